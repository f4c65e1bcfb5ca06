"""The end of the demo: what the federation achieved, in the user's words."""

from __future__ import annotations

import json
from pathlib import Path

from fedslm.config import RunConfig
from fedslm.data.clinic import SYSTEM_PROMPT, demo_question
from fedslm.use.chat import answer
from fedslm.model import load_base_model, resolve_model_dir
from fedslm.report.html import run_report


def print_summary(s: dict, cfg: RunConfig) -> None:
    print()
    print(f"done: {s['rounds']} rounds x {s['sites']} sites in {s['federation_seconds']:.1f}s "
          f"(per round {', '.join(f'{x:.1f}s' for x in s['seconds_per_round'])})")
    print(f"  held-out loss {s['eval_loss_initial']:.4f} -> {s['eval_loss_final']:.4f}")
    if cfg.privacy.enabled:
        print(f"  epsilon spent (max over sites) {s['epsilon']:.4f} <= target {cfg.privacy.epsilon} at delta {cfg.privacy.delta:g}")
    print(f"  bytes up {s['bytes_up']:,}  down {s['bytes_down']:,}")
    print(f"  run dir: {cfg.output_dir}")


def show_demo_answers(cfg: RunConfig, max_new_tokens: int = 60) -> None:
    q = demo_question(cfg.seed)
    base, tok = load_base_model(resolve_model_dir(cfg.model))
    tuned, tuned_tok = load_base_model(Path(cfg.output_dir) / "model")
    answers = {"base model": answer(base, tok, q['prompt'], max_new_tokens, SYSTEM_PROMPT) or "(empty answer)",
               "federated model": answer(tuned, tuned_tok, q['prompt'], max_new_tokens, SYSTEM_PROMPT) or "(empty answer)"}
    print(f"\nheld-out question: {q['prompt']}")
    print(f"  base model:      {answers['base model']}")
    print(f"  federated model: {answers['federated model']}")
    # into the run's report too
    run_dir = Path(cfg.output_dir)
    (run_dir / "demo.json").write_text(json.dumps({"question": q["prompt"], "answers": answers}, indent=2))
    run_report(run_dir)
