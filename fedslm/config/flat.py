"""The flat boundary: Flower's run_config carries only scalars under dotted keys.

`to_run_config` / `from_run_config` are the one flatten/parse pair between the typed
config and that table (and the run_config.json a run writes); `load_run_config` reads a
run directory's config back, checked.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any

from fedslm.config.errors import ConfigError
from fedslm.config.schema import RunConfig

_NONE = ""  # run_config has no null; an empty string stands for "unset"

# Run-config keys that are not training settings: a deployed run's app signature
# (fedslm.deploy.signing.SIGNATURE_KEY; it cannot be inside the FAB it signs, so it is a
# run-config override of this empty default). The config ignores them.
DEPLOYMENT_KEYS: dict[str, str] = {"app-signature": ""}


def to_run_config(cfg: Any, prefix: str = "") -> dict[str, str | int | float | bool]:
    """Flatten a config dataclass to Flower's run_config: dotted keys, scalar values."""
    out: dict[str, str | int | float | bool] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            out.update(to_run_config(value, key + "."))
        elif isinstance(value, (list, tuple)):
            out[key] = ",".join(str(v) for v in value)
        elif value is None:
            out[key] = _NONE
        else:
            out[key] = value
    return out


def from_run_config(flat: typing.Mapping[str, Any], cls: type = RunConfig) -> Any:
    """Inverse of :func:`to_run_config`; unknown keys are an error, missing keys default."""
    known = set(to_run_config(cls()))
    flat = {k: v for k, v in flat.items() if k not in DEPLOYMENT_KEYS}
    unknown = sorted(k for k in flat if k not in known)
    if unknown:
        raise ConfigError([f"{k}: unknown key; allowed keys: {', '.join(sorted(known))}" for k in unknown])
    return _build(cls, flat, "")


def _build(cls: type, flat: typing.Mapping[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = _build(tp, flat, key + ".")
        elif key in flat:
            kwargs[f.name] = _parse(tp, flat[key], key)
    return cls(**kwargs)


def _parse(tp: Any, raw: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):  # Optional[X]
        if raw == _NONE or raw is None:
            return None
        tp = next(a for a in args if a is not type(None))
        origin = typing.get_origin(tp)
    if origin is list:
        items = [s.strip() for s in str(raw).split(",") if s.strip()]
        return [_parse(args[0] if args else str, s, key) for s in items]
    try:
        if tp is bool:
            if isinstance(raw, bool):
                return raw
            if str(raw).lower() in ("true", "1", "yes"):
                return True
            if str(raw).lower() in ("false", "0", "no"):
                return False
            raise ValueError(raw)
        if tp is int:
            if isinstance(raw, float) and not raw.is_integer():
                raise ValueError(raw)
            return int(raw)
        if tp is float:
            return float(raw)
        return str(raw)
    except (TypeError, ValueError):
        raise ConfigError([f"{key}: cannot read {raw!r} as {tp.__name__}"]) from None


def load_run_config(run_dir: Path | str, name: str = "run_config.json") -> RunConfig:
    """The checked config a run directory was written with (its run_config.json; an
    exported model directory keeps it as training_config.json)."""
    path = Path(run_dir) / name
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a fedslm run directory (no run_config.json); give the "
                                "directory a federation wrote (it holds summary.json and adapters/)")
    from fedslm.config.checks import validate

    return validate(from_run_config(json.loads(path.read_text())))
