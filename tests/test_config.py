"""Every preset in conf/ composes and validates; bad input stops early and names the key."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from fedslm.config import ConfigError, RunConfig, from_run_config, to_run_config, validate
from fedslm.config.compose import register_schema, to_run_config_object

CONF = Path(__file__).resolve().parents[1] / "conf"
register_schema()


def _compose(overrides: list[str]):
    # output_dir is normally Hydra's run dir; composing outside a run needs a value, and
    # these tests never write to it
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=["output_dir=unused-run-dir", *overrides])


GROUP_OPTIONS = sorted(
    (group.name, yml.stem) for group in CONF.iterdir() if group.is_dir() for yml in group.glob("*.yaml")
)


def test_conf_has_all_groups():
    assert {g for g, _ in GROUP_OPTIONS} == {"model", "data", "privacy", "strategy"}


@pytest.mark.parametrize("group,option", GROUP_OPTIONS)
def test_every_preset_loads_and_validates(group, option, tmp_path):
    overrides = [f"{group}={option}"]
    if (group, option) == ("model", "local"):
        (tmp_path / "config.json").write_text("{}")
        overrides.append(f"model.path={tmp_path}")
    composed = _compose(overrides)  # composing alone checks every key against the schema
    data_path = composed.data.path
    if group == "data" and data_path and not Path(data_path).exists():
        pytest.skip(f"{data_path} not present (the preset's data lives in ../shared/data)")
    cfg = to_run_config_object(composed)
    assert isinstance(cfg, RunConfig)


def test_default_is_the_demo():
    cfg = to_run_config_object(_compose([]))
    assert cfg.model.source == "embedded" and cfg.model.path is None
    assert cfg.strategy.name == "ffa" and cfg.privacy.enabled and cfg.privacy.epsilon == 8.0
    assert cfg.privacy.delta == 1e-5
    assert cfg.federation.sites == 3 and cfg.federation.rounds == 3


def test_tiny_preset_lengthens_sequences_for_its_byte_tokenizer():
    assert to_run_config_object(_compose(["model=tiny"])).data.max_length == 512
    assert to_run_config_object(_compose([])).data.max_length == 160


def test_unknown_key_names_the_key():
    with pytest.raises(ConfigCompositionException) as err:
        _compose(["privacy.epsilonn=4"])
    assert "epsilonn" in str(err.value) + str(err.value.__cause__)


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigCompositionException) as err:
        _compose(["federation.rounds=three"])
    assert "rounds" in str(err.value) + str(err.value.__cause__)


@pytest.mark.parametrize(
    "override,line",
    [
        ("privacy.epsilon=0", "privacy.epsilon: got 0.0, must be a finite number > 0"),
        ("privacy.epsilon=-1", "privacy.epsilon: got -1.0, must be a finite number > 0"),
        ("federation.rounds=0", "federation.rounds: got 0, must be >= 1"),
        ("privacy.delta=1.5", "privacy.delta: got 1.5, must be in (0, 1)"),
        ("strategy.name=fedsgd", "strategy.name: got 'fedsgd', allowed values: fedavg, ffa, exact, stack"),
        ("model.path=/nonexistent/model", "model.path: '/nonexistent/model' is not a Hugging Face model directory"),
        # names are checked against the model when LoRA is attached (tests/test_families.py)
        ("lora.target_modules=[q_proj,'v proj']", "lora.target_modules: got ['v proj']; give module names (q_proj, "
                                                  "v_proj, ...) or one of: attention, mlp, all"),
        ("privacy.accountant=gdp", "privacy.accountant: got 'gdp', allowed values: rdp, prv"),
        ("federation.transport_dtype=int8", "federation.transport_dtype: got 'int8', allowed values: float32, float16"),
        ("server_eval.task=bleu", "server_eval.task: got 'bleu', allowed values: none, perplexity, choice, generate"),
        ("server_eval.split=train", "server_eval.split: got 'train', allowed values: eval, all"),
        ("data.partitioner=shards", "data.partitioner: got 'shards', allowed values: iid, dirichlet, natural, "
                                    "natural_sample"),
        ("privacy.grad_sample_mode=ew", "privacy.grad_sample_mode: got 'ew', allowed values: hooks, functorch, ghost, "
                                        "lora"),
    ],
)
def test_bad_value_names_the_key_the_value_and_what_is_allowed(override, line):
    with pytest.raises(ConfigError) as err:
        to_run_config_object(_compose([override]))
    assert any(p.startswith(line) for p in err.value.problems), err.value.problems


def test_the_allowed_values_are_the_implementations_registries():
    """validate reads each list from the module that implements it: a scheme, optimiser or
    task added there is accepted with no second list to update."""
    from fedslm.config.checks import choices
    from fedslm.lora.schemes import SCHEMES
    from fedslm.privacy.dp_step import GRAD_SAMPLE_MODES
    from fedslm.server.optimisers import SERVER_OPTIMISERS
    from fedslm.use.evaluate import TASKS

    c = choices()
    assert c["strategy.name"] == tuple(SCHEMES) and c["strategy.server_optimizer"] == tuple(SERVER_OPTIMISERS)
    assert c["server_eval.task"] == ("none", *TASKS) and c["privacy.grad_sample_mode"] == GRAD_SAMPLE_MODES


def test_the_composed_defaults_are_the_schema_defaults():
    """One source of defaults: conf/ with no overrides is RunConfig() exactly, and each
    preset changes only the keys its file sets."""
    import yaml

    assert to_run_config_object(_compose([])) == RunConfig(output_dir="unused-run-dir")
    base = to_run_config(RunConfig(output_dir="unused-run-dir"))
    for group, option in GROUP_OPTIONS:
        text = yaml.safe_load((CONF / group / f"{option}.yaml").read_text()) or {}
        global_pkg = "@package _global_" in (CONF / group / f"{option}.yaml").read_text()
        keys: set[str] = set()
        for k, v in (text.items() if global_pkg else {group: text}.items()):
            keys |= {f"{k}.{sub}" for sub in _flat_keys(v)} if isinstance(v, dict) else {k}
        overrides = [f"{group}={option}"]
        if (group, option) == ("model", "local"):
            continue  # needs a model directory; covered by test_every_preset_loads_and_validates
        composed = _compose(overrides)
        if group == "data" and composed.data.path and not Path(composed.data.path).exists():
            continue
        changed = {k for k, v in to_run_config(to_run_config_object(composed)).items() if base[k] != v}
        assert changed <= keys, f"{group}={option} changes {sorted(changed - keys)} without setting them"


def _flat_keys(d: dict, prefix: str = "") -> set[str]:
    out = set()
    for k, v in d.items():
        out |= _flat_keys(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}"}
    return out


def test_bad_strategy_lists_allowed_values():
    with pytest.raises(ConfigError, match="allowed values: fedavg, ffa, exact, stack"):
        to_run_config_object(_compose(["strategy.name=fedsgd"]))


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["strategy=ffa", "lora.site_ranks=[8,4,8]"], "heterogeneous ranks need strategy=exact or strategy=stack"),
        (["strategy=exact", "lora.site_ranks=[8,4]"], "give one per site"),
        (["strategy=exact", "lora.site_ranks=[8,16,8]"], "lora.r is the global rank"),
        (["strategy=exact", "strategy.server_optimizer=fedadam"], "use strategy=ffa or fedavg"),
        (["strategy=stack", "strategy.aggregator=median"], "has no stacked form"),
        (["strategy=exact", "privacy.client_level=true"], "clip arrays of one fixed shape"),
        (["strategy.aggregator=trimmed_mean", "strategy.trim_fraction=0.5"], "strategy.trim_fraction"),
        (["federation.sites_per_round=9"], "federation.sites_per_round"),
        (["strategy.server_optimizer=adamw"], "allowed values: none, fedavgm, fedadam, fedyogi"),
    ],
)
def test_strategy_combinations_that_cannot_work_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        to_run_config_object(_compose(overrides))


def test_privacy_presets_bring_their_recipe_and_the_command_line_wins():
    dp = to_run_config_object(_compose([]))
    assert dp.privacy.enabled and dp.train.lr == 0.1 and dp.lora.target_modules == ["q_proj", "v_proj"]
    none = to_run_config_object(_compose(["privacy=none"]))
    assert not none.privacy.enabled and none.train.lr == 0.01 and none.lora.target_modules == ["all"]
    mine = to_run_config_object(_compose(["train.lr=0.05", "lora.target_modules=[q_proj]"]))
    assert mine.train.lr == 0.05 and mine.lora.target_modules == ["q_proj"] and mine.privacy.enabled


def test_strategy_presets_and_heterogeneous_ranks_compose():
    cfg = to_run_config_object(_compose(["strategy=exact", "lora.site_ranks=[8,4,2]"]))
    assert cfg.strategy.name == "exact" and cfg.lora.site_ranks == [8, 4, 2]
    cfg = to_run_config_object(_compose(["strategy=fedavg", "strategy.server_optimizer=fedyogi"]))
    assert cfg.strategy.server_optimizer == "fedyogi"
    assert from_run_config(to_run_config(cfg)) == cfg  # survives Flower's flat run_config


def test_all_problems_reported_at_once():
    with pytest.raises(ConfigError) as err:
        to_run_config_object(_compose(["privacy.epsilon=0", "federation.rounds=0"]))
    assert len(err.value.problems) == 2


def test_missing_model_path():
    with pytest.raises(ConfigError, match="model.path: required with model=local"):
        to_run_config_object(_compose(["model=local"]))


def test_run_config_round_trip():
    cfg = RunConfig()
    cfg.model.path = None
    cfg.lora.target_modules = ["q_proj", "v_proj"]
    cfg.privacy.epsilon = 2.5
    flat = to_run_config(cfg)
    assert all(isinstance(v, (str, int, float, bool)) for v in flat.values())
    assert from_run_config(flat) == cfg
    assert dataclasses.asdict(from_run_config({})) == dataclasses.asdict(RunConfig())


def test_run_config_rejects_unknown_and_unparsable():
    with pytest.raises(ConfigError, match="privacy.epsilom: unknown key"):
        from_run_config({"privacy.epsilom": 3.0})
    with pytest.raises(ConfigError, match="federation.rounds: cannot read"):
        from_run_config({"federation.rounds": "many"})
    with pytest.raises(ConfigError, match="privacy.epsilon"):
        validate(from_run_config({"privacy.epsilon": -2.0}))


def test_cli_stops_before_any_work(tmp_path):
    """A bad value exits with status 2 and names the key, without loading a model."""
    proc = subprocess.run(
        [sys.executable, "-m", "simulations.run", "privacy.epsilon=0", f"hydra.run.dir={tmp_path / 'never'}"],
        capture_output=True, text=True, cwd=CONF.parent, timeout=120,
    )
    assert proc.returncode == 2
    assert "privacy.epsilon" in proc.stderr and "must be a finite number > 0" in proc.stderr
    assert "base model" not in proc.stdout


def test_packing_is_refused_under_dp_with_the_reason(tiny_cfg):
    """Greedy packing moves every later block when one document is removed: one record
    would touch many DP samples. Without DP it is allowed."""
    tiny_cfg.data.shape, tiny_cfg.data.packing = "text", True
    with pytest.raises(ConfigError, match="data.packing: not allowed with privacy.enabled=true"):
        validate(tiny_cfg)
    tiny_cfg.privacy.enabled = False
    tiny_cfg.lora.dropout = 0.0
    validate(tiny_cfg)


@pytest.mark.parametrize("key,value", [("eval_every", 0), ("eval_limit", -1)])
def test_evaluation_cadence_is_checked(tiny_cfg, key, value):
    setattr(tiny_cfg.federation, key, value)
    with pytest.raises(ConfigError, match=f"federation.{key}: got {value}"):
        validate(tiny_cfg)
