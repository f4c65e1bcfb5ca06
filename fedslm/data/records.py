"""Rows of any table become one of three example kinds, chosen by `data.shape`:

- ("prompt", "answer"): instruction and classification shapes; the loss is on the answer;
- ("messages",): chat shape; the loss is on every assistant turn;
- ("text",): plain causal LM; the loss is on every token.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets

from fedslm.config import DataConfig
from fedslm.data.errors import DataError


# data.shape: what one row becomes (see the module docstring)
SHAPES = ("instruction", "chat", "text", "classification")
# data.loss_on: which tokens carry the loss (fedslm.data.tokenize.encode)
LOSS_ON = ("auto", "answer", "label", "all")


def required_columns(cfg: DataConfig) -> list[str]:
    if cfg.shape == "chat":
        return [cfg.messages_column]
    if cfg.shape == "text":
        return [cfg.text_column]
    if cfg.shape == "classification":
        return [cfg.text_column, cfg.label_column]
    prompt_cols = _template_fields(cfg.prompt_template) if cfg.prompt_template else list(cfg.prompt_columns)
    answer_cols = _template_fields(cfg.answer_template) if cfg.answer_template else [cfg.answer_column]
    return list(dict.fromkeys(prompt_cols + answer_cols))


def _template_fields(template: str) -> list[str]:
    import string

    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def check_columns(ds: datasets.Dataset, cfg: DataConfig, where: str) -> None:
    missing = [c for c in required_columns(cfg) if c not in ds.column_names]
    if missing:
        raise DataError(
            f"{where}: column(s) {', '.join(repr(m) for m in missing)} not found; the data has columns "
            f"{', '.join(ds.column_names)}. Set the data.*_column options (shape={cfg.shape}) to the right names"
        )


def load_label_set(cfg: DataConfig) -> list[str] | None:
    if not cfg.labels_path:
        return None
    try:
        labels = json.loads(Path(cfg.labels_path).expanduser().read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(f"data.labels_path {cfg.labels_path}: cannot read a JSON list of labels ({err})") from err
    if not isinstance(labels, list) or not labels:
        raise DataError(f"data.labels_path {cfg.labels_path}: expected a non-empty JSON list of label names")
    return [str(x) for x in labels]


def check_labels(ds: datasets.Dataset, cfg: DataConfig, labels: list[str] | None, where: str) -> None:
    if cfg.shape != "classification" or labels is None:
        return
    allowed = set(labels)
    seen = set(ds.unique(cfg.label_column))
    bad = sorted(str(x) for x in seen if not (str(x) in allowed or (isinstance(x, int) and 0 <= x < len(labels))))
    if bad:
        raise DataError(
            f"{where}: {len(bad)} label value(s) not in the label set of {cfg.labels_path} "
            f"({', '.join(bad[:5])}{', ...' if len(bad) > 5 else ''}); allowed are e.g. "
            f"{', '.join(labels[:5])}: fix the labels or the label list",
            public=f"{where}: {len(bad)} label value(s) not in the site's label set (the values are in the site's log)",
        )


def to_example(row: dict, cfg: DataConfig, labels: list[str] | None) -> dict:
    """One row as {prompt, answer} | {messages} | {text}."""
    if cfg.shape == "text":
        return {"text": str(row[cfg.text_column])}
    if cfg.shape == "chat":
        return {"messages": row[cfg.messages_column]}
    if cfg.shape == "classification":  # the answer is the label: loss_on label = answer
        label = row[cfg.label_column]
        if labels is not None and isinstance(label, int):
            label = labels[label]
        return {"prompt": f"{cfg.instruction}\n\n{row[cfg.text_column]}", "answer": str(label)}
    if cfg.prompt_template:
        prompt = cfg.prompt_template.format(**row)
    else:
        prompt = "\n\n".join(str(row[c]) for c in cfg.prompt_columns)
    answer = cfg.answer_template.format(**row) if cfg.answer_template else str(row[cfg.answer_column])
    example = {"prompt": prompt, "answer": answer}
    label = row.get(cfg.label_column)
    if label is not None and labels is not None and isinstance(label, int):
        label = labels[label]
    # auto: the label where the answer starts with one, as "{label}. {long_answer}" does
    if label is not None and (cfg.loss_on == "label" or cfg.loss_on == "auto" and answer.startswith(str(label))):
        example["label"] = str(label)
    elif cfg.loss_on == "label":
        raise DataError(f"data.loss_on=label: the row has no {cfg.label_column!r} column (data.label_column); "
                        "name the label column, or use data.loss_on=answer")
    return example
