"""Seconds per federated round of the demo configuration, split into load / setup / train /
serialize / aggregate, for fedslm's round against a naive one, in the same run.

    .venv/bin/python -m benchmarks.round_time [--rounds 2] [--sites 3] [override ...]

The demo configuration is what `python -m simulations.run` composes (conf/config.yaml:
SmolLM2-135M, privacy=dp, FFA on q and v, 3 DP steps of batch 8 per site and round);
extra arguments are Hydra overrides. The sites of a round run one after another in this
one process, as a Ray actor serves several sites in a simulation.

- fedslm: the site runtime (model, tokenizer, LoRA, DP wrapper) built once per process
  and reused by every round and every site; only the trained B goes on the wire, in the
  configured transport dtype (fp16 by default), both ways.
- naive: every site reloads the base model (from the safetensors cache), re-attaches
  LoRA and re-wraps it for DP every round, and A and B travel in fp32 both ways.

Both train identically (same config, data and seeds), so the ratio isolates what a round
costs besides training. "setup" is the per-round optimizer, data loader and Opacus
set-up inside train_local (measured by a zero-step call), and is part of "train".
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from collections import defaultdict

PHASES = ("load", "train", "serialize", "aggregate")


def run_mode(cfg, mode: str, rounds: int, echo=print) -> tuple[list[dict], list[int], float]:
    from fedslm.lora.adapter import adapter_state, attach_lora, load_adapter_state
    from fedslm.data.sites import build_site_data
    from fedslm.lora.schemes import SCHEMES, SiteUpdate, make_scheme
    from fedslm.model import load_base_model, resolve_model_dir
    from fedslm.privacy.accounting import PrivacyLedger, expected_rounds
    from fedslm.site.handlers import load_global, runtime_for
    from fedslm.privacy.dp_step import wrap_for_dp
    from fedslm.privacy.plan import check_site_size
    from fedslm.train import DPContext, train_local
    from fedslm.transport import from_record, record_bytes, to_record

    naive = mode == "naive"
    dtype = "float32" if naive else cfg.federation.transport_dtype
    freeze_a = not SCHEMES[cfg.strategy.name].trains_a
    sites = cfg.federation.sites
    per_round, bytes_per_round, setup = [], [], []
    data, ledgers = {}, defaultdict(PrivacyLedger)
    g = None  # the global adapter, fp32, trainable tensors only
    scheme = None
    for r in range(1, rounds + 1):
        t = dict.fromkeys(PHASES, 0.0)
        sent, replies = 0, []
        for site in range(sites):
            start = time.perf_counter()
            if naive:
                model, tok = load_base_model(resolve_model_dir(cfg.model))
                pm = attach_lora(model, cfg.lora, freeze_a=freeze_a)
                gsm = wrap_for_dp(pm, cfg.privacy) if cfg.privacy.enabled else None
            else:
                rt = runtime_for(cfg)
                pm, tok, gsm = rt.peft_model, rt.tokenizer, rt.grad_sample_module
            if site not in data:
                data[site] = build_site_data(cfg.data, site, sites, tok).train
            t["load"] += time.perf_counter() - start

            # down: the server serialises the global, the site reads it into its adapter
            start = time.perf_counter()
            if g is None:
                g = adapter_state(pm)
            if naive:
                full = {**adapter_state(pm, trainable_only=False), **g}
                down = to_record(full, dtype)
                load_adapter_state(pm, from_record(down), trainable_only=False)
            else:
                down = to_record(g, dtype)
                load_global(rt, down)
            sent += record_bytes(down)
            t["serialize"] += time.perf_counter() - start

            dp = None
            if cfg.privacy.enabled:
                plan = check_site_size(cfg.privacy, cfg.train, len(data[site]), expected_rounds(cfg.federation), site)
                dp = DPContext(cfg.privacy, plan, ledgers[site])
            seed = hash((cfg.seed, site, r)) % (2**31)
            zero = dataclasses.replace(cfg.train, local_steps=0)
            setup.append(train_local(pm, data[site], zero, tok.pad_token_id, seed, dp=dp,
                                     grad_sample_module=gsm).seconds)
            start = time.perf_counter()
            stats = train_local(pm, data[site], cfg.train, tok.pad_token_id, seed, dp=dp, grad_sample_module=gsm)
            t["train"] += time.perf_counter() - start
            if stats.ledger is not None:
                ledgers[site] = stats.ledger

            start = time.perf_counter()
            up = to_record(adapter_state(pm, trainable_only=not naive), dtype)
            sent += record_bytes(up)
            replies.append(up)
            t["serialize"] += time.perf_counter() - start

        start = time.perf_counter()
        updates = [SiteUpdate({k: v for k, v in from_record(rec).items() if k in g}, cfg.lora.r, 1.0)
                   for rec in replies]
        if scheme is None:  # the server's, built once from the shared initial adapter
            scheme = make_scheme(cfg.strategy.name, adapter_state(pm, trainable_only=False), cfg.lora.r, cfg.lora.alpha)
        g, _ = scheme.combine(g, updates, cfg.strategy.aggregator, cfg.strategy.trim_fraction)
        t["aggregate"] += time.perf_counter() - start
        t["total"] = sum(t[p] for p in PHASES)
        per_round.append(t)
        bytes_per_round.append(sent)
        echo(f"  {mode} round {r}: " + ", ".join(f"{p} {t[p]:.2f}s" for p in (*PHASES, "total"))
             + f", {sent / 1024:.1f} KiB on the wire", flush=True)
    return per_round, bytes_per_round, statistics.median(setup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. train.local_steps=2")
    args = parser.parse_args()

    from fedslm import quiet
    from fedslm.config.compose import compose_run_config
    from fedslm.model import resolve_model_dir

    quiet.silence_known_noise()
    cfg = compose_run_config([f"federation.sites={args.sites}", "train.progress=false", *args.overrides])
    start = time.perf_counter()
    resolve_model_dir(cfg.model)  # converts the embedded GGUF on the very first run only
    print(f"base model ready in {time.perf_counter() - start:.1f}s (GGUF converted only if the cache was empty)")
    print(f"demo configuration: {cfg.federation.sites} sites x {args.rounds} rounds, {cfg.train.local_steps} steps of "
          f"batch {cfg.train.batch_size}, privacy {'dp (' + cfg.privacy.grad_sample_mode + ')' if cfg.privacy.enabled else 'off'}, "
          f"strategy {cfg.strategy.name}, LoRA r={cfg.lora.r} on {','.join(cfg.lora.target_modules)}, "
          f"transport {cfg.federation.transport_dtype}", flush=True)
    results = {mode: run_mode(cfg, mode, args.rounds) for mode in ("fedslm", "naive")}

    def steady(rows):  # rounds after the first: the fedslm runtime is built in round 1
        rows = rows[1:] or rows
        return {k: statistics.mean(r[k] for r in rows) for k in (*PHASES, "total")}

    print(f"\nseconds per round (mean of rounds 2..{args.rounds}; round 1 of fedslm builds the runtime):")
    print(f"{'mode':<8}" + "".join(f"{p:>11}" for p in (*PHASES, "total")) + f"{'setup':>9}{'KiB/round':>11}")
    for mode, (rows, sent, setup) in results.items():
        s = steady(rows)
        print(f"{mode:<8}" + "".join(f"{s[p]:>11.2f}" for p in (*PHASES, "total"))
              + f"{setup:>9.3f}{statistics.mean(sent) / 1024:>11.1f}")
    fast, naive = steady(results["fedslm"][0]), steady(results["naive"][0])
    print(f"round 1 of fedslm (runtime built): {results['fedslm'][0][0]['total']:.2f}s")
    print(f"bytes per round: {statistics.mean(results['fedslm'][1]):,.0f} ({cfg.federation.transport_dtype}, B only) vs "
          f"{statistics.mean(results['naive'][1]):,.0f} (naive fp32 A+B both ways): "
          f"{statistics.mean(results['naive'][1]) / statistics.mean(results['fedslm'][1]):.2f}x fewer")
    print(f"naive/fedslm seconds per round ratio: {naive['total'] / fast['total']:.2f}")


if __name__ == "__main__":
    main()
