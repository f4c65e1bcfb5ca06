"""`fedslm compare DIR...`: every job of a sweep (or any runs) side by side, the
privacy-utility frontier, and what the whole sweep spent at each site.

Every job of a sweep over private sites spends privacy at every site it trains at. The
sweep's total per site composes the jobs' DP steps (their noise multipliers, sampling
rates and step counts from privacy.json) with the run's accountant: what a site whose
data served every job has spent, beside each job's own epsilon.
"""

from __future__ import annotations

import csv
import io
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from fedslm.report.runs import RunInfo, find_runs

STATUS_ORDER = {"done": 0, "running": 1, "failed": 2, "missing": 3}


@dataclass
class Comparison:
    runs: list[RunInfo]
    varied: list[str]  # the settings that differ between jobs
    columns: list[str]
    rows: list[dict]
    utility: str  # the column the frontier plots
    higher_is_better: bool
    sweep_epsilon: dict[str, float] = field(default_factory=dict)  # site -> composed over the done jobs
    delta: float | None = None
    uncounted: list[str] = field(default_factory=list)  # jobs that may have spent privacy but are not composed


def compare(paths: list[Path]) -> Comparison:
    runs = find_runs(paths)
    varied = _varied(runs)
    metric_names = {m[0] for r in runs if (m := r.server_metric())}
    utility = f"server {sorted(metric_names)[0]}" if len(metric_names) == 1 else "held-out loss"
    higher = utility.startswith("server ") and not utility.endswith("loss")
    rows = []
    for run in sorted(runs, key=lambda r: (STATUS_ORDER[r.status], [_setting(r, k) for k in varied], r.name)):
        s = run.summary
        rounds = s.get("rounds") or 0
        row = {"job": run.name, "status": run.status, **{k: _setting(run, k) for k in varied},
               "epsilon": _round(run.epsilon, 3), "held-out loss": _round(s.get("eval_loss_final"), 4)}
        metric = run.server_metric()
        if utility.startswith("server "):
            row[utility] = _round(metric[1], 4) if metric else None
        row["MB/round"] = _round((s.get("bytes_up", 0) + s.get("bytes_down", 0)) / rounds / 1e6, 3) if rounds else None
        row["seconds"] = _round(s.get("federation_seconds", s.get("seconds")), 1)
        row["note"] = run.note
        rows.append(row)
    columns = ["job", "status", *varied, "epsilon", "held-out loss"]
    columns += [utility] if utility.startswith("server ") else []
    columns += ["MB/round", "seconds", "note"]
    eps, delta, uncounted = sweep_epsilon(runs)
    return Comparison(runs, varied, columns, rows, utility, higher, eps, delta, uncounted)


def sweep_epsilon(runs: list[RunInfo]) -> tuple[dict[str, float], float | None, list[str]]:
    """Per site, the epsilon of every done private job's steps composed (the accountant of
    the jobs; RDP if they differ), at the jobs' delta. Only jobs on the same data set (name,
    path and number of sites; the largest such group) are composed: runs on other data
    spend at other sites."""
    from fedslm.privacy.accounting import PrivacyLedger

    private = [r for r in runs if r.status == "done" and r.epsilon is not None and r.privacy.get("steps_per_site")]
    # a running or failed job may have trained rounds (spent privacy) with no privacy.json yet
    uncounted = [r.name for r in runs if r.status in ("running", "failed") and r.metrics]
    if not private:
        return {}, None, uncounted
    groups: dict[tuple, list[RunInfo]] = {}
    for r in private:
        c = r.config
        groups.setdefault((c.get("data.name"), c.get("data.path"), c.get("federation.sites")), []).append(r)
    private = max(groups.values(), key=len)
    uncounted += [r.name for group in groups.values() if group is not private for r in group]
    delta = max(float(r.privacy["delta"]) for r in private)
    accountants = {r.privacy.get("accountant", "rdp") for r in private}
    accountant = accountants.pop() if len(accountants) == 1 else "rdp"
    history: dict[str, list] = {}
    for r in private:
        p = r.privacy
        # privacy.json rounds sigma for reading; the run's metrics hold it whole
        exact = {str(m["site"]): m["noise_multiplier"] for m in r.metrics if m.get("noise_multiplier")}
        for site, steps in p["steps_per_site"].items():
            sigma = float(exact.get(site, p["noise_multiplier_per_site"][site]))
            history.setdefault(site, []).append((sigma, float(p["sample_rate_per_site"][site]), int(steps)))
    composed = {site: PrivacyLedger(h).epsilon(delta, accountant)
                for site, h in sorted(history.items(), key=lambda x: int(x[0]))}
    return composed, delta, uncounted


def format_table(c: Comparison) -> str:
    shown = [col for col in c.columns if col != "note" or any(r["note"] for r in c.rows)]
    cells = [[_cell(r.get(col)) for col in shown] for r in c.rows]
    widths = [max(len(col), *(len(row[i]) for row in cells)) if cells else len(col) for i, col in enumerate(shown)]
    lines = ["  ".join(col.ljust(w) for col, w in zip(shown, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    counts = {s: sum(r["status"] == s for r in c.rows) for s in STATUS_ORDER}
    lines.append(", ".join(f"{n} {s}" for s, n in counts.items() if n))
    if c.sweep_epsilon:
        lines.append(f"privacy spent at each site by these jobs together (the done private ones on the same data, "
                     f"composed; delta {c.delta:g}): " + ", ".join(f"site {s} {e:.2f}" for s, e in c.sweep_epsilon.items())
                     + (f"; a lower bound: not counted {', '.join(c.uncounted)} (running, failed, or on other data)"
                        if c.uncounted else ""))
    return "\n".join(lines)


def write_csv(c: Comparison, path: Path) -> Path:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=c.columns, extrasaction="ignore")
    w.writeheader()
    w.writerows(c.rows)
    Path(path).write_text(buf.getvalue())
    return Path(path)


def plot_frontier(c: Comparison, path: Path) -> Path | None:
    """Epsilon spent vs utility: one line per combination of the other varied settings,
    the non-private jobs as dashed reference lines. None when no job has finished."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in c.rows if r["status"] == "done" and r.get(c.utility) is not None]
    if not done:
        return None
    others = [k for k in c.varied if k not in ("privacy.epsilon", "privacy")]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    groups: dict[str, list[dict]] = {}
    for row in done:
        groups.setdefault(", ".join(f"{k}={row[k]}" for k in others) or "runs", []).append(row)
    for i, (label, rows) in enumerate(sorted(groups.items())):
        color = f"C{i % 10}"
        private = sorted((r for r in rows if r["epsilon"] is not None), key=lambda r: r["epsilon"])
        if private:
            ax.plot([r["epsilon"] for r in private], [r[c.utility] for r in private], marker="o", color=color, label=label)
        for r in rows:
            if r["epsilon"] is None:
                ax.axhline(r[c.utility], color=color, linestyle="--", alpha=0.8, label=f"{label}, no DP")
    ax.set(xlabel="epsilon spent (max over sites)", ylabel=c.utility,
           title=f"Privacy-utility frontier ({'higher' if c.higher_is_better else 'lower'} is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    with warnings.catch_warnings():  # many long labels: matplotlib says it cannot fit them all
        warnings.simplefilter("ignore")
        fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def compare_command(paths: list[Path], out: Path | None = None, echo=print) -> Comparison:
    """Print the table; write compare.csv, frontier.png and report.html into `out` (the sweep
    directory when one is given, else the current directory)."""
    from fedslm.report.html import sweep_report

    c = compare(paths)
    out = Path(out) if out else (Path(paths[0]) if len(paths) == 1 and (Path(paths[0]) / "multirun.yaml").is_file()
                                 else Path.cwd())
    out.mkdir(parents=True, exist_ok=True)
    echo(format_table(c))
    written = [write_csv(c, out / "compare.csv")]
    frontier = plot_frontier(c, out / "frontier.png")
    written += [frontier] if frontier else []
    written.append(sweep_report(c, out / "report.html", frontier))
    echo("wrote " + ", ".join(str(p) for p in written))
    return c


# settings that differ between any two runs without saying anything about them
NOT_SETTINGS = {"output_dir", "model.cache_dir", "resume", "privacy.ledger_dir", "data.cache_dir"}


def _varied(runs: list[RunInfo]) -> list[str]:
    keys = sorted(({k for r in runs for k in (r.overrides or {})} |
                   {k for r in runs if not r.overrides for k in r.config}) - NOT_SETTINGS)
    known = [r for r in runs if r.status != "missing" or r.overrides]
    return [k for k in keys if len({_setting(r, k) for r in known}) > 1]


def _setting(run: RunInfo, key: str) -> str:
    # the run's own config is the truth (typed: 2.0, true); an override names what the
    # config does not hold (a preset group such as privacy=none)
    if key in run.config:
        value = run.config[key]
        return json.dumps(value) if isinstance(value, (bool, list, dict)) else str(value)
    if key in run.overrides:
        return run.overrides[key]
    return "" if run.status == "missing" else "(default)"


def _round(x, digits: int):
    return None if x is None else round(float(x), digits)


def _cell(v) -> str:
    return "-" if v is None or v == "" else str(v)
