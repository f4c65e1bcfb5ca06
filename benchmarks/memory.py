"""Peak memory of a site's training step: measured on small shapes with a real 150k
vocabulary, then scaled by formula to the SLMs people deploy.

    .venv/bin/python -m benchmarks.memory [--quick]

1. Measured (CPU, fp32, peak resident memory of one forward + backward in a fresh
   process): a Qwen2-shaped model with Qwen2.5's 151,936-token vocabulary at batch 8 x
   1,024 with 128 answer tokens per row, on the DP step's path (per-sample LoRA
   gradients) with fedslm's loss (logits at answer positions only, fedslm.losses); two
   small widths give the per-layer activation bytes per token, fitted as a*d + b*ff.
   Beside it, at batch 2 (the full case would need about 20 GB at batch 8), the usual
   full-logit loss (every position's logits, as `labels=` computes them) against fedslm's.
2. The formula: weights + LoRA state + per-sample gradients + activations (fitted, per
   layer and token) + answer-position logits (three fp32 copies: logits, log-softmax,
   gradient), for batch 8 x 1,024 with 128 answer tokens per row, in fp32 on a CPU, and
   bf16 or NF4 (4-bit) bases on a GPU, against 24 GB of CPU RAM and 16 / 24 / 80 GB GPUs.

Writes benchmarks/results/memory.json; the README's Hardware table is its output.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "memory.json"
BATCH, SEQ, ANSWER = 8, 1024, 128
QWEN_VOCAB = 151936
GIB = 2**30

# the families' real shapes (config.json of each release): d, ff, layers, heads, kv heads, vocab, tied
MODELS = {
    "SmolLM2-135M": (576, 1536, 30, 9, 3, 49152, True),
    "Qwen2.5-0.5B": (896, 4864, 24, 14, 2, 151936, True),
    "Llama-3.2-1B": (2048, 8192, 16, 32, 8, 128256, True),
    "Qwen2.5-1.5B": (1536, 8960, 28, 12, 2, 151936, True),
    "SmolLM2-1.7B": (2048, 8192, 24, 32, 32, 49152, True),
    "Gemma-2-2B": (2304, 9216, 26, 8, 4, 256000, True),
    "Qwen2.5-3B": (2048, 11008, 36, 16, 2, 151936, True),
    "Llama-3.2-3B": (3072, 8192, 28, 24, 8, 128256, True),
    "Phi-3.5-mini (3.8B)": (3072, 8192, 32, 32, 32, 32064, False),
}


def _params(d: int, ff: int, layers: int, heads: int, kv: int, vocab: int, tied: bool) -> int:
    head = d // heads
    attn = d * d * 2 + 2 * d * kv * head  # q, o and k, v
    mlp = 3 * d * ff
    return layers * (attn + mlp + 2 * d) + vocab * d * (1 if tied else 2) + d


def _lora_params(d: int, layers: int, heads: int, kv: int, r: int = 8) -> int:
    """The DP recipe's LoRA: rank 8 on q and v (FFA: only B trains)."""
    head = d // heads
    return layers * r * (d + kv * head)  # B of q (d x r) and of v (kv*head x r)


def step_in_subprocess(d: int, ff: int, layers: int, full_logits: bool, vocab: int, batch: int = BATCH) -> dict:
    code = f"import benchmarks.memory as m; m._child({d}, {ff}, {layers}, {full_logits}, {vocab}, {batch})"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900,
                         cwd=Path(__file__).resolve().parent.parent)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _child(d: int, ff: int, layers: int, full_logits: bool, vocab: int, batch: int) -> None:
    """One forward + backward of the DP step's loss; prints the resident peak above the
    resident size just before it."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from fedslm.config import LoraConfig
    from fedslm.lora.adapter import attach_lora
    from fedslm.lora.grad_sample import wrap_lora_for_dp
    from fedslm.losses import sequence_losses

    torch.set_num_threads(2)
    config = Qwen2Config(vocab_size=vocab, hidden_size=d, intermediate_size=ff, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ,
                         tie_word_embeddings=True)
    model = Qwen2ForCausalLM(config)
    model.config.use_cache = False
    pm = attach_lora(model, LoraConfig(), freeze_a=True)
    wrap_lora_for_dp(pm)
    pm.train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, SEQ), generator=g)
    mask = torch.zeros(batch, SEQ, dtype=torch.long)
    mask[:, SEQ - ANSWER:] = 1
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": mask}
    Path("/proc/self/clear_refs").write_text("5")  # reset the resident peak (VmHWM)
    before = _status("VmRSS")
    if full_logits:
        logits = pm(input_ids=ids, attention_mask=batch["attention_mask"]).logits.float()  # (B, T, V)
        token = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
        m = mask[:, 1:].float()
        loss = ((token * m).sum(1) / m.sum(1)).mean()
    else:
        loss = sequence_losses(pm, batch).mean()
    loss.backward()
    print(json.dumps({"peak_bytes": _status("VmHWM") - before}))


def measure(quick: bool) -> dict:
    rows = {}
    widths = [(64, 128)] if quick else [(64, 128), (256, 704)]
    layers = 2
    runs = [(d, ff, False, BATCH) for d, ff in widths] + [(widths[0][0], widths[0][1], full, 2) for full in (False, True)]
    for d, ff, full, batch in runs:
        name = f"d{d}-ff{ff}-batch{batch}-{'full-logits' if full else 'answer-logits'}"
        started = time.perf_counter()
        rows[name] = {**step_in_subprocess(d, ff, layers, full, QWEN_VOCAB, batch), "d": d, "ff": ff,
                      "layers": layers, "batch": batch, "full_logits": full,
                      "seconds": round(time.perf_counter() - started, 1)}
        print(f"  {name}: peak {rows[name]['peak_bytes'] / GIB:.2f} GiB above the loaded model", flush=True)
    return rows


def fit_activations(rows: dict) -> tuple[float, float]:
    """Per layer and token, activation bytes (fp32) = a*d + b*ff, from the answer-logit runs
    with the logits' own share taken out."""
    logits = 3 * BATCH * ANSWER * QWEN_VOCAB * 4
    pts = [(r["d"], r["ff"], (r["peak_bytes"] - logits) / (BATCH * SEQ * r["layers"]))
           for r in rows.values() if not r["full_logits"] and r["batch"] == BATCH]
    if len(pts) == 1:  # --quick: one width; charge it all to d and ff in a fixed 1:1 share
        d, ff, y = pts[0]
        return y / (d + ff), y / (d + ff)
    (d1, f1, y1), (d2, f2, y2) = pts[:2]
    det = d1 * f2 - d2 * f1
    return (y1 * f2 - y2 * f1) / det, (d1 * y2 - d2 * y1) / det


def formula(a: float, b: float) -> dict:
    table = {}
    for name, (d, ff, layers, heads, kv, vocab, tied) in MODELS.items():
        n = _params(d, ff, layers, heads, kv, vocab, tied)
        lora = _lora_params(d, layers, heads, kv)
        act_fp32 = (a * d + b * ff) * BATCH * SEQ * layers
        logits = 3 * BATCH * ANSWER * vocab * 4  # fp32 whatever the base: fedslm.losses
        full_logits = 3 * BATCH * SEQ * vocab * 4
        lora_state = lora * 4 * (1 + 1 + 2) + lora * 4 * BATCH  # weights, grad, AdamW moments; per-sample grads
        row = {"params_b": round(n / 1e9, 2)}
        for where, wbytes, act in (("cpu_fp32", 4.0, 1.0), ("gpu_bf16", 2.0, 0.5), ("gpu_nf4", 0.56, 0.5)):
            total = n * wbytes + act_fp32 * act + logits + lora_state
            row[where] = round(total / GIB, 1)
        row["full_logits_extra_gib"] = round((full_logits - logits) / GIB, 1)
        table[name] = row
    return table


def fits(gib: float, budget: float) -> str:
    return "yes" if gib <= 0.9 * budget else "no"  # 10% kept for the allocator, CUDA context, the rest


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="one width (the smoke test's size)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    print(f"[1/2] measured: Qwen2 shape, vocabulary {QWEN_VOCAB:,}, batch {BATCH} x {SEQ}, {ANSWER} answer tokens "
          "per row, the DP step's loss and backward", flush=True)
    rows = measure(args.quick)
    a, b = fit_activations(rows)
    small = next(r for r in rows.values() if not r["full_logits"] and r["batch"] == 2)
    full = next(r for r in rows.values() if r["full_logits"])
    print(f"  batch 2: full-vocabulary logits at every position {full['peak_bytes'] / GIB:.2f} GiB, at answer positions "
          f"only {small['peak_bytes'] / GIB:.2f} GiB: {full['peak_bytes'] / small['peak_bytes']:.1f}x", flush=True)
    print(f"[2/2] formula: activations {a:.1f}*d + {b:.1f}*ff bytes per layer and token (fp32), batch {BATCH} x {SEQ}",
          flush=True)
    table = formula(a, b)
    head = f"{'model':<21}{'params':>7}{'CPU fp32':>10}{'24GB RAM':>9}{'GPU bf16':>10}{'GPU NF4':>9}  fits bf16 16/24/80 GB, NF4 16/24"
    print(head)
    for name, r in table.items():
        bf, q = r["gpu_bf16"], r["gpu_nf4"]
        print(f"{name:<21}{r['params_b']:>6}B{r['cpu_fp32']:>9} G{fits(r['cpu_fp32'], 24):>9}{bf:>9} G{q:>8} G  "
              f"{fits(bf, 16)}/{fits(bf, 24)}/{fits(bf, 80)}, {fits(q, 16)}/{fits(q, 24)}")
    out = {"command": "python -m benchmarks.memory" + (" --quick" if args.quick else ""), "date": time.strftime("%Y-%m-%d"),
           "machine": f"{platform.machine()}, {os.cpu_count()} cores", "batch": BATCH, "seq": SEQ,
           "answer_tokens": ANSWER, "measured": rows, "activation_bytes_per_layer_token": {"d": a, "ff": b},
           "full_over_answer_logits_peak": round(full["peak_bytes"] / small["peak_bytes"], 2), "table": table}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    return out


if __name__ == "__main__":
    main()
