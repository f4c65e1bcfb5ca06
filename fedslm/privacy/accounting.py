"""Sample-level DP accounting: noise calibration, the accountant's ledger, the budget.

The ledger is Opacus's own accountant history, (noise multiplier, sample rate, steps) per
round, kept as JSON in the node's persistent state, so epsilon composes over every round a
site has trained and survives a restart of the client process.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from functools import lru_cache

from fedslm.config import FederationConfig, PrivacyConfig

# Opacus (and the scipy it pulls in, about a second) is imported where an accountant is
# used, not here: a deployed site starts a fresh process per message, and an evaluate
# message, or the error types the ClientApp catches, need none of it.

# Opacus's default RDP orders (RDPAccountant.DEFAULT_ALPHAS, checked by a test) stop at
# 63; at the small noise multipliers that few-step federated runs need, the optimal order
# is higher, so extend the grid (a tighter, still valid bound, and no "optimal order is
# the largest alpha" warning).
RDP_ALPHAS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + list(range(64, 257, 4))


# privacy.accountant: Opacus accountants a site may enforce its budget with
ACCOUNTANTS = ("rdp", "prv")


def _accountant_kwargs(accountant: str) -> dict:
    return {"alphas": RDP_ALPHAS} if accountant == "rdp" else {}


class BudgetExceededError(RuntimeError):
    """A site refuses to train because one more round would exceed its epsilon."""


def calibrate_noise(cfg: PrivacyConfig, sample_rate: float, total_steps: int) -> float:
    """Noise multiplier that keeps epsilon <= target after `total_steps` steps.

    `total_steps` must cover the whole federation (local steps x rounds), not one round:
    calibrating per round and composing R rounds multiplies the spent budget.
    """
    return _calibrated(cfg.epsilon, cfg.delta, sample_rate, total_steps, cfg.accountant)


# The search costs seconds of RDP arithmetic (about 100 fractional orders per probe) and a
# site asks the same question every round: a pure function of its arguments, cached.
@lru_cache(maxsize=256)
def _calibrated(epsilon: float, delta: float, sample_rate: float, total_steps: int, accountant: str) -> float:
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():
        # the search probes tiny noise levels whose optimal RDP order is off the grid;
        # those probes are rejected anyway, so their warning says nothing about the result
        warnings.filterwarnings("ignore", message=".*Optimal order is the largest alpha.*")
        return get_noise_multiplier(
            target_epsilon=epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=total_steps,
            accountant=accountant,
            **_accountant_kwargs(accountant),
        )


@lru_cache(maxsize=1024)
def _epsilon(history: tuple[tuple[float, float, int], ...], delta: float, accountant: str) -> float:
    from opacus.accountants import create_accountant

    acc = create_accountant(accountant)
    acc.history = list(history)
    return float(acc.get_epsilon(delta=delta, **_accountant_kwargs(accountant)))


def sites_per_round(fed: FederationConfig) -> int:
    if fed.sites_per_round:
        return fed.sites_per_round
    return max(1, math.ceil(fed.fraction_train * fed.sites))


def expected_rounds(fed: FederationConfig) -> int:
    """Rounds a site expects to train in: all of them, or its share under client sampling.
    A site sampled more often than expected is refused once its budget is spent."""
    return max(1, math.ceil(fed.rounds * sites_per_round(fed) / fed.sites))


@dataclass
class PrivacyLedger:
    history: list[tuple[float, float, int]] = field(default_factory=list)

    @property
    def steps(self) -> int:
        return sum(h[2] for h in self.history)

    def epsilon(self, delta: float, accountant: str = "prv") -> float:
        if not self.history:
            return 0.0
        return _epsilon(tuple((float(s), float(q), int(n)) for s, q, n in self.history), delta, accountant)

    def with_round(self, noise_multiplier: float, sample_rate: float, steps: int) -> "PrivacyLedger":
        return PrivacyLedger(self.history + [(noise_multiplier, sample_rate, steps)])

    def check_budget(self, cfg: PrivacyConfig, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """Epsilon after one more round; raises BudgetExceededError if over the target."""
        after = self.with_round(noise_multiplier, sample_rate, steps).epsilon(cfg.delta, cfg.accountant)
        if after > cfg.epsilon * (1 + 1e-9):
            spent = self.epsilon(cfg.delta, cfg.accountant)
            raise BudgetExceededError(
                f"privacy budget exhausted: epsilon spent {spent:.3f}, another round of {steps} steps "
                f"would reach {after:.3f} > target {cfg.epsilon} (delta={cfg.delta}); this site "
                "refuses to train. Start a new run with a larger privacy.epsilon or fewer rounds"
            )
        return after

    def to_json(self) -> str:
        return json.dumps(self.history)

    @classmethod
    def from_json(cls, text: str) -> "PrivacyLedger":
        return cls([(float(s), float(q), int(n)) for s, q, n in json.loads(text)])
