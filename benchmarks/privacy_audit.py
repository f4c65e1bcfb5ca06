"""The same federation with and without DP, audited side by side.

    .venv/bin/python -m benchmarks.privacy_audit [--model tiny|embedded]

A setting built to overfit (one small site, many local steps) so that the non-DP run
memorises: 16 canaries (each inserted with probability 1/2, twice), 40 local steps of
8 per round, 2 rounds. The DP run differs only in privacy.enabled (target epsilon 8).
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

from fedslm import quiet
from fedslm.privacy.audit import audit
from fedslm.config import RunConfig, validate
from simulations.simulate import simulate


def config(model: str, out: Path) -> RunConfig:
    cfg = RunConfig()
    cfg.model.source = model
    cfg.data.max_length = 512 if model == "tiny" else 160
    cfg.data.train_examples, cfg.data.eval_examples = 24, 24
    cfg.federation.sites, cfg.federation.rounds, cfg.federation.ray_cpus = 1, 2, 1
    cfg.train.local_steps, cfg.train.batch_size, cfg.train.lr, cfg.train.progress = 40, 8, 0.02, False
    cfg.privacy.canaries, cfg.privacy.canary_repeats, cfg.privacy.max_noise_multiplier = 16, 2, 50.0
    cfg.output_dir = str(out)
    cfg.demo_answer = False
    return validate(cfg)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=["tiny", "embedded"], default="tiny")
    parser.add_argument("--candidates", type=int, default=100)
    args = parser.parse_args()
    quiet.silence_known_noise()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, private in (("no DP", False), ("DP eps 8", True)):
            cfg = copy.deepcopy(config(args.model, Path(tmp) / name.replace(" ", "_")))
            cfg.privacy.enabled = private
            simulate(cfg, echo=lambda *_: None)
            results[name] = audit(Path(cfg.output_dir), candidates=args.candidates, echo=lambda *_: None)

    rows = [("canary exposure, inserted (bits)", "canary_exposure_bits"),
            ("canary exposure, not inserted (bits)", "canary_exposure_bits_not_inserted"),
            ("membership inference AUC", "mia_auc"),
            ("MIA TPR at 1% FPR", "mia_tpr_at_1pct_fpr"),
            ("epsilon lower bound (one run, 95%)", "epsilon_lower_bound"),
            ("epsilon upper bound (accountant)", "epsilon_accountant")]
    print(f"model {args.model}, {args.candidates} candidates per canary")
    print(f"{'':<38} {'no DP':>8} {'DP eps 8':>9}")
    for label, key in rows:
        vals = [results[n][key] for n in ("no DP", "DP eps 8")]
        print(f"{label:<38} " + " ".join(f"{'-' if v is None else f'{v:.2f}':>8}" for v in vals))


if __name__ == "__main__":
    main()
