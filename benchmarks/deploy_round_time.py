"""Seconds per round, deployment vs simulation, side by side in one run, for the demo's
training (3 sites, 3 rounds, 3 DP steps of batch 8 on 400 rows each) with the tiny model
and the embedded SmolLM2.

    .venv/bin/python -m benchmarks.deploy_round_time [--model tiny|embedded|both] [--rounds 3]

Deployment: SuperLink (TLS, node auth) + per site a SuperNode in process isolation and
its `fedslm site` worker (signed app, warm app host), `flwr run` on 127.0.0.1
(fedslm.deploy.loopback); each site reads its own training and held-out files, of the
sizes of the simulated partitions. Simulation: simulations.simulate.simulate (Ray actors).
Writes benchmarks/results/deploy_round_time.json (_tiny.json for --model tiny); the last line is the larger ratio.
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


def measure(model: str, rounds: int, root: Path) -> dict:
    cache = root / "models"
    resolve_model_dir(ModelConfig(source=model, cache_dir=str(cache)))
    table = {k: v for k, v in pyproject_table().items() if k != "app-signature"}
    values = {"model.source": model, "model.cache_dir": str(cache), "federation.rounds": rounds,
              "train.progress": False, "export_model": False}
    flat = table | values
    sites, train, held_out = flat["federation.sites"], flat["data.train_examples"], flat["data.eval_examples"]

    from simulations.simulate import simulate

    t = time.perf_counter()
    sim = simulate(validate(from_run_config(flat | {"output_dir": str(root / f"sim-{model}")})), echo=lambda *_: None)
    sim_wall = time.perf_counter() - t

    # each site's own training file and held-out file, of the simulated partitions' sizes
    lb = Loopback(root / f"deploy-{model}", sites=sites, site_examples=train, site_eval_examples=held_out)
    lb.cache = cache
    try:
        lb.start_federation()
        t = time.perf_counter()
        res = lb.run(run_config_string(values | {"output_dir": str(root / f"dep-{model}")}), timeout=3600)
        dep_wall = time.perf_counter() - t
        if res.returncode != 0:
            raise SystemExit(res.stdout[-3000:] + res.stderr[-2000:])
    finally:
        lb.stop()
    dep = json.loads((root / f"dep-{model}" / "summary.json").read_text())
    row = {
        "model": model, "sites": sites, "rounds": rounds, "train_examples_per_site": train,
        "simulated_seconds_per_round": sim["seconds_per_round"], "deployed_seconds_per_round": dep["seconds_per_round"],
        "simulated_mean": round(_mean(sim["seconds_per_round"]), 2), "deployed_mean": round(_mean(dep["seconds_per_round"]), 2),
        "simulated_wall_s": round(sim_wall, 1), "deployed_wall_s": round(dep_wall, 1),
    }
    row["ratio"] = round(row["deployed_mean"] / row["simulated_mean"], 2)
    print(f"{model}: simulated {row['simulated_seconds_per_round']} s/round (mean {row['simulated_mean']:.1f}), "
          f"deployed {row['deployed_seconds_per_round']} s/round (mean {row['deployed_mean']:.1f}): "
          f"ratio {row['ratio']:.2f}", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=["tiny", "embedded", "both"], default="both")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    models = ["tiny", "embedded"] if args.model == "both" else [args.model]
    root = Path(tempfile.mkdtemp(prefix="fedslm-deploy-bench-"))
    rows = [measure(m, args.rounds, root) for m in models]
    out = {"command": "python -m benchmarks.deploy_round_time" + ("" if args.model == "both" else f" --model {args.model}"),
           "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores",
           "rows": rows, "ratio": max(r["ratio"] for r in rows)}
    path = RESULTS if args.model == "both" else RESULTS.with_name(f"deploy_round_time_{args.model}.json")
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")
    print(f"deployed/simulated seconds per round: {out['ratio']:.2f}")


if __name__ == "__main__":
    main()
