"""The run record: what the strategy saw in every round (replies, bytes, rejections,
aggregation error, server evaluation), kept in memory and passed to the outputs.

The strategy reports; `fedslm.server.outputs` writers decide how it is shown and stored,
so the round loop stays about federated learning. `state_dict` / `load_state_dict` make
the record part of the server's checkpoint.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from fedslm.server.outputs import Writer, default_writers


@dataclass
class RoundLog:
    started: float = field(default_factory=time.perf_counter)
    seconds: float = 0.0
    # the round up to its aggregated adapter, without the sites' evaluation: what a round
    # costs where evaluation is rarer (federation.eval_every) or absent (FlowerTune)
    train_seconds: float = 0.0
    bytes_up: int = 0
    bytes_down: int = 0
    train: dict[int, dict] = field(default_factory=dict)  # site -> metrics
    eval: dict[int, dict] = field(default_factory=dict)
    rejected: list[str] = field(default_factory=list)
    aggregation_error: float | None = None
    server_eval: dict = field(default_factory=dict)  # the server's own held-out metrics


class RunRecorder:
    def __init__(self, run_dir: Path, rounds: int, meta: dict[str, str], echo=print,
                 writers: list[Writer] | None = None, start: str = "base model", tracking: str = "none"):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.rounds = rounds
        self.meta = meta
        self.writers = writers if writers is not None else default_writers(self.run_dir, rounds, meta, echo, start,
                                                                                  tracking)
        self.log: dict[int, RoundLog] = defaultdict(RoundLog)
        self.node_site: dict[int, int] = {}
        self.started = time.perf_counter()

    # --- what the strategy reports -------------------------------------------------
    def round_started(self, r: int) -> None:
        self.log[r].started = time.perf_counter()

    def training_done(self, r: int) -> None:
        self.log[r].train_seconds = time.perf_counter() - self.log[r].started

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
        for w in self.writers:
            w.rejected(r, line)

    def note(self, r: int, text: str) -> None:
        for w in self.writers:
            w.note(r, text)

    def aggregation_error(self, r: int, error: float) -> None:
        self.log[r].aggregation_error = error

    def server_evaluated(self, r: int, metrics: dict) -> None:
        self.log[r].server_eval = dict(metrics)
        for w in self.writers:
            w.server_evaluated(r, self.log[r].server_eval)

    def global_adapter(self, r: int, tensors: dict, meta: dict[str, str]) -> None:
        for w in self.writers:
            w.global_adapter(r, tensors, meta)

    def round_finished(self, r: int) -> None:
        rl = self.log[r]
        rl.seconds = time.perf_counter() - rl.started
        rows = self.site_rows(r)
        for w in self.writers:
            w.round_finished(r, rl, rows)

    def site_rows(self, r: int) -> list[dict]:
        """One row per site that trained or evaluated in round r (metrics.jsonl's rows)."""
        rl = self.log[r]
        rows = []
        for site in sorted(set(rl.train) | set(rl.eval)):
            t, e = rl.train.get(site, {}), rl.eval.get(site, {})
            rows.append({
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
            })
        return rows

    def rounds_trained(self) -> dict[int, int]:
        """site -> rounds whose training it replied to (the checkpointed record, so a
        resumed run's schedule continues where it stopped)."""
        out: dict[int, int] = defaultdict(int)
        for r, rl in self.log.items():
            for site in rl.train:
                out[site] += 1
        return dict(out)

    # --- the server's checkpoint (fedslm.server.checkpoint) ----------------------------
    def state_dict(self) -> dict:
        return {
            "done": max((r for r in self.log), default=0),
            "elapsed": time.perf_counter() - self.started,
            "node_site": {str(n): s for n, s in self.node_site.items()},
            "log": {str(r): {"seconds": rl.seconds, "train_seconds": rl.train_seconds, "bytes_up": rl.bytes_up, "bytes_down": rl.bytes_down,
                             "train": rl.train, "eval": rl.eval, "rejected": rl.rejected,
                             "aggregation_error": rl.aggregation_error, "server_eval": rl.server_eval}
                    for r, rl in self.log.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        """The record of rounds 0..done as saved; the writers drop anything written after."""
        self.started = time.perf_counter() - float(state["elapsed"])
        self.node_site = {int(n): int(s) for n, s in state["node_site"].items()}
        for r, saved in state["log"].items():
            rl = self.log[int(r)]
            rl.seconds, rl.bytes_up, rl.bytes_down = saved["seconds"], saved["bytes_up"], saved["bytes_down"]
            rl.train = {int(s): m for s, m in saved["train"].items()}
            rl.eval = {int(s): m for s, m in saved["eval"].items()}
            rl.rejected, rl.aggregation_error = saved["rejected"], saved["aggregation_error"]
            rl.server_eval = saved.get("server_eval", {})
            rl.train_seconds = saved.get("train_seconds", 0.0)
        for w in self.writers:
            w.restored(int(state["done"]))

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
            "train_seconds_per_round": [round(self.log[r].train_seconds, 2) for r in sorted(rounds_done)],
            "bytes_up_per_round": [self.log[r].bytes_up for r in sorted(rounds_done)],
            "bytes_down_per_round": [self.log[r].bytes_down for r in sorted(rounds_done)],
            "aggregation_error_per_round": [self.log[r].aggregation_error for r in sorted(rounds_done)],
            "rejected": {r: rl.rejected for r, rl in self.log.items() if rl.rejected},
            "server_eval_per_round": {r: rl.server_eval for r, rl in sorted(self.log.items()) if rl.server_eval},
            "eval_loss_per_site": {str(s): c for s, c in self.eval_curve().items()},
            "epsilon_per_site": {str(s): c for s, c in self.epsilon_curve().items()},
        }
        summary.update(extra)
        return summary

    def finish(self, extra: dict, target_epsilon: float | None) -> dict:
        """The summary of the run, handed to every writer (summary.json, curves.png)."""
        summary = self.summary(extra)
        for w in self.writers:
            w.finished(self, summary, target_epsilon)
        return summary
