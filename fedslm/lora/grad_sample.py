"""Per-sample gradients of LoRA factors, computed inside their own backward pass.

For one LoRA factor W (A: r x d_in, B: d_out x r) applied as y = x W^T over the tokens t
of sample n, the sample's gradient is sum_t g_nt x_nt^T: one batched matmul over
tensors the backward pass already holds (the factor's input x and its output gradient
g). Opacus's hooks mode reaches the same numbers through module hooks, and autograd
still computes the summed gradient next to them, which Opacus then throws away. Here a
custom autograd function returns the input gradient, writes the per-sample gradient to
`weight.grad_sample`, and computes no summed weight gradient at all.

Materialising (batch x d_out x r) is the cheap choice for LoRA: it costs
T * d_out * r per sample, the same as the summed gradient, while a ghost norm costs
T^2 * (d_out + r) and needs g and x kept until every layer's norm is known; with r far
below the sequence length T the materialised form wins in both time and memory.

Clipping, noise and accounting stay with Opacus's DPOptimizer and accountant, wrapped
around a no-op GradSampleModule: the privacy mechanism and epsilon are exactly those of
the hooks mode.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class _PerSampleLinear(torch.autograd.Function):
    """y = x W^T whose backward yields dL/dx and stores per-sample dL_n/dW."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: nn.Parameter) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.owner = weight  # the Parameter itself, where Opacus looks for grad_sample
        return F.linear(x, weight)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight = ctx.saved_tensors
        # under autocast the output (and so its gradient) can be bf16/fp16 while the
        # factor is fp32: compute in the gradient's dtype, hand x its own dtype back
        grad_x = grad_out.matmul(weight.to(grad_out.dtype)).to(x.dtype) if ctx.needs_input_grad[0] else None
        n = grad_out.shape[0]
        # the per-sample gradients, and so the clipping and noise Opacus applies to them,
        # are in the factor's own dtype (fp32), whatever precision the forward ran in
        g = grad_out.reshape(n, -1, grad_out.shape[-1]).to(weight.dtype)
        a = x.reshape(n, -1, x.shape[-1]).to(weight.dtype)
        # the loss is a mean over the batch; each sample's own gradient is n times its share
        per_sample = torch.bmm(g.transpose(1, 2), a)
        per_sample.mul_(n)
        _stash(ctx.owner, per_sample)
        return grad_x, None


def _stash(param: nn.Parameter, grad_sample: torch.Tensor) -> None:
    # a second backward before the optimizer step (physical batches) adds a list entry,
    # the layout Opacus's DPOptimizer concatenates
    current = getattr(param, "grad_sample", None)
    if current is None:
        param.grad_sample = grad_sample
    elif isinstance(current, list):
        current.append(grad_sample)
    else:
        param.grad_sample = [current, grad_sample]


class PerSampleGradLinear(nn.Linear):
    """An nn.Linear (a LoRA factor) whose trainable weight gets per-sample gradients
    instead of a summed one. Outside training, or when frozen, it is a plain Linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.weight.requires_grad and torch.is_grad_enabled():
            return _PerSampleLinear.apply(x, self.weight)
        return F.linear(x, self.weight, self.bias)


def lora_factors(peft_model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """Every LoRA A and B Linear in the model, by qualified name."""
    return [
        (name, m)
        for name, m in peft_model.named_modules()
        if isinstance(m, nn.Linear) and (".lora_A." in name or ".lora_B." in name)
    ]


def enable_per_sample_grads(peft_model: nn.Module) -> int:
    """Switch every trainable LoRA factor to per-sample gradients (frozen A, as in FFA,
    is left alone: it needs none). Returns how many factors were switched."""
    switched = 0
    for name, m in lora_factors(peft_model):
        if m.bias is not None and m.bias.requires_grad:
            raise ValueError(f"{name}: a trainable LoRA bias has no per-sample path here; use grad_sample_mode=hooks")
        if m.weight.requires_grad:
            # same parameters and state-dict keys: only the forward changes
            m.__class__ = PerSampleGradLinear
            switched += 1
    others = [n for n, p in peft_model.named_parameters()
              if p.requires_grad and ".lora_A." not in n and ".lora_B." not in n]
    if others:
        raise ValueError(f"grad_sample_mode=lora covers LoRA factors only, but {others[:2]} also train; use hooks")
    return switched


def disable_per_sample_grads(peft_model: nn.Module) -> None:
    for _, m in lora_factors(peft_model):
        if type(m) is PerSampleGradLinear:
            m.__class__ = nn.Linear


def wrap_lora_for_dp(peft_model: nn.Module):
    """The model's LoRA factors on the fast path, inside Opacus's no-op wrapper (which
    gives each trainable parameter its `grad_sample` slot and hooks nothing)."""
    from opacus.grad_sample.gsm_no_op import GradSampleModuleNoOp

    if enable_per_sample_grads(peft_model) == 0:
        raise ValueError("grad_sample_mode=lora: the model has no trainable LoRA factor")
    return GradSampleModuleNoOp(peft_model)
