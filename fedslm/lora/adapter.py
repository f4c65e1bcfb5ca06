"""LoRA adapters: attach to a base model, and move their tensors in and out.

peft's get/set_peft_model_state_dict are the only doors; every tensor that comes in is
checked against the expected keys and shapes first, so a malformed update fails loudly
instead of being partly loaded.
"""

from __future__ import annotations

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

from fedslm.config import LoraConfig
from fedslm.lora.targets import resolve_targets


class AdapterMismatchError(ValueError):
    pass


def attach_lora(model: torch.nn.Module, cfg: LoraConfig, freeze_a: bool) -> PeftModel:
    """Wrap `model` with LoRA. With `freeze_a` (FFA-LoRA) only the B matrices train.

    A is drawn from `cfg.init_seed` inside a forked RNG so that every site and the
    server build the same A without disturbing anyone's global random state.
    """
    depth = model.config.num_hidden_layers
    if cfg.layers > depth:
        raise ValueError(f"lora.layers={cfg.layers}: this model has {depth} decoder layers; use at most {depth} "
                         "(0 = every layer)")
    peft_cfg = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=resolve_targets(model, list(cfg.target_modules)),
        # the top K layers only: the layers below stay frozen (fedslm.lora.frozen_prefix)
        layers_to_transform=list(range(depth - cfg.layers, depth)) if 0 < cfg.layers < depth else None,
        bias="none",
        task_type="CAUSAL_LM",
    )
    with torch.random.fork_rng():
        torch.manual_seed(cfg.init_seed)
        peft_model = get_peft_model(model, peft_cfg)
    if freeze_a:
        for name, param in peft_model.named_parameters():
            if "lora_A" in name:
                param.requires_grad_(False)
    return peft_model


def _trainable_keys(peft_model: PeftModel) -> set[str]:
    # state-dict keys drop the adapter name ("lora_B.default.weight" -> "lora_B.weight")
    adapter = peft_model.active_adapter
    return {
        name.replace(f".{adapter}.", ".")
        for name, p in peft_model.named_parameters()
        if p.requires_grad
    }


def adapter_state(peft_model: PeftModel, trainable_only: bool = True) -> dict[str, torch.Tensor]:
    """The adapter's tensors (detached CPU copies); by default only what trains."""
    state = get_peft_model_state_dict(peft_model)
    if trainable_only:
        keys = _trainable_keys(peft_model)
        state = {k: v for k, v in state.items() if k in keys}
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}


def expected_shapes(peft_model: PeftModel, trainable_only: bool = True) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in adapter_state(peft_model, trainable_only).items()}


def load_adapter_state(peft_model: PeftModel, tensors: dict[str, torch.Tensor], trainable_only: bool = True) -> None:
    """Load tensors into the adapter after checking keys, shapes and finiteness."""
    expected = expected_shapes(peft_model, trainable_only)
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise AdapterMismatchError(
            f"adapter keys do not match this model's LoRA config: {len(missing)} missing "
            f"(e.g. {missing[:2]}), {len(extra)} unexpected (e.g. {extra[:2]}); "
            "check that server and site use the same lora.r, lora.target_modules and strategy"
        )
    for key, shape in expected.items():
        got = tuple(tensors[key].shape)
        if got != shape:
            raise AdapterMismatchError(f"{key}: shape {got}, expected {shape} (lora.r mismatch?)")
        if not torch.isfinite(tensors[key]).all():
            raise AdapterMismatchError(f"{key}: contains NaN or Inf")
    param_dtype = next(p for p in peft_model.parameters() if p.requires_grad).dtype
    cast = {k: v.to(param_dtype) for k, v in tensors.items()}
    result = set_peft_model_state_dict(peft_model, cast)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise AdapterMismatchError(f"peft did not accept keys {unexpected[:3]}")


def set_base_delta(peft_model: PeftModel, deltas: dict[str, torch.Tensor], originals: dict[str, torch.Tensor]) -> None:
    """Set each adapted layer's base weight to W0 + delta (FLoRA's merged stack). W0 is
    kept in `originals` on first use, so every round merges into the pristine base."""
    with torch.no_grad():
        for layer, delta in deltas.items():
            weight = peft_model.get_submodule(layer).base_layer.weight
            if weight.dtype != torch.float32:
                raise ValueError(f"strategy=stack merges every round into the base weights, which are {weight.dtype} "
                                 "here: the merge would round the update away (or cannot hold it, 4-bit); use "
                                 "train.precision=fp32 and model.quantize=none with stack, or strategy ffa/exact")
            w0 = originals.setdefault(layer, weight.detach().clone())
            weight.copy_(w0 + delta.to(w0.device, w0.dtype))


def a_digest(tensors: dict[str, torch.Tensor]) -> int:
    """A 48-bit fingerprint of the frozen A matrices (exact as a float metric). FFA sites
    never send A; the server checks this against its own A, because aggregation_error
    computed with the server's A on both sides cannot see a site whose A differs."""
    import hashlib

    h = hashlib.sha256()
    for key in sorted(k for k in tensors if ".lora_A." in k):
        h.update(key.encode())
        h.update(tensors[key].detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return int.from_bytes(h.digest()[:6], "big")
