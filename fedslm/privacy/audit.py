"""`fedslm audit RUN_DIR`: empirical evidence beside the accountant's promise.

- Canary exposure (Carlini et al. 2019): the rank of each planted secret among random
  candidate secrets under the final model, exposure = log2(R + 1) - log2(rank) bits;
  compared with canaries that were generated but never inserted.
- Loss-based membership inference, calibrated by the base model's loss: AUC and TPR at 1%
  FPR on the canary site's training (member) vs held-out (non-member) examples.
- The one-run lower bound on epsilon (Steinke, Nasr and Jagielski 2023): guess which
  canaries were inserted from their calibrated scores; the number of correct guesses
  bounds epsilon from below at 95% confidence.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path


from fedslm.config import load_run_config
from fedslm.data.canaries import random_secret, read_audit_file
from fedslm.data.sites import build_site_data, system_prompt_for
from fedslm.data.tokenize import TokenizedDataset
from fedslm.losses import dataset_losses
from fedslm.model import load_base_model, resolve_model_dir


def example_losses(model, dataset: TokenizedDataset, pad_id: int, batch_size: int = 16) -> list[float]:
    return dataset_losses(model, dataset, batch_size, pad_id)[0].tolist()


def _answers_losses(model, tok, prompt: str, answers: list[str], system_prompt) -> list[float]:
    records = [{"prompt": prompt, "answer": a} for a in answers]
    return example_losses(model, TokenizedDataset.from_records(tok, records, 4096, system_prompt), tok.pad_token_id)


def exposure_bits(true_loss: float, candidate_losses: list[float]) -> float:
    """log2(R+1) - log2(rank of the true secret among R+1 secrets, by loss; 1 = lowest)."""
    rank = 1 + sum(c < true_loss for c in candidate_losses)
    return math.log2(len(candidate_losses) + 1) - math.log2(rank)


def auc_and_tpr(member_scores: list[float], nonmember_scores: list[float], fpr: float = 0.01) -> tuple[float, float]:
    """ROC AUC (ties count half) and the TPR at the largest threshold with FPR <= fpr."""
    wins = sum((m > n) + 0.5 * (m == n) for m in member_scores for n in nonmember_scores)
    auc = wins / (len(member_scores) * len(nonmember_scores))
    ranked = sorted(nonmember_scores, reverse=True)
    allowed = math.floor(fpr * len(ranked))  # non-members allowed above the threshold
    threshold = ranked[allowed] if allowed < len(ranked) else -math.inf
    tpr = sum(m > threshold for m in member_scores) / len(member_scores)
    return auc, tpr


def _binomial_tail(r: int, p: float, v: int) -> float:
    return sum(math.comb(r, k) * p**k * (1 - p) ** (r - k) for k in range(v, r + 1))


def epsilon_lower_bound(correct: int, guesses: int, confidence: float = 0.95) -> float:
    """Largest epsilon rejected by `correct` right guesses out of `guesses`: under
    epsilon-DP the count of correct guesses is dominated by Binomial(guesses,
    e^eps / (1 + e^eps)) (Steinke et al. 2023, the delta = 0 form)."""
    beta = 1 - confidence
    if guesses == 0 or _binomial_tail(guesses, 0.5, correct) > beta:
        return 0.0
    lo, hi = 0.0, 50.0
    for _ in range(60):
        mid = (lo + hi) / 2
        p = math.exp(mid) / (1 + math.exp(mid))
        lo, hi = (mid, hi) if _binomial_tail(guesses, p, correct) <= beta else (lo, mid)
    return lo


def one_run_guesses(scores: list[float], inserted: list[bool]) -> tuple[int, int]:
    """Guess 'in' for the top quarter of scores and 'out' for the bottom quarter."""
    k = max(1, len(scores) // 4)
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    correct = sum(inserted[i] for i in order[-k:]) + sum(not inserted[i] for i in order[:k])
    return correct, 2 * k


def audit(run_dir: Path, candidates: int = 100, max_examples: int = 200, seed: int = 0, echo=print) -> dict:
    run_dir = Path(run_dir)
    if not (run_dir / "run_config.json").exists() or not (run_dir / "model" / "config.json").exists():
        raise FileNotFoundError(f"{run_dir} is not a finished fedslm run (needs run_config.json and model/)")
    cfg = load_run_config(run_dir)
    files = sorted((run_dir / "audit").glob("site-*-canaries.json"))
    if not files:
        raise FileNotFoundError(f"no canary file in {run_dir / 'audit'}: run with privacy.canaries=N (e.g. 32)")
    site, canaries = read_audit_file(files[0])

    base, tok = load_base_model(resolve_model_dir(cfg.model))
    tuned, _ = load_base_model(run_dir / "model")
    system_prompt = system_prompt_for(cfg.data)

    rng = random.Random(f"audit|{seed}")
    exposures, scores = [], []
    for c in canaries:
        others = [c.answer(random_secret(rng)) for _ in range(candidates)]
        tuned_losses = _answers_losses(tuned, tok, c.prompt, [c.answer()] + others, system_prompt)
        exposures.append(exposure_bits(tuned_losses[0], tuned_losses[1:]))
        base_loss = _answers_losses(base, tok, c.prompt, [c.answer()], system_prompt)[0]
        scores.append(base_loss - tuned_losses[0])  # how much training lowered its loss
    inserted = [c.inserted for c in canaries]
    exp_in = [e for e, i in zip(exposures, inserted) if i]
    exp_out = [e for e, i in zip(exposures, inserted) if not i]

    # membership inference on the canary site's real examples (canaries excluded)
    data = build_site_data(cfg.data, site, cfg.federation.sites, tok)
    members = _subset(data.train, max_examples)
    nonmembers = _subset(data.eval, max_examples)

    def calibrated(ds: TokenizedDataset) -> list[float]:
        # how much lower the tuned model's loss is than the base model's on each example
        return [b - t for b, t in zip(example_losses(base, ds, tok.pad_token_id), example_losses(tuned, ds, tok.pad_token_id))]

    auc, tpr = auc_and_tpr(calibrated(members), calibrated(nonmembers))

    correct, guesses = one_run_guesses(scores, inserted)
    privacy = json.loads((run_dir / "privacy.json").read_text())
    eps_site = (privacy.get("epsilon_per_site") or {}).get(str(site))
    result = {
        "site": site,
        "privacy": privacy.get("level"),
        "canaries": len(canaries),
        "canaries_inserted": sum(inserted),
        "candidates": candidates,
        "canary_exposure_bits": _mean(exp_in),
        "canary_exposure_bits_not_inserted": _mean(exp_out),
        "canary_exposure_bits_max": max(exp_in, default=None),
        "mia_auc": auc,
        "mia_tpr_at_1pct_fpr": tpr,
        "mia_members": len(members),
        "mia_nonmembers": len(nonmembers),
        "one_run_correct_guesses": correct,
        "one_run_guesses": guesses,
        "epsilon_lower_bound": epsilon_lower_bound(correct, guesses),
        "epsilon_accountant": eps_site,
        "delta": privacy.get("delta"),
    }
    (run_dir / "audit.json").write_text(json.dumps(result, indent=2))
    echo(format_audit(result))
    return result


def _subset(ds: TokenizedDataset, n: int) -> TokenizedDataset:
    return TokenizedDataset(ds.table.select(range(min(n, len(ds)))))


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def format_audit(r: dict) -> str:
    def f(x, d=2):
        return "-" if x is None else f"{x:.{d}f}"

    max_bits = math.log2(r["candidates"] + 1)
    return "\n".join([
        f"privacy audit of site {r['site']} ({r['privacy']} DP run)",
        f"  canary exposure, inserted      {f(r['canary_exposure_bits'])} bits (max possible {max_bits:.2f}; {r['canaries_inserted']} canaries)",
        f"  canary exposure, not inserted  {f(r['canary_exposure_bits_not_inserted'])} bits",
        f"  membership inference           AUC {f(r['mia_auc'], 3)}, TPR at 1% FPR {f(r['mia_tpr_at_1pct_fpr'], 3)} "
        f"({r['mia_members']} members / {r['mia_nonmembers']} non-members)",
        f"  epsilon lower bound (one run)  {f(r['epsilon_lower_bound'])} "
        f"({r['one_run_correct_guesses']}/{r['one_run_guesses']} correct guesses, 95% confidence)",
        f"  epsilon upper bound (accountant) {f(r['epsilon_accountant'])} at delta {r['delta']}",
    ])

