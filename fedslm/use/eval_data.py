"""The examples an evaluation scores: a run's held-out rows, with gold labels and options.

`split="eval"` rebuilds every site's held-out split exactly as the federation formed it
(same partitioner, seed and eval fraction), so with the training run's data config the
model is scored only on rows no site trained on. `split="all"` takes every row (a
separate test file).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fedslm.config import DataConfig, RunConfig
from fedslm.data.errors import DataError
from fedslm.data.records import check_columns, load_label_set, to_example
from fedslm.data.sites import is_synthetic, site_rows, system_prompt_for
from fedslm.data.sources import load_table

SPLITS = ("eval", "all")


@dataclass
class EvalSet:
    """Prompt/answer examples; `golds` and `options` for choice tasks (None when the data
    has no labels)."""

    name: str
    examples: list[dict]
    system_prompt: str | None
    golds: list[str] | None = None
    options: list[str] = field(default_factory=list)
    # classification answers are exactly the label, so an option is scored with its eos
    # (the probability of answering that and stopping); otherwise as the answer's start
    options_end_answer: bool = False


def eval_set(cfg: RunConfig, split: str = "eval", limit: int = 0, choices: list[str] | None = None) -> EvalSet:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    d = cfg.data
    rows = _rows(cfg, split)
    if limit and len(rows) > limit:
        rows = rows.shuffle(seed=d.seed).select(range(limit))
    if len(rows) == 0:
        raise DataError(f"{d.name}: the {split} split has no rows; use --split all or a larger data set")
    labels = load_label_set(d)
    examples = [to_example(r, d, labels) for r in rows]
    if not all("prompt" in e for e in examples):
        raise DataError(f"{d.name}: shape {d.shape} has no prompt/answer pairs; evaluate supports "
                        "shape=instruction or classification (perplexity also works on those)")
    golds, options = _golds_and_options(rows, d, labels, examples, choices)
    return EvalSet(d.name, examples, system_prompt_for(d), golds, options, options_end_answer=d.shape == "classification")


def _rows(cfg: RunConfig, split: str):
    import datasets

    d, sites = cfg.data, cfg.federation.sites
    if split == "all" and not is_synthetic(d):
        table = load_table(d.eval_path or d.path, d.format)
        check_columns(table, d, f"data ({d.eval_path or d.path})")
        return table
    per_site = [site_rows(d, s, sites) for s in range(sites)]
    parts = [r.eval for r in per_site] if split == "eval" else [t for r in per_site for t in (r.train, r.eval)]
    return datasets.concatenate_datasets(parts)


def _golds_and_options(rows, d: DataConfig, labels: list[str] | None, examples: list[dict],
                       choices: list[str] | None) -> tuple[list[str] | None, list[str]]:
    if d.shape == "classification":
        golds = [e["answer"] for e in examples]
        return golds, list(choices or labels or sorted(set(golds)))
    if d.label_column in rows.column_names:
        golds = [str(v) for v in rows[d.label_column]]
        return golds, list(choices or sorted(set(golds)))
    return None, list(choices or [])


def config_for_data(model_dir: str | Path, data: str | None, overrides: list[str] | None = None) -> tuple[RunConfig, dict]:
    """(run config, a description for eval.json) from `--data`: a conf/data preset, a run
    directory (its run_config.json), a data file, or None for the config the model was
    trained with (training_config.json, written by export)."""
    from fedslm.config import load_run_config

    overrides = list(overrides or [])
    if data is not None:
        return config_from_data(data, overrides)
    trained = Path(model_dir) / "training_config.json"
    if not trained.is_file():
        raise DataError(f"{model_dir} has no training_config.json (not an exported fedslm model), so the data to "
                        "score is unknown; give --data PRESET|FILE|RUN_DIR")
    return _with_overrides(load_run_config(model_dir, trained.name), overrides), {"source": str(trained)}


def config_from_data(data: str, overrides: list[str] | None = None, what: str = "--data") -> tuple[RunConfig, dict]:
    """(run config, description) of a conf/data preset, a run directory or a data file;
    `what` names the setting in the error."""
    from fedslm.config import load_run_config
    from fedslm.config.compose import REPO_ROOT, compose_run_config

    overrides = list(overrides or [])
    if (REPO_ROOT / "conf" / "data" / f"{data}.yaml").is_file():
        return compose_run_config([f"data={data}", *overrides]), {"preset": data}
    path = Path(data).expanduser()
    if (path / "run_config.json").is_file():
        cfg = load_run_config(path)
        return _with_overrides(cfg, overrides), {"run_dir": str(path)}
    if path.exists():
        return compose_run_config([f"data.path={path.resolve()}", f"data.name={path.stem}", *overrides]), \
            {"path": str(path.resolve())}
    presets = sorted(p.stem for p in (REPO_ROOT / "conf" / "data").glob("*.yaml"))
    raise DataError(f"{what} {data!r} is neither a data preset ({', '.join(presets)}), nor an existing file or run "
                    "directory")


def _with_overrides(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """Apply dotted KEY=VALUE overrides to a config read from disk, through the flat
    boundary, so the same keys and checks apply as on the command line."""
    from fedslm.config import ConfigError, from_run_config, to_run_config, validate

    if not overrides:
        return cfg
    flat = to_run_config(cfg)
    for o in overrides:
        if "=" not in o:
            raise ConfigError([f"{o}: expected KEY=VALUE"])
        key, value = o.split("=", 1)
        flat[key] = value.strip("[]")  # lists travel comma-separated
    return validate(from_run_config(flat))
