"""Aggregation strategies side by side on BANKING77 (7 branches, natural partition by group).

    .venv/bin/python -m benchmarks.aggregation [--rounds 3 --local-steps 4 --max-examples 192]

Every federated row has the same privacy target, sites, rounds, local steps and batch (the
same compute); they differ only in strategy (and privacy for the no-DP row). Two
non-federated references get the same total number of training steps:
- ceiling: one non-private LoRA trained on all sites' training rows pooled;
- floor: each site alone with the same DP target and its own share of steps (mean over sites).
Held-out: every site's eval split, carved from the shared training file (data.eval_fraction),
pooled; accuracy is exact match of the greedily generated intent name. Loss is the mean
per-token answer loss on the same pooled set.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path

import datasets
import torch

from fedslm import quiet
from fedslm.lora.adapter import attach_lora
from fedslm.config import RunConfig, validate
from fedslm.data.records import load_label_set, to_example
from fedslm.data.sites import site_rows, system_prompt_for
from fedslm.data.tokenize import tokenize_table
from fedslm.model import load_base_model, resolve_model_dir
from fedslm.privacy.accounting import PrivacyLedger
from fedslm.use.chat import greedy_answers
from fedslm.use.scoring import exact_match
from simulations.simulate import simulate
from fedslm.privacy.plan import plan_dp
from fedslm.site.evaluate import evaluate_loss
from fedslm.train import DPContext, train_local

DATA = Path(__file__).resolve().parents[1] / "../shared/data/banking77"


def base_config(args, out: Path) -> RunConfig:
    from hydra import compose, initialize_config_dir

    from fedslm.config.compose import REPO_ROOT, register_schema, to_run_config_object

    register_schema()
    with initialize_config_dir(str(REPO_ROOT / "conf"), version_base=None):
        overrides = ["data=banking77", f"output_dir={out}", *args.override]
        cfg = to_run_config_object(compose("config", overrides=overrides))
    cfg.data.max_examples = args.max_examples
    cfg.data.eval_fraction = args.eval_fraction
    cfg.federation.rounds = args.rounds
    cfg.federation.ray_cpus = args.ray_cpus
    cfg.train.local_steps = args.local_steps
    cfg.train.batch_size = args.batch_size
    cfg.train.progress = False
    cfg.demo_answer = False
    return validate(cfg)


def held_out(cfg: RunConfig) -> tuple[list[dict], list[dict]]:
    """(pooled training examples, pooled held-out examples) of all sites, as {prompt, answer}."""
    labels = load_label_set(cfg.data)
    train, held = [], []
    for site in range(cfg.federation.sites):
        rows = site_rows(cfg.data, site, cfg.federation.sites)
        train += [to_example(r, cfg.data, labels) for r in rows.train]
        held += [to_example(r, cfg.data, labels) for r in rows.eval]
    return train, held


def score(model, tok, cfg: RunConfig, held: list[dict]) -> dict:
    ds = tokenize_table(tok, datasets.Dataset.from_list(held), cfg.data.max_length, system_prompt_for(cfg.data))
    loss = evaluate_loss(model, ds, 16, tok.pad_token_id)
    preds = greedy_answers(model, tok, [h["prompt"] for h in held], system_prompt_for(cfg.data))
    return {"loss": loss, "accuracy": exact_match(preds, [h["answer"] for h in held])}


def federated(cfg: RunConfig, held: list[dict], label: str) -> dict:
    start = time.perf_counter()
    summary = simulate(cfg, echo=lambda *_: None)
    model, tok = load_base_model(Path(cfg.output_dir) / "model")
    res = score(model, tok, cfg, held)
    errors = [e for e in summary["aggregation_error_per_round"] if e is not None]
    return {
        "row": label,
        **res,
        "epsilon": summary["epsilon"],
        "bytes_up_per_round": summary["bytes_up"] / summary["rounds"],
        "bytes_down_per_round": summary["bytes_down"] / summary["rounds"],
        "aggregation_error": sum(errors) / len(errors) if errors else None,
        "seconds": time.perf_counter() - start,
    }


def local_training(cfg: RunConfig, examples: list[dict], steps: int, private: bool, seed: int):
    """A LoRA trained on `examples` alone (no federation) for `steps` steps."""
    model, tok = load_base_model(resolve_model_dir(cfg.model))
    pm = attach_lora(model, cfg.lora, freeze_a=cfg.strategy.name == "ffa")
    ds = tokenize_table(tok, datasets.Dataset.from_list(examples), cfg.data.max_length, system_prompt_for(cfg.data))
    train = dataclasses.replace(cfg.train, local_steps=steps)
    dp, gsm = None, None
    if private:
        from fedslm.privacy.dp_step import wrap_for_dp

        plan = plan_dp(cfg.privacy, train, len(ds), 1)
        dp, gsm = DPContext(cfg.privacy, plan, PrivacyLedger()), wrap_for_dp(pm, cfg.privacy)
    stats = train_local(pm, ds, train, tok.pad_token_id, seed=seed, dp=dp, grad_sample_module=gsm)
    eps = stats.ledger.epsilon(cfg.privacy.delta, cfg.privacy.accountant) if stats.ledger else None
    return pm, tok, eps


def ceiling(cfg: RunConfig, train: list[dict], held: list[dict], steps: int) -> dict:
    """The same adapter as the federated default (FFA: A frozen), so the gap to it is the
    cost of federating and of DP, not of a different adapter."""
    start = time.perf_counter()
    pm, tok, _ = local_training(cfg, train, steps, private=False, seed=cfg.seed)
    return {"row": f"ceiling: pooled data, one {cfg.strategy.name} LoRA, no DP", **score(pm, tok, cfg, held),
            "seconds": time.perf_counter() - start}


def floor(cfg: RunConfig, held: list[dict], steps_per_site: int) -> dict:
    start = time.perf_counter()
    labels = load_label_set(cfg.data)
    per_site, eps = [], []
    for site in range(cfg.federation.sites):
        rows = site_rows(cfg.data, site, cfg.federation.sites)
        pm, tok, e = local_training(cfg, [to_example(r, cfg.data, labels) for r in rows.train], steps_per_site,
                                    private=cfg.privacy.enabled, seed=site)
        per_site.append(score(pm, tok, cfg, held))
        eps.append(e)
        print(f"  floor site {site}: {per_site[-1]}", flush=True)
    n = len(per_site)
    return {"row": "floor: each site alone, same DP (mean)", "loss": sum(r["loss"] for r in per_site) / n,
            "accuracy": sum(r["accuracy"] for r in per_site) / n, "epsilon": max(eps) if eps[0] is not None else None,
            "seconds": time.perf_counter() - start}


def fmt(r: dict) -> str:
    def mb(x):
        return f"{x / 1e6:.2f}" if x is not None else "-"

    err = r.get("aggregation_error")
    eps = r.get("epsilon")
    return (f"| {r['row']} | {r['loss']:.3f} | {100 * r['accuracy']:.1f}% | {eps:.2f} | " if eps is not None else
            f"| {r['row']} | {r['loss']:.3f} | {100 * r['accuracy']:.1f}% | - | ") + \
        f"{mb(r.get('bytes_up_per_round'))} | {mb(r.get('bytes_down_per_round'))} | " + \
        (f"{err:.2e} |" if err is not None else "- |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-examples", type=int, default=192, help="training rows per site")
    parser.add_argument("--eval-fraction", type=float, default=0.1)
    parser.add_argument("--ray-cpus", type=int, default=2)
    parser.add_argument("--strategies", default="fedavg,ffa,exact,stack")
    parser.add_argument("--no-references", action="store_true", help="skip the no-DP, ceiling and floor rows")
    parser.add_argument("--references-only", action="store_true", help="only the ceiling and floor rows")
    parser.add_argument("--skip-floor", action="store_true", help="no floor row (the slowest: one training per site)")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    parser.add_argument("override", nargs="*", help="Hydra overrides applied to every run, e.g. lora.r=4")
    args = parser.parse_args()
    if not (DATA / "train.jsonl").exists():
        raise SystemExit(f"BANKING77 not found at {DATA.resolve()}; this benchmark needs ../shared/data/banking77")
    quiet.silence_known_noise()
    os.environ.setdefault("FEDSLM_NO_PROGRESS", "1")
    torch.set_num_threads(2)

    root = Path(tempfile.mkdtemp(prefix="fedslm-agg-"))
    cfg = base_config(args, root / "base")
    train, held = held_out(cfg)
    print(f"BANKING77: {cfg.federation.sites} sites, {len(train)} training rows, {len(held)} held-out rows pooled; "
          f"{args.rounds} rounds x {args.local_steps} local steps x batch {args.batch_size}; "
          f"DP target epsilon {cfg.privacy.epsilon}; LoRA r={cfg.lora.r}, lr {cfg.train.lr}", flush=True)
    rows = []
    runs = [(s, True) for s in args.strategies.split(",")] + ([] if args.no_references else [("ffa", False)])
    runs = [] if args.references_only else runs
    for name, private in runs:
        run_cfg = dataclasses.replace(cfg, strategy=dataclasses.replace(cfg.strategy, name=name),
                                      privacy=dataclasses.replace(cfg.privacy, enabled=private),
                                      output_dir=str(root / f"{name}-{'dp' if private else 'nodp'}"))
        rows.append(federated(validate(run_cfg), held, f"{name}{'' if private else ', no DP'}"))
        print(fmt(rows[-1]), f"[{rows[-1]['seconds']:.0f}s]", flush=True)
    if not args.no_references:
        total_steps = args.rounds * args.local_steps * cfg.federation.sites
        rows.append(ceiling(cfg, train, held, total_steps))
        print(fmt(rows[-1]), f"[{rows[-1]['seconds']:.0f}s]", flush=True)
        if not args.skip_floor:
            rows.append(floor(cfg, held, args.rounds * args.local_steps))
            print(fmt(rows[-1]), f"[{rows[-1]['seconds']:.0f}s]", flush=True)

    base, tok = load_base_model(resolve_model_dir(cfg.model))
    rows.insert(0, {"row": "base model (no training)", **score(base, tok, cfg, held)})
    print("\n| run | held-out loss | accuracy | epsilon | MB up / round | MB down / round | aggregation error |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(fmt(r))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
