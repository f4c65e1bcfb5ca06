"""Where a run's record goes: each output is a writer that observes the record.

- `Console`: the round lines the operator watches;
- `MetricsFile`: metrics.jsonl, one row per site and round;
- `AdapterFiles`: adapters/round_NNN.safetensors, each round's global adapter;
- `SummaryFiles`: summary.json and curves.png at the end of the run.

A writer implements only the hooks it needs; `RunRecorder` calls each hook on every
writer in order. Another output (a tracker, a report) is one more writer.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

from fedslm.rundir import adapter_path, save_adapter

if TYPE_CHECKING:
    from fedslm.server.record import RoundLog, RunRecorder


class Writer:
    """No-op hooks; a writer overrides the ones it needs."""

    def rejected(self, r: int, line: str) -> None: ...
    def note(self, r: int, text: str) -> None: ...
    def server_evaluated(self, r: int, metrics: dict) -> None: ...
    def global_adapter(self, r: int, tensors: dict, meta: dict[str, str]) -> None: ...
    def round_finished(self, r: int, rl: RoundLog, rows: list[dict]) -> None: ...
    def restored(self, done: int) -> None: ...
    def finished(self, record: RunRecorder, summary: dict, target_epsilon: float | None) -> None: ...


class Console(Writer):
    def __init__(self, rounds: int, echo=print, start: str = "base model"):
        self.rounds, self.echo, self.start = rounds, echo, start

    def rejected(self, r: int, line: str) -> None:
        self.echo(f"  ! round {r}: rejected {line}")

    def note(self, r: int, text: str) -> None:
        self.echo(f"  ! round {r}: {text}")

    def server_evaluated(self, r: int, metrics: dict) -> None:
        shown = "  ".join(f"{k.removeprefix('server_')} {v:.4f}" for k, v in metrics.items() if k != "server_examples")
        self.echo(f"  server held-out ({metrics.get('server_examples', '?')} examples), round {r}: {shown}")

    def round_finished(self, r: int, rl: RoundLog, rows: list[dict]) -> None:
        if r == 0:
            losses = [m["eval_loss"] for m in rl.eval.values()]
            mean = sum(losses) / len(losses) if losses else math.nan
            self.echo(f"round 0 ({self.start}): held-out loss {mean:.4f} over {len(losses)} sites  [{rl.seconds:.1f}s]")
            return
        self.echo(
            f"round {r}/{self.rounds}  {rl.seconds:6.1f}s (training {rl.train_seconds:.1f}s)  up {_mb(rl.bytes_up)}  down {_mb(rl.bytes_down)}"
            f"  sites {len(rl.train)} ok, {len(rl.rejected)} rejected"
            + (f"  aggregation error {rl.aggregation_error:.2e}" if rl.aggregation_error is not None else "")
        )
        for row in rows:
            # a private site does not release its training loss or timing (fedslm.privacy.releases)
            self.echo(
                f"    site {row['site']}:"
                + (f" train loss {_fmt(row['train_loss'])} " if row["train_loss"] is not None else "")
                + f" held-out loss {_fmt(row['eval_loss'])}"
                f"  epsilon {_fmt(row['epsilon'], 2)} (RDP {_fmt(row['epsilon_rdp'], 2)}, PRV {_fmt(row['epsilon_prv'], 2)})"
                + (f"  ({_fmt(row['train_seconds'], 1)}s train)" if row["train_seconds"] is not None else "")
            )


class MetricsFile(Writer):
    """metrics.jsonl. A resumed run keeps the rows of the rounds its checkpoint saved and
    drops any written after it (a crash between a round's rows and its checkpoint)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / "metrics.jsonl"
        self._saved_rows = self.path.read_text().splitlines(keepends=True) if self.path.exists() else []
        self.path.write_text("")

    def round_finished(self, r: int, rl: RoundLog, rows: list[dict]) -> None:
        if r == 0:
            return
        with self.path.open("a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")

    def restored(self, done: int) -> None:
        self.path.write_text("".join(line for line in self._saved_rows if json.loads(line)["round"] <= done))


class AdapterFiles(Writer):
    def __init__(self, run_dir: Path, meta: dict[str, str]):
        self.run_dir, self.meta = Path(run_dir), meta

    def global_adapter(self, r: int, tensors: dict, meta: dict[str, str]) -> None:
        """The round's global adapter as a peft LoRA state (A and B) of rank meta['rank']."""
        save_adapter(adapter_path(self.run_dir, r), tensors, {**self.meta, **meta, "round": str(r)})


class SummaryFiles(Writer):
    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)

    def finished(self, record: RunRecorder, summary: dict, target_epsilon: float | None) -> None:
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        self.plot(record, target_epsilon)

    def plot(self, record: RunRecorder, target_epsilon: float | None) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator

        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
        for site, curve in sorted(record.eval_curve().items()):
            ax1.plot(list(curve), list(curve.values()), marker="o", label=f"site {site}")
        ax1.set(xlabel="round (0 = base model)", ylabel="held-out answer loss", title="Held-out loss per site")
        for site, curve in sorted(record.epsilon_curve().items()):
            ax2.plot(list(curve), list(curve.values()), marker="o", label=f"site {site}")
        if target_epsilon:
            ax2.axhline(target_epsilon, color="grey", linestyle="--", label="target")
        ax2.set(xlabel="round", ylabel="epsilon spent", title="Privacy spent per site")
        for ax in (ax1, ax2):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.legend()
            ax.grid(alpha=0.3)
        fig.tight_layout()
        path = self.run_dir / "curves.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path


class ReportFile(Writer):
    """report.html, from what the other writers put in the run directory (they run first)."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)

    def finished(self, record: RunRecorder, summary: dict, target_epsilon: float | None) -> None:
        from fedslm.report.html import run_report

        run_report(self.run_dir)


def default_writers(run_dir: Path, rounds: int, meta: dict[str, str], echo=print,
                    start: str = "base model", tracking: str = "none") -> list[Writer]:
    """`start`: what round 0 evaluates (the base model, or the public warm start);
    `tracking`: the experiment tracker (fedslm.report.tracking)."""
    writers = [Console(rounds, echo, start), MetricsFile(run_dir), AdapterFiles(run_dir, meta), SummaryFiles(run_dir),
               ReportFile(run_dir)]
    if tracking == "tensorboard":
        from fedslm.report.tracking import TensorBoardTracker

        writers.append(TensorBoardTracker(run_dir))
    return writers


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def _fmt(x, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}f}"
