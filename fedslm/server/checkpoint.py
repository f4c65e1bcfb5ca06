"""Restarting the coordinator: what the server saves after every round and how a run
continues from it (`resume=true`).

Flower has no checkpointing, and `Strategy.start` always counts rounds from 1. So the
strategy is driven through `ResumableRounds`, which adds the number of rounds already done
to every round number (the sites' seeds, the sampling draw and FedAdam's bias correction
all depend on it) and, after each round's evaluation, writes run_dir/checkpoint/:

  round-NNNN/global.safetensors   the global arrays exactly as the strategy holds them
  round-NNNN/state.safetensors    every tensor of the saved parts' states (optimiser state)
  round-NNNN/state.json           round number, run key, and each part's state with its
                                  tensors replaced by references into state.safetensors
  latest                          the name of the newest complete round directory

A round is written whole into a temporary directory, fsync'ed, renamed into place, and
only then does `latest` (replaced atomically, fsync'ed) point at it: a crash at any moment
leaves `latest` naming a complete round, never round N+1's arrays with round N's state.

The parts are whatever has state across rounds, each with `state_dict()` /
`load_state_dict()` (the strategy, a client-level DP wrapper, the run record): this module
never reaches into their attributes. A resumed run with the same config and seeds then
ends with the same adapter as one that never stopped. The run key names the sites'
privacy ledgers for this run; it is kept here, so a resumed run (a new Flower run id)
continues the same ledgers and a site's epsilon counts every round it ever trained.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from safetensors.torch import load_file, save_file

from fedslm.atomic import fsync_path, write_atomic

_TENSOR = "__tensor__"  # marks a tensor's place in state.json


class Saveable(Protocol):
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


def checkpoint_dir(run_dir: Path | str) -> Path:
    return Path(run_dir) / "checkpoint"


def new_run_key() -> str:
    return uuid.uuid4().hex[:12]


class Checkpoint:
    """What a restarted server needs; read with `Checkpoint.load`, written by `save`."""

    def __init__(self, server_round: int, run_key: str, arrays: dict[str, torch.Tensor], parts: dict[str, dict]):
        self.server_round = server_round
        self.run_key = run_key
        self.arrays = arrays
        self.parts = parts

    @classmethod
    def load(cls, run_dir: Path | str) -> Checkpoint:
        d = latest_round_dir(run_dir)
        state = json.loads((d / "state.json").read_text())
        tensors = load_file(str(d / "state.safetensors")) if (d / "state.safetensors").exists() else {}
        return cls(int(state["round"]), state["run_key"], load_file(str(d / "global.safetensors")),
                   _join(state["parts"], tensors))

    def restore(self, parts: dict[str, Saveable]) -> ArrayRecord:
        """Put every part back where round `server_round` left it; returns the global
        arrays to start the next round from, in the strategy's own dtype."""
        for name, part in parts.items():
            if name in self.parts:
                part.load_state_dict(self.parts[name])
        return ArrayRecord({k: Array(v.numpy()) for k, v in self.arrays.items()})


def latest_round_dir(run_dir: Path | str) -> Path:
    """The newest complete checkpoint of a run, as `latest` names it."""
    root = checkpoint_dir(run_dir)
    pointer = root / "latest"
    if not pointer.is_file():
        raise FileNotFoundError(
            f"resume=true but {pointer} does not exist: no round of this run was saved. "
            "Point output_dir at the directory of the run to continue, or start it fresh with resume=false"
        )
    d = root / pointer.read_text().strip()
    if not (d / "state.json").is_file():
        raise FileNotFoundError(f"{pointer} names {d}, which holds no complete checkpoint; restore it from a backup")
    return d


def save(run_dir: Path, server_round: int, run_key: str, arrays: dict[str, torch.Tensor],
         parts: dict[str, Saveable]) -> None:
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    states = {name: _split(part.state_dict(), name, tensors) for name, part in parts.items()}
    name = f"round-{server_round:04d}"
    tmp = root / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.contiguous() for k, v in arrays.items()}, str(tmp / "global.safetensors"))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "state.safetensors"))
    (tmp / "state.json").write_text(json.dumps({"round": server_round, "run_key": run_key, "parts": states},
                                               default=float))
    for f in tmp.iterdir():
        fsync_path(f)
    fsync_path(tmp)
    final = root / name
    shutil.rmtree(final, ignore_errors=True)  # a round redone after a crash replaces its own leftovers
    tmp.rename(final)
    fsync_path(root)
    write_atomic(root / "latest", name, durable=True)
    for old in root.glob("round-*"):  # keep this round and the one before it
        if old.name < f"round-{server_round - 1:04d}":
            shutil.rmtree(old, ignore_errors=True)



def _split(value, path: str, tensors: dict[str, torch.Tensor]):
    """`value` with each tensor moved into `tensors` under its path and a reference left."""
    if isinstance(value, torch.Tensor):
        tensors[path] = value
        return {_TENSOR: path}
    if isinstance(value, dict):
        return {k: _split(v, f"{path}/{k}", tensors) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_split(v, f"{path}/{i}", tensors) for i, v in enumerate(value)]
    return value


def _join(value, tensors: dict[str, torch.Tensor]):
    if isinstance(value, dict):
        if set(value) == {_TENSOR}:
            return tensors[value[_TENSOR]]
        return {k: _join(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [_join(v, tensors) for v in value]
    return value


def exact_tensors(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """The record's arrays in their own dtype: FedAdam/FedYogi/FedAdagrad hand back float64
    arrays (a float64 learning-rate factor promotes the float32 update), and the next round
    starts from those; rounding them to float32 here made a resumed run differ from an
    uninterrupted one in the last bits."""
    return {k: torch.from_numpy(np.ascontiguousarray(arr.numpy()).copy()) for k, arr in record.items()}


class ResumableRounds(Strategy):
    """Drives a strategy from round `done + 1` on and saves a checkpoint after each round.

    Only the round numbers are changed on the way through: every call goes to the
    wrapped strategy, so its aggregation, checks and recording are untouched.
    """

    def __init__(self, strategy, parts: dict[str, Saveable], run_dir: Path, run_key: str, done: int = 0):
        self.strategy = strategy
        self.parts = parts
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
        save(self.run_dir, server_round + self.done, self.run_key, exact_tensors(self._evaluated), self.parts)
        return out

    def start(self, *, evaluate_fn=None, **kwargs):
        # a server-side evaluation sees the true round number too
        shifted = None if evaluate_fn is None else (lambda r, arrays: evaluate_fn(r + self.done, arrays))
        return super().start(evaluate_fn=shifted, **kwargs)
