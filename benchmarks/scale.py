"""Simulated federations of many sites on one small machine: seconds per round, peak
memory and Ray actors, for 10, 100 and 1,000 sites.

    .venv/bin/python -m benchmarks.scale [--sites 10,100,1000] [--rounds 3] [--per-round 10]

Tiny random Llama, DP on (grad_sample_mode=lora), FFA, 10 sites sampled to train and 10
to evaluate per round, 3 rounds. Each federation runs in a fresh process (its own Ray);
this process samples that process tree every 0.2 s for the peak resident memory (sum over
the server, the Ray workers and their actors) and the number of ClientApp actors. Ray
gets `ray_cpus` = the core count and one CPU per site, so at most that many actors
exist; a site is a partition id handed to an actor, not a process, and its data is built
when it is first asked, so memory follows the sites that ever trained, not the sites
that exist.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil


def federation(sites: int, rounds: int, per_round: int, out: str) -> None:
    """One simulated federation (runs in the child process)."""
    from fedslm.config.compose import compose_run_config
    from simulations.simulate import simulate

    cores = os.cpu_count() or 1
    cfg = compose_run_config([
        "model=tiny", f"federation.sites={sites}", f"federation.rounds={rounds}",
        f"federation.sites_per_round={per_round}", f"federation.fraction_evaluate={per_round / sites}",
        f"federation.min_sites={per_round}", f"federation.ray_cpus={cores}", "federation.cpus_per_site=1",
        "data.train_examples=64", "data.eval_examples=8", "train.local_steps=2", "train.progress=false",
        "privacy.epsilon=50", "export_model=false", "demo_answer=false", f"output_dir={out}",
    ])
    simulate(cfg, echo=lambda *a, **k: None)


def _watch(proc: subprocess.Popen, stats: dict, stop: threading.Event) -> None:
    root = psutil.Process(proc.pid)
    while not stop.is_set():
        try:
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        rss, actors = 0, 0
        for p in tree:
            try:
                rss += p.memory_info().rss
                actors += "ClientAppActor" in " ".join(p.cmdline())
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        stats["peak_rss"] = max(stats["peak_rss"], rss)
        stats["max_actors"] = max(stats["max_actors"], actors)
        stop.wait(0.2)


def measure(sites: int, rounds: int, per_round: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "benchmarks.scale", "--child", str(sites),
                                 "--rounds", str(rounds), "--per-round", str(per_round), "--out", out],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        stats, stop = {"peak_rss": 0, "max_actors": 0}, threading.Event()
        watcher = threading.Thread(target=_watch, args=(proc, stats, stop), daemon=True)
        watcher.start()
        _, err = proc.communicate()
        stop.set()
        watcher.join()
        wall = time.perf_counter() - start
        summary_path = Path(out) / "summary.json"
        if proc.returncode or not summary_path.exists():
            raise RuntimeError(f"{sites} sites: federation failed:\n{err[-3000:]}")
        summary = json.loads(summary_path.read_text())
    per_round_s = summary.get("seconds_per_round") or []
    return {"sites": sites, "wall_s": wall, "seconds_per_round": per_round_s,
            "peak_rss_mib": stats["peak_rss"] / 2**20, "max_actors": stats["max_actors"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sites", default="10,100,1000")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--per-round", type=int, default=10)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        federation(args.child, args.rounds, args.per_round, args.out)
        return
    print(f"{os.cpu_count()} cores; tiny Llama, DP, {args.per_round} sites train and evaluate per round, "
          f"{args.rounds} rounds", flush=True)
    print(f"{'sites':>6}{'s/round (rounds 1..)':>28}{'mean s/round':>14}{'wall s':>9}{'peak RSS MiB':>14}{'actors':>8}")
    for n in (int(s) for s in args.sites.split(",")):
        m = measure(n, args.rounds, args.per_round)
        rounds = m["seconds_per_round"]
        shown = " ".join(f"{s:.1f}" for s in rounds)
        mean = sum(rounds) / len(rounds) if rounds else float("nan")
        print(f"{n:>6}{shown:>28}{mean:>14.2f}{m['wall_s']:>9.1f}{m['peak_rss_mib']:>14.0f}{m['max_actors']:>8}",
              flush=True)


if __name__ == "__main__":
    main()
