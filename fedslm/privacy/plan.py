"""The DP plan of one site: its noise set once for the whole federation, or a refusal that
says how many examples the site would need."""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedslm.config import PrivacyConfig, TrainConfig
from fedslm.data.errors import DataError
from fedslm.privacy.accounting import CalibrationError, calibrate_noise


@dataclass
class DPPlan:
    """How one site's noise was set: for the whole federation, not one round."""

    noise_multiplier: float
    sample_rate: float
    total_steps: int


def plan_dp(cfg: PrivacyConfig, train: TrainConfig, num_examples: int, rounds: int) -> DPPlan:
    # Opacus samples each example with probability 1 / len(loader) = 1 / ceil(N / B);
    # calibrate with exactly that rate.
    sample_rate = 1.0 / math.ceil(num_examples / train.batch_size)
    total = train.steps_for(num_examples) * rounds
    return DPPlan(calibrate_noise(cfg, sample_rate, total), sample_rate, total)


def _plan_or_none(cfg: PrivacyConfig, train: TrainConfig, n: int, rounds: int) -> DPPlan | None:
    try:
        return plan_dp(cfg, train, n, rounds)
    except CalibrationError:  # no noise level reaches the target with this many rows
        return None


def _noise_for(cfg: PrivacyConfig, train: TrainConfig, n: int, rounds: int) -> float:
    plan = _plan_or_none(cfg, train, n, rounds)
    return math.inf if plan is None else plan.noise_multiplier


def check_site_size(cfg: PrivacyConfig, train: TrainConfig, num_examples: int, rounds: int, site: int) -> DPPlan:
    """The DP plan for this site, or a DataError saying how many examples it needs."""
    if num_examples < train.batch_size:
        raise DataError(
            f"site {site} has {num_examples} training examples, fewer than train.batch_size={train.batch_size}; "
            "give it more data or lower train.batch_size"
        )
    plan = _plan_or_none(cfg, train, num_examples, rounds)
    if plan is not None and plan.noise_multiplier <= cfg.max_noise_multiplier:
        return plan
    sigma = math.inf if plan is None else plan.noise_multiplier
    low, high = num_examples, num_examples * 2
    while _noise_for(cfg, train, high, rounds) > cfg.max_noise_multiplier and high < 10**8:
        low, high = high, high * 2
    while high - low > max(1, low // 50):
        mid = (low + high) // 2
        low, high = (low, mid) if _noise_for(cfg, train, mid, rounds) <= cfg.max_noise_multiplier else (mid, high)
    raise DataError(
        f"site {site} has {num_examples} training examples: too few for epsilon {cfg.epsilon} over "
        f"{train.steps_for(num_examples) * rounds} DP steps of batch {train.batch_size} (noise multiplier "
        f"{sigma:.1f} > privacy.max_noise_multiplier={cfg.max_noise_multiplier}); it needs about {high} "
        "examples, or a larger privacy.epsilon, fewer train.local_steps/local_epochs/rounds, or a smaller "
        "train.batch_size"
    )
