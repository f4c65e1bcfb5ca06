"""Seconds per round, deployment vs simulation, side by side in one run, for the demo's
training (3 sites, 3 rounds, 3 DP steps of batch 8 on 400 rows each) with the tiny model
and the embedded SmolLM2.

    .venv/bin/python -m benchmarks.deploy_round_time [--model tiny|embedded|both] [--rounds 3] [--repeats N]

Deployment: SuperLink (TLS, node auth) + per site a SuperNode in process isolation and
its `fedslm site` worker (signed app, warm app host), `flwr run` (submitted, not streamed)
on 127.0.0.1 (fedslm.deploy.loopback); each site reads its own training and held-out files, of the
sizes of the simulated partitions. Simulation: simulations.simulate.simulate (Ray actors).
Writes benchmarks/results/deploy_round_time.json (_tiny.json or _embedded.json for --model tiny|embedded); the last line is the larger ratio.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

from fedslm.config import ModelConfig, from_run_config, validate
from fedslm.config.pyproject import pyproject_table
from fedslm.deploy.loopback import Loopback, run_config_string
from fedslm.model import resolve_model_dir

RESULTS = Path(__file__).resolve().parent / "results" / "deploy_round_time.json"


def _mean(xs) -> float:
    return sum(xs) / len(xs)


def measure(model: str, rounds: int, root: Path, repeats: int = 1) -> dict:
    """`repeats` pairs (a simulated run, then a deployed one on a fresh federation), one
    after the other: the ratio is over every round of every pair. A 3-round run of the tiny
    model lasts seconds, and which site waits for a free Ray actor, the Poisson batch sizes
    and the machine's other work move one run's mean by half; pairs average that out."""
    cache = root / "models"
    resolve_model_dir(ModelConfig(source=model, cache_dir=str(cache)))
    table = {k: v for k, v in pyproject_table().items() if k != "app-signature"}
    values = {"model.source": model, "model.cache_dir": str(cache), "federation.rounds": rounds,
              "train.progress": False, "export_model": False}
    flat = table | values
    sites, train, held_out = flat["federation.sites"], flat["data.train_examples"], flat["data.eval_examples"]

    from simulations.simulate import simulate

    sim_rounds: list[float] = []
    dep_rounds: list[float] = []
    sim_wall = dep_wall = 0.0
    for i in range(repeats):
        t = time.perf_counter()
        sim = simulate(validate(from_run_config(flat | {"output_dir": str(root / f"sim-{model}-{i}")})),
                       echo=lambda *_: None)
        sim_wall += time.perf_counter() - t
        sim_rounds += sim["seconds_per_round"]

        # each site's own training file and held-out file, of the simulated partitions' sizes
        lb = Loopback(root / f"deploy-{model}-{i}", sites=sites, site_examples=train, site_eval_examples=held_out)
        lb.cache = cache
        out = root / f"dep-{model}-{i}"
        try:
            lb.start_federation()
            t = time.perf_counter()
            # submitted without --stream: an operator's CLI following the log is not part of
            # the federation, and on these 2 cores it would take CPU from the sites
            status = lb.run_unwatched(run_config_string(values | {"output_dir": str(out)}), out / "summary.json", 3600)
            dep_wall += time.perf_counter() - t
        finally:
            lb.stop()
        if status != "finished:completed":
            raise SystemExit(f"the deployed run ended {status}; logs in {lb.root}")
        dep_rounds += json.loads((out / "summary.json").read_text())["seconds_per_round"]
        print(f"{model} pair {i + 1}/{repeats}: simulated {sim['seconds_per_round']} s/round, deployed "
              f"{dep_rounds[-rounds:]} s/round", flush=True)
    row = {
        "model": model, "sites": sites, "rounds": rounds, "pairs": repeats, "train_examples_per_site": train,
        "simulated_seconds_per_round": sim_rounds, "deployed_seconds_per_round": dep_rounds,
        "simulated_mean": round(_mean(sim_rounds), 2), "deployed_mean": round(_mean(dep_rounds), 2),
        "simulated_wall_s": round(sim_wall, 1), "deployed_wall_s": round(dep_wall, 1),
    }
    row["ratio"] = round(row["deployed_mean"] / row["simulated_mean"], 2)
    print(f"{model}: simulated mean {row['simulated_mean']:.2f} s/round, deployed mean {row['deployed_mean']:.2f} "
          f"s/round over {repeats} pair(s) of {rounds} rounds: ratio {row['ratio']:.2f}", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=["tiny", "embedded", "both"], default="both")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=None,
                    help="simulated/deployed pairs per model (default: 5 for tiny, 1 for embedded)")
    args = ap.parse_args()
    models = ["tiny", "embedded"] if args.model == "both" else [args.model]
    root = Path(tempfile.mkdtemp(prefix="fedslm-deploy-bench-"))
    rows = [measure(m, args.rounds, root, args.repeats or (5 if m == "tiny" else 1)) for m in models]
    out = {"command": "python -m benchmarks.deploy_round_time" + ("" if args.model == "both" else f" --model {args.model}")
           + (f" --repeats {args.repeats}" if args.repeats else ""),
           "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores",
           "rows": rows, "ratio": max(r["ratio"] for r in rows)}
    path = RESULTS if args.model == "both" else RESULTS.with_name(f"deploy_round_time_{args.model}.json")
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")
    print(f"deployed/simulated seconds per round: {out['ratio']:.2f}")


if __name__ == "__main__":
    main()
