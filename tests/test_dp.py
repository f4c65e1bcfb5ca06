"""DP-SGD on LoRA: exact per-sample gradients, clipping, noise, accounting, budget."""

from __future__ import annotations

import copy

import pytest
import torch
from opacus import GradSampleModule
from opacus.accountants import RDPAccountant

from fedslm.lora.adapter import adapter_state, attach_lora
from fedslm.config import PrivacyConfig
from fedslm.data.clinic import generate_site
from fedslm.data.tokenize import TokenizedDataset, make_collate
from fedslm.model import load_base_model, resolve_model_dir
from fedslm.privacy.accounting import RDP_ALPHAS, BudgetExceededError, PrivacyLedger, calibrate_noise
from fedslm.privacy.plan import plan_dp
from fedslm.train import DPContext, sequence_losses, train_local


@pytest.fixture
def tiny(tiny_cfg):
    model, tok = load_base_model(resolve_model_dir(tiny_cfg.model))
    return model, tok


def _dataset(tok, n, max_length=1024, site=0):
    return TokenizedDataset.from_records(tok, generate_site(site, n, seed=5), max_length)


def test_per_sample_gradients_match_one_by_one_autograd(tiny, tiny_cfg):
    """Opacus's grad samples for every LoRA A and B equal each example's own gradient,
    with right padding in the batch (so padding and masks leak nothing across samples)."""
    model, tok = tiny
    pm = attach_lora(model, tiny_cfg.lora, freeze_a=False)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)  # nonzero B so that A has a gradient too
    ds = _dataset(tok, 4)
    collate = make_collate(tok.pad_token_id)
    assert len({len(ds[i][0]) for i in range(4)}) > 1, "need unequal lengths to exercise padding"
    params = {n: p for n, p in pm.named_parameters() if p.requires_grad}

    reference = []
    for i in range(4):
        pm.zero_grad()
        sequence_losses(pm, collate([ds[i]])).sum().backward()
        reference.append({n: p.grad.clone() for n, p in params.items()})
    pm.zero_grad()

    gsm = GradSampleModule(copy.deepcopy(pm))
    inner = gsm._module
    per_seq = sequence_losses(inner, collate([ds[i] for i in range(4)]))
    per_seq.mean().backward()
    checked = 0
    for n, p in inner.named_parameters():
        if not p.requires_grad:
            continue
        assert p.grad_sample.shape == (4, *p.shape)
        for i in range(4):
            torch.testing.assert_close(p.grad_sample[i], reference[i][n], rtol=1e-4, atol=1e-6)
        checked += 1
    assert checked == len(params) and any("lora_A" in n for n in params)


def _trainable(pm):
    return [p for p in pm.parameters() if p.requires_grad]


def test_clipping_and_noise_seen_by_the_optimizer(tiny, tiny_cfg):
    model, tok = tiny
    pm = attach_lora(model, tiny_cfg.lora, freeze_a=True)
    gsm = GradSampleModule(pm)
    ds = _dataset(tok, 32)
    cfg = PrivacyConfig(epsilon=8.0, max_grad_norm=0.05, grad_sample_mode="hooks")  # GradSampleModule below
    tiny_cfg.train.batch_size = 8
    tiny_cfg.train.local_steps = 4
    plan = plan_dp(cfg, tiny_cfg.train, len(ds), rounds=1)
    expected_batch = int(len(ds) * plan.sample_rate)
    seen = {"clipped": 0, "checked": 0}

    def inspect(_loss):
        params = _trainable(pm)
        if params[0].grad_sample is None or len(params[0].grad_sample) == 0:
            return
        flat = torch.cat([p.grad_sample.reshape(len(p.grad_sample), -1) for p in params], dim=1)
        norms = flat.norm(dim=1)
        factors = (cfg.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
        assert ((norms * factors) <= cfg.max_grad_norm * (1 + 1e-5)).all()
        seen["clipped"] += int((factors < 1).sum())
        noise = []
        for p in params:
            clipped_sum = torch.einsum("i,i...->...", factors, p.grad_sample)
            torch.testing.assert_close(p.summed_grad, clipped_sum, rtol=1e-4, atol=1e-7)
            noise.append((p.grad * expected_batch - p.summed_grad).flatten())
        noise = torch.cat(noise)
        # Gaussian noise of std sigma * C on every coordinate
        # (the noise is secret and fresh each run: a 5-sigma band of the std estimate)
        std = noise.std().item()
        assert abs(std / (plan.noise_multiplier * cfg.max_grad_norm) - 1) < 5 / (2 * noise.numel()) ** 0.5
        seen["checked"] += 1

    train_local(pm, ds, tiny_cfg.train, tok.pad_token_id, seed=3,
                dp=DPContext(cfg, plan, PrivacyLedger()), grad_sample_module=gsm, progress=inspect)
    assert seen["checked"] >= 3 and seen["clipped"] > 0


def test_no_dp_means_no_noise(tiny, tiny_cfg):
    """Without DP the loop is plain AdamW on the mean answer loss: a hand-written loop with
    the same batches lands on the same weights (any noise or clipping would not)."""
    model, tok = tiny
    pm = attach_lora(model, tiny_cfg.lora, freeze_a=True)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    reference = copy.deepcopy(pm)
    ds = _dataset(tok, 16)
    before = [p.detach().clone() for p in _trainable(pm)]
    stats = train_local(pm, ds, tiny_cfg.train, tok.pad_token_id, seed=0)
    assert stats.ledger is None and stats.steps == tiny_cfg.train.local_steps
    assert any(not torch.equal(a, p) for a, p in zip(before, _trainable(pm)))

    t = tiny_cfg.train
    params = _trainable(reference)
    opt = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    batches = iter(torch.utils.data.DataLoader(ds, batch_size=t.batch_size, shuffle=True,
                                               collate_fn=make_collate(tok.pad_token_id),
                                               generator=torch.Generator().manual_seed(0)))
    reference.train()
    for _ in range(t.local_steps):
        opt.zero_grad()
        sequence_losses(reference, next(batches)).mean().backward()
        opt.step()
    for mine, theirs in zip(_trainable(pm), params):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-7)


def test_epsilon_matches_independent_accountant_and_stays_within_target(tiny, tiny_cfg):
    model, tok = tiny
    pm = attach_lora(model, tiny_cfg.lora, freeze_a=True)
    gsm = GradSampleModule(pm)
    ds = _dataset(tok, 40)
    cfg = PrivacyConfig(epsilon=8.0, delta=1e-5, grad_sample_mode="hooks", accountant="rdp")
    rounds, steps = 5, tiny_cfg.train.local_steps
    plan = plan_dp(cfg, tiny_cfg.train, len(ds), rounds)
    ledger, eps = PrivacyLedger(), []
    for r in range(rounds):
        stats = train_local(pm, ds, tiny_cfg.train, tok.pad_token_id, seed=r,
                            dp=DPContext(cfg, plan, ledger), grad_sample_module=gsm)
        ledger = stats.ledger
        eps.append(ledger.epsilon(cfg.delta, "rdp"))

        independent = RDPAccountant()
        for _ in range((r + 1) * steps):
            independent.step(noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate)
        assert eps[-1] == pytest.approx(independent.get_epsilon(cfg.delta, alphas=RDP_ALPHAS), rel=1e-9)
    assert all(a < b for a, b in zip(eps, eps[1:]))
    assert ledger.steps == rounds * steps
    assert eps[-1] <= cfg.epsilon
    assert eps[-1] > 0.9 * cfg.epsilon  # calibrated, not wastefully over-noised

    # what per-round calibration would have done: the same 5 rounds end far above target
    naive_sigma = calibrate_noise(cfg, plan.sample_rate, steps)
    naive = PrivacyLedger([(naive_sigma, plan.sample_rate, steps)] * rounds).epsilon(cfg.delta, "rdp")
    assert naive > 1.4 * cfg.epsilon

    with pytest.raises(BudgetExceededError, match="privacy budget exhausted"):
        ledger.check_budget(cfg, plan.noise_multiplier, plan.sample_rate, steps)


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_empty_poisson_batches_are_noise_only_steps(tiny, tiny_cfg, mode, monkeypatch, reproducible_dp):
    """A step whose Poisson batch is empty still moves the optimizer by pure Gaussian noise
    of std sigma * C / (expected batch), and is accounted like any other."""
    from fedslm.privacy.dp_step import PrivateStep, wrap_for_dp

    model, tok = tiny
    pm = attach_lora(model, tiny_cfg.lora, freeze_a=True)
    ds = _dataset(tok, 4)
    tiny_cfg.train.batch_size = 1
    tiny_cfg.train.local_steps = 20
    cfg = PrivacyConfig(epsilon=50.0, grad_sample_mode=mode)
    gsm = wrap_for_dp(pm, cfg)
    plan = plan_dp(cfg, tiny_cfg.train, len(ds), rounds=1)

    empty_now, noise = {"flag": False}, []
    original = PrivateStep.empty_batch

    def spy(self, params):
        empty_now["flag"] = True
        return original(self, params)

    def after_step(_loss):
        if empty_now["flag"]:
            noise.append(torch.cat([p.grad.flatten() for p in _trainable(pm)]))
            empty_now["flag"] = False

    monkeypatch.setattr(PrivateStep, "empty_batch", spy)
    stats = train_local(pm, ds, tiny_cfg.train, tok.pad_token_id, seed=1,
                        dp=DPContext(cfg, plan, PrivacyLedger()), grad_sample_module=gsm, progress=after_step)
    assert stats.empty_steps > 0 and len(noise) == stats.empty_steps
    assert stats.ledger.steps == 20  # empty steps are accounted like any other
    values = torch.cat(noise)
    expected_std = plan.noise_multiplier * cfg.max_grad_norm / (len(ds) * plan.sample_rate)
    # fresh secret noise each run: 5-sigma bands of the std and mean estimates
    assert abs(values.std().item() / expected_std - 1) < 5 / (2 * values.numel()) ** 0.5
    assert abs(values.mean().item()) < 5 * expected_std / values.numel() ** 0.5
    assert len({float(v[0]) for v in noise}) == len(noise)  # fresh noise each empty step


def test_ledger_survives_serialisation():
    ledger = PrivacyLedger([(0.7, 0.02, 5), (0.7, 0.02, 5)])
    again = PrivacyLedger.from_json(ledger.to_json())
    assert again == ledger and again.epsilon(1e-5) == ledger.epsilon(1e-5)


def test_calibration_covers_the_expected_participation():
    from fedslm.config import FederationConfig
    from fedslm.privacy.accounting import expected_rounds

    assert expected_rounds(FederationConfig(rounds=5, fraction_train=1.0)) == 5
    assert expected_rounds(FederationConfig(rounds=5, fraction_train=0.5)) == 4  # 2 of 3 sites a round
    assert expected_rounds(FederationConfig(sites=10, rounds=6, sites_per_round=5)) == 3
    assert expected_rounds(FederationConfig(rounds=2, fraction_train=0.1)) == 1


@pytest.mark.parametrize("epsilon, sample_rate, steps, accountant", [
    (8.0, 1 / 8, 9, "prv"),      # the demo's plan
    (8.0, 1 / 24, 27, "prv"),
    (1.0, 0.01, 1000, "prv"),    # many steps, a tight budget
    (50.0, 0.25, 20, "prv"),     # little noise: the probes below sigma 1 are the slow ones
    (2.0, 0.3, 300, "rdp"),      # much noise: the search climbs from sigma 1
    (8.0, 0.5, 5, "rdp"),
])
def test_noise_search_lands_in_opacus_window_in_few_probes(epsilon, sample_rate, steps, accountant):
    """Calibration is one site's first cost in a deployed run: the search must spend no more
    than the target and no less than target - 0.01 (Opacus's get_noise_multiplier's window,
    computed here with Opacus's own search for comparison), with at most 8 accountant
    probes where Opacus's bisection takes about 16."""
    import warnings

    from opacus.accountants.utils import get_noise_multiplier

    from fedslm.privacy.accounting import EPSILON_TOLERANCE, RDP_ALPHAS, PrivacyLedger, search_noise

    probes = []

    def epsilon_at(sigma):
        probes.append(sigma)
        return PrivacyLedger([(sigma, sample_rate, steps)]).epsilon(1e-5, accountant)

    sigma = search_noise(epsilon_at, epsilon)
    spent = epsilon_at(sigma)
    assert epsilon - EPSILON_TOLERANCE <= spent <= epsilon
    assert len(probes) - 1 <= 8
    kwargs = {"alphas": RDP_ALPHAS} if accountant == "rdp" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = get_noise_multiplier(target_epsilon=epsilon, target_delta=1e-5, sample_rate=sample_rate,
                                      steps=steps, accountant=accountant, **kwargs)
    # both land in the same 0.01-wide window of epsilon, so their noise agrees closely
    assert sigma == pytest.approx(theirs, rel=5e-3)


def test_noise_search_never_returns_a_probe_over_the_target():
    """A curve the log-log secant fits badly (a kink, flat stretches) costs probes, never
    the guarantee; an unreachable target is an error, not a silently weak noise level;
    an accountant whose epsilon jumps past the window is a failure, not a site too small."""
    from fedslm.privacy.accounting import MAX_SIGMA, CalibrationError, search_noise

    def kinked(sigma):  # steep below sigma 3, nearly flat above
        return 40.0 / sigma**3 if sigma < 3 else 1.48 - 0.01 * sigma

    seen = {}
    sigma = search_noise(lambda s: seen.setdefault(s, kinked(s)), 1.2)
    assert sigma in seen and 1.19 <= seen[sigma] <= 1.2  # returned only as it was probed

    probed = []
    with pytest.raises(CalibrationError, match="out of reach: even noise multiplier 1e\\+06 spends 5"):
        search_noise(lambda s: probed.append(s) or 5.0 + 1.0 / s, 4.0)  # never below 5
    assert max(probed) == pytest.approx(MAX_SIGMA)  # the limit itself was tried
    with pytest.raises(RuntimeError, match="does not fall steadily"):
        search_noise(lambda s: 9.0 if s < 3 else 1.0, 5.0)
    with pytest.raises(ValueError, match="must be > 0"):
        search_noise(lambda s: 1.0 / s, 0.0)
    # a target below twice the tolerance keeps a window inside (0, target]
    sigma = search_noise(lambda s: 0.01 / s, 0.005)
    assert 0.0025 <= 0.01 / sigma <= 0.005


def test_remembered_rdp_curves_give_opacus_figures_and_are_not_recomputed(monkeypatch):
    """A warm site's every training message composes epsilon over rounds that share one
    (sample rate, sigma); the one-step RDP curve is computed once per process. The figures
    must be Opacus's own, to the bit, for both accountants (PRV uses the curve for its
    domain), and a new round of the same plan must compute no order again."""
    from opacus.accountants import create_accountant
    from opacus.accountants.analysis import rdp as analysis

    from fedslm.privacy import accounting

    accounting._memoise_rdp()
    exact = analysis.compute_rdp.exact
    # values no other test uses: _epsilon's own cache must not answer for the memo
    history = [(0.9137, 0.0219, 3), (0.9137, 0.0219, 4), (1.3071, 0.0113, 5)]
    for accountant in ("rdp", "prv"):
        with monkeypatch.context() as m:
            m.setattr(analysis, "compute_rdp", exact)
            acc = create_accountant(accountant)
            acc.history = list(history)
            theirs = acc.get_epsilon(delta=1e-5, **({"alphas": RDP_ALPHAS} if accountant == "rdp" else {}))
        assert PrivacyLedger(history).epsilon(1e-5, accountant) == theirs

    orders_computed = []
    one_order = analysis._compute_rdp
    monkeypatch.setattr(analysis, "_compute_rdp", lambda *a: orders_computed.append(a) or one_order(*a))
    later = PrivacyLedger(history + [(0.9137, 0.0219, 2)])
    assert later.epsilon(1e-5, "rdp") > PrivacyLedger(history).epsilon(1e-5, "rdp")
    later.epsilon(1e-5, "prv")
    assert orders_computed == []
    PrivacyLedger([(0.777, 0.0219, 2)]).epsilon(1e-5, "rdp")  # a new sigma is computed, once
    assert len(orders_computed) == len(RDP_ALPHAS)


def test_prv_and_rdp_both_bound_the_same_history():
    ledger = PrivacyLedger([(0.8, 0.02, 30)])
    rdp, prv = ledger.epsilon(1e-5, "rdp"), ledger.epsilon(1e-5, "prv")
    assert 0 < prv < rdp  # PRV is the tighter accountant here; both are reported


def test_gradient_accumulation_equals_the_unsplit_logical_batch(tiny, tiny_cfg, reproducible_dp):
    """Physical batches of 2 accumulated into Poisson logical batches of ~8: same sampled
    batches, same noise, same update, and one accounted step per logical batch."""
    model, tok = tiny
    ds = _dataset(tok, 32)
    cfg = PrivacyConfig(epsilon=8.0, grad_sample_mode="hooks")
    tiny_cfg.train.batch_size = 8
    tiny_cfg.train.local_steps = 3
    plan = plan_dp(cfg, tiny_cfg.train, len(ds), rounds=1)
    results = []
    for physical in (0, 2):
        pm = attach_lora(copy.deepcopy(model), tiny_cfg.lora, freeze_a=True)
        train_cfg = copy.deepcopy(tiny_cfg.train)
        train_cfg.max_physical_batch = physical
        stats = train_local(pm, ds, train_cfg, tok.pad_token_id, seed=9,
                            dp=DPContext(cfg, plan, PrivacyLedger()), grad_sample_module=GradSampleModule(pm))
        assert stats.steps == 3 and stats.ledger.steps == 3
        results.append(([p.detach().clone() for p in _trainable(pm)], stats.examples_seen))
    (plain, seen_plain), (split, seen_split) = results
    assert seen_plain == seen_split
    for a, b in zip(plain, split):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mode", ["functorch", "ghost"])
def test_grad_sample_modes_give_the_same_private_update_as_hooks(tiny, tiny_cfg, mode, reproducible_dp):
    """Same Poisson batches and noise: functorch and ghost clipping must reproduce the
    hooks update (ghost without ever materialising per-sample gradients)."""
    from fedslm.privacy.dp_step import wrap_for_dp

    model, tok = tiny
    ds = _dataset(tok, 32)
    tiny_cfg.train.batch_size = 8
    results = []
    for m in ("hooks", mode):
        cfg = PrivacyConfig(epsilon=8.0, max_grad_norm=0.05, grad_sample_mode=m)
        plan = plan_dp(cfg, tiny_cfg.train, len(ds), rounds=1)
        pm = attach_lora(copy.deepcopy(model), tiny_cfg.lora, freeze_a=True)
        stats = train_local(pm, ds, tiny_cfg.train, tok.pad_token_id, seed=4,
                            dp=DPContext(cfg, plan, PrivacyLedger()), grad_sample_module=wrap_for_dp(pm, cfg))
        assert stats.ledger.steps == tiny_cfg.train.local_steps
        results.append([p.detach().clone() for p in _trainable(pm)])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


def test_proximal_term_pulls_toward_the_global_adapter(tiny_cfg):
    """FedProx: lr * mu = 1 pins every step to the start; mu = 0 moves freely; in between
    the drift shrinks."""
    model, tok = load_base_model(resolve_model_dir(tiny_cfg.model))
    ds = TokenizedDataset.from_records(tok, generate_site(0, 24, seed=1), 1024)
    drift = {}
    for mu in (0.0, 0.5 / tiny_cfg.train.lr, 1.0 / tiny_cfg.train.lr):
        pm = attach_lora(copy.deepcopy(model), tiny_cfg.lora, freeze_a=True)
        start = adapter_state(pm)
        train_local(pm, ds, tiny_cfg.train, tok.pad_token_id, seed=0, proximal_mu=mu)
        end = adapter_state(pm)
        drift[mu] = sum(float((end[k] - start[k]).norm() ** 2) for k in start) ** 0.5
    lo, mid, hi = sorted(drift)
    assert drift[lo] > drift[mid] > 0
    assert drift[hi] < 1e-6


def test_local_epochs_set_the_steps_from_the_sites_rows_and_the_calibration_covers_them(tiny, tiny_cfg):
    """train.local_epochs: a site trains ceil(epochs x rows / batch) steps a round, its noise
    is calibrated for exactly those steps over every round, and the ledger counts them."""
    model, tok = tiny
    ds = _dataset(tok, 30)
    train = copy.deepcopy(tiny_cfg.train)
    train.batch_size, train.local_epochs = 4, 1.5
    assert train.steps_for(len(ds)) == 12 and train.steps_for(5) == 2
    cfg = PrivacyConfig(epsilon=8.0, grad_sample_mode="hooks")
    plan = plan_dp(cfg, train, len(ds), rounds=2)
    assert plan.total_steps == 24
    pm = attach_lora(model, tiny_cfg.lora, freeze_a=True)
    stats = train_local(pm, ds, train, tok.pad_token_id, seed=2, dp=DPContext(cfg, plan, PrivacyLedger()),
                        grad_sample_module=GradSampleModule(pm))
    assert stats.steps == 12 and stats.ledger.steps == 12
    twice = stats.ledger.with_round(plan.noise_multiplier, plan.sample_rate, 12)
    assert 0.9 * cfg.epsilon < twice.epsilon(cfg.delta, cfg.accountant) <= cfg.epsilon
