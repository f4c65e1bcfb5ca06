"""grad_sample_mode=lora: fedslm's own per-sample gradients for LoRA factors must be
exactly Opacus's (hooks), and a private round on them must be the same round."""

from __future__ import annotations

import copy

import pytest
import torch
from opacus import GradSampleModule

from fedslm.lora.adapter import attach_lora
from fedslm.lora.targets import resolve_targets
from fedslm.config import PrivacyConfig, validate
from fedslm.data.clinic import generate_site
from fedslm.data.tokenize import TokenizedDataset, make_collate
from fedslm.lora.grad_sample import PerSampleGradLinear, disable_per_sample_grads, wrap_lora_for_dp
from fedslm.model import load_base_model, resolve_model_dir
from fedslm.privacy.accounting import PrivacyLedger
from fedslm.privacy.dp_step import wrap_for_dp
from fedslm.privacy.plan import plan_dp
from fedslm.train import DPContext, sequence_losses, train_local
from tests.helpers import grad_samples, randomise_b


@pytest.fixture
def tiny(tiny_cfg):
    return load_base_model(resolve_model_dir(tiny_cfg.model))


def _dataset(tok, n, site=0):
    return TokenizedDataset.from_records(tok, generate_site(site, n, seed=5), 1024)


def _padded_batch(tok, n):
    ds = _dataset(tok, n)
    lengths = {len(ds[i][0]) for i in range(n)}
    assert len(lengths) > 1, "need unequal lengths so that padding is exercised"
    return make_collate(tok.pad_token_id)([ds[i] for i in range(n)])


@pytest.mark.parametrize("freeze_a", [True, False], ids=["ffa", "a-trains"])
def test_per_sample_gradients_equal_opacus_hooks_for_every_target(tiny, tiny_cfg, freeze_a):
    model, tok = tiny
    model = model.double()
    tiny_cfg.lora.target_modules = ["all"]
    every = resolve_targets(model, ["all"])
    assert len(every) == 7  # a Llama layer's seven projections
    pm = randomise_b(attach_lora(model, tiny_cfg.lora, freeze_a=freeze_a))
    batch = _padded_batch(tok, 5)

    reference = grad_samples(copy.deepcopy(pm), batch, GradSampleModule)
    fast_model = copy.deepcopy(pm)
    fast = grad_samples(fast_model, batch, wrap_lora_for_dp)

    assert set(fast) == set(reference)
    targets = {t for t in every if any(f".{t}.lora_B." in n for n in fast)}
    assert targets == set(every)
    assert any(".lora_A." in n for n in fast) != freeze_a
    for name, ref in reference.items():
        assert fast[name].shape == ref.shape == (5, *ref.shape[1:])
        torch.testing.assert_close(fast[name], ref, rtol=1e-9, atol=1e-12, msg=name)
        assert ref.abs().sum() > 0, f"{name}: a zero gradient proves nothing"
    # the fast path computes no summed gradient: Opacus sets p.grad from the clipped sum
    assert all(p.grad is None for p in fast_model.parameters() if p.requires_grad)


def test_padding_contributes_nothing(tiny, tiny_cfg):
    """A sample's per-sample gradient is the same alone and padded in a batch with longer ones."""
    model, tok = tiny
    model = model.double()
    pm = randomise_b(attach_lora(model, tiny_cfg.lora, freeze_a=False))
    wrap_lora_for_dp(pm)
    ds = _dataset(tok, 6)
    collate = make_collate(tok.pad_token_id)
    shortest = min(range(6), key=lambda i: len(ds[i][0]))
    alone = collate([ds[shortest]])
    sequence_losses(pm, alone).mean().backward()
    single = {n: p.grad_sample[0].clone() for n, p in pm.named_parameters() if p.requires_grad}
    for p in pm.parameters():
        p.grad_sample = None
    together = collate([ds[i] for i in range(6)])
    assert together["input_ids"].shape[1] > alone["input_ids"].shape[1]
    sequence_losses(pm, together).mean().backward()
    for n, p in pm.named_parameters():
        if p.requires_grad:
            # Llama's RMSNorm and rotary run in fp32 even in an fp64 model, and another
            # batch shape takes other kernels: agreement to fp32 rounding, relative to scale
            scale = single[n].abs().max().item()
            assert scale > 0
            torch.testing.assert_close(p.grad_sample[shortest], single[n], rtol=1e-4, atol=1e-5 * scale)


def test_switching_keeps_parameters_and_eval_outputs(tiny, tiny_cfg):
    model, tok = tiny
    pm = attach_lora(model, tiny_cfg.lora, freeze_a=True)
    batch = _padded_batch(tok, 3)
    keys = [n for n, _ in pm.named_parameters()]
    with torch.no_grad():
        before = sequence_losses(pm, batch)
    wrap_lora_for_dp(pm)
    switched = [m for m in pm.modules() if isinstance(m, PerSampleGradLinear)]
    # FFA: only the B factors train, so only they need the per-sample path
    assert len(switched) == len(tiny_cfg.lora.target_modules) * tiny_cfg.model.tiny.num_layers
    assert [n for n, _ in pm.named_parameters()] == keys
    with torch.no_grad():
        torch.testing.assert_close(sequence_losses(pm, batch), before)
    disable_per_sample_grads(pm)
    assert not any(isinstance(m, PerSampleGradLinear) for m in pm.modules())


def _private_round(model, tok, tiny_cfg, mode, *, physical=0, local_steps=3, batch=8, n=32, epsilon=8.0):
    ds = _dataset(tok, n)
    train_cfg = copy.deepcopy(tiny_cfg.train)
    train_cfg.batch_size, train_cfg.local_steps, train_cfg.max_physical_batch = batch, local_steps, physical
    cfg = PrivacyConfig(epsilon=epsilon, max_grad_norm=0.05, grad_sample_mode=mode)
    plan = plan_dp(cfg, train_cfg, len(ds), rounds=1)
    pm = attach_lora(copy.deepcopy(model), tiny_cfg.lora, freeze_a=True)
    stats = train_local(pm, ds, train_cfg, tok.pad_token_id, seed=4,
                        dp=DPContext(cfg, plan, PrivacyLedger()), grad_sample_module=wrap_for_dp(pm, cfg))
    return [p.detach().clone() for p in pm.parameters() if p.requires_grad], stats, cfg


def test_private_round_equals_hooks_round_with_the_same_epsilon(tiny, tiny_cfg, reproducible_dp):
    model, tok = tiny
    hooks, hooks_stats, cfg = _private_round(model, tok, tiny_cfg, "hooks")
    fast, fast_stats, _ = _private_round(model, tok, tiny_cfg, "lora")
    for a, b in zip(hooks, fast):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
    assert fast_stats.ledger.history == hooks_stats.ledger.history
    assert fast_stats.ledger.epsilon(cfg.delta) == hooks_stats.ledger.epsilon(cfg.delta)
    assert fast_stats.examples_seen == hooks_stats.examples_seen > 0


def test_physical_batches_and_empty_batches_on_the_fast_path(tiny, tiny_cfg, reproducible_dp):
    model, tok = tiny
    whole, whole_stats, _ = _private_round(model, tok, tiny_cfg, "lora")
    split, split_stats, _ = _private_round(model, tok, tiny_cfg, "lora", physical=2)
    assert split_stats.ledger.steps == whole_stats.ledger.steps == 3
    for a, b in zip(whole, split):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    # batch 1 of 4 examples: Poisson sampling draws nobody in some of 20 steps
    _, stats, _ = _private_round(model, tok, tiny_cfg, "lora", local_steps=20, batch=1, n=4, epsilon=50.0)
    assert stats.empty_steps > 0 and stats.ledger.steps == 20


def test_config_accepts_lora_mode_and_routes_it_to_the_lora_path(tiny_cfg, tiny):
    """lora mode with micro-batches validates (ghost with micro-batches does not), and the
    wrapper it selects is fedslm's own: no Opacus hooks, per-sample Linear factors instead."""
    from fedslm.config import ConfigError

    tiny_cfg.privacy.grad_sample_mode = "lora"
    tiny_cfg.train.max_physical_batch = 2
    validate(tiny_cfg)
    tiny_cfg.privacy.grad_sample_mode = "ghost"
    with pytest.raises(ConfigError, match="train.max_physical_batch: not supported"):
        validate(tiny_cfg)
    tiny_cfg.privacy.grad_sample_mode = "lora_fast"
    with pytest.raises(ConfigError, match="privacy.grad_sample_mode.*hooks.*lora"):
        validate(tiny_cfg)

    from opacus.grad_sample.gsm_no_op import GradSampleModuleNoOp

    model, _ = tiny
    lora = wrap_for_dp(attach_lora(copy.deepcopy(model), tiny_cfg.lora, freeze_a=True),
                       PrivacyConfig(grad_sample_mode="lora"))
    hooks = wrap_for_dp(attach_lora(copy.deepcopy(model), tiny_cfg.lora, freeze_a=True),
                        PrivacyConfig(grad_sample_mode="hooks"))
    assert isinstance(lora, GradSampleModuleNoOp) and not isinstance(hooks, GradSampleModuleNoOp)
    assert hooks.autograd_grad_sample_hooks and not getattr(lora, "autograd_grad_sample_hooks", [])
    fast = [m for m in lora.modules() if isinstance(m, PerSampleGradLinear) and m.weight.requires_grad]
    assert fast and not any(isinstance(m, PerSampleGradLinear) for m in hooks.modules())
