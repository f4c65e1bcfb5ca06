"""kill -9 soak on loopback: a deployed run of N rounds while the SuperLink, a SuperNode or
a site worker (with its app host) is killed at random moments. A killed SuperLink is
restarted on the same database and the run resumed (`resume=true`); a killed SuperNode is
restarted with the same state dir; a killed site worker is restarted at once (a supervisor
would), and its new app host picks up the run from the site's disk.
At the end every site's lifetime ledger is reconciled with what the site really did:

- no round counted twice (the ledger's trained rounds are distinct),
- none missed (every round whose reply the coordinator received is in the site's ledger),
- the ledger's epsilon equals what the accountant composes from those rounds' steps.

    .venv/bin/python -m benchmarks.deploy_soak [--rounds 10] [--kills 4] [--seed 0]

Prints the figures and writes them to benchmarks/results/deploy_soak_seed<SEED>.json.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

from fedslm.config import ModelConfig
from fedslm.config.pyproject import pyproject_table
from fedslm.deploy.loopback import Loopback, run_config_string, wait_for
from fedslm.model import resolve_model_dir
from fedslm.privacy.accounting import PrivacyLedger
from fedslm.server.checkpoint import Checkpoint

LOCAL_STEPS = 2


def rounds_saved(out: Path) -> int:
    try:
        return Checkpoint.load(out).server_round
    except FileNotFoundError:
        return 0


def reconcile(lb: Loopback, site: int, out: Path, run_key: str, delta: float) -> dict:
    (ledger_file,) = (lb.root / f"site-{site}-state").glob("ledger-*.json")
    ledger = json.loads(ledger_file.read_text())
    trained = ledger["trained"].get(run_key, [])
    history = [tuple(h) for h in ledger["runs"].get(run_key, [])]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    replied = sorted(r["round"] for r in rows if r["site"] == site and r["epsilon"] is not None)
    # what the accountant composes from the rounds the site trained: one entry per round
    # (noise multiplier and sampling rate are the same every round of a run)
    sigma, q = history[0][0], history[0][1]
    recomposed = PrivacyLedger([(sigma, q, LOCAL_STEPS)] * len(set(trained))).epsilon(delta)
    return {
        "site": site,
        "rounds_trained": sorted(trained),
        "rounds_replied": replied,
        "counted_twice": len(trained) - len(set(trained)),
        "missed": sorted(set(replied) - set(trained)),
        "trained_no_reply": sorted(set(trained) - set(replied)),
        "ledger_steps": PrivacyLedger(history).steps,
        "epsilon_ledger": PrivacyLedger(history).epsilon(delta),
        "epsilon_recomposed": recomposed,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--kills", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)

    root = Path(tempfile.mkdtemp(prefix="fedslm-soak-"))
    cache = root / "models"
    resolve_model_dir(ModelConfig(source="tiny", cache_dir=str(cache)))
    lb = Loopback(root / "deploy", sites=2)
    lb.cache = cache
    out = root / "run"
    values = dict(pyproject_table()) | {
        "model.source": "tiny", "model.cache_dir": str(cache), "data.max_length": 512, "federation.sites": 2,
        "federation.rounds": args.rounds, "federation.min_sites": 2, "federation.timeout_s": 60.0,
        "train.local_steps": LOCAL_STEPS, "train.batch_size": 4, "train.progress": False, "export_model": False,
        "output_dir": str(out),
    }
    kills: list[dict] = []
    runs = 0
    started = time.time()
    try:
        lb.start_federation()
        while True:
            runs += 1
            # resume what was saved; a coordinator killed before its first checkpoint starts over
            run = lb.run_async(run_config_string(values | {"resume": rounds_saved(out) > 0}))
            link_killed = False
            while len(kills) < args.kills and run.alive():
                deadline = time.time() + rng.uniform(10, 45)
                while time.time() < deadline and run.alive():
                    time.sleep(0.5)
                if not run.alive():
                    break
                victim = rng.choice(["superlink", "site-0", "site-1", "worker-0", "worker-1"])
                kills.append({"what": victim, "after_round": rounds_saved(out), "at_s": round(time.time() - started)})
                print(f"kill -9 {victim} after round {kills[-1]['after_round']}", flush=True)
                if victim == "superlink":
                    lb.link.kill()
                    wait_for(lambda: not run.alive(), 120, "flwr run to notice")
                    lb.start_link()
                    link_killed = True
                    break
                site = int(victim[-1])
                if victim.startswith("worker"):
                    lb.workers[site].kill()  # the worker and the app host it started
                    lb.start_worker(site)
                    continue
                lb.nodes[site].kill()
                kills[-1]["node_starts"] = lb.restart_node(site)
            if link_killed:
                continue
            wait_for(lambda: not run.alive(), 1800, "the run to end")
            summary = out / "summary.json"
            if summary.exists() and json.loads(summary.read_text()).get("rounds") == args.rounds:
                break
            if runs > args.kills + 3:
                raise SystemExit(f"the run did not complete after {runs} attempts:\n{run.text()[-3000:]}")
    finally:
        lb.stop()

    ckpt = Checkpoint.load(out)
    sites = [reconcile(lb, s, out, ckpt.run_key, 1e-5) for s in (0, 1)]
    result = {
        "rounds": args.rounds, "rounds_completed": ckpt.server_round, "flwr_runs": runs, "kills": kills,
        "wall_s": round(time.time() - started, 1), "sites": sites,
        "reconciled": all(s["counted_twice"] == 0 and not s["missed"]
                          and abs(s["epsilon_ledger"] - s["epsilon_recomposed"]) < 1e-9 for s in sites),
    }
    for k in kills:
        print(f"killed {k['what']} after round {k['after_round']} (t={k['at_s']}s)")
    print(f"rounds completed: {ckpt.server_round}/{args.rounds} in {runs} flwr runs, {result['wall_s']}s")
    for s in sites:
        print(f"site {s['site']}: trained {len(s['rounds_trained'])} rounds, replies received {len(s['rounds_replied'])}, "
              f"counted twice {s['counted_twice']}, missed {s['missed']}, epsilon ledger {s['epsilon_ledger']:.4f} "
              f"vs recomposed {s['epsilon_recomposed']:.4f}")
    print(f"reconciled: {result['reconciled']}")
    dest = Path(__file__).parent / "results" / f"deploy_soak_seed{args.seed}.json"
    dest.parent.mkdir(exist_ok=True)
    dest.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
