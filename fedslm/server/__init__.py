"""What runs on the coordinator (the ServerApp in server/app.py calls `run.run_server`).

- `run`: the server's run as named steps: setup, round 0, rounds, outputs;
- `strategy`: the Flower strategy: site sampling, reply checks, LoRA-aware aggregation;
- `optimisers`: Flower's server optimisers (FedAvgM, FedAdam, FedYogi) by name;
- `reply_checks`: what a reply must pass before it can touch the global adapter;
- `record`: the run record; `outputs`: the writers that show and store it;
- `checkpoint`: the per-round checkpoint and `resume=true`;
- `evaluation`: the server's own per-round held-out evaluation.

Nothing here imports fedslm.site: the two sides meet only in Flower messages.
"""
