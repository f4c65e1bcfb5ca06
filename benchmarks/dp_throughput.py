"""DP-LoRA vs plain LoRA training throughput, side by side in one run.

    .venv/bin/python -m benchmarks.dp_throughput --device cpu            # batch 8 x 256, fp32
    .venv/bin/python -m benchmarks.dp_throughput --device cuda           # batch 64 x 512, bf16 autocast

SmolLM2-135M (the embedded model, converted once into ~/.cache/fedslm) with LoRA r=16
on all seven projections, FFA (A frozen, B trains: fedslm's default strategy). Variants:

- lora            non-DP LoRA, eager
- lora-compiled   non-DP LoRA with each decoder block torch.compile'd (cuda by default;
                  --compile asks for it on CPU too)
- dp-hooks        Opacus DP-SGD, per-sample gradients from its layer hooks
- dp-lora         fedslm's path (grad_sample_mode=lora): per-sample gradients in the
                  LoRA factors' own backward; Opacus clips, noises and accounts

Every DP variant runs the whole DP optimizer step (per-sample clipping to max_grad_norm,
Gaussian noise, then AdamW). All variants train on the same fixed batch, and the timed
steps are interleaved (one step of each variant in turn), so a machine shared with other
work slows every variant alike and the ratios hold. On CPU each step is timed in the
process's CPU seconds on one thread (--threads 1, the default there): on a shared 2-core
machine wall time mostly measures the neighbours, CPU time measures the work. The last
line is the headline: fedslm's DP path against the fastest non-DP variant measured.
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import time
from dataclasses import dataclass

import torch

from fedslm.lora.targets import resolve_targets
from fedslm.config import LoraConfig, ModelConfig


@dataclass
class Variant:
    name: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    times: list[float]
    peak_bytes: int = 0


def synthetic_batch(vocab: int, batch: int, seq: int, device: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Full-length sequences whose second half is the answer (the tokens scored)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    loss_mask = torch.zeros(batch, seq, dtype=torch.long)
    loss_mask[:, seq // 2:] = 1
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "loss_mask": loss_mask.to(device)}


def build(name: str, base: torch.nn.Module, lora: LoraConfig, batch: int, lr: float) -> Variant:
    from opacus.optimizers import DPOptimizer

    from fedslm.lora.adapter import attach_lora
    from fedslm.config import PrivacyConfig
    from fedslm.privacy.dp_step import wrap_for_dp

    pm = attach_lora(copy.deepcopy(base), lora, freeze_a=True)
    params = [p for p in pm.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    if name == "lora-compiled":
        for block in pm.get_base_model().get_decoder().layers:
            block.compile()
    if name.startswith("dp-"):
        wrap_for_dp(pm, PrivacyConfig(grad_sample_mode=name.removeprefix("dp-")))
        optimizer = DPOptimizer(optimizer, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=batch)
    pm.train()
    return Variant(name, pm, optimizer, [])


def step(v: Variant, batch: dict[str, torch.Tensor], autocast: torch.autocast | None) -> None:
    from fedslm.train import sequence_losses

    v.optimizer.zero_grad(set_to_none=True)
    if autocast is not None:
        with autocast:
            loss = sequence_losses(v.model, batch).mean()
    else:
        loss = sequence_losses(v.model, batch).mean()
    loss.backward()
    v.optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--batch", type=int, help="default 8 on cpu, 64 on cuda")
    parser.add_argument("--seq", type=int, help="default 256 on cpu, 512 on cuda")
    parser.add_argument("--steps", type=int, help="timed steps per variant (default 6 cpu, 20 cuda)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--compile", action="store_true", help="also time compiled non-DP LoRA on CPU")
    parser.add_argument("--variants", default="", help="comma list to run a subset (default: all that apply)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on CPU (timed in CPU seconds)")
    args = parser.parse_args()
    cuda = args.device == "cuda"
    batch_size = args.batch or (64 if cuda else 8)
    seq = args.seq or (512 if cuda else 256)
    steps = args.steps or (20 if cuda else 6)
    if not cuda:
        torch.set_num_threads(args.threads)
    clock = time.perf_counter if cuda else time.process_time

    from fedslm import quiet
    from fedslm.model import load_base_model, resolve_model_dir

    quiet.silence_known_noise()
    base, _tok = load_base_model(resolve_model_dir(ModelConfig()))
    base.to(args.device)  # before LoRA is attached (see the Opacus+peft notes)
    lora = LoraConfig(r=args.rank, alpha=2 * args.rank, target_modules=["all"])
    n_targets = len(resolve_targets(base, lora.target_modules))
    names = ["lora"] + (["lora-compiled"] if cuda or args.compile else []) + ["dp-hooks", "dp-lora"]
    if args.variants:
        names = [n for n in names if n in args.variants.split(",")]
    batch = synthetic_batch(base.config.vocab_size, batch_size, seq, args.device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else None
    variants = [build(n, base, lora, batch_size, lr=1e-4) for n in names]
    del base
    gc.collect()

    print(f"{args.device}: SmolLM2-135M, LoRA r={args.rank} on {n_targets} projections (FFA), batch "
          f"{batch_size} x {seq}, {'bf16 autocast' if cuda else 'fp32'}, {torch.get_num_threads()} threads, "
          f"{args.warmup} warm-up + {steps} timed steps per variant, interleaved", flush=True)
    for i in range(args.warmup + steps):
        for v in variants:
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start = clock()
            step(v, batch, autocast)
            if cuda:
                torch.cuda.synchronize()
                v.peak_bytes = max(v.peak_bytes, torch.cuda.max_memory_allocated())
            if i >= args.warmup:
                v.times.append(clock() - start)

    tokens = batch_size * seq
    rate = {}
    print(f"{'variant':<15}{'s/step' if cuda else 'cpu s/step':>11}{'tokens/s':>11}" + (f"{'peak GiB':>10}" if cuda else ""))
    for v in variants:
        median = statistics.median(v.times)
        rate[v.name] = tokens / median
        print(f"{v.name:<15}{median:>11.3f}{rate[v.name]:>11.0f}" + (f"{v.peak_bytes / 2**30:>10.2f}" if cuda else ""))
    plain = [n for n in ("lora", "lora-compiled") if n in rate]
    if not plain or "dp-lora" not in rate:
        return
    best = max(plain, key=rate.get)
    if "dp-hooks" in rate:
        print(f"dp-hooks step / lora step: {rate['lora'] / rate['dp-hooks']:.3f}")
    print(f"dp-lora step / lora step: {rate['lora'] / rate['dp-lora']:.3f}")
    if cuda:
        by_name = {v.name: v for v in variants}
        print(f"dp-lora peak memory / lora peak memory: {by_name['dp-lora'].peak_bytes / by_name['lora'].peak_bytes:.2f}")
    print(f"(ratio below: dp-lora tokens/s over {best} tokens/s)")
    print(f"dp/non-dp throughput ratio: {rate['dp-lora'] / rate[best]:.2f}")


if __name__ == "__main__":
    main()
