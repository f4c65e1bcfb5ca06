"""Restarting the coordinator: what the server saves after every round and how a run
continues from it (`resume=true`).

Flower has no checkpointing, and `Strategy.start` always counts rounds from 1. So the
strategy is driven through `ResumableRounds`, which adds the number of rounds already done
to every round number (the sites' seeds, the sampling draw and FedAdam's bias correction
all depend on it) and, after each round's evaluation, writes run_dir/checkpoint/:

  global.safetensors     the global arrays exactly as the strategy holds them (fp32)
  optimizer.safetensors  server optimiser state (FedAvgM momentum, FedAdam/FedYogi m_t,
                         v_t and current arrays), whatever the strategy chain holds
  state.json             round number, run key, the record so far, scalars (an adaptive
                         DP clip norm), and which arrays the optimiser file holds

A resumed run with the same config and seeds then ends with the same adapter as one that
never stopped. The run key names the sites' privacy ledgers for this run; it is kept in
the checkpoint, so a resumed run (a new Flower run id) continues the same ledgers and a
site's epsilon counts every round it ever trained.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from safetensors.torch import load_file, save_file

from fedslm.reporting import RunRecorder

# Attributes of Flower's strategies that carry state from round to round
ARRAY_STATE = ("current_arrays", "m_t", "v_t", "momentum_vector")
SCALAR_STATE = ("clipping_norm",)


def checkpoint_dir(run_dir: Path | str) -> Path:
    return Path(run_dir) / "checkpoint"


def new_run_key() -> str:
    return uuid.uuid4().hex[:12]


class Checkpoint:
    """What a restarted server needs; read with `Checkpoint.load`, written by ResumableRounds."""

    def __init__(self, server_round: int, run_key: str, arrays: dict[str, torch.Tensor], state: dict,
                 optimizer: dict[str, torch.Tensor]):
        self.server_round = server_round
        self.run_key = run_key
        self.arrays = arrays
        self.state = state
        self.optimizer = optimizer

    @classmethod
    def load(cls, run_dir: Path | str) -> "Checkpoint":
        d = checkpoint_dir(run_dir)
        if not (d / "state.json").is_file():
            raise FileNotFoundError(
                f"resume=true but {d / 'state.json'} does not exist: no round of this run was saved. "
                "Point output_dir at the directory of the run to continue, or start it fresh with resume=false"
            )
        state = json.loads((d / "state.json").read_text())
        optimizer = load_file(str(d / "optimizer.safetensors")) if (d / "optimizer.safetensors").exists() else {}
        return cls(int(state["round"]), state["run_key"], load_file(str(d / "global.safetensors")), state, optimizer)


def _owners(strategy) -> list[tuple[str, object]]:
    """The strategy and the one it wraps (Flower's DP wrappers keep it in .strategy)."""
    out = [("outer", strategy)]
    if hasattr(strategy, "strategy"):
        out.append(("inner", strategy.strategy))
    return out


def strategy_state(strategy) -> tuple[dict[str, torch.Tensor], dict]:
    """Flatten the optimiser state of a strategy chain into named tensors + a layout."""
    tensors: dict[str, torch.Tensor] = {}
    layout: dict[str, dict] = {}
    scalars: dict[str, float] = {}
    for level, obj in _owners(strategy):
        for attr in ARRAY_STATE:
            value = getattr(obj, attr, None)
            if value is None:
                continue
            if isinstance(value, ArrayRecord):
                kind, items = "record", {k: a.numpy() for k, a in value.items()}
            elif isinstance(value, dict):
                kind, items = "dict", value
            else:
                kind, items = "list", {str(i): v for i, v in enumerate(value)}
            name = f"{level}.{attr}"
            layout[name] = {"kind": kind, "keys": list(items)}
            for key, arr in items.items():
                tensors[f"{name}/{key}"] = torch.from_numpy(np.ascontiguousarray(arr).copy())
        for attr in SCALAR_STATE:
            if isinstance(getattr(obj, attr, None), (int, float)):
                scalars[f"{level}.{attr}"] = float(getattr(obj, attr))
    return tensors, {"arrays": layout, "scalars": scalars}


def restore_strategy_state(strategy, tensors: dict[str, torch.Tensor], layout: dict) -> None:
    owners = dict(_owners(strategy))
    for name, spec in layout.get("arrays", {}).items():
        level, attr = name.split(".", 1)
        items = {k: tensors[f"{name}/{k}"].numpy() for k in spec["keys"]}
        if spec["kind"] == "record":
            value = ArrayRecord({k: Array(v) for k, v in items.items()})
        elif spec["kind"] == "dict":
            value = items
        else:
            value = [items[k] for k in spec["keys"]]
        setattr(owners[level], attr, value)
    for name, number in layout.get("scalars", {}).items():
        level, attr = name.split(".", 1)
        setattr(owners[level], attr, number)


class ResumableRounds(Strategy):
    """Drives a strategy from round `done + 1` on and saves a checkpoint after each round.

    Only the round numbers are changed on the way through: every call goes to the
    wrapped strategy, so its aggregation, checks and recording are untouched.
    """

    def __init__(self, strategy, recorder: RunRecorder, run_dir: Path, run_key: str, done: int = 0):
        self.strategy = strategy
        self.recorder = recorder
        self.run_dir = Path(run_dir)
        self.run_key = run_key
        self.done = done
        self._evaluated: ArrayRecord | None = None

    def summary(self) -> None:
        self.strategy.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_train(server_round + self.done, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.strategy.aggregate_train(server_round + self.done, replies)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self._evaluated = arrays
        return self.strategy.configure_evaluate(server_round + self.done, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        out = self.strategy.aggregate_evaluate(server_round + self.done, replies)
        self.save(server_round + self.done)
        return out

    def start(self, *, evaluate_fn=None, **kwargs):
        # a server-side evaluation sees the true round number too
        shifted = None if evaluate_fn is None else (lambda r, arrays: evaluate_fn(r + self.done, arrays))
        return super().start(evaluate_fn=shifted, **kwargs)

    def save(self, server_round: int) -> None:
        d = checkpoint_dir(self.run_dir)
        d.mkdir(parents=True, exist_ok=True)
        opt, layout = strategy_state(self.strategy)
        inner = getattr(self.strategy, "strategy", self.strategy)
        state = {
            "round": server_round,
            "run_key": self.run_key,
            "optimizer": layout,
            "exhausted": sorted(getattr(inner, "exhausted", ())),
            "errors": {str(k): v for k, v in getattr(inner, "errors", {}).items()},
            "recorder": self.recorder.to_state(),
        }
        # arrays first, state.json last and atomically: state.json names a complete round
        _save(d / "global.safetensors", _exact(self._evaluated))
        _save(d / "optimizer.safetensors", opt)
        tmp = d / "state.json.tmp"
        tmp.write_text(json.dumps(state, default=float))
        tmp.replace(d / "state.json")


def _exact(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """The record's arrays in their own dtype: FedAdam/FedYogi/FedAdagrad hand back float64
    arrays (a float64 learning-rate factor promotes the float32 update), and the next round
    starts from those; rounding them to float32 here made a resumed run differ from an
    uninterrupted one in the last bits."""
    return {k: torch.from_numpy(np.ascontiguousarray(arr.numpy()).copy()) for k, arr in record.items()}


def _save(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    tmp.replace(path)


def restore(strategy, recorder: RunRecorder, ckpt: Checkpoint) -> ArrayRecord:
    """Put the strategy and the record back where round `ckpt.server_round` left them;
    returns the global arrays to start the next round from."""
    restore_strategy_state(strategy, ckpt.optimizer, ckpt.state.get("optimizer", {}))
    inner = getattr(strategy, "strategy", strategy)
    if hasattr(inner, "exhausted"):
        inner.exhausted = set(ckpt.state.get("exhausted", []))
    if hasattr(inner, "errors"):
        inner.errors = {int(k): v for k, v in ckpt.state.get("errors", {}).items()}
    recorder.restore_state(ckpt.state["recorder"], ckpt.server_round)
    # exactly the arrays the strategy held, in their own dtype (see _exact)
    return ArrayRecord({k: Array(v.numpy()) for k, v in ckpt.arrays.items()})
