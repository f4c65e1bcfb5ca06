"""Helpers the per-sample-gradient tests share (tests/test_fast_dp.py, test_device.py,
test_families.py)."""

from __future__ import annotations

import torch

from fedslm.losses import sequence_losses


def randomise_b(pm, std: float = 0.05, seed: int | None = None):
    """Nonzero LoRA B factors (A's gradient is zero while B is), from `seed` when given."""
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                if g is None:
                    p.normal_(0, std)
                else:
                    p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * std)
    return pm


def grad_samples(pm, batch, wrap) -> dict[str, torch.Tensor]:
    """Per-sample gradients of every trainable parameter of `pm` (wrapped in place by
    `wrap`) after one backward of the mean loss."""
    wrap(pm)
    sequence_losses(pm, batch).mean().backward()
    return {n: p.grad_sample.detach().clone() for n, p in pm.named_parameters() if p.requires_grad}
