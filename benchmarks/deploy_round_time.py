"""Seconds per round, deployment vs simulation, for the same config; and what one ClientApp
process costs before it trains (in deployment Flower starts one per message).

    .venv/bin/python -m benchmarks.deploy_round_time [--rounds 3] [--model tiny|embedded]

Deployment: SuperLink (TLS, node auth) + one SuperNode per site on 127.0.0.1 via `flwr
run` (fedslm.deploy.loopback). Simulation: simulations.simulate.simulate, whose Ray actors keep the
model loaded between rounds.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fedslm.config.pyproject import pyproject_table
from fedslm.config import ModelConfig, from_run_config, validate
from fedslm.deploy.loopback import Loopback, run_config_string
from fedslm.model import resolve_model_dir

STARTUP = """
import time, sys
t0 = time.perf_counter()
import client.app  # what a ClientApp process imports
from fedslm.model import load_base_model
t1 = time.perf_counter()
load_base_model(__import__("pathlib").Path(sys.argv[1]))
t2 = time.perf_counter()
print(f"{t1 - t0:.2f} {t2 - t1:.2f}")
"""


def client_startup(model_dir: Path, repeats: int = 3) -> tuple[float, float, float]:
    """(python + imports, model load from the safetensors cache, whole process) in seconds, median."""
    rows = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", STARTUP, str(model_dir)], capture_output=True, text=True, check=True)
        imports, load = map(float, out.stdout.split()[-2:])
        rows.append((imports, load, time.perf_counter() - t))
    return tuple(sorted(r[i] for r in rows)[len(rows) // 2] for i in range(3))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sites", type=int, default=2)
    ap.add_argument("--model", choices=["tiny", "embedded"], default="tiny")
    args = ap.parse_args()

    root = Path(tempfile.mkdtemp(prefix="fedslm-deploy-bench-"))
    cache = root / "models"
    model_dir = resolve_model_dir(ModelConfig(source=args.model, cache_dir=str(cache)))
    values = {"model.source": args.model, "model.cache_dir": str(cache), "federation.sites": args.sites,
              "federation.rounds": args.rounds, "train.local_steps": 3, "train.batch_size": 4,
              "data.train_examples": 48, "data.eval_examples": 8, "train.progress": False, "export_model": False,
              "federation.ray_cpus": args.sites}
    if args.model == "tiny":
        values["data.max_length"] = 512

    flat = dict(pyproject_table())
    flat.update(values, output_dir=str(root / "sim"))
    from simulations.simulate import simulate

    sim = simulate(validate(from_run_config(flat)), echo=lambda *_: None)

    lb = Loopback(root / "deploy", sites=args.sites)
    try:
        lb.start_federation()
        res = lb.run(run_config_string({**values, "output_dir": str(root / "dep")}), timeout=1800)
        if res.returncode != 0:
            raise SystemExit(res.stdout[-3000:] + res.stderr[-2000:])
    finally:
        lb.stop()
    dep = json.loads((root / "dep" / "summary.json").read_text())
    imports, load, process = client_startup(model_dir)

    print(f"model {args.model}, {args.sites} sites, {args.rounds} rounds, 3 DP steps of 4 examples per site and round")
    print(f"simulation  seconds per round: {sim['seconds_per_round']}  mean {_mean(sim['seconds_per_round']):.1f}")
    print(f"deployment  seconds per round: {dep['seconds_per_round']}  mean {_mean(dep['seconds_per_round']):.1f}")
    print(f"ClientApp process start-up (median of 3): python + imports {imports:.1f}s, model load {load:.2f}s, "
          f"whole process {process:.1f}s; a deployed round pays it twice per site (train, evaluate)")


def _mean(xs) -> float:
    return sum(xs) / len(xs)


if __name__ == "__main__":
    main()
