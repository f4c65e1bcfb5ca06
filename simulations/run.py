"""Hydra entry point: `python -m simulations.run [overrides]`, sweeps with `-m`."""

from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from fedslm.config import ConfigError
from fedslm.config.compose import register_schema, to_run_config_object

register_schema()


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(dcfg: DictConfig) -> float | None:
    try:
        cfg = to_run_config_object(dcfg)
    except ConfigError as err:
        print(f"fedslm: {err}", file=sys.stderr)
        sys.exit(2)
    cfg.output_dir = HydraConfig.get().runtime.output_dir

    from fedslm.data.errors import DataError
    from fedslm.data.sites import is_synthetic
    from simulations.demo import print_summary, show_demo_answers
    from simulations.simulate import simulate

    try:
        summary = simulate(cfg)
    except DataError as err:
        print(f"fedslm: data problem: {err}", file=sys.stderr)
        sys.exit(2)
    print_summary(summary, cfg)
    if cfg.demo_answer and cfg.export_model and is_synthetic(cfg.data):
        show_demo_answers(cfg)
    return summary["eval_loss_final"]


if __name__ == "__main__":
    main()
