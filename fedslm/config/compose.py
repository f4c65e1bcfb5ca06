"""Hydra composition of conf/: the typed schema registered once, and the one way to turn
conf/ plus overrides into a checked RunConfig (the simulation entry, CLI tools, the
generated pyproject table and the tests all go through `compose_run_config`)."""

from __future__ import annotations

from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from fedslm.config.checks import validate
from fedslm.config.schema import RunConfig

SCHEMA_NAME = "fedslm_schema"
# the project directory: conf/ and the Flower app folders live beside the library
REPO_ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = REPO_ROOT / "conf"


def _from_repo(relative: str) -> str:
    """`${repo:../shared/data/x}`: a path relative to the repository, not to the cwd."""
    return str((REPO_ROOT / relative).resolve())


def register_schema() -> None:
    if not OmegaConf.has_resolver("repo"):
        OmegaConf.register_new_resolver("repo", _from_repo)
    # conf/config.yaml lists this schema first in its defaults, so every preset and
    # override is merged into typed fields: unknown keys and wrong types fail at once.
    ConfigStore.instance().store(name=SCHEMA_NAME, node=RunConfig)


def to_run_config_object(cfg: DictConfig) -> RunConfig:
    run_cfg = OmegaConf.to_object(cfg)
    if not isinstance(run_cfg, RunConfig):  # composed without the schema
        run_cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RunConfig), cfg))
    return validate(run_cfg)


def compose_run_config(overrides: list[str] | None = None, output_dir: str = "outputs/latest") -> RunConfig:
    """The RunConfig a `simulations.run` with these overrides would use, composed outside
    a Hydra app. The run directory is Hydra's only at app run time, so it is `output_dir`
    here unless an override sets it."""
    from hydra import compose, initialize_config_dir

    register_schema()
    overrides = list(overrides or [])
    if not any(o.split("=", 1)[0].lstrip("+~") == "output_dir" for o in overrides):
        overrides.append(f"output_dir={output_dir}")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return to_run_config_object(compose(config_name="config", overrides=overrides))
