"""Hydra glue: the typed schema behind conf/, and the one conversion to RunConfig."""

from __future__ import annotations

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from fedslm.config import RunConfig, validate

SCHEMA_NAME = "fedslm_schema"


def register_schema() -> None:
    # conf/config.yaml lists this schema first in its defaults, so every preset and
    # override is merged into typed fields: unknown keys and wrong types fail at once.
    ConfigStore.instance().store(name=SCHEMA_NAME, node=RunConfig)


def to_run_config_object(cfg: DictConfig) -> RunConfig:
    run_cfg = OmegaConf.to_object(cfg)
    if not isinstance(run_cfg, RunConfig):  # composed without the schema
        run_cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RunConfig), cfg))
    return validate(run_cfg)
