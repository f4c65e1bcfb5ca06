"""Utility under DP, side by side on the same held-out rows: base model, central non-DP
LoRA, federated non-DP, federated DP at epsilon 8 and 2, and each site alone with DP.

    .venv/bin/python -m benchmarks.utility                 # the whole benchmark
    .venv/bin/python -m benchmarks.utility --quick         # a smoke-sized run (minutes)
    .venv/bin/python -m benchmarks.utility --data banking77 --recipe "train.local_epochs=2"

Data (../shared/data; the benchmark stops if it is absent):
- BANKING77: held-out rows carved from the shared training file, stratified by label
  (13 per intent, 1,001 rows; --quick: 2 per intent), which no site ever sees; the rest
  is split into the 7 natural branches (one site per `group`), every row trained on.
- PubMedQA: k-fold cross-validation over its 500 rows (5 folds; --folds N runs the
  first N of them; --quick: 1 fold of a smaller slice), 3 IID sites; each fold's
  held-out rows are scored by every row below.

Every federated row runs the recipe (`--recipe`, Hydra overrides on top of each data
preset; the same for every row, privacy aside) through Flower's simulation engine and is
scored with fedslm evaluate's choice task (the option with the highest log-likelihood)
and, for BANKING77, greedy generation's exact match on the first --gen-rows held-out rows.
Accuracy and macro-F1 carry 95% bootstrap intervals over the held-out rows. The central
row trains one site on all training rows with the same recipe and token budget; the
site-alone rows train each site (--alone-sites of them) on its own rows with DP: the floor
the federation must beat. Writes utility.json (utility-DATA.json for one data set,
-Nof5 for --folds N, -quick for --quick) and prints the table the README shows.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import tempfile
import time
from collections import defaultdict
from datetime import date
from pathlib import Path

from fedslm import quiet
from fedslm.use.scoring import macro_f1

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"

# The recipe the defaults are measured with: every row of each site in logical batches of 64
# (physical 16), one epoch a round over 3 rounds, LoRA on the top 4 layers (the frozen
# prefix cached per site), the loss on the label, the PRV accountant.
RECIPE = ["federation.rounds=3", "train.local_epochs=1", "train.batch_size=64", "train.max_physical_batch=16",
          "lora.layers=4", "federation.eval_every=100", "federation.eval_limit=8", "data.eval_fraction=0.02",
          "train.progress=false", "demo_answer=false", "export_model=true"]
PER_DATA = {"banking77": ["warm_start.data=labels"], "pubmedqa": []}


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _read(path: Path) -> list[dict]:
    # JSON Lines ends records at "\n" only: str.splitlines() also splits at U+2028 and
    # other separators that PubMedQA's abstracts hold inside their strings
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]


def banking77_split(tmp: Path, per_label: int, seed: int = 0) -> list[tuple[Path, Path]]:
    """One (train file, held-out file) pair: per_label rows of each intent held out."""
    rows, rng = _read(SHARED / "banking77" / "train.jsonl"), random.Random(seed)
    by_label = defaultdict(list)
    for i, r in enumerate(rows):
        by_label[r["label"]].append(i)
    held = {i for ids in by_label.values() for i in rng.sample(ids, min(per_label, len(ids) - 1))}
    return [(_write(tmp / "banking77-train.jsonl", [r for i, r in enumerate(rows) if i not in held]),
             _write(tmp / "banking77-heldout.jsonl", [r for i, r in enumerate(rows) if i in held]))]


def pubmedqa_folds(tmp: Path, folds: int, use: int, rows_cap: int, seed: int = 0) -> list[tuple[Path, Path]]:
    rows = _read(SHARED / "pubmedqa" / "train.jsonl")
    random.Random(seed).shuffle(rows)
    rows = rows[:rows_cap] if rows_cap else rows
    out = []
    for k in range(use):
        held = rows[k::folds]
        train = [r for i, r in enumerate(rows) if i % folds != k]
        out.append((_write(tmp / f"pubmedqa-train-{k}.jsonl", train), _write(tmp / f"pubmedqa-heldout-{k}.jsonl", held)))
    return out


def bootstrap(preds: list[str], golds: list[str], reps: int = 1000, seed: int = 0) -> dict:
    """Accuracy and macro-F1 with 95% percentile intervals over resampled held-out rows."""
    rng, n = random.Random(seed), len(golds)
    acc = sum(p == g for p, g in zip(preds, golds)) / n
    accs, f1s = [], []
    for _ in range(reps):
        idx = [rng.randrange(n) for _ in range(n)]
        p, g = [preds[i] for i in idx], [golds[i] for i in idx]
        accs.append(sum(a == b for a, b in zip(p, g)) / n)
        f1s.append(macro_f1(p, g))
    accs.sort(), f1s.sort()
    lo, hi = int(0.025 * reps), int(0.975 * reps) - 1
    return {"accuracy": acc, "accuracy_ci": [accs[lo], accs[hi]], "macro_f1": macro_f1(preds, golds),
            "macro_f1_ci": [f1s[lo], f1s[hi]]}


def score(model_dir: Path, heldout_cfg, gen_rows: int) -> dict:
    from fedslm.use.chat import load_model_dir
    from fedslm.use.eval_data import eval_set
    from fedslm.use.evaluate import choice, generation

    model, tok = load_model_dir(model_dir)
    es = eval_set(heldout_cfg, "all")
    start = time.perf_counter()
    out = choice(model, tok, es)
    per_question = (time.perf_counter() - start) / len(es.examples)
    result = {**bootstrap(out["predictions"], es.golds), "held_out": len(es.examples), "options": len(es.options),
              "score_seconds_per_question": round(per_question, 3)}
    if gen_rows:
        es.examples, es.golds = es.examples[:gen_rows], es.golds[:gen_rows]
        result["generation_exact_match"] = generation(model, tok, es, max_new_tokens=16)["exact_match"]
    return result


def federate(name: str, overrides: list[str], out: Path) -> dict:
    from fedslm.config.compose import compose_run_config
    from simulations.simulate import simulate

    cfg = compose_run_config([*overrides, f"output_dir={out / name}"])
    start = time.perf_counter()
    summary = simulate(cfg, echo=lambda line: print(f"  [{name}] {line}", flush=True))
    rounds = max(1, summary["rounds"])
    return {"epsilon": summary["epsilon"] if cfg.privacy.enabled else None,
            "bytes_per_round": (summary["bytes_up"] + summary["bytes_down"]) / rounds,
            "wall_seconds": round(time.perf_counter() - start, 1), "model_dir": out / name / "model"}


def one_split(data: str, train: Path, heldout: Path, args, out: Path) -> list[dict]:
    from fedslm.config.compose import compose_run_config
    from fedslm.data.sites import site_rows
    from fedslm.model import resolve_model_dir

    out.mkdir(parents=True, exist_ok=True)  # the site-alone rows write here even when no federated row ran
    preset = [f"data={data}", f"data.path={train}", *RECIPE, *PER_DATA[data], *args.recipe]
    if args.per_site:
        preset.append(f"data.max_examples={args.per_site}")
    heldout_cfg = compose_run_config([f"data={data}", f"data.path={heldout}"])
    gen_rows = args.gen_rows if data == "banking77" else 0
    rows = []

    def add(label: str, run: dict | None, model_dir: Path) -> None:
        print(f"{data}: scoring {label}", flush=True)
        # the model's directory is this run's scratch space: not a figure, and not kept
        figures = {k: v for k, v in (run or {}).items() if k != "model_dir"}
        rows.append({"data": data, "row": label, **figures, **score(model_dir, heldout_cfg, gen_rows)})
        print(f"  {label}: accuracy {rows[-1]['accuracy']:.3f} macro-F1 {rows[-1]['macro_f1']:.3f}", flush=True)

    sites = compose_run_config(preset).federation.sites
    add("base model", None, resolve_model_dir(heldout_cfg.model))
    # privacy=none's lr, on the same trainable values as the DP rows
    nodp = ["privacy=none", "lora.target_modules=[q_proj,v_proj]"]
    # the same rows in one place: --quick's per-site cap times the sites
    pooled = [f"data.max_examples={args.per_site * sites}"] if args.per_site else []
    if "central" not in args.skip:
        run = federate("central", [*preset, *nodp, "federation.sites=1", "data.partitioner=iid", *pooled], out)
        add("central, no DP", run, run["model_dir"])
    if "federated" not in args.skip:
        run = federate("fed-nodp", [*preset, *nodp], out)
        add("federated, no DP", run, run["model_dir"])
        for eps in args.epsilons:
            run = federate(f"fed-dp{eps:g}", [*preset, f"privacy.epsilon={eps}"], out)
            add(f"federated, DP epsilon {eps:g}", run, run["model_dir"])
    alone = []
    cfg = compose_run_config(preset)
    for s in range(min(args.alone_sites, sites)):
        own = site_rows(cfg.data, s, sites)
        path = _write(out / f"{data}-site{s}.jsonl", [dict(r) for r in own.train] + [dict(r) for r in own.eval])
        run = federate(f"alone-{s}", [*preset, f"data.path={path}", "federation.sites=1", "data.partitioner=iid",
                                      f"privacy.epsilon={args.epsilons[0]}"], out)
        add(f"site {s} alone, DP epsilon {args.epsilons[0]:g}", run, run["model_dir"])
        alone.append(rows.pop())
    if alone:
        keys = ("accuracy", "macro_f1", "generation_exact_match", "epsilon", "bytes_per_round", "wall_seconds")
        mean = {k: sum(r[k] for r in alone) / len(alone) for k in keys if k in alone[0] and alone[0][k] is not None}
        rows.append({"data": data, "row": f"each site alone, DP epsilon {args.epsilons[0]:g} (mean of {len(alone)})",
                     **mean, "accuracy_ci": [min(r["accuracy"] for r in alone), max(r["accuracy"] for r in alone)],
                     "macro_f1_ci": [min(r["macro_f1"] for r in alone), max(r["macro_f1"] for r in alone)],
                     "held_out": alone[0]["held_out"], "per_site": alone})
    return rows


def merge_folds(fold_rows: list[list[dict]]) -> list[dict]:
    """Cross-validation: each row's figures averaged over folds (intervals: their mean)."""
    if len(fold_rows) == 1:
        return fold_rows[0]
    merged = []
    for same in zip(*fold_rows):
        row = dict(same[0])
        for k, v in same[0].items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and all(r.get(k) is not None for r in same):
                row[k] = sum(r[k] for r in same) / len(same)
            elif isinstance(v, list) and len(v) == 2 and all(isinstance(x, float) for x in v):
                row[k] = [sum(r[k][i] for r in same) / len(same) for i in (0, 1)]
        row["folds"] = len(same)
        row["held_out"] = sum(r["held_out"] for r in same)
        merged.append(row)
    return merged


def _portable(argv: list[str]) -> list[str]:
    """The command line without --out and its folder: a path of this machine, not a setting."""
    out, skip = [], False
    for arg in argv:
        if skip or arg.startswith("--out="):
            skip = False
            continue
        skip = arg == "--out"
        if not skip:
            out.append(arg)
    return out


def _mb(n) -> str:
    return "-" if n is None else f"{n / 1e6:.2f} MB"


def table(rows: list[dict]) -> str:
    def pct(r, k):
        ci = r.get(f"{k}_ci")
        return f"{100 * r[k]:.1f}%" + (f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else "")

    def f1(r):
        ci = r.get("macro_f1_ci")
        return f"{r['macro_f1']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")

    lines = ["| data | row | choice accuracy [95% CI] | macro-F1 [95% CI] | generation EM | epsilon spent | "
             "bytes per round | wall s |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        em = r.get("generation_exact_match")
        eps = r.get("epsilon")
        lines.append(f"| {r['data']} | {r['row']} | {pct(r, 'accuracy')} | {f1(r)} | "
                     f"{'-' if em is None else f'{100 * em:.1f}%'} | {'-' if eps is None else f'{eps:.2f}'} | "
                     f"{_mb(r.get('bytes_per_round'))} | "
                     f"{r.get('wall_seconds', '-')} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", nargs="+", default=["banking77", "pubmedqa"], choices=sorted(PER_DATA))
    ap.add_argument("--quick", action="store_true", help="smoke-sized: few rows per site, small held-out sets")
    ap.add_argument("--per-site", type=int, default=None, help="cap on training rows per site (--quick: 32)")
    ap.add_argument("--per-label", type=int, default=None, help="BANKING77 held-out rows per intent (13; --quick: 1)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["central", "federated", "alone"],
                    help="rows not run (the base model always is)")
    ap.add_argument("--epsilons", type=float, nargs="+", default=[8.0, 2.0])
    ap.add_argument("--alone-sites", type=int, default=None, help="sites trained alone (default: all; --quick 1)")
    ap.add_argument("--gen-rows", type=int, default=None, help="BANKING77 rows scored by generation")
    ap.add_argument("--recipe", nargs="*", default=[], help="extra Hydra overrides for every federated row")
    ap.add_argument("--folds", type=int, default=None,
                    help="PubMedQA: how many of the 5 cross-validation folds to run (default 5; --quick 1)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    quiet.silence_known_noise()
    missing = [d for d in args.data if not (SHARED / d).is_dir()]
    if missing:
        raise SystemExit(f"../shared/data/{missing[0]} is not here; this benchmark needs the shared data sets")
    args.alone_sites = 0 if "alone" in args.skip else (
        args.alone_sites if args.alone_sites is not None else (1 if args.quick else 99))
    args.per_site = args.per_site if args.per_site is not None else (32 if args.quick else 0)
    args.per_label = args.per_label if args.per_label is not None else (1 if args.quick else 13)
    if args.quick:  # a site of 32 rows cannot be sampled in batches of 64; one round is a smoke test
        args.recipe = ["train.batch_size=16", "train.max_physical_batch=8", "federation.rounds=1", *args.recipe]
    args.gen_rows = args.gen_rows if args.gen_rows is not None else (10 if args.quick else 200)
    if args.folds is not None and not 1 <= args.folds <= 5:
        raise SystemExit(f"--folds {args.folds}: give 1 to 5 (PubMedQA is cut into 5 folds)")
    if args.folds is not None and "pubmedqa" not in args.data:
        raise SystemExit("--folds applies to PubMedQA's cross-validation; BANKING77 has one held-out split")
    out = Path(args.out or tempfile.mkdtemp(prefix="fedslm-utility-"))
    out.mkdir(parents=True, exist_ok=True)
    started, rows = time.perf_counter(), []
    for data in args.data:
        if data == "banking77":
            splits = banking77_split(out, args.per_label)
        else:
            splits = pubmedqa_folds(out, 5, args.folds or (1 if args.quick else 5), 100 if args.quick else 0)
        fold_rows = [one_split(data, train, held, args, out / f"{data}-fold{k}") for k, (train, held) in enumerate(splits)]
        rows += merge_folds(fold_rows)
    result = {"date": date.today().isoformat(), "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
              "command": "python -m benchmarks.utility " + " ".join(_portable(sys.argv[1:])),
              "recipe": RECIPE + [f"{d}: {' '.join(PER_DATA[d])}" for d in args.data] + args.recipe,
              "seconds": round(time.perf_counter() - started, 1), "rows": rows}
    # a run of one data set, or of some of PubMedQA's folds, does not overwrite fuller figures
    name = "utility" + ("" if set(args.data) == set(PER_DATA) else "-" + "-".join(args.data))
    if args.folds and args.folds < 5:
        name += f"-{args.folds}of5"
    path = Path("benchmarks/results") / f"{name}{'-quick' if args.quick else ''}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str))
    print("\n" + table(rows))
    print(f"\nwrote {path}; {result['seconds']:.0f} s in all")


if __name__ == "__main__":
    main()
