"""LoRA-aware aggregation as a Flower Message-API strategy.

FFA-LoRA: every site builds the same frozen A from the shared seed and trains only B, so
the global update sum_i w_i B_i A = (sum_i w_i B_i) A: averaging B (weighted by examples)
is exactly the average of the sites' updates. FedAvg does the averaging; this subclass
adds what a federation of real sites needs around it: replies are checked before they are
used, bytes are counted, and each round is recorded.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedslm.reporting import RunRecorder
from fedslm.transport import record_bytes

log = logging.getLogger(__name__)

WEIGHT_KEY = "num-examples"


def reply_problem(content, expected: dict[str, tuple[int, ...]]) -> str | None:
    """Why a training reply cannot be aggregated, or None if it can."""
    if "arrays" not in content.array_records or "metrics" not in content.metric_records:
        return "reply lacks the 'arrays' or 'metrics' record"
    metrics = content.metric_records["metrics"]
    weight = metrics.get(WEIGHT_KEY)
    if not isinstance(weight, (int, float)) or weight <= 0:
        return f"'{WEIGHT_KEY}' must be a positive number, got {weight!r}"
    arrays = content.array_records["arrays"]
    keys = set(arrays.keys())
    if keys != set(expected):
        return (f"adapter keys differ from the global adapter: {len(set(expected) - keys)} missing, "
                f"{len(keys - set(expected))} unexpected")
    for key, arr in arrays.items():
        if tuple(arr.shape) != expected[key]:
            return f"{key}: shape {tuple(arr.shape)}, expected {expected[key]}"
        values = arr.numpy()
        if values.dtype not in (np.float32, np.float16):
            return f"{key}: dtype {values.dtype}, expected float32 or float16"
        if not np.isfinite(values).all():
            return f"{key}: contains NaN or Inf"
    return None


def weighted_mean(records: list[ArrayRecord], weights: list[float]) -> ArrayRecord:
    """Example-weighted mean of adapter tensors, accumulated in float64, returned as fp32."""
    total = float(sum(weights))
    out: dict[str, np.ndarray] = {}
    for record, w in zip(records, weights, strict=True):
        for key, arr in record.items():
            contrib = arr.numpy().astype(np.float64) * (w / total)
            out[key] = contrib if key not in out else out[key] + contrib
    return ArrayRecord({k: Array(v.astype(np.float32)) for k, v in out.items()})


class FFALoRA(FedAvg):
    """FedAvg over the B matrices of FFA-LoRA, with validated replies and a run record."""

    def __init__(
        self,
        recorder: RunRecorder,
        expected_shapes: dict[str, tuple[int, ...]],
        transport_dtype: str = "float32",
        uniform_weights: bool = False,
        **fedavg_kwargs,
    ):
        super().__init__(weighted_by_key=WEIGHT_KEY, **fedavg_kwargs)
        self.recorder = recorder
        self.expected = expected_shapes
        self.transport_dtype = transport_dtype
        # client-level DP bounds each site's influence by the clip norm only if every site
        # counts the same in the mean; example weights would let a big site exceed it
        self.uniform_weights = uniform_weights
        # nodes that refused to train because their privacy budget is spent: they are not
        # asked again (they still evaluate, which spends no training privacy)
        self.exhausted: set[int] = set()

    def _downlink(self, arrays: ArrayRecord) -> ArrayRecord:
        return ArrayRecord({k: Array(a.numpy().astype(self.transport_dtype)) for k, a in arrays.items()})

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self.recorder.round_started(server_round)
        down = self._downlink(arrays)
        messages = [m for m in super().configure_train(server_round, down, config, grid)
                    if m.metadata.dst_node_id not in self.exhausted]
        if self.exhausted:
            self.recorder.note(server_round, f"{len(self.exhausted)} site(s) with a spent privacy budget not asked to train")
        self.recorder.add_bytes_down(server_round, record_bytes(down) * len(messages))
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid: list[Message] = []
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                if msg.error.reason.startswith("BudgetExceededError"):
                    self.exhausted.add(node)
                self.recorder.rejected(server_round, node, f"site error: {msg.error.reason}")
                continue
            problem = reply_problem(msg.content, self.expected)
            if problem:
                self.recorder.rejected(server_round, node, f"invalid update: {problem}")
                continue
            metrics = dict(msg.content.metric_records["metrics"])
            self.recorder.train_reply(server_round, node, metrics, record_bytes(msg.content.array_records["arrays"]))
            valid.append(msg)

        if len(valid) < max(1, self.min_train_nodes):
            self.recorder.note(
                server_round,
                f"only {len(valid)} valid replies (< min {self.min_train_nodes}); global adapter unchanged this round",
            )
            return None, None
        weights = [1.0 if self.uniform_weights else float(m.content.metric_records["metrics"][WEIGHT_KEY]) for m in valid]
        arrays = weighted_mean([m.content.array_records["arrays"] for m in valid], weights)
        metrics = self.train_metrics_aggr_fn([m.content for m in valid], WEIGHT_KEY)
        return arrays, metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        if server_round == 0:
            self.recorder.round_started(0)
        else:
            # the round's final global adapter: after any DP wrapper has noised the aggregate
            self.recorder.global_adapter(server_round, arrays)
        down = self._downlink(arrays)
        messages = list(super().configure_evaluate(server_round, down, config, grid))
        self.recorder.add_bytes_down(server_round, record_bytes(down) * len(messages))
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        valid = []
        for msg in replies:
            if msg.has_error():
                self.recorder.rejected(server_round, msg.metadata.src_node_id, f"evaluation failed: {msg.error.reason}")
                continue
            self.recorder.eval_reply(server_round, msg.metadata.src_node_id, dict(msg.content.metric_records["metrics"]))
            valid.append(msg)
        self.recorder.round_finished(server_round)
        if not valid:
            return None
        return self.evaluate_metrics_aggr_fn([m.content for m in valid], WEIGHT_KEY)
