"""Adapter tensors on the wire: fp16 by default, half the bytes of fp32, bf16-safe."""

from __future__ import annotations

import torch

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
