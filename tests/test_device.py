"""Devices and precision (train.device, train.precision, model.quantize) and the GPU share
of simulated sites (tests/test_simulation.py runs a federation on a separate Ray cluster).

The CUDA paths cannot run on the CPU-only test machines; what they share with the CPU is
tested here with the CPU's own bf16 autocast (the same code: a bf16 base, fp32 LoRA
factors, fp32 per-sample gradients, clipping and noise)."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
from opacus import GradSampleModule

from fedslm.config import ConfigError, validate
from fedslm.data.clinic import generate_site
from fedslm.data.tokenize import TokenizedDataset, make_collate
from fedslm.device import DeviceError, autocast, base_dtype, check_hardware, resolve_device
from fedslm.lora.adapter import attach_lora
from fedslm.lora.grad_sample import wrap_lora_for_dp
from fedslm.losses import sequence_losses
from fedslm.model import load_base_model, resolve_model_dir
from fedslm.privacy.accounting import PrivacyLedger
from fedslm.privacy.dp_step import wrap_for_dp
from fedslm.privacy.plan import plan_dp
from fedslm.train import DPContext, train_local
from simulations.simulate import gpus_per_site, ray_backend
from tests.helpers import grad_samples, randomise_b

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")


@no_cuda
def test_a_device_that_is_not_there_is_refused_with_what_is(tiny_cfg):
    assert resolve_device("auto").type in ("cpu", "mps")
    with pytest.raises(DeviceError, match=r"train.device=cuda, but this machine has no usable CUDA GPU \(available: cpu"):
        resolve_device("cuda")
    with pytest.raises(DeviceError, match="model.quantize=4bit needs a CUDA GPU.*use model.quantize=none"):
        check_hardware("auto", "4bit")
    tiny_cfg.model.quantize = "4bit"
    with pytest.raises(DeviceError, match="model.quantize=4bit needs a CUDA GPU"):
        from simulations.simulate import simulate

        simulate(tiny_cfg, echo=lambda *_: None)
    assert not Path(tiny_cfg.output_dir, "summary.json").exists()


def test_bad_device_settings_are_named(tiny_cfg):
    tiny_cfg.train.device, tiny_cfg.train.precision, tiny_cfg.model.quantize = "tpu", "fp8", "3bit"
    tiny_cfg.federation.gpus_per_site = 2.0
    with pytest.raises(ConfigError) as err:
        validate(tiny_cfg)
    text = str(err.value)
    for key in ("train.device: got 'tpu', allowed values: auto, cpu, cuda, mps", "train.precision: got 'fp8'",
                "model.quantize: got '3bit', allowed values: none, 4bit", "federation.gpus_per_site: got 2.0"):
        assert key in text


def test_cpu_stays_fp32_by_default(tiny_cfg):
    model, _ = load_base_model(resolve_model_dir(tiny_cfg.model), tiny_cfg.train.device, tiny_cfg.train.precision)
    if not torch.cuda.is_available():
        assert base_dtype(model) == torch.float32 and next(model.parameters()).device.type in ("cpu", "mps")


def _batch(tok, n=4):
    ds = TokenizedDataset.from_records(tok, generate_site(0, n, seed=5), 256)
    return make_collate(tok.pad_token_id)([ds[i] for i in range(n)])


def _private_round(pm, tok, cfg):
    data = TokenizedDataset.from_records(tok, generate_site(0, 24, seed=1), 256)
    plan = plan_dp(cfg.privacy, cfg.train, len(data), rounds=1)
    return train_local(pm, data, cfg.train, tok.pad_token_id, seed=0, dp=DPContext(cfg.privacy, plan, PrivacyLedger([])),
                       grad_sample_module=wrap_for_dp(pm, cfg.privacy))


def test_bf16_base_keeps_lora_and_per_sample_gradients_in_fp32(tiny_cfg):
    """A bf16 base under autocast (CUDA's default; here the CPU's bf16): the LoRA factors,
    their per-sample gradients and so the clipping stay fp32, and match Opacus's hooks on
    the same model to bf16's precision and the fp32 model's to a few percent."""
    path = resolve_model_dir(tiny_cfg.model)
    model, tok = load_base_model(path, "cpu", "bf16")
    assert base_dtype(model) == torch.bfloat16
    pm = randomise_b(attach_lora(model, tiny_cfg.lora, freeze_a=False))
    assert all(p.dtype == torch.float32 for p in pm.parameters() if p.requires_grad)
    assert isinstance(autocast(pm), torch.autocast)
    batch = _batch(tok)
    fast = grad_samples(copy.deepcopy(pm), batch, wrap_lora_for_dp)
    hooks = grad_samples(copy.deepcopy(pm), batch, GradSampleModule)
    fp32 = grad_samples(copy.deepcopy(pm).float(), batch, wrap_lora_for_dp)  # the same weights, all fp32
    assert set(fast) == set(hooks) == set(fp32)
    for name in fast:
        assert fast[name].dtype == torch.float32
        scale = fp32[name].abs().max()
        assert (fast[name] - hooks[name].float()).abs().max() <= 2e-2 * scale, name
        assert (fast[name] - fp32[name]).abs().max() <= 5e-2 * scale, name


def test_a_private_round_on_a_bf16_base(tiny_cfg, reproducible_dp):
    model, tok = load_base_model(resolve_model_dir(tiny_cfg.model), "cpu", "bf16")
    pm = attach_lora(model, tiny_cfg.lora, freeze_a=True)
    stats = _private_round(pm, tok, tiny_cfg)
    assert stats.steps == tiny_cfg.train.local_steps and stats.mean_loss == stats.mean_loss
    trained = [p for p in pm.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() and p.abs().max() > 0 for p in trained)


def test_noise_drawn_on_the_host_is_opacus_noise(tiny_cfg, reproducible_dp):
    """The DP optimizer draws its noise from the secret host generator and moves it to the
    parameter's device; on the CPU that must be exactly what Opacus's own add_noise adds."""
    from opacus.optimizers import DPOptimizer

    from fedslm.privacy.dp_step import _add_noise_from_host

    p = torch.nn.Parameter(torch.zeros(5, 3))
    grads = []
    for own in (False, True):
        opt = DPOptimizer(torch.optim.SGD([p], lr=1.0), noise_multiplier=0.7, max_grad_norm=1.0, expected_batch_size=4,
                          generator=torch.Generator().manual_seed(3), secure_mode=True)
        p.summed_grad = torch.ones(5, 3)
        _add_noise_from_host(opt) if own else opt.add_noise()
        grads.append(p.grad.clone())
        p.grad, p.summed_grad = None, None
    assert torch.equal(grads[0], grads[1]) and grads[0].std() > 0.1


def test_gpu_share_and_ray_arguments(tiny_cfg):
    fed = tiny_cfg.federation
    if not torch.cuda.is_available():
        assert gpus_per_site(tiny_cfg) == 0.0  # auto without a GPU
    fed.gpus_per_site = 0.25
    assert ray_backend(tiny_cfg)["client_resources"] == {"num_cpus": fed.cpus_per_site, "num_gpus": 0.25}
    assert "num_cpus" in ray_backend(tiny_cfg)["init_args"]
    fed.ray_address = "127.0.0.1:6379"
    init = ray_backend(tiny_cfg)["init_args"]
    assert init["address"] == "127.0.0.1:6379" and "num_cpus" not in init  # Ray refuses it for a cluster


cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (this machine has none)")


@cuda_only
def test_on_cuda_a_bf16_private_round_keeps_fp32_dp_arithmetic(tiny_cfg, reproducible_dp):
    model, tok = load_base_model(resolve_model_dir(tiny_cfg.model), "cuda", "auto")
    assert model.device.type == "cuda"
    pm = randomise_b(attach_lora(model, tiny_cfg.lora, freeze_a=False))
    batch = _batch(tok)
    fast = grad_samples(copy.deepcopy(pm), batch, wrap_lora_for_dp)
    hooks = grad_samples(copy.deepcopy(pm), batch, GradSampleModule)
    for name in fast:
        assert fast[name].dtype == torch.float32 and fast[name].device.type == "cuda"
        assert (fast[name] - hooks[name].float()).abs().max() <= 2e-2 * fast[name].abs().max(), name
    stats = _private_round(pm, tok, tiny_cfg)
    assert stats.steps == tiny_cfg.train.local_steps
    assert all(p.device.type == "cuda" and p.dtype == torch.float32 for p in pm.parameters() if p.requires_grad)


@cuda_only
@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes (pip install -e '.[gpu]')")
def test_on_cuda_a_4bit_base_trains_privately(tiny_cfg, reproducible_dp):
    model, tok = load_base_model(resolve_model_dir(tiny_cfg.model), "cuda", "auto", "4bit")
    pm = attach_lora(model, tiny_cfg.lora, freeze_a=True)
    stats = _private_round(pm, tok, tiny_cfg)
    assert stats.steps == tiny_cfg.train.local_steps and stats.ledger.steps == stats.steps


def test_the_card_says_when_the_sites_trained_on_a_4bit_base(tiny_cfg):
    from fedslm.use.card import model_card

    plain = model_card(tiny_cfg, {"level": "none"}, 1e-5, 4, 8)
    tiny_cfg.model.quantize = "4bit"
    quantized = model_card(tiny_cfg, {"level": "none"}, 1e-5, 4, 8)
    assert "NF4" not in plain and "trained on an NF4 (4-bit, bitsandbytes) copy of the base" in quantized


def test_auto_gpu_shares_let_ray_place_every_site(tiny_cfg, monkeypatch):
    import simulations.simulate as sim

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr("fedslm.device.resolve_device", lambda name="auto": torch.device("cuda"))
    fed = tiny_cfg.federation
    fed.gpus_per_site, fed.sites, fed.ray_cpus, fed.cpus_per_site = -1, 3, 3, 1.0
    assert sim.gpus_per_site(tiny_cfg) == 0.5  # 2 GPUs, 3 at once: two per GPU, not 2/3 each
    fed.sites = 7
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert sim.gpus_per_site(tiny_cfg) == pytest.approx(1 / 3)  # 3 at once share the GPU
    fed.ray_cpus = 1
    assert sim.gpus_per_site(tiny_cfg) == 1.0


def test_a_site_on_a_node_that_does_not_see_the_run_directory_refuses(tiny_cfg, tmp_path):
    """On a Ray cluster a site's ledger lives in the run directory: a process on a node
    without it would start a second ledger. The driver marks the directory; sites check."""
    from flwr.app import Context, RecordDict

    from fedslm.config import ConfigError
    from fedslm.rundir import mark_run_dir
    from fedslm.site.runtime import site_setup

    tiny_cfg.federation.ray_address = "127.0.0.1:6379"
    tiny_cfg.output_dir = str(tmp_path / "driver-only")
    ctx = Context(run_id=1, node_id=5, node_config={"partition-id": 0, "num-partitions": 3}, state=RecordDict(),
                  run_config={})
    with pytest.raises(ConfigError, match="does not see the run directory .*driver-only.*filesystem every node shares"):
        site_setup(ctx, tiny_cfg)
    mark_run_dir(Path(tiny_cfg.output_dir))
    assert site_setup(ctx, tiny_cfg).policy.simulated


def test_hooks_mode_clips_in_fp32_on_a_bf16_base(tiny_cfg):
    """Opacus's hooks give bf16 per-sample gradients under a bf16 base, and a clip factor
    computed in bf16 can let a sample's clipped gradient exceed the clip norm. fedslm casts
    them to fp32 before Opacus clips: every sample's clipped contribution is within C."""
    from fedslm.privacy.dp_step import PrivateStep

    model, tok = load_base_model(resolve_model_dir(tiny_cfg.model), "cpu", "bf16")
    pm = randomise_b(attach_lora(model, tiny_cfg.lora, freeze_a=False), std=0.5)
    tiny_cfg.privacy.grad_sample_mode, tiny_cfg.privacy.max_grad_norm = "hooks", 0.05  # every sample is clipped
    data = TokenizedDataset.from_records(tok, generate_site(0, 16, seed=5), 256)
    params = [p for p in pm.parameters() if p.requires_grad]
    loader = torch.utils.data.DataLoader(data, batch_size=8, collate_fn=make_collate(tok.pad_token_id))
    plan = plan_dp(tiny_cfg.privacy, tiny_cfg.train, len(data), rounds=1)
    step = PrivateStep(DPContext(tiny_cfg.privacy, plan, PrivacyLedger([])), wrap_for_dp(pm, tiny_cfg.privacy),
                       torch.optim.SGD(params, lr=0.0), loader, torch.Generator().manual_seed(0))
    step.backward(sequence_losses(pm, _batch(tok, 8)))
    assert all(p.grad_sample.dtype == torch.float32 for p in params)
    flat = torch.cat([p.grad_sample.reshape(8, -1) for p in params], dim=1)
    norms = flat.norm(dim=1)
    assert (norms > 0.05).all()
    factor = (0.05 / (norms + 1e-6)).clamp(max=1.0)  # Opacus's clip factor, now in fp32
    assert ((flat * factor[:, None]).norm(dim=1) <= 0.05 * (1 + 1e-6)).all()
    step.optimizer.clip_and_accumulate()
    assert all(p.summed_grad.dtype == torch.float32 for p in params)
    assert torch.cat([p.summed_grad.flatten() for p in params]).norm() <= 8 * 0.05 * (1 + 1e-5)
