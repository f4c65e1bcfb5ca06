"""The public warm start: before any private round, the server trains the initial global
adapter on public data (`warm_start.data`), so the sites' noisy rounds start from a model
that already knows the task's form instead of spending their budget on it.

It reads no site data and runs before any site is asked anything, so it costs no privacy:
the sites' ledgers never see it, and privacy.json and the model card name the data as
public. "labels" builds the public part of a classification task from its label set
alone: the instruction, the label's words as the message, the label as the answer.
"""

from __future__ import annotations

import time
from pathlib import Path

from fedslm.config import RunConfig, TrainConfig
from fedslm.data.errors import DataError


def public_examples(cfg: RunConfig) -> tuple[list[dict], str | None, str]:
    """(prompt/answer examples, system prompt, a description) of warm_start.data."""
    from fedslm.data.records import load_label_set
    from fedslm.data.sites import system_prompt_for
    from fedslm.use.eval_data import config_from_data, eval_set

    ws = cfg.warm_start
    if ws.data == "labels":
        labels = load_label_set(cfg.data)
        if cfg.data.shape != "classification" or not labels:
            raise DataError("warm_start.data=labels needs a classification data set with data.labels_path (the "
                            "public label set); give a preset or a file of public data instead")
        examples = [{"prompt": f"{cfg.data.instruction}\n\n{label.replace('_', ' ')}", "answer": label}
                    for label in labels]
        return examples, system_prompt_for(cfg.data), f"the label set of {cfg.data.name} ({len(labels)} names)"
    pub, _ = config_from_data(ws.data, what="warm_start.data")
    rows = eval_set(pub, "all", ws.max_examples)
    return rows.examples, rows.system_prompt, f"{pub.data.name} ({Path(pub.data.path).name if pub.data.path else 'built in'})"


def warm_start(cfg: RunConfig, model_dir: Path, scheme, start: dict, echo=print) -> tuple[dict, dict]:
    """(the warm global adapter, what privacy.json says of it)."""
    import torch

    from fedslm.data.tokenize import TokenizedDataset
    from fedslm.lora.adapter import adapter_state, attach_lora, load_adapter_state
    from fedslm.lora.frozen_prefix import CachedStates, first_trained_layer
    from fedslm.model import load_base_model
    from fedslm.train import train_local

    ws = cfg.warm_start
    began = time.perf_counter()
    examples, system_prompt, described = public_examples(cfg)
    model, tok = load_base_model(model_dir, cfg.train.device, cfg.train.precision, cfg.model.quantize)
    pm = attach_lora(model, cfg.lora, freeze_a=not scheme.trains_a)
    load_adapter_state(pm, scheme.site_start(start, cfg.lora.r, None))
    data = TokenizedDataset.from_records(tok, examples, cfg.data.max_length, system_prompt, cfg.data.loss_on)
    if len(data) == 0:
        raise DataError(f"warm_start.data={ws.data}: no examples with an answer to learn from")
    if first_trained_layer(pm):
        data = CachedStates.build(pm, data, tok.pad_token_id, cfg.train.eval_batch_size)
    train = TrainConfig(local_epochs=ws.epochs, batch_size=min(ws.batch_size, len(data)), lr=ws.lr,
                        threads=cfg.train.threads, progress=False)
    torch.manual_seed(cfg.seed)
    stats = train_local(pm, data, train, tok.pad_token_id, seed=cfg.seed)
    warm = adapter_state(pm)
    info = {"data": described, "public": True, "rows": len(data), "epochs": ws.epochs, "steps": stats.steps,
            "lr": ws.lr, "train_loss": stats.mean_loss, "epsilon": 0.0, "seconds": round(time.perf_counter() - began, 1)}
    echo(f"warm start on public data, {described}: {len(data)} rows x {ws.epochs:g} epochs, {stats.steps} steps, "
         f"train loss {stats.mean_loss:.4f}, no privacy spent [{info['seconds']}s]")
    return {k: warm[k] if k in warm else v for k, v in start.items()}, info
