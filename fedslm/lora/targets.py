"""Which projections LoRA adapts, per architecture (`lora.target_modules`).

The names are read off the model's own first decoder layer, not from a table of families:
its linear layers under the attention block are `attention`, those under the MLP are
`mlp`, and `all` is both. Explicit names (q_proj, v_proj, ...) are checked against the
same list. Families that fuse projections (Phi-3: q, k and v in `qkv_proj`, gate and up
in `gate_up_proj`) have no separate q_proj: an explicit name that the model fuses is
mapped to the fused layer (LoRA then adapts all of it: on Phi-3 the default `[q_proj,
v_proj]` adapts k as well), so the DP recipe's default works on every family. A mixture of
experts' router (`gate`, `*_gate`) is never a target.
"""

from __future__ import annotations

from torch import nn

ALIASES = ("attention", "mlp", "all")
ROUTERS = ("gate", "router")
# the projections families fuse, and the fused layer that holds each
FUSED = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
         "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}


class TargetError(ValueError):
    pass


def projections(model: nn.Module) -> dict[str, list[str]]:
    """{"attention": [...], "mlp": [...]}: the leaf names of the linear layers in the first
    decoder layer's attention and MLP blocks, in module order."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    layer = lm.get_decoder().layers[0]
    found: dict[str, list[str]] = {"attention": [], "mlp": []}
    for name, module in layer.named_modules():
        # bitsandbytes' Linear4bit is an nn.Linear too
        if not isinstance(module, nn.Linear) or "." not in name:
            continue
        block, leaf = name.split(".")[0], name.split(".")[-1]
        if leaf in ROUTERS or leaf.endswith("_gate"):  # a mixture of experts' router, not a projection
            continue
        group = "attention" if "attn" in block or "attention" in block else "mlp" if "mlp" in block else None
        if group and leaf not in found[group]:
            found[group].append(leaf)
    if not found["attention"]:
        raise TargetError(f"{type(lm).__name__}: found no linear layers in the attention block of its first decoder "
                          "layer; give lora.target_modules as explicit module names")
    return found


def resolve_targets(model: nn.Module, requested: list[str]) -> list[str]:
    """The module names LoRA attaches to for `requested` (aliases or names), in model order."""
    blocks = projections(model)
    known = blocks["attention"] + blocks["mlp"]
    chosen: list[str] = []
    for name in requested:
        if name in ALIASES:
            if name != "attention" and not blocks["mlp"]:
                raise TargetError(f"lora.target_modules={name}: {_family(model)} has no plain linear layers in an MLP "
                                  "block (a mixture of experts?); name its modules explicitly, or use attention")
            picks = known if name == "all" else blocks[name]
        elif name in known:
            picks = [name]
        elif FUSED.get(name) in known:
            picks = [FUSED[name]]
        else:
            raise TargetError(f"lora.target_modules: {name!r} is not a projection of {_family(model)}; it has "
                              f"{', '.join(known)} (or use one of the aliases {', '.join(ALIASES)})")
        chosen += [p for p in picks if p not in chosen]
    if not chosen:
        raise TargetError("lora.target_modules is empty; give module names or one of: " + ", ".join(ALIASES))
    return [p for p in known if p in chosen]


def _family(model: nn.Module) -> str:
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    return f"this model ({lm.config.model_type})"
