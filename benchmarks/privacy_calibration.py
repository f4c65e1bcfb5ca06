"""Noise calibration for the whole federation vs naive per-round calibration.

    .venv/bin/python -m benchmarks.privacy_calibration

For the demo's sampling (batch 8 of 400 examples, 3 DP steps per round) and several
targets and round counts: the noise multiplier fedslm calibrates over all rounds, the
epsilon it ends at by both accountants, and where calibrating for one round and running
them all would have ended.
"""

from __future__ import annotations

import math

from fedslm.config import PrivacyConfig, TrainConfig
from fedslm.privacy.accounting import PrivacyLedger, calibrate_noise
from fedslm.privacy.plan import plan_dp


def main(examples: int = 400, delta: float = 1e-5) -> None:
    train = TrainConfig(batch_size=8, local_steps=3)
    print(f"site of {examples} examples, batch {train.batch_size}, {train.local_steps} DP steps per round, delta {delta:g}")
    print(f"{'target':>6} {'rounds':>6} {'sigma':>7} {'eps RDP':>8} {'eps PRV':>8} {'naive sigma':>11} {'naive eps':>9}")
    for target in (1.0, 4.0, 8.0):
        for rounds in (1, 3, 5, 10):
            cfg = PrivacyConfig(epsilon=target, delta=delta)
            plan = plan_dp(cfg, train, examples, rounds)
            ledger = PrivacyLedger([(plan.noise_multiplier, plan.sample_rate, train.local_steps)] * rounds)
            naive_sigma = calibrate_noise(cfg, plan.sample_rate, train.local_steps)
            naive = PrivacyLedger([(naive_sigma, plan.sample_rate, train.local_steps)] * rounds)
            eps_rdp, eps_prv = ledger.epsilon(delta, "rdp"), ledger.epsilon(delta, "prv")
            assert eps_rdp <= target * (1 + 1e-9) and not math.isnan(eps_prv)
            print(f"{target:>6g} {rounds:>6} {plan.noise_multiplier:>7.3f} {eps_rdp:>8.3f} {eps_prv:>8.3f} "
                  f"{naive_sigma:>11.3f} {naive.epsilon(delta, 'rdp'):>9.3f}")


if __name__ == "__main__":
    main()
