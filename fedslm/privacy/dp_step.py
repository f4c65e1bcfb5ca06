"""The DP step of a site's training loop, wired through Opacus.

Opacus does the mechanism: Poisson-sampled logical batches, per-sample clipping to
`max_grad_norm`, Gaussian noise, and its accountant appending this round's steps to the
site's ledger. This module owns the choice of how per-sample gradients are obtained
(`privacy.grad_sample_mode`) and hands the loop a private optimizer and loader.
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import torch

from fedslm.config import PrivacyConfig
from fedslm.privacy.accounting import PrivacyLedger
from fedslm.privacy.plan import DPPlan

# privacy.grad_sample_mode: how Opacus gets per-sample gradients. hooks (layer hooks),
# functorch (vmap), ghost (norms without materialising them), lora (fedslm.lora.grad_sample:
# LoRA factors compute them in their own backward; same clipping, noise and accounting).
GRAD_SAMPLE_MODES = ("hooks", "functorch", "ghost", "lora")


@dataclass
class DPContext:
    """What a private local round needs: the settings, the plan and the ledger so far."""

    cfg: PrivacyConfig
    plan: DPPlan
    ledger: PrivacyLedger


def wrap_for_dp(peft_model, cfg: PrivacyConfig):
    """The Opacus wrapper for `cfg.grad_sample_mode`; callers keep it across rounds
    (wrapping adds hooks; once is enough)."""
    from opacus.grad_sample.utils import prepare_module

    from fedslm.device import base_dtype

    if cfg.grad_sample_mode == "ghost" and base_dtype(peft_model) != torch.float32:
        raise ValueError(f"privacy.grad_sample_mode=ghost computes its clipping norms in the base's {base_dtype(peft_model)}; "
                         "on a half-precision or 4-bit base use grad_sample_mode=lora (the default) or hooks")
    if cfg.grad_sample_mode == "lora":
        from fedslm.lora.grad_sample import wrap_lora_for_dp

        return wrap_lora_for_dp(peft_model)
    kwargs = {"max_grad_norm": cfg.max_grad_norm} if cfg.grad_sample_mode == "ghost" else {}
    return prepare_module(peft_model, cfg.grad_sample_mode, True, **kwargs)


class _PerSequenceLoss:
    """Ghost clipping asks a criterion for per-sample losses; ours are already computed."""

    reduction = "mean"

    def __call__(self, per_sequence: torch.Tensor) -> torch.Tensor:
        return per_sequence


class PrivateStep:
    """Opacus's optimizer and Poisson loader for one local round, and the ledger after it."""

    def __init__(self, dp: DPContext, grad_sample_module, optimizer, loader, noise_generator: torch.Generator):
        """`loader`'s generator drives the Poisson sampling and `noise_generator` the noise:
        both secret (fedslm.privacy.randomness)."""
        from opacus import PrivacyEngine

        self.ghost = dp.cfg.grad_sample_mode == "ghost"
        # the engine's own secure_mode needs torchcsprng; the generators come from OS entropy
        self.engine = PrivacyEngine(accountant=dp.cfg.accountant, secure_mode=False)
        self.engine.accountant.history = list(dp.ledger.history)
        private = self.engine.make_private(
            module=grad_sample_module,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=dp.plan.noise_multiplier,
            max_grad_norm=dp.cfg.max_grad_norm,
            poisson_sampling=True,
            noise_generator=noise_generator,
            # the lora path fills grad_sample itself; Opacus only clips, noises and accounts
            grad_sample_mode="no_op" if dp.cfg.grad_sample_mode == "lora" else dp.cfg.grad_sample_mode,
            **({"criterion": _PerSequenceLoss()} if self.ghost else {}),
        )
        self.optimizer, self.loader = private[1], private[-1]
        # Opacus's floating-point-safe Gaussian sampling (sum of four draws), which its
        # secure_mode would turn on; here only the noise sampling is switched
        self.optimizer.secure_mode = True
        self.optimizer.add_noise = types.MethodType(_add_noise_from_host, self.optimizer)
        self._criterion = private[2] if self.ghost else None

    def backward(self, per_sequence: torch.Tensor) -> None:
        # ghost: Opacus runs a norm pass and a clipped-loss pass from this tensor
        (self._criterion(per_sequence) if self.ghost else per_sequence.mean()).backward()
        if not self.ghost:
            _grad_samples_in_param_dtype(self.optimizer.params)

    def empty_batch(self, params) -> None:
        """Poisson sampling drew nobody. The step must still be taken (and noised) for the
        accounting to hold: Opacus treats empty grad samples as a noise-only step."""
        for p in params:
            if self.ghost:  # ghost clipping accumulates p.grad, not grad samples
                p.grad = torch.zeros_like(p)
            else:
                p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)

    def physical_batches(self, max_physical: int):
        """Split each logical batch into physical ones of at most `max_physical` examples;
        Opacus skips the optimizer step until the logical batch is complete."""
        from opacus.utils.batch_memory_manager import BatchMemoryManager

        return BatchMemoryManager(data_loader=self.loader, max_physical_batch_size=max_physical,
                                  optimizer=self.optimizer)

    def ledger(self) -> PrivacyLedger:
        return PrivacyLedger(list(self.engine.accountant.history))


def _grad_samples_in_param_dtype(params) -> None:
    """Opacus's hooks compute per-sample gradients in the activations' dtype: bf16 under a
    bf16 base, where the norms and clip factors computed from them can overshoot the clip
    norm by rounding. Cast them to the (fp32) parameter's dtype before Opacus clips, so the
    clipping bounds exactly what is noised. (The lora path stores fp32 already.)"""
    for p in params:
        gs = getattr(p, "grad_sample", None)
        if isinstance(gs, torch.Tensor) and gs.dtype != p.dtype:
            p.grad_sample = gs.to(p.dtype)
        elif isinstance(gs, list):
            p.grad_sample = [g.to(p.dtype) if g.dtype != p.dtype else g for g in gs]


def _add_noise_from_host(optimizer) -> None:
    """Opacus's add_noise, with the noise drawn on the host from the secret CPU generator
    (fedslm.privacy.randomness) and moved to the parameter's device. Opacus draws on the
    parameter's device, which for a GPU would need a CUDA generator: a Philox seeded
    from 64 bits, where the host's Mersenne Twister holds 19,968 bits from os.urandom.
    LoRA's gradients are small, so the copy costs little."""
    from opacus.optimizers.optimizer import _check_processed_flag, _generate_noise, _mark_as_processed

    # (as Opacus's ghost-clipping optimizer does: an adjusted multiplier, if one is set)
    std = getattr(optimizer, "_adjusted_noise_multiplier", optimizer.noise_multiplier) * optimizer.max_grad_norm
    for p in optimizer.params:
        _check_processed_flag(p.summed_grad)
        host = torch.empty(p.summed_grad.shape, dtype=p.summed_grad.dtype)  # shape and dtype only
        noise = _generate_noise(std=std, reference=host, generator=optimizer.generator,
                                secure_mode=optimizer.secure_mode)
        p.grad = (p.summed_grad + noise.to(p.summed_grad.device, non_blocking=True)).view_as(p)
        _mark_as_processed(p.summed_grad)


def clear_grad_samples(params) -> None:
    for p in params:
        for attr in ("grad_sample", "summed_grad"):
            if hasattr(p, attr):
                setattr(p, attr, None)
