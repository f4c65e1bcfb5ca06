"""Base SmolLM2-135M vs the federated DP model on held-out PubMedQA and BANKING77, plus the
export checks (merge parity, fp16 vs int8 size and loss).

    .venv/bin/python -m benchmarks.federated_eval [--rounds 3 --local-steps 3 --limit 200]

Each data set runs the default DP federation of its preset (`privacy=dp`: target epsilon
8, FFA-LoRA on q and v; PubMedQA: 3 IID sites, BANKING77: 7 branches) and is scored with
`fedslm evaluate --task choice` on the held-out rows the sites kept back (each option's
log-likelihood after the prompt: yes/no/maybe, or the 77 intent names), base model and
federated model on the same rows. The figures in the README come from this script.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from fedslm import quiet
from fedslm.use.eval_data import eval_set
from fedslm.use.evaluate import evaluate_dir
from fedslm.use.export import export_run
from fedslm.config.compose import compose_run_config
from fedslm.model import resolve_model_dir
from simulations.simulate import simulate

SHARED = Path(__file__).resolve().parents[1] / "../shared/data"


def federate_and_score(name: str, args, out: Path) -> dict:
    run_dir = out / name
    cfg = compose_run_config([f"data={name}", f"output_dir={run_dir}", f"federation.rounds={args.rounds}",
                              f"train.local_steps={args.local_steps}", "train.progress=false", "demo_answer=false",
                              *args.override])
    t0 = time.perf_counter()
    summary = simulate(cfg, echo=print)
    fed_seconds = time.perf_counter() - t0
    es = eval_set(cfg, "eval", args.limit)
    print(f"{name}: scoring {len(es.examples)} held-out examples, {len(es.options)} options", flush=True)
    base = evaluate_dir(resolve_model_dir(cfg.model), es, "choice", cfg.data.max_length)
    tuned = evaluate_dir(run_dir / "model", es, "choice", cfg.data.max_length)
    return {"data": name, "sites": cfg.federation.sites, "rounds": cfg.federation.rounds,
            "local_steps": cfg.train.local_steps, "batch": cfg.train.batch_size, "epsilon": summary["epsilon"],
            "target_epsilon": cfg.privacy.epsilon, "examples": len(es.examples), "options": len(es.options),
            "base_accuracy": base["accuracy"], "fed_accuracy": tuned["accuracy"],
            "base_macro_f1": base["macro_f1"], "fed_macro_f1": tuned["macro_f1"],
            "eval_loss_initial": summary["eval_loss_initial"], "eval_loss_final": summary["eval_loss_final"],
            "federation_seconds": round(fed_seconds, 1), "merge_max_abs_diff": summary.get("merge_max_abs_diff"),
            "run_dir": str(run_dir)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", nargs="+", default=["pubmedqa", "banking77"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--local-steps", type=int, default=3)
    p.add_argument("--limit", type=int, default=200, help="held-out examples scored per data set")
    p.add_argument("--int8-from", default="banking77", help="which run to export as fp16 + int8")
    p.add_argument("--out", default=None)
    p.add_argument("--override", nargs="*", default=[], help="extra Hydra overrides for every federation")
    args = p.parse_args()
    quiet.silence_known_noise()
    out = Path(args.out or tempfile.mkdtemp(prefix="fedslm-eval-bench-"))
    missing = [d for d in args.data if not (SHARED / d).is_dir()]
    if missing:
        raise SystemExit(f"../shared/data/{missing[0]} is not here; this benchmark needs the shared data sets")

    rows = [federate_and_score(name, args, out) for name in args.data]
    export = None
    if args.int8_from in args.data:
        t0 = time.perf_counter()
        export = export_run(out / args.int8_from, out / f"{args.int8_from}-export", dtype="fp16", int8=True)
        export["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "federated_eval.json").write_text(json.dumps({"rows": rows, "export": export}, indent=2, default=str))

    print("\n| data | sites x rounds x steps (batch) | epsilon | held-out | options | base accuracy | federated DP accuracy | macro-F1 base / fed | held-out loss base -> fed |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['data']} | {r['sites']} x {r['rounds']} x {r['local_steps']} ({r['batch']}) | {r['epsilon']:.2f} "
              f"(target {r['target_epsilon']:g}) | {r['examples']} | {r['options']} | {100 * r['base_accuracy']:.1f}% | "
              f"{100 * r['fed_accuracy']:.1f}% | {r['base_macro_f1']:.3f} / {r['fed_macro_f1']:.3f} | "
              f"{r['eval_loss_initial']:.3f} -> {r['eval_loss_final']:.3f} |")
    for r in rows:
        print(f"{r['data']}: federation {r['federation_seconds']:.0f}s, merge parity (fp32) {r['merge_max_abs_diff']:.2e}")
    if export:
        q = export["int8"]
        print(f"export of {args.int8_from} ({export['seconds']:.0f}s): merge parity {export['merge_max_abs_diff']:.2e}, "
              f"fp16 copy {export['dtype_max_abs_diff']:.2e}; fp16 {q['fp16_bytes'] / 1e6:.0f} MB vs int8 "
              f"{q['int8_bytes'] / 1e6:.0f} MB; held-out answer loss fp16 {q['fp16_loss']:.4f} vs int8 "
              f"{q['int8_loss']:.4f} ({q['examples']} examples)")
    print(f"results in {out / 'federated_eval.json'}")


if __name__ == "__main__":
    main()
