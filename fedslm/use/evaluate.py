"""`fedslm evaluate`: one model directory, one held-out set, one task, one eval.json.

- perplexity: mean loss over answer tokens (prompt masked, as in training) and its exp;
- choice: each option's log-likelihood after the prompt, the best one is the prediction:
  accuracy, and macro-F1 over the classes;
- generate: greedy answers, exact match and contains-answer.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch

from fedslm.data.tokenize import TokenizedDataset, chat_prompt
from fedslm.losses import dataset_losses
from fedslm.use.chat import greedy_answers
from fedslm.use.eval_data import EvalSet
from fedslm.use.scoring import OptionScorer, contains_answer, exact_match, macro_f1


class EvalError(ValueError):
    pass


# --task (and server_eval.task): each task and the two metrics printed for it
TASKS = {"perplexity": ("loss", "perplexity"), "choice": ("accuracy", "macro_f1"),
         "generate": ("exact_match", "contains_answer")}


@torch.no_grad()
def perplexity(model, tok, es: EvalSet, max_length: int, batch_size: int = 8) -> dict:
    data = TokenizedDataset.from_records(tok, es.examples, max_length, es.system_prompt)
    losses, counts = dataset_losses(model, data, batch_size, tok.pad_token_id)
    # back from per-sequence means to token sums, summed batch by batch
    total = sum(chunk.sum().item() for chunk in (losses * counts).split(batch_size))
    tokens = int(counts.sum())
    loss = total / max(tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "answer_tokens": tokens,
            "truncated": data.truncated}


def choice(model, tok, es: EvalSet, progress=None) -> dict:
    if not es.golds or len(es.options) < 2:
        raise EvalError(f"{es.name}: the choice task needs a label per example and at least two options; this data has "
                        f"{'no labels' if not es.golds else f'options {es.options}'} (give --choices a,b,c, or use a "
                        "classification data set or one with a label column)")
    eos = [tok.eos_token_id] if es.options_end_answer else []
    option_ids = [tok(o, add_special_tokens=False)["input_ids"] + eos for o in es.options]
    prompts = [tok(chat_prompt(tok, ex["prompt"], es.system_prompt), add_special_tokens=False)["input_ids"]
               for ex in es.examples]
    # the system prompt and instruction every question starts with run once
    shared = os.path.commonprefix(prompts)[:min(map(len, prompts)) - 1]
    scorer = OptionScorer(model, option_ids, shared)
    preds = []
    for i, prompt in enumerate(prompts):
        preds.append(es.options[scorer.best(prompt)])
        if progress:
            progress(i + 1, len(es.examples))
    golds = es.golds
    return {"accuracy": sum(p == g for p, g in zip(preds, golds)) / len(golds), "macro_f1": macro_f1(preds, golds),
            "options": len(es.options), "predictions": preds}


def generation(model, tok, es: EvalSet, max_new_tokens: int = 32) -> dict:
    answers = es.golds or [e["answer"] for e in es.examples]
    preds = greedy_answers(model, tok, [e["prompt"] for e in es.examples], es.system_prompt, max_new_tokens)
    return {"exact_match": exact_match(preds, answers), "contains_answer": contains_answer(preds, answers),
            "predictions": preds}


def evaluate_model(model, tok, es: EvalSet, task: str, max_length: int, batch_size: int = 8,
                   max_new_tokens: int = 32, progress=None) -> dict:
    """One task's metrics for an in-memory model (a merged model or a peft model)."""
    if task not in TASKS:
        raise EvalError(f"unknown task {task!r}; use one of {', '.join(TASKS)}")
    start = time.perf_counter()
    if task == "perplexity":
        out = perplexity(model, tok, es, max_length, batch_size)
    elif task == "choice":
        out = choice(model, tok, es, progress)
    else:
        out = generation(model, tok, es, max_new_tokens)
    return {"task": task, "examples": len(es.examples), **out, "seconds": round(time.perf_counter() - start, 2)}


def evaluate_dir(model_dir: str | Path, es: EvalSet, task: str, max_length: int, **kwargs) -> dict:
    from fedslm.use.chat import load_model_dir

    if task not in TASKS:  # before the (slow) model load
        raise EvalError(f"unknown task {task!r}; use one of {', '.join(TASKS)}")
    model, tok = load_model_dir(model_dir)
    return {"model_dir": str(model_dir), **evaluate_model(model, tok, es, task, max_length, **kwargs)}




def side_by_side(result: dict, baseline: dict) -> str:
    """A small table: base vs fine-tuned for the task's headline metrics."""
    lines = [f"{'metric':<16} {'baseline':>10} {'model':>10} {'change':>10}"]
    for key in TASKS[result["task"]]:
        b, m = baseline[key], result[key]
        lines.append(f"{key:<16} {b:>10.4f} {m:>10.4f} {m - b:>+10.4f}")
    return "\n".join(lines)


def write_eval_json(path: Path, result: dict, es: EvalSet, data_desc: dict, baseline: dict | None = None) -> Path:
    payload = {"data": {**data_desc, "name": es.name, "examples": len(es.examples)}, **result}
    if baseline is not None:
        payload["baseline"] = baseline
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2))
    return path


def evaluate_command(model_dir: str | Path, data: str | None = None, task: str = "perplexity", split: str = "eval",
                     overrides: list[str] | None = None, limit: int = 0, choices: list[str] | None = None,
                     baseline: str | None = None, max_new_tokens: int = 32, batch_size: int = 8,
                     out: str | Path | None = None, echo=print) -> dict:
    """`fedslm evaluate`: score a model (and optionally a baseline) and write eval.json."""
    from fedslm.use.eval_data import config_for_data, eval_set
    from fedslm.use.chat import check_model_dir
    from fedslm.model import resolve_model_dir

    if task not in TASKS:
        raise EvalError(f"unknown task {task!r}; use one of {', '.join(TASKS)}")
    check_model_dir(model_dir)  # before reading any data
    cfg, desc = config_for_data(model_dir, data, overrides)
    es = eval_set(cfg, split, limit, choices)
    echo(f"{es.name}: {len(es.examples)} {split} examples, task {task}")
    kwargs = {"batch_size": batch_size, "max_new_tokens": max_new_tokens, "progress": _progress(echo)}
    result = evaluate_dir(model_dir, es, task, cfg.data.max_length, **kwargs)
    base = None
    if baseline:
        base_dir = resolve_model_dir(cfg.model) if baseline == "base" else Path(baseline)
        check_model_dir(base_dir)
        base = evaluate_dir(base_dir, es, task, cfg.data.max_length, **kwargs)
        echo(side_by_side(result, base))
    else:
        echo("  ".join(f"{k} {result[k]:.4f}" for k in TASKS[task]))
    path = Path(out) if out else _default_out(Path(model_dir))
    write_eval_json(path, result, es, {**desc, "split": split}, base)
    echo(f"wrote {path}")
    return {"result": result, "baseline": base, "path": str(path)}


def _default_out(model_dir: Path) -> Path:
    import os

    return model_dir / "eval.json" if os.access(model_dir, os.W_OK) else Path("eval.json")


def _progress(echo):
    """A line every 10% of a long choice evaluation."""
    def report(done: int, total: int) -> None:
        if total >= 20 and done % max(1, total // 10) == 0:
            echo(f"  scored {done}/{total}")
    return report
