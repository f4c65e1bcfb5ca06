"""The frozen prefix on a CPU site: one DP epoch with LoRA on the top K layers, full forward
vs cached prefix, side by side in one run.

    .venv/bin/python -m benchmarks.frozen_prefix                 # SmolLM2-135M, BANKING77 site 0, K=4
    .venv/bin/python -m benchmarks.frozen_prefix --rows 64 --layers 2

A BANKING77 branch's training rows (../shared/data; the synthetic clinic where it is
absent), the shipped DP recipe (FFA on q and v, fedslm's per-sample path) with
LoRA on the top K of SmolLM2's 30 layers. Both variants train the same epoch (same rows,
logical batch, physical batches) with the same adapter start; the cache's one-off build is
timed apart. Prints seconds per epoch for each, the speed-up, and the largest difference
between the two variants' losses on the same batch; writes benchmarks/results/frozen_prefix.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from datetime import date
from pathlib import Path

import torch

from fedslm.config.compose import compose_run_config
from fedslm.data.sites import build_site_data
from fedslm.data.tokenize import make_collate
from fedslm.lora.adapter import attach_lora
from fedslm.lora.frozen_prefix import CachedStates
from fedslm.losses import sequence_losses
from fedslm.model import load_base_model, resolve_model_dir
from fedslm.privacy.accounting import PrivacyLedger
from fedslm.privacy.dp_step import DPContext, wrap_for_dp
from fedslm.privacy.plan import plan_dp
from fedslm.train import train_local

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "banking77"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=256, help="training rows of the site (one epoch)")
    ap.add_argument("--layers", type=int, default=4, help="LoRA on the top K layers")
    ap.add_argument("--batch", type=int, default=64, help="logical batch")
    ap.add_argument("--physical", type=int, default=16, help="physical batch")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/frozen_prefix.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    overrides = ["data=banking77"] if SHARED.exists() else []
    overrides += [f"lora.layers={args.layers}", f"train.batch_size={args.batch}",
                  f"train.max_physical_batch={args.physical}", "train.local_epochs=1", "train.progress=false",
                  f"data.max_examples={args.rows}"]
    cfg = compose_run_config(overrides)
    model, tok = load_base_model(resolve_model_dir(cfg.model))
    pm = attach_lora(model, cfg.lora, freeze_a=True)
    data = build_site_data(cfg.data, 0, cfg.federation.sites, tok)
    tokens = data.train
    start = time.perf_counter()
    cached = CachedStates.build(pm, tokens, tok.pad_token_id, batch_size=args.physical)
    build_s = time.perf_counter() - start

    collate = make_collate(tok.pad_token_id)
    first = min(8, len(tokens))
    with torch.no_grad():
        diff = (sequence_losses(pm, collate([cached[i] for i in range(first)]))
                - sequence_losses(pm, collate([tokens[i] for i in range(first)]))).abs().max().item()

    plan = plan_dp(cfg.privacy, cfg.train, len(tokens), cfg.federation.rounds)
    seconds = {}
    for name, ds in (("full forward", tokens), ("cached prefix", cached)):
        m = copy.deepcopy(pm)
        gsm = wrap_for_dp(m, cfg.privacy)
        start = time.perf_counter()
        stats = train_local(m, ds, cfg.train, tok.pad_token_id, seed=0,
                            dp=DPContext(cfg.privacy, plan, PrivacyLedger()), grad_sample_module=gsm)
        seconds[name] = time.perf_counter() - start
        print(f"{name:>14}: {stats.steps} DP steps, {stats.examples_seen} rows, {seconds[name]:.1f} s per epoch",
              flush=True)
    speedup = seconds["full forward"] / seconds["cached prefix"]
    result = {
        "date": date.today().isoformat(), "machine": f"{platform.machine()}, {args.threads} threads",
        "model": str(resolve_model_dir(cfg.model).name), "data": cfg.data.name, "rows": len(tokens),
        "lora_layers": args.layers, "logical_batch": args.batch, "physical_batch": args.physical,
        "seconds_per_epoch": seconds, "cache_build_seconds": build_s, "max_loss_difference": diff,
        "speedup": speedup,
    }
    print(f"cache built once in {build_s:.1f} s; largest loss difference cached vs full: {diff:.2e}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"frozen prefix speed-up per epoch (top {args.layers} layers): {speedup:.2f}x")


if __name__ == "__main__":
    main()
