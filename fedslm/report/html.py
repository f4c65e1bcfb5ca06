"""report.html: one self-contained file per run, and one per sweep (`fedslm compare`).

Everything is inside the file: styles inline, plots as PNG data URIs, no script and no
fetch, so it opens the same from a laptop, a mail attachment or an air-gapped site.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from pathlib import Path
from urllib.parse import quote

from fedslm.atomic import write_atomic
from fedslm.report.runs import RunInfo, read_run

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:70em;color:#222;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;margin:.5em 0;font-size:.9em}th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}img{max-width:100%;border:1px solid #eee}
.status-done{color:#176f2c}.status-failed{color:#b00020}.status-running{color:#8a6d00}.status-missing{color:#777}
pre{background:#f7f7f7;padding:.7em;white-space:pre-wrap}.muted{color:#666}
"""


def _page(title: str, body: str) -> str:
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body>\n<h1>{html.escape(title)}</h1>\n{body}\n</body></html>\n")


def _table(columns: list[str], rows: list[list], classes: list[str] | None = None) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = []
    for i, row in enumerate(rows):
        cells = []
        for v in row:
            num = isinstance(v, (int, float)) and not isinstance(v, bool)
            text = "-" if v is None or v == "" else (f"{v:.4g}" if isinstance(v, float) else str(v))
            cells.append(f"<td class=\"num\">{text}</td>" if num else f"<td>{html.escape(text)}</td>")
        cls = f" class=\"{classes[i]}\"" if classes else ""
        body.append(f"<tr{cls}>{''.join(cells)}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _img(png: bytes | Path | None, alt: str) -> str:
    if png is None:
        return f"<p class=\"muted\">({html.escape(alt)}: nothing to plot yet)</p>"
    data = png.read_bytes() if isinstance(png, Path) else png
    return f"<img alt=\"{html.escape(alt)}\" src=\"data:image/png;base64,{base64.b64encode(data).decode()}\">"


def _bytes_plot(summary: dict) -> bytes | None:
    up, down = summary.get("bytes_up_per_round") or [], summary.get("bytes_down_per_round") or []
    if not up:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = list(range(1, len(up) + 1))
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.bar([r - 0.2 for r in rounds], [b / 1e6 for b in up], width=0.4, label="up (sites to server)")
    ax.bar([r + 0.2 for r in rounds], [b / 1e6 for b in down], width=0.4, label="down (server to sites)")
    ax.set(xlabel="round", ylabel="MB", title="Bytes per round")
    ax.set_xticks(rounds)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def changed_settings(config: dict) -> dict[str, object]:
    """The run's settings that differ from fedslm's defaults (RunConfig())."""
    from fedslm.config import RunConfig, to_run_config

    defaults = to_run_config(RunConfig())
    skip = {"output_dir", "model.cache_dir"}
    return {k: v for k, v in sorted(config.items()) if k not in skip and defaults.get(k) != v}


def run_report(run_dir: Path) -> Path:
    """Write run_dir/report.html from what the run directory holds (any state)."""
    from fedslm.privacy.report import guarantee_text

    run = read_run(Path(run_dir))
    s, parts = run.summary, []
    parts.append(f"<p>Status: <b class=\"status-{run.status}\">{run.status}</b>{' - ' + html.escape(run.note) if run.note else ''}"
                 f". {s.get('rounds', '?')} rounds, {s.get('sites', '?')} sites, strategy {html.escape(str(s.get('strategy', '-')))}"
                 + (f", {s['federation_seconds']:.0f} s" if "federation_seconds" in s else "") + ".</p>")
    changed = changed_settings(run.config)
    parts.append("<h2>Configuration (what differs from the defaults)</h2>")
    parts.append(_table(["setting", "value"], [[k, json.dumps(v) if isinstance(v, (list, dict)) else v]
                                               for k, v in changed.items()]) if changed else "<p>Every setting is the default.</p>")

    parts.append("<h2>Sites</h2>")
    # the partition's table (simulation: sites.json) joined with what each site reported
    sites = {str(x["site"]): x for x in (json.loads((run.path / "sites.json").read_text())
                                         if (run.path / "sites.json").is_file() else [])}
    loss = {str(k): v for k, v in (s.get("eval_loss_per_site") or {}).items()}  # site -> round -> loss
    eps = {str(k): v for k, v in (run.privacy.get("epsilon_per_site") or {}).items()}
    rows = []
    for sid in sorted(set(sites) | set(loss) | set(eps), key=int):
        info, curve = sites.get(sid, {}), loss.get(sid) or {}
        final = curve[max(curve, key=int)] if curve else None
        rows.append([sid, info.get("natural_id", ""), info.get("train"), info.get("eval"), info.get("label_mix", ""),
                     final, eps.get(sid)])
    parts.append(_table(["site", "name", "train rows", "held-out rows", "label mix", "final held-out loss", "epsilon"], rows)
                 if rows else "<p class=\"muted\">No site has reported yet.</p>")

    parts.append("<h2>Loss and epsilon per round, per site</h2>")
    parts.append(_img(run.path / "curves.png" if (run.path / "curves.png").is_file() else None, "held-out loss and epsilon per round"))
    if run.metrics:
        parts.append(_table(["round", "site", "held-out loss", "epsilon", "steps"],
                            [[m.get("round"), m.get("site"), m.get("eval_loss"), m.get("epsilon"), m.get("steps")]
                             for m in run.metrics]))
    parts.append("<h2>Bytes and time per round</h2>")
    parts.append(_img(_bytes_plot(s), "bytes per round"))
    if s.get("seconds_per_round"):
        up, down = s.get("bytes_up_per_round") or [], s.get("bytes_down_per_round") or []

        def mb(per_round: list, i: int) -> float | None:
            return per_round[i] / 1e6 if i < len(per_round) else None

        parts.append(_table(["round", "seconds", "MB up", "MB down"],
                            [[i + 1, t, mb(up, i), mb(down, i)] for i, t in enumerate(s["seconds_per_round"])]))

    parts.append("<h2>Privacy guarantee</h2>")
    if run.privacy:
        guarantee, scope = guarantee_text(run.privacy)
        parts.append(f"<p>{html.escape(guarantee)}</p><p>{html.escape(scope)}</p>")
    else:
        parts.append("<p class=\"muted\">No privacy.json yet (the run has not finished).</p>")

    parts.append("<h2>Rejected replies</h2>")
    rejected = s.get("rejected") or {}
    parts.append(_table(["round", "reason"], [[r, why] for r, whys in sorted(rejected.items(), key=lambda x: int(x[0]))
                                              for why in whys]) if rejected else "<p>None.</p>")
    demo = run.path / "demo.json"
    if demo.is_file():
        d = json.loads(demo.read_text())
        parts.append("<h2>Demo answers</h2>")
        parts.append(f"<p><b>Held-out question:</b> {html.escape(d['question'])}</p>")
        parts.append(_table(["model", "answer"], [[k, v] for k, v in d["answers"].items()]))
    out = run.path / "report.html"
    write_atomic(out, lambda tmp: Path(tmp).write_text(_page(f"fedslm run {run.path.name}", "\n".join(parts))))
    return out


def sweep_report(c, path: Path, frontier: Path | None) -> Path:
    """The comparison's table, frontier and sweep-wide privacy as one file."""
    parts = [f"<p>{len(c.runs)} jobs: " + ", ".join(f"{sum(r['status'] == st for r in c.rows)} {st}"
                                                    for st in ("done", "running", "failed", "missing")
                                                    if any(r["status"] == st for r in c.rows)) + ".</p>"]
    parts.append("<h2>Jobs</h2>")
    parts.append(_table(c.columns, [[r.get(col) for col in c.columns] for r in c.rows],
                        [f"status-{r['status']}" for r in c.rows]))
    parts.append("<h2>Privacy-utility frontier</h2>")
    parts.append(_img(frontier, "epsilon spent vs utility"))
    parts.append("<h2>Privacy spent by the whole sweep</h2>")
    if c.sweep_epsilon:
        parts.append(f"<p>Every job trained at every site, so each site's data carries all of them: the jobs' DP steps "
                     f"composed, at delta {c.delta:g}. Choose hyperparameters on public data or proxies.</p>")
        parts.append(_table(["site", "epsilon over the sweep"], [[s, e] for s, e in c.sweep_epsilon.items()]))
        if c.uncounted:
            parts.append(f"<p>A lower bound: not counted, as they have no finished privacy record or ran on other data: "
                         f"{html.escape(', '.join(c.uncounted))}.</p>")
    else:
        parts.append("<p>No finished private job.</p>")
    links = [(r.name, r.path / "report.html") for r in c.runs if (r.path / "report.html").is_file()]
    if links:
        # relative to the sweep's page, so the folder can be moved or mailed as a whole
        items = "".join(f"<li><a href=\"{html.escape(quote(os.path.relpath(p, Path(path).parent)))}\">"
                        f"{html.escape(n)}</a></li>" for n, p in links)
        parts.append(f"<h2>Each job's report</h2><ul>{items}</ul>")
    write_atomic(Path(path), lambda tmp: Path(tmp).write_text(_page("fedslm sweep", "\n".join(parts))))
    return Path(path)
