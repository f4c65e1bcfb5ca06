"""What runs at a site (the ClientApp in client/app.py calls `handlers`).

- `handlers`: a train or evaluate message in, adapter tensors and metrics out;
- `runtime`: the per-process model, wrappers and tokenised data, built once;
- `ledger`: where the site keeps its privacy ledger on its own disk;
- `train`: the one local training loop; `evaluate`: held-out evaluation.

Nothing here imports fedslm.server: the two sides meet only in Flower messages.
"""
