"""One set of defaults: the `[tool.flwr.app.config]` table in pyproject.toml is written
from the composed Hydra defaults (conf/), never edited by hand.

Simulation reads conf/ through Hydra; deployment (`flwr run`) reads the flat table. Both
come from the same composition, flattened at the one boundary (`to_run_config`), so a
deployed run trains with exactly what `python -m simulations.run` would. `fedslm
app-config --write` regenerates the table; tests/test_deploy_config.py fails when the
two disagree.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

from fedslm.config.compose import REPO_ROOT, compose_run_config
from fedslm.config.flat import DEPLOYMENT_KEYS, to_run_config

PYPROJECT = REPO_ROOT / "pyproject.toml"
TABLE = "[tool.flwr.app.config]"

# Keys Hydra fills at run time (its run directory) need a value of their own when the
# ServerApp runs under a SuperLink. A relative output_dir is relative to the SuperLink's
# working directory; the README's commands pass an absolute one with --run-config.
DEPLOY_OVERRIDES = {"output_dir": "outputs/deploy"}


def hydra_defaults(overrides: list[str] | None = None) -> dict[str, str | int | float | bool]:
    """The default run as composed from conf/ (plus any overrides), flattened."""
    pinned = [f"{k}={v}" for k, v in DEPLOY_OVERRIDES.items()]
    return to_run_config(compose_run_config(pinned + list(overrides or []))) | DEPLOYMENT_KEYS


def render_table(flat: dict[str, str | int | float | bool]) -> str:
    lines = [
        TABLE,
        "# Written by `fedslm app-config --write` from the composed Hydra defaults (conf/);",
        "# do not edit by hand: change conf/ and regenerate. Lists are comma-separated,",
        '# "" means unset. Override per run: flwr run . NAME --run-config "train.lr=0.05".',
    ]
    for key in sorted(flat):
        lines.append(f'"{key}" = {_toml_value(flat[key])}')
    return "\n".join(lines) + "\n"


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(value)  # a TOML basic string for the plain text we hold


def pyproject_table(path: Path = PYPROJECT) -> dict:
    return tomllib.loads(path.read_text())["tool"]["flwr"]["app"].get("config", {})


def differences(path: Path = PYPROJECT) -> list[str]:
    """Keys where pyproject's table and the Hydra defaults differ, one line each."""
    want, have = hydra_defaults(), pyproject_table(path)
    out = []
    for key in sorted(set(want) | set(have)):
        if key not in have:
            out.append(f"{key}: missing from pyproject (Hydra default {want[key]!r})")
        elif key not in want:
            out.append(f"{key}: in pyproject but not a config key")
        elif have[key] != want[key] or type(have[key]) is not type(want[key]):
            out.append(f"{key}: pyproject has {have[key]!r}, Hydra default is {want[key]!r}")
    return out


def write_table(path: Path = PYPROJECT) -> None:
    """Replace the table (up to the next table header) in place; the rest of the file
    is left byte for byte."""
    text = path.read_text()
    start = text.index(TABLE)
    nxt = re.search(r"^\[", text[start + len(TABLE):], flags=re.MULTILINE)
    end = start + len(TABLE) + nxt.start() if nxt else len(text)
    tail = text[end:]
    path.write_text(text[:start] + render_table(hydra_defaults()) + ("\n" + tail if tail else ""))
