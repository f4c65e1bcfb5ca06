"""Tokenisation + collation throughput of the data layer on MedQuAD, cold and warm cache.

    .venv/bin/python -m benchmarks.data_throughput [--data ../shared/data/medquad/medquad.jsonl]

Each phase runs in a fresh process against the same `datasets` cache directory: "cold"
starts from an empty cache (JSON -> Arrow conversion and tokenisation both run), "warm"
finds both cached. Collation (padding batches of 8) is timed in each phase.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "medquad" / "medquad.jsonl"


def phase(data: str, max_length: int) -> dict:
    from fedslm import quiet

    quiet.silence_known_noise()
    from transformers import AutoTokenizer

    from fedslm.config import DataConfig, ModelConfig
    from fedslm.data.sites import build_site_data
    from fedslm.data.tokenize import make_collate
    from fedslm.model import resolve_model_dir

    tok = AutoTokenizer.from_pretrained(resolve_model_dir(ModelConfig()))
    cfg = DataConfig(name="medquad", path=data, prompt_columns=["question"], answer_column="answer",
                     max_length=max_length, eval_fraction=0.1)
    start = time.perf_counter()
    site = build_site_data(cfg, 0, 1, tok)  # one site holding the whole file
    tokenise_s = time.perf_counter() - start
    n = len(site.train) + len(site.eval)
    tokens = site.train.num_tokens() + site.eval.num_tokens()

    collate = make_collate(tok.pad_token_id)
    start = time.perf_counter()
    for i in range(0, len(site.train), 8):
        collate([site.train[j] for j in range(i, min(i + 8, len(site.train)))])
    collate_s = time.perf_counter() - start
    return {"examples": n, "tokens": tokens, "tokenise_s": tokenise_s, "collate_s": collate_s,
            "collated_examples": len(site.train), "truncated": site.train.truncated + site.eval.truncated}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        print(json.dumps(phase(args.data, args.max_length)))
        return
    if not Path(args.data).exists():
        sys.exit(f"{args.data} not found: pass --data PATH to a MedQuAD-style JSON Lines file")

    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "HF_DATASETS_CACHE": cache}
        results = {}
        for name in ("cold", "warm"):
            out = subprocess.run([sys.executable, "-m", "benchmarks.data_throughput", "--phase", name,
                                  "--data", args.data, "--max-length", str(args.max_length)],
                                 cwd=REPO, env=env, capture_output=True, text=True, check=True)
            results[name] = json.loads(out.stdout.strip().splitlines()[-1])

    print(f"data: {args.data}  max_length {args.max_length}  SmolLM2 tokenizer  (cpu count {os.cpu_count()})")
    print(f"{'cache':<6} {'examples':>9} {'tokens':>11} {'load+tokenise s':>16} {'examples/s':>11} {'tokens/s':>11} {'collate ex/s':>13}")
    for name, r in results.items():
        print(f"{name:<6} {r['examples']:>9,} {r['tokens']:>11,} {r['tokenise_s']:>16.2f} "
              f"{r['examples'] / r['tokenise_s']:>11,.0f} {r['tokens'] / r['tokenise_s']:>11,.0f} "
              f"{r['collated_examples'] / r['collate_s']:>13,.0f}")
    cold, warm = results["cold"], results["warm"]
    print(f"truncated to {args.max_length} tokens: {cold['truncated']:,} of {cold['examples']:,}")
    print(f"warm/cold speed-up of load+tokenise: {cold['tokenise_s'] / warm['tokenise_s']:.1f}x")


if __name__ == "__main__":
    main()
