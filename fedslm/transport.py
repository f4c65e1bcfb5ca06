"""Adapter tensors on the wire: an ArrayRecord of named arrays in the transport dtype.

Only tensors cross the wire, never text or token ids. fp16 halves the bytes; bf16 is not
accepted by ArrayRecord, so everything is cast to fp32 or fp16 before sending, and the
receiver always works in fp32.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord

# federation.transport_dtype: the wire dtype of adapter tensors
DTYPES = {"float32": torch.float32, "float16": torch.float16}


def to_record(tensors: dict[str, torch.Tensor], dtype: str = "float32") -> ArrayRecord:
    target = DTYPES[dtype]
    return ArrayRecord({k: v.detach().to("cpu", target).contiguous() for k, v in tensors.items()})


def from_record(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(arr.numpy().copy()).float() for k, arr in record.items()}


def record_bytes(record: ArrayRecord) -> int:
    """Serialised bytes of the tensors in a record: each array travels as .npy bytes
    (the raw values plus a header of about 128 bytes), so this is what goes on the wire."""
    return sum(len(arr.data) for arr in record.values())
