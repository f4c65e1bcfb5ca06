"""Adapter tensors on the wire: fp16 by default, half the bytes of fp32, bf16-safe."""

from __future__ import annotations

import json

import pytest
import torch
from flwr.app import Array, ArrayRecord

from fedslm.config import FederationConfig
from fedslm.transport import from_record, record_bytes, to_record


def _adapter(dtype=torch.float32) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    shapes = {f"layers.{i}.{m}.lora_B.weight": (576 if m == "q_proj" else 192, 16)
              for i in range(4) for m in ("q_proj", "v_proj")}
    return {k: (0.01 * torch.randn(s, generator=gen)).to(dtype) for k, s in shapes.items()}


def test_fp16_is_the_default_and_halves_the_bytes_on_the_wire():
    assert FederationConfig().transport_dtype == "float16"
    tensors = _adapter()
    values = sum(t.numel() for t in tensors.values())
    fp32, fp16 = record_bytes(to_record(tensors, "float32")), record_bytes(to_record(tensors, "float16"))
    headers = fp32 - 4 * values  # .npy headers, the same for either dtype
    assert 0 < headers < 200 * len(tensors)
    assert fp16 == 2 * values + headers
    assert fp16 / fp32 < 0.51


def test_fp16_round_trip_is_close_and_bf16_is_cast_first():
    tensors = _adapter(torch.bfloat16)
    back = from_record(to_record(tensors, "float16"))
    for key, t in tensors.items():
        assert back[key].dtype == torch.float32
        # bf16 (8 mantissa bits) fits in fp16 (11): exact, except below fp16's normal
        # range (6e-5), where fp16 spacing is 6e-8
        torch.testing.assert_close(back[key], t.float(), rtol=0, atol=6e-8)
    exact = from_record(to_record(_adapter(), "float32"))
    rounded = from_record(to_record(_adapter(), "float16"))
    for key in exact:
        torch.testing.assert_close(rounded[key], exact[key], rtol=1e-3, atol=1e-7)


def test_an_adapter_travels_as_one_array_and_comes_back_by_name():
    """Flower moves each Array of a message as its own objects, one request per hop: the
    whole adapter is one array (a handful of objects, not two per tensor), and the names,
    shapes and values come back exactly."""
    from flwr.app import RecordDict
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    tensors = _adapter()
    record = to_record(tensors, "float32")
    assert len(record) == 1
    assert len(get_all_nested_objects(RecordDict({"arrays": record}))) <= 4
    plain = ArrayRecord({k: v.contiguous() for k, v in tensors.items()})
    assert len(get_all_nested_objects(RecordDict({"arrays": plain}))) >= 2 * len(tensors)
    back = from_record(record)
    assert list(back) == sorted(tensors)
    for k, t in tensors.items():
        assert torch.equal(back[k], t)
    # the same adapter in any dict order is the same record (Flower pairs arrays by key)
    shuffled = dict(reversed(list(tensors.items())))
    assert list(to_record(shuffled)) == list(record)
    # a record of plain named arrays (Flower's own tools) reads as well
    assert all(torch.equal(from_record(plain)[k], t) for k, t in tensors.items())


def test_a_forged_layout_is_an_error_not_a_misread():
    from fedslm.transport import LAYOUT, named_arrays

    record = to_record(_adapter(), "float16")
    key = next(iter(record.keys()))
    flat = record[key].numpy()
    forged = (LAYOUT + "not json", LAYOUT + '[["a", [3, 3]]]', key.replace("16]", "17]", 1),
              LAYOUT + "[" * 100_000,  # deep nesting: RecursionError inside json, not a crash of the server
              LAYOUT + json.dumps([["a", [float(flat.size)]]]), LAYOUT + json.dumps([["a", [True] * 1]]))
    for bad_key in forged:
        with pytest.raises(ValueError, match="layout"):
            named_arrays(ArrayRecord({bad_key: Array(flat)}))
