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


# As Opacus's get_noise_multiplier: the calibrated noise spends between target - 0.01 and
# the target. Beyond MAX_SIGMA the target is out of reach (Opacus's limit too).
EPSILON_TOLERANCE = 0.01
MAX_SIGMA = 1e6


class CalibrationError(ValueError):
    """No noise multiplier up to MAX_SIGMA keeps epsilon within the target."""


# A site asks the same question every round: a pure function of its arguments, cached
# (its probes land in _epsilon's cache too).
@lru_cache(maxsize=256)
def _calibrated(epsilon: float, delta: float, sample_rate: float, total_steps: int, accountant: str) -> float:
    with warnings.catch_warnings():
        # the search probes small noise levels whose optimal RDP order is off the grid;
        # those probes spend too much and are rejected, so their warning says nothing
        warnings.filterwarnings("ignore", message=".*Optimal order is the largest alpha.*")
        return search_noise(lambda sigma: _epsilon(((sigma, sample_rate, total_steps),), delta, accountant), epsilon)


def search_noise(epsilon_at, target: float, tolerance: float = EPSILON_TOLERANCE) -> float:
    """The noise multiplier sigma with target - tolerance <= epsilon_at(sigma) <= target
    (for a target below 2 x tolerance, the window is the upper half of [0, target]).

    Opacus's get_noise_multiplier bisects sigma from [0, 20]: about 16 probes, each a
    fraction of a second of PRV arithmetic (its domain bound alone runs RDP over fractional
    orders in Python), and a deployed site pays it at its first training message. Epsilon
    falls smoothly with sigma, close to a power law (eps ~ c / sigma where sites train), so
    secant steps in log-log space land in the window in a few probes (3-6 on the plans
    measured). Only a sigma whose own probe spends at most the target is ever returned:
    the guarantee does not rest on the interpolation, which merely picks the next probe.
    """
    if not target > 0:
        raise ValueError(f"target epsilon {target} must be > 0")
    tolerance = min(tolerance, target / 2)
    log_aim = math.log(target - tolerance / 2)  # the middle of the window
    top = math.log(MAX_SIGMA)
    probes: list[tuple[float, float]] = []  # (log sigma, log eps), eps finite and > 0
    over = under = None  # log sigma of the nearest probes above / within the target: the bracket
    sides: list[bool] = []  # whether each probe spent more than the target
    x = 0.0  # sigma 1
    for _ in range(100):
        x = min(x, top)
        sigma = math.exp(x)
        eps = float(epsilon_at(sigma))
        if eps <= target:
            if target - eps <= tolerance:
                return sigma
            under = x if under is None else min(under, x)
        elif x >= top:
            raise CalibrationError(f"epsilon {target} is out of reach: even noise multiplier {MAX_SIGMA:g} spends "
                                   f"{eps:.3g}. Raise privacy.epsilon or train fewer steps")
        else:
            over = x if over is None else max(over, x)
        sides.append(not eps <= target)
        if 0 < eps < math.inf:
            probes.append((x, math.log(eps)))
        # three probes in a row on one side: the secant is creeping, so halve the bracket
        stalled = len(sides) >= 3 and len(set(sides[-3:])) == 1
        x = _next_probe(x, probes, over, under, log_aim, stalled)
    raise RuntimeError(f"the noise search found no sigma for epsilon {target} in 100 probes: the accountant's "
                       "epsilon does not fall steadily with the noise multiplier")


def _next_probe(x: float, probes, over, under, log_aim: float, stalled: bool) -> float:
    if len(probes) >= 2 and probes[-1][1] != probes[-2][1]:  # secant through the last two probes
        (x0, y0), (x1, y1) = probes[-2:]
        guess = x1 + (log_aim - y1) * (x0 - x1) / (y0 - y1)
    elif probes:  # one probe: the power law
        guess = probes[-1][0] + probes[-1][1] - log_aim
    else:
        guess = math.nan
    if over is not None and under is not None:  # bracketed: stay inside it, else bisect
        return guess if over < guess < under and not stalled else (over + under) / 2
    # not yet bracketed: move away from the side probed so far, by a factor 1.05 to 4
    step = guess - x if math.isfinite(guess) else math.inf
    if under is None:
        return x + min(max(step, math.log(1.05)), math.log(4))
    return x - min(max(-step, math.log(1.05)), math.log(4))


@lru_cache(maxsize=1024)
def _epsilon(history: tuple[tuple[float, float, int], ...], delta: float, accountant: str) -> float:
    from opacus.accountants import create_accountant

    _memoise_rdp()
    acc = create_accountant(accountant)
    acc.history = list(history)
    return float(acc.get_epsilon(delta=delta, **_accountant_kwargs(accountant)))


def _memoise_rdp() -> None:
    """Make Opacus's `compute_rdp` remember the one-step RDP curve of each (sample rate,
    noise multiplier), the same values Opacus computes, looked up instead of recomputed.

    Every epsilon a site works out (its budget check before a round, the lifetime check,
    both accountants' figures after it) composes a history of rounds that all share one
    (q, sigma), and the RDP accountant recomputes that curve for every entry and every
    call: over 250 orders, a hundred of them fractional, each a series in Python. PRV
    runs the same curve again for its domain bound. That was about 0.7 s of every warm
    training message, more than the training itself with a small model. Opacus composes
    `steps` rounds as the one-step curve times `steps` (compute_rdp's last line), so the
    product from the remembered curve is bit-for-bit the figure Opacus would compute."""
    from opacus.accountants.analysis import rdp as analysis

    if getattr(analysis.compute_rdp, "fedslm_memo", False):
        return
    exact = analysis.compute_rdp

    @lru_cache(maxsize=4096)
    def one_step(q: float, sigma: float, orders: tuple) -> object:
        return exact(q=q, noise_multiplier=sigma, steps=1, orders=list(orders))

    def compute_rdp(*, q, noise_multiplier, steps, orders):
        if isinstance(orders, (int, float)):  # one order: nothing worth remembering
            return exact(q=q, noise_multiplier=noise_multiplier, steps=steps, orders=orders)
        return one_step(float(q), float(noise_multiplier), tuple(orders)) * steps

    compute_rdp.fedslm_memo = True
    compute_rdp.exact = exact
    analysis.compute_rdp = compute_rdp


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
