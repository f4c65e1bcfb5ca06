"""Where a model runs and in what precision: `train.device` and `train.precision`.

One rule for every place that runs a model (site training and evaluation, the server's
warm start and evaluation, export, `fedslm evaluate` and `chat`): the device and dtype
are chosen once, when the base model is loaded (`fedslm.model.load_base_model`), and
everything after reads them back from the model itself (`model_device`, `autocast`), so
no call site can disagree with the weights it runs.

bf16 keeps the frozen base in bfloat16 (half the memory) and runs it under autocast;
the LoRA factors stay fp32 (peft keeps adapter weights in fp32 over a half-precision
base), and so do the per-sample gradients, the clipping, the noise and the accountant.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

DEVICES = ("auto", "cpu", "cuda", "mps")
# auto: bf16 on a CUDA device that supports it, fp32 everywhere else (CPU bf16 matmuls are
# slower than fp32 on most CPUs, and MPS autocast covers few ops)
PRECISIONS = ("auto", "fp32", "bf16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class DeviceError(RuntimeError):
    pass


def resolve_device(name: str = "auto") -> torch.device:
    """auto: cuda, then mps, then cpu. An explicit device that is not there is an error
    that says what this machine has, never a silent fall-back to the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"train.device=cuda, but this machine has no usable CUDA GPU ({available()}); "
                          "use train.device=auto or cpu, or install a CUDA build of torch")
    if name == "mps" and not _mps_available():
        raise DeviceError(f"train.device=mps, but MPS is not available here ({available()}); use train.device=auto or cpu")
    if name not in DEVICES:
        raise DeviceError(f"train.device={name!r}: allowed values: {', '.join(DEVICES)}")
    return torch.device(name)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """The dtype the frozen base is held and run in."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    if precision not in DTYPES:
        raise DeviceError(f"train.precision={precision!r}: allowed values: {', '.join(PRECISIONS)}")
    return DTYPES[precision]


def check_hardware(device: str, quantize: str = "none") -> torch.device:
    """The device a run's settings resolve to here, or a DeviceError before any work starts
    (a simulation checks once, up front, instead of failing inside every site process)."""
    where = resolve_device(device)
    if quantize == "4bit":
        if where.type != "cuda":
            raise DeviceError(f"model.quantize=4bit needs a CUDA GPU (bitsandbytes NF4), but this run's device is "
                              f"{where.type} ({available()}); use model.quantize=none on a CPU or MPS machine")
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is None:
            raise DeviceError("model.quantize=4bit needs bitsandbytes: pip install 'fedslm[gpu]' "
                              "(or pip install bitsandbytes)")
    return where


def available() -> str:
    found = ["cpu"]
    if torch.cuda.is_available():
        found.append(f"cuda x{torch.cuda.device_count()}")
    if _mps_available():
        found.append("mps")
    return "available: " + ", ".join(found)


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def base_dtype(model) -> torch.dtype:
    """The dtype of the frozen base weights (the LoRA factors may differ)."""
    frozen = [p for p in model.parameters() if not p.requires_grad and p.is_floating_point()]
    return (frozen or list(model.parameters()))[0].dtype


def autocast(model):
    """The autocast a forward pass of `model` runs under: its base's half precision, or none."""
    dtype = base_dtype(model)
    if dtype not in (torch.bfloat16, torch.float16):
        return nullcontext()
    return torch.autocast(device_type=model_device(model).type, dtype=dtype)


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    if all(v.device == device for v in batch.values()):
        return batch
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
