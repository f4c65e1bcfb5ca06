"""Reading run directories back: one run, or every job of a Hydra sweep, whatever state
it is in (finished, failed, still running, or not started yet).

A run directory is what fedslm.server.outputs writes (summary.json, metrics.jsonl,
privacy.json, run_config.json); a Hydra job adds .hydra/overrides.yaml, and a sweep's
directory holds multirun.yaml and one numbered folder per job.
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

# a job with no summary.json whose files changed this recently is taken to be running
RUNNING_WINDOW_S = 600


@dataclass
class RunInfo:
    path: Path
    name: str
    status: str  # done | running | failed | missing
    overrides: dict[str, str] = field(default_factory=dict)  # key=value as given (Hydra), else from run_config
    config: dict = field(default_factory=dict)  # the flat run_config.json
    summary: dict = field(default_factory=dict)
    privacy: dict = field(default_factory=dict)
    metrics: list[dict] = field(default_factory=list)
    note: str = ""  # why a job failed, when its log says

    @property
    def epsilon(self) -> float | None:
        """Epsilon spent (the most any site spent); None for a non-private run."""
        if self.summary.get("privacy", self.privacy.get("level")) == "none" or self.config.get("privacy.enabled") is False:
            return None
        value = self.summary.get("epsilon")
        return float(value) if value is not None else None

    def server_metric(self) -> tuple[str, float] | None:
        """The last round's server-side metric (accuracy, exact match, F1 or loss), if any."""
        per_round = self.summary.get("server_eval_per_round") or {}
        if not per_round:
            return None
        last = per_round[max(per_round, key=int)]
        for key in ("server_accuracy", "server_macro_f1", "server_exact_match", "server_contains", "server_loss"):
            if key in last:
                return key.removeprefix("server_"), float(last[key])
        return None


def read_run(path: Path, now: float | None = None) -> RunInfo:
    path = Path(path)
    info = RunInfo(path=path, name=path.name, status="missing")
    if not path.is_dir():
        return info
    info.overrides = _hydra_overrides(path)
    info.config = _json(path / "run_config.json") or {}
    info.summary = _json(path / "summary.json") or {}
    info.privacy = _json(path / "privacy.json") or {}
    if (path / "metrics.jsonl").is_file():
        info.metrics = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines() if line.strip()]
    if info.summary:
        info.status = "done"
    else:
        newest = max((p.stat().st_mtime for p in path.rglob("*") if p.is_file()), default=path.stat().st_mtime)
        info.status = "running" if (now or time.time()) - newest < RUNNING_WINDOW_S else "failed"
        if info.status == "failed":
            info.note = _failure(path)
    return info


def find_runs(paths: list[Path]) -> list[RunInfo]:
    """Every run under `paths`: run directories, and sweep directories (multirun.yaml) with
    their jobs, including the jobs a sweep has not started yet (status missing)."""
    runs: list[RunInfo] = []
    now = time.time()
    for root in map(Path, paths):
        if not root.exists():
            raise FileNotFoundError(f"{root}: no such directory; give run directories or a sweep directory "
                                    "(multirun/DATE/TIME)")
        if (root / "multirun.yaml").is_file():
            # job folders are named by hydra.sweep.subdir: the job number, then (here) its overrides
            jobs = sorted((p for p in root.iterdir() if p.is_dir() and _job_number(p.name) is not None),
                          key=lambda p: _job_number(p.name))
            runs += [read_run(job, now) for job in jobs]
            planned = _sweep_jobs(root / "multirun.yaml")
            present = {_job_number(p.name) for p in jobs}
            runs += [RunInfo(path=root / str(i), name=str(i), status="missing", overrides=planned[i])
                     for i in range(len(planned)) if i not in present]
        elif (root / "run_config.json").is_file() or (root / ".hydra").is_dir():
            runs.append(read_run(root, now))
        else:
            found = sorted({p.parent for p in root.rglob("run_config.json")})
            if not found:
                raise FileNotFoundError(f"{root}: holds no fedslm run (no run_config.json below it)")
            runs += [read_run(p, now) for p in found]
    for run in runs:  # names unique across roots
        if sum(r.name == run.name for r in runs) > 1:
            run.name = str(run.path)
    return runs


def _job_number(name: str) -> int | None:
    head = name.split("_", 1)[0]
    return int(head) if head.isdigit() else None


def _json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _hydra_overrides(path: Path) -> dict[str, str]:
    import yaml

    file = path / ".hydra" / "overrides.yaml"
    if not file.is_file():
        return {}
    out = {}
    for item in yaml.safe_load(file.read_text()) or []:
        key, _, value = str(item).partition("=")
        if key not in ("output_dir", "hydra.run.dir", "hydra.sweep.dir"):
            out[key.lstrip("+~")] = value
    return out


def _sweep_jobs(multirun_yaml: Path) -> list[dict[str, str]]:
    """Each job's overrides, in job-number order, as Hydra's basic sweeper expands the
    task overrides (the product of their comma lists, in the order given)."""
    import yaml

    data = yaml.safe_load(multirun_yaml.read_text()) or {}
    task = ((data.get("hydra") or {}).get("overrides") or {}).get("task") or []
    choices = []
    for item in map(str, task):
        key, _, value = item.partition("=")
        choices.append([(key.lstrip("+~"), v) for v in _split_choices(value)])
    return [{k: v for k, v in combo if k not in ("output_dir", "hydra.run.dir", "hydra.sweep.dir")}
            for combo in itertools.product(*choices)]


def _split_choices(value: str) -> list[str]:
    depth, parts, cur = 0, [], ""
    for ch in value:
        depth += 1 if ch in "[(" else -1 if ch in "])" else 0
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return parts + [cur]


def _failure(path: Path) -> str:
    for name in ("run.log", f"{path.name}.log"):
        log = path / name
        if log.is_file():
            lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
            errors = [line for line in lines if "Error" in line or "error:" in line]
            if errors:
                return errors[-1][:200]
            # never another line: in a simulation run.log holds the sites' own lines
            return f"no summary.json; {name} names no error"
    return "no summary.json and no log line that says why"
