"""The model card (README.md) written beside an exported model: what it is, the privacy
guarantee as fedslm.privacy.report states it, and the parity checks it passed."""

from __future__ import annotations

from fedslm.config import RunConfig
from fedslm.privacy.report import guarantee_text


def _quantized_note(cfg: RunConfig) -> str:
    if cfg.model.quantize != "4bit":
        return ""
    return ("The sites trained on an NF4 (4-bit, bitsandbytes) copy of the base. The adapter is merged here into the "
            "unquantised base, and the check above compares against that base + adapter; the 4-bit base + adapter that "
            "training saw differs from both by the base's quantisation error.\n")


def model_card(cfg: RunConfig, privacy: dict, parity: float, n_tensors: int, rank: int, dtype: str = "fp32",
               cast_parity: float | None = None) -> str:
    guarantee, scope = guarantee_text(privacy)
    return f"""# fedslm federated model

Base model: `{cfg.model.path or cfg.model.source}`; global LoRA rank {rank} on {', '.join(cfg.lora.target_modules)},
aggregated with `{cfg.strategy.name}` over {cfg.federation.rounds} rounds and {cfg.federation.sites} sites,
then merged into the base weights ({n_tensors} adapter tensors).

## Privacy guarantee
{guarantee}

{scope}

## Checks
Merged model vs base + adapter: max |logit difference| = {parity:.2e} on held-out prompts (fp32).
Weights stored as {dtype}{f"; that copy vs base + adapter (fp32): {cast_parity:.2e}" if dtype != "fp32" and cast_parity is not None else ""}.
{_quantized_note(cfg)}
## Files
`model.safetensors` + `config.json` + tokenizer: load with
`AutoModelForCausalLM.from_pretrained(dir)`. `privacy.json`: the guarantee as data.
`training_config.json`: the run's configuration. The adapter alone (PEFT format) is in `../adapter`.
"""
