"""The shared model users take away: base + global adapter merged into one HF directory,
checked against the unmerged model, with its privacy guarantee written beside it."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from fedslm.lora.adapter import adapter_state, attach_lora, load_adapter_state
from fedslm.config import RunConfig, to_run_config
from fedslm.data.tokenize import chat_prompt
from fedslm.use.card import model_card
from fedslm.device import model_device
from fedslm.model import load_base_model

# fp32 merge changes the summation order of W x + B A x; on SmolLM2 (logits of order 10)
# that moves logits by ~1e-4. A wrong merge moves them by whole units. Half precision
# rounds every weight (fp16: 11-bit, bf16: 8-bit mantissa): measured on SmolLM2, the cast
# alone moves logits by 0.16 (fp16) and 1.2 (bf16), so the merge itself is always checked
# in fp32 and the cast against a looser bound of its own.
PARITY_TOL_FP32 = 1e-3
PARITY_TOL = {"fp32": PARITY_TOL_FP32, "fp16": 0.5, "bf16": 2.5}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class ParityError(RuntimeError):
    pass


def build_adapted(model_dir: Path, cfg: RunConfig, tensors: dict[str, torch.Tensor], rank: int, alpha: float):
    """(peft model with the global adapter loaded, tokenizer). `tensors` holds every A and B
    of a rank-`rank` adapter (a strategy's peft view of its global adapter)."""
    # fp32 whatever the run trained in: the parity check's reference is base + adapter in
    # fp32 (a 4-bit run's adapter is merged into the unquantised base; the card says so)
    base, tok = load_base_model(model_dir, cfg.train.device, "fp32")
    lora = dataclasses.replace(cfg.lora, r=rank, alpha=alpha, site_ranks=[])
    peft_model = attach_lora(base, lora, freeze_a=False)
    load_adapter_state(peft_model, tensors, trainable_only=False)
    peft_model.eval()
    return peft_model, tok


@torch.no_grad()
def merge_parity(peft_model, merged, tok, prompts: list[str]) -> float:
    """Max |logit difference| between base+adapter (fp32) and the merged model (any dtype)."""
    worst = 0.0
    for p in prompts:
        ids = tok(chat_prompt(tok, p), return_tensors="pt", add_special_tokens=False)["input_ids"]
        a = peft_model(input_ids=ids.to(model_device(peft_model))).logits.float().cpu()
        b = merged(input_ids=ids.to(model_device(merged))).logits.float().cpu()
        worst = max(worst, (a - b).abs().max().item())
    return worst


def export_merged(model_dir: Path, cfg: RunConfig, tensors: dict[str, torch.Tensor], rank: int, alpha: float,
                  out_dir: Path, parity_prompts: list[str], privacy: dict, dtype: str = "fp32",
                  adapter_dir: Path | None = None) -> dict:
    """Write the merged model (in `dtype`), the adapter alone (PEFT format, by default
    beside the model) and the model card; refuse if the merged model's logits drift from
    base + adapter (fp32) by more than the dtype's tolerance."""
    out_dir = Path(out_dir)
    peft_model, tok = build_adapted(model_dir, cfg, tensors, rank, alpha)
    peft_model.save_pretrained(adapter_dir or out_dir.parent / "adapter")  # for users who keep the base
    full_adapter = adapter_state(peft_model, trainable_only=False)

    # merge into a fresh copy so the adapter model stays intact for the parity check
    merged_src, _ = build_adapted(model_dir, cfg, tensors, rank, alpha)
    merged = merged_src.merge_and_unload()
    merged.eval()
    diff = merge_parity(peft_model, merged, tok, parity_prompts)
    if diff > PARITY_TOL_FP32:
        raise ParityError(f"merged model differs from base+adapter by {diff:.2e} > {PARITY_TOL_FP32:.0e}")
    cast_diff = diff
    if dtype != "fp32":
        merged = merged.to(DTYPES[dtype])
        cast_diff = merge_parity(peft_model, merged, tok, parity_prompts)
        if cast_diff > PARITY_TOL[dtype]:
            raise ParityError(f"the {dtype} copy differs from base+adapter (fp32) by {cast_diff:.2e} > "
                              f"{PARITY_TOL[dtype]:g}; nothing was written (try --dtype fp32)")
    merged.config.use_cache = True
    merged.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    (out_dir / "training_config.json").write_text(json.dumps(to_run_config(cfg), indent=2))
    (out_dir / "privacy.json").write_text(json.dumps(privacy, indent=2))
    (out_dir / "README.md").write_text(model_card(cfg, privacy, diff, len(full_adapter), rank, dtype, cast_diff))
    return {"merge_max_abs_diff": diff, "model_dir": str(out_dir), "dtype": dtype, "dtype_max_abs_diff": cast_diff}


def export_int8(model_dir: Path, out_dir: Path) -> Path:
    """A weight-only int8 copy of an exported model (torchao through transformers): every
    linear layer's weights as int8 with a per-channel scale, dequantised on the fly.
    Embeddings, norms and activations stay fp32: quantising the tied embedding did not
    survive a save/load round trip (logits moved by ~1 on a test model), and fp32
    activations keep it runnable on any CPU. Loads with plain from_pretrained, with
    torchao installed; no native build needed."""
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TorchAoConfig

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                 quantization_config=TorchAoConfig(Int8WeightOnlyConfig()))
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out_dir)
    for name in ("privacy.json", "training_config.json"):
        if (Path(model_dir) / name).is_file():
            (Path(out_dir) / name).write_text((Path(model_dir) / name).read_text())
    return Path(out_dir)


def weights_bytes(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in Path(model_dir).glob("*.safetensors"))


def int8_report(cfg: RunConfig, fp_dir: Path, int8_dir: Path, limit: int = 64) -> dict:
    """Size and held-out answer loss of the int8 copy beside the same model stored as fp16
    (weights rounded to fp16, computed in fp32, as a CPU runs it)."""
    from fedslm.use.eval_data import eval_set
    from fedslm.use.evaluate import perplexity
    from fedslm.use.chat import load_model_dir

    es = eval_set(cfg, "eval", limit)
    model, tok = load_model_dir(fp_dir, device="cpu")  # fp16 weights computed in fp32, as a CPU runs them
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.float16).float())
    fp16_loss = perplexity(model, tok, es, cfg.data.max_length)["loss"]
    n_params = sum(p.numel() for p in model.parameters())
    del model
    q, tok = load_model_dir(int8_dir, device="cpu")
    int8_loss = perplexity(q, tok, es, cfg.data.max_length)["loss"]
    return {"examples": len(es.examples), "fp16_loss": fp16_loss, "int8_loss": int8_loss,
            "fp16_bytes": 2 * n_params, "int8_bytes": weights_bytes(int8_dir), "int8_dir": str(int8_dir)}


def latest_adapter(run_dir: Path, server_round: int | None = None) -> Path:
    """adapters/round_NNN.safetensors of `server_round`, or of the last round saved."""
    found = sorted((Path(run_dir) / "adapters").glob("round_*.safetensors"))
    if server_round is not None:
        found = [p for p in found if p.name == f"round_{server_round:03d}.safetensors"]
    if not found:
        which = f"round {server_round}" if server_round is not None else "any round"
        raise FileNotFoundError(f"{run_dir}: no global adapter for {which} in adapters/; "
                                "give a run directory of a federation that finished at least one round")
    return found[-1]


def export_run(run_dir: Path, out_dir: Path, dtype: str = "fp32", server_round: int | None = None,
               int8: bool = False) -> dict:
    """`fedslm export`: merge a run's global adapter into its base model, as a standalone
    Hugging Face directory with the adapter (PEFT) in out_dir/adapter and the model card;
    with `int8`, also a weight-only int8 copy in out_dir/int8, measured against fp16."""
    from safetensors import safe_open

    from fedslm.rundir import load_adapter
    from fedslm.config import load_run_config
    from fedslm.data.clinic import demo_question
    from fedslm.model import resolve_model_dir

    run_dir = Path(run_dir)
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    cfg = load_run_config(run_dir)
    path = latest_adapter(run_dir, server_round)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    rank, alpha = int(meta.get("rank", cfg.lora.r)), float(meta.get("alpha", cfg.lora.alpha))
    privacy_file = run_dir / "privacy.json"
    privacy = json.loads(privacy_file.read_text()) if privacy_file.is_file() else {"level": "none"}
    prompts = [demo_question(cfg.seed)["prompt"], "What should I do about a cough?"]
    out_dir = Path(out_dir)
    info = export_merged(resolve_model_dir(cfg.model), cfg, load_adapter(path), rank, alpha, out_dir, prompts,
                         privacy, dtype=dtype, adapter_dir=out_dir / "adapter")
    info["bytes"] = weights_bytes(out_dir)
    if int8:
        info["int8"] = int8_report(cfg, out_dir, export_int8(out_dir, out_dir / "int8"))
        with (out_dir / "README.md").open("a") as card:
            r = info["int8"]
            card.write(f"\n## int8 copy\n`int8/`: weight-only int8 (torchao), {r['int8_bytes'] / 1e6:.0f} MB vs "
                       f"{r['fp16_bytes'] / 1e6:.0f} MB in fp16; held-out answer loss {r['int8_loss']:.4f} vs "
                       f"{r['fp16_loss']:.4f} (fp16), on {r['examples']} held-out examples.\n")
    return {**info, "adapter": str(path)}
