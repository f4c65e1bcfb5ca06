"""Adapter tensors on the wire: one ArrayRecord holding every tensor of an adapter,
packed into a single array in the transport dtype.

Only tensors cross the wire, never text or token ids. fp16 halves the bytes; bf16 is not
accepted by ArrayRecord, so everything is cast to fp32 or fp16 before sending, and the
receiver always works in fp32.

Why one array: in deployment Flower moves every Array of a message as objects of their
own, one HTTP request each at every hop (ServerApp -> SuperLink -> SuperNode -> app and
back). SmolLM2's adapter is 120 tensors, about 240 objects per message, and pulling them
took 8-12 s per message on a busy 2-core site. Packed it is a handful. The names and
shapes travel in the array's key (`LAYOUT` + JSON), sorted by name, so the same adapter
always has the same key: Flower's strategies and DP wrappers, which pair arrays by key,
see one array and treat it as the concatenation it is (norms, clipping and noise are
element-wise or over all elements alike).
"""

from __future__ import annotations

import json
import math

import numpy as np
import torch
from flwr.app import ArrayRecord

LAYOUT = "fedslm-packed:"

# federation.transport_dtype: the wire dtype of adapter tensors
DTYPES = {"float32": torch.float32, "float16": torch.float16}


def to_record(tensors: dict[str, torch.Tensor], dtype: str = "float32") -> ArrayRecord:
    target = DTYPES[dtype]
    names = sorted(tensors)
    parts = [tensors[n].detach().to("cpu", target).contiguous() for n in names]
    layout = json.dumps([[n, list(p.shape)] for n, p in zip(names, parts)], separators=(",", ":"))
    flat = torch.cat([p.reshape(-1) for p in parts]) if parts else torch.zeros(0, dtype=target)
    return ArrayRecord({LAYOUT + layout: flat})


def named_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    """Name -> array in its wire dtype, for a packed record (or one of plain named arrays,
    as Flower's own tools make). Raises ValueError when a packed record's layout does not
    account for its values exactly (a malformed or forged reply)."""
    if len(record) == 1 and (key := next(iter(record.keys()))).startswith(LAYOUT):
        flat = record[key].numpy().reshape(-1)
        try:  # the key comes from another party: anything unexpected in it is a malformed layout
            layout = json.loads(key[len(LAYOUT):])
            if not all(isinstance(n, str) and all(type(d) is int for d in shape) for n, shape in layout):
                raise ValueError("names must be strings and dimensions integers")
            sizes = [math.prod(shape) for _, shape in layout]
        except Exception as err:  # noqa: BLE001 - incl. RecursionError from deeply nested JSON
            raise ValueError(f"the packed adapter's layout is malformed ({type(err).__name__})") from None
        if any(s < 0 for s in sizes) or sum(sizes) != flat.size:
            raise ValueError(f"the packed adapter's layout describes {sum(sizes)} values, the array holds {flat.size}")
        out, offset = {}, 0
        for (name, shape), size in zip(layout, sizes):
            out[str(name)] = flat[offset:offset + size].reshape([int(d) for d in shape])
            offset += size
        return out
    return {k: arr.numpy() for k, arr in record.items()}


def from_record(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.array(v, copy=True)).float() for k, v in named_arrays(record).items()}


def record_bytes(record: ArrayRecord) -> int:
    """Serialised bytes of the tensors in a record: each array travels as .npy bytes
    (the raw values plus a header of about 128 bytes), so this is what goes on the wire."""
    return sum(len(arr.data) for arr in record.values())
