"""The run record: console progress, metrics.jsonl, per-round adapters, summary, curves.

The strategy reports what it sees (replies, bytes, rejections); this module decides how it
is shown and stored, so the server's round loop stays about federated learning.
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from fedslm.checkpoint import adapter_path, save_adapter


@dataclass
class RoundLog:
    started: float = field(default_factory=time.perf_counter)
    seconds: float = 0.0
    bytes_up: int = 0
    bytes_down: int = 0
    train: dict[int, dict] = field(default_factory=dict)  # site -> metrics
    eval: dict[int, dict] = field(default_factory=dict)
    rejected: list[str] = field(default_factory=list)
    aggregation_error: float | None = None
    server_eval: dict = field(default_factory=dict)  # the server's own held-out metrics


class RunRecorder:
    def __init__(self, run_dir: Path, rounds: int, meta: dict[str, str], echo=print):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.rounds = rounds
        self.meta = meta
        self.echo = echo
        self.log: dict[int, RoundLog] = defaultdict(RoundLog)
        self.node_site: dict[int, int] = {}
        self.metrics_path = self.run_dir / "metrics.jsonl"
        # kept for restore_state: a resumed run keeps the rows of the rounds it saved
        self._saved_rows = self.metrics_path.read_text().splitlines(keepends=True) if self.metrics_path.exists() else []
        self.metrics_path.write_text("")
        self.started = time.perf_counter()

    # --- what the strategy reports -------------------------------------------------
    def round_started(self, r: int) -> None:
        self.log[r].started = time.perf_counter()

    def add_bytes_down(self, r: int, n: int) -> None:
        self.log[r].bytes_down += n

    def train_reply(self, r: int, node: int, metrics: dict, bytes_up: int) -> None:
        site = int(metrics["site"])
        self.node_site[node] = site
        self.log[r].train[site] = metrics
        self.log[r].bytes_up += bytes_up

    def eval_reply(self, r: int, node: int, metrics: dict) -> None:
        site = int(metrics["site"])
        self.node_site[node] = site
        self.log[r].eval[site] = metrics

    def rejected(self, r: int, node: int, reason: str) -> None:
        who = f"site {self.node_site[node]}" if node in self.node_site else f"node {node}"
        line = f"{who}: {reason.strip().splitlines()[-1] if reason.strip() else 'no reason given'}"
        self.log[r].rejected.append(line)
        self.echo(f"  ! round {r}: rejected {line}")

    def note(self, r: int, text: str) -> None:
        self.echo(f"  ! round {r}: {text}")

    def aggregation_error(self, r: int, error: float) -> None:
        self.log[r].aggregation_error = error

    def server_evaluated(self, r: int, metrics: dict) -> None:
        self.log[r].server_eval = dict(metrics)
        shown = "  ".join(f"{k.removeprefix('server_')} {v:.4f}" for k, v in metrics.items() if k != "server_examples")
        self.echo(f"  server held-out ({metrics.get('server_examples', '?')} examples), round {r}: {shown}")

    def global_adapter(self, r: int, tensors: dict, meta: dict[str, str]) -> None:
        """The round's global adapter as a peft LoRA state (A and B) of rank meta['rank']."""
        save_adapter(adapter_path(self.run_dir, r), tensors, {**self.meta, **meta, "round": str(r)})

    def round_finished(self, r: int) -> None:
        rl = self.log[r]
        rl.seconds = time.perf_counter() - rl.started
        if r == 0:
            losses = [m["eval_loss"] for m in rl.eval.values()]
            mean = sum(losses) / len(losses) if losses else math.nan
            self.echo(f"round 0 (base model): held-out loss {mean:.4f} over {len(losses)} sites  [{rl.seconds:.1f}s]")
            return
        self.echo(
            f"round {r}/{self.rounds}  {rl.seconds:6.1f}s  up {_mb(rl.bytes_up)}  down {_mb(rl.bytes_down)}"
            f"  sites {len(rl.train)} ok, {len(rl.rejected)} rejected"
            + (f"  aggregation error {rl.aggregation_error:.2e}" if rl.aggregation_error is not None else "")
        )
        with self.metrics_path.open("a") as f:
            for site in sorted(set(rl.train) | set(rl.eval)):
                t, e = rl.train.get(site, {}), rl.eval.get(site, {})
                row = {
                    "round": r,
                    "site": site,
                    "train_loss": t.get("train_loss"),
                    "eval_loss": e.get("eval_loss"),
                    "epsilon": t.get("epsilon"),
                    "epsilon_rdp": t.get("epsilon_rdp"),
                    "epsilon_prv": t.get("epsilon_prv"),
                    "noise_multiplier": t.get("noise_multiplier"),
                    "num_examples": t.get("num-examples"),
                    "steps": t.get("steps"),
                    "train_seconds": t.get("train_seconds"),
                    "lora_r": t.get("lora_r"),
                    "aggregation_error": rl.aggregation_error,
                }
                f.write(json.dumps(row) + "\n")
                self.echo(
                    f"    site {site}: train loss {_fmt(row['train_loss'])}  held-out loss {_fmt(row['eval_loss'])}"
                    f"  epsilon {_fmt(row['epsilon'], 2)} (RDP {_fmt(row['epsilon_rdp'], 2)}, PRV {_fmt(row['epsilon_prv'], 2)})"
                    f"  ({_fmt(row['train_seconds'], 1)}s train)"
                )

    # --- restart (fedslm.resume) -------------------------------------------------------
    def to_state(self) -> dict:
        return {
            "elapsed": time.perf_counter() - self.started,
            "node_site": {str(n): s for n, s in self.node_site.items()},
            "log": {str(r): {"seconds": rl.seconds, "bytes_up": rl.bytes_up, "bytes_down": rl.bytes_down,
                             "train": rl.train, "eval": rl.eval, "rejected": rl.rejected,
                             "aggregation_error": rl.aggregation_error, "server_eval": rl.server_eval}
                    for r, rl in self.log.items()},
        }

    def restore_state(self, state: dict, done: int) -> None:
        """The record of rounds 0..done as saved; metrics.jsonl is cut back to those rounds
        (a crash after a round's lines were written but before its checkpoint)."""
        self.started = time.perf_counter() - float(state["elapsed"])
        self.node_site = {int(n): int(s) for n, s in state["node_site"].items()}
        for r, saved in state["log"].items():
            rl = self.log[int(r)]
            rl.seconds, rl.bytes_up, rl.bytes_down = saved["seconds"], saved["bytes_up"], saved["bytes_down"]
            rl.train = {int(s): m for s, m in saved["train"].items()}
            rl.eval = {int(s): m for s, m in saved["eval"].items()}
            rl.rejected, rl.aggregation_error = saved["rejected"], saved["aggregation_error"]
            rl.server_eval = saved.get("server_eval", {})
        rows = self._saved_rows
        self.metrics_path.write_text("".join(line for line in rows if json.loads(line)["round"] <= done))

    # --- the end of the run -----------------------------------------------------------
    def eval_curve(self) -> dict[int, dict[int, float]]:
        """site -> {round: held-out loss}, round 0 being the base model."""
        out: dict[int, dict[int, float]] = defaultdict(dict)
        for r, rl in sorted(self.log.items()):
            for site, m in rl.eval.items():
                out[site][r] = float(m["eval_loss"])
        return dict(out)

    def epsilon_curve(self) -> dict[int, dict[int, float]]:
        out: dict[int, dict[int, float]] = defaultdict(lambda: {0: 0.0})
        for r, rl in sorted(self.log.items()):
            for site, m in rl.train.items():
                out[site][r] = float(m["epsilon"])
        return dict(out)

    def summary(self, extra: dict) -> dict:
        rounds_done = [r for r in self.log if r >= 1]
        last = max(rounds_done, default=0)

        def mean_eval(r: int) -> float | None:
            vals = [m["eval_loss"] for m in self.log[r].eval.values()] if r in self.log else []
            return sum(vals) / len(vals) if vals else None

        eps = [m["epsilon"] for rl in self.log.values() for m in rl.train.values()]
        summary = {
            "rounds": len(rounds_done),
            "sites": len({s for rl in self.log.values() for s in rl.eval} | {s for rl in self.log.values() for s in rl.train}),
            "eval_loss_initial": mean_eval(0),
            "eval_loss_final": mean_eval(last),
            "epsilon": max(eps) if eps else 0.0,
            "bytes_up": sum(rl.bytes_up for rl in self.log.values()),
            "bytes_down": sum(rl.bytes_down for rl in self.log.values()),
            "seconds": time.perf_counter() - self.started,
            "seconds_per_round": [round(self.log[r].seconds, 2) for r in sorted(rounds_done)],
            "bytes_up_per_round": [self.log[r].bytes_up for r in sorted(rounds_done)],
            "bytes_down_per_round": [self.log[r].bytes_down for r in sorted(rounds_done)],
            "aggregation_error_per_round": [self.log[r].aggregation_error for r in sorted(rounds_done)],
            "rejected": {r: rl.rejected for r, rl in self.log.items() if rl.rejected},
            "server_eval_per_round": {r: rl.server_eval for r, rl in sorted(self.log.items()) if rl.server_eval},
            "eval_loss_per_site": {str(s): c for s, c in self.eval_curve().items()},
            "epsilon_per_site": {str(s): c for s, c in self.epsilon_curve().items()},
        }
        summary.update(extra)
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        return summary

    def plot(self, target_epsilon: float | None) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
        for site, curve in sorted(self.eval_curve().items()):
            ax1.plot(list(curve), list(curve.values()), marker="o", label=f"site {site}")
        ax1.set(xlabel="round (0 = base model)", ylabel="held-out answer loss", title="Held-out loss per site")
        for site, curve in sorted(self.epsilon_curve().items()):
            ax2.plot(list(curve), list(curve.values()), marker="o", label=f"site {site}")
        if target_epsilon:
            ax2.axhline(target_epsilon, color="grey", linestyle="--", label="target")
        ax2.set(xlabel="round", ylabel="epsilon spent", title="Privacy spent per site")
        from matplotlib.ticker import MaxNLocator

        for ax in (ax1, ax2):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.legend()
            ax.grid(alpha=0.3)
        fig.tight_layout()
        path = self.run_dir / "curves.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def _fmt(x, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}f}"
