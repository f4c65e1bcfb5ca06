"""Server-side evaluation: each round's global adapter scored on a held-out set the server
holds, with the same tasks as `fedslm evaluate` (Flower's `evaluate_fn` hook).

The sites' own held-out losses still come back in every evaluate round; this adds a
single, comparable figure per round (accuracy, exact match or perplexity) from one place.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from flwr.app import ArrayRecord, MetricRecord

from fedslm.config import RunConfig
from fedslm.use.evaluate import TASKS, evaluate_model
from fedslm.lora.schemes import Scheme
from fedslm.transport import from_record


def server_eval_set(cfg: RunConfig):
    """The examples the server scores: its own data (preset or file) or the run's held-out rows."""
    from fedslm.use.eval_data import config_from_data, eval_set

    se = cfg.server_eval
    data_cfg = cfg
    if se.data:  # read the way `fedslm evaluate --data` reads it
        composed, _ = config_from_data(se.data, what="server_eval.data")
        data_cfg = dataclasses.replace(cfg, data=composed.data, federation=dataclasses.replace(
            cfg.federation, sites=composed.federation.sites))
    return eval_set(data_cfg, se.split, se.limit)


def server_evaluate_fn(cfg: RunConfig, scheme: Scheme, model_dir: Path, recorder) -> Callable | None:
    """evaluate_fn(server_round, arrays) -> MetricRecord for strategy.start, or None when off."""
    if cfg.server_eval.task == "none":
        return None
    from fedslm.use.export import build_adapted

    task = cfg.server_eval.task
    es = server_eval_set(cfg)  # read and formatted once, scored every round

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        rank, alpha, view = scheme.peft_view(from_record(arrays))
        model, tok = build_adapted(model_dir, cfg, view, rank, alpha)
        result = evaluate_model(model, tok, es, task, cfg.data.max_length, cfg.train.eval_batch_size)
        metrics = {f"server_{k}": float(result[k]) for k in TASKS[task]}
        recorder.server_evaluated(server_round, {**metrics, "server_examples": len(es.examples)})
        return MetricRecord(metrics)

    return evaluate
