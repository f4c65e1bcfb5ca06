"""What one site does when a message arrives: load the global adapter, train or evaluate
on its own data, and reply with adapter tensors and metrics only."""

from __future__ import annotations

import math
import os

import torch
from flwr.app import Context, Message, MetricRecord, RecordDict

from fedslm.config import RunConfig
from fedslm.lora.adapter import adapter_state
from fedslm.privacy.accounting import expected_rounds
from fedslm.privacy.dp_step import DPContext
from fedslm.privacy.plan import check_site_size
from fedslm.site.evaluate import evaluate_loss
from fedslm.site.ledger import ledger_file, load_ledger, save_ledger
from fedslm.site.replay import ReplyCache, round_digest
from fedslm.site.runtime import load_global, runtime_for, site_data, site_id, site_rank
from fedslm.site.train import train_local
from fedslm.transport import to_record


def handle_train(msg: Message, context: Context, cfg: RunConfig, progress: bool = True) -> Message:
    site = site_id(context)
    rt = runtime_for(cfg, site_rank(cfg, context, site))
    data = site_data(cfg, context, rt)
    train_ds = data.train
    load_global(rt, msg.content["arrays"])
    server_round = int(msg.content["config"]["server-round"])
    run_key = str(msg.content["config"]["run-key"]) if "run-key" in msg.content["config"] else None

    dp, noise, rate = None, 0.0, 0.0
    eps = {"rdp": 0.0, "prv": 0.0}
    replay = digest = None
    if cfg.privacy.enabled:
        # a round already released is sent again as it was, never trained (and charged) twice
        replay = ReplyCache(ledger_file(cfg, context, site, run_key).with_suffix(".last-reply.safetensors"))
        digest = round_digest(msg.content["arrays"], server_round, run_key)
        saved = replay.get(digest)
        if saved is not None:
            print(f"site {site}: round {server_round} was already trained from this global adapter; "
                  "sending the same reply again (no new privacy cost)", flush=True)
            arrays = to_record(saved.tensors, cfg.federation.transport_dtype)
            return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord(saved.metrics)}), reply_to=msg)
        ledger = load_ledger(cfg, context, site, run_key)
        plan = check_site_size(cfg.privacy, cfg.train, len(train_ds), expected_rounds(cfg.federation), site)
        # refuse before spending anything (raises BudgetExceededError with the numbers)
        ledger.check_budget(cfg.privacy, plan.noise_multiplier, plan.sample_rate, cfg.train.local_steps)
        dp, noise, rate = DPContext(cfg.privacy, plan, ledger), plan.noise_multiplier, plan.sample_rate

    bar = _StepBar(cfg, site, server_round) if progress and cfg.train.progress else None
    seed = hash((cfg.seed, site, server_round)) % (2**31)
    # Batches (Opacus's Poisson sampler inherits the loader's generator when secure_mode is
    # off) and DP noise use generators seeded inside train_local; LoRA dropout draws from
    # torch's global generator. Seeding that here, after the runtime is built (whose first
    # build consumes global draws), makes a round's update independent of what this
    # process ran before, so a fresh ClientApp process (deployment, a resumed run, another
    # Ray actor) trains exactly like a warm one
    torch.manual_seed(seed)
    stats = train_local(
        rt.peft_model,
        train_ds,
        cfg.train,
        pad_id=rt.tokenizer.pad_token_id,
        seed=seed,
        dp=dp,
        grad_sample_module=rt.grad_sample_module,
        progress=bar.step if bar else None,
        proximal_mu=cfg.strategy.proximal_mu,
    )
    if bar:
        bar.close()
    if stats.ledger is not None:
        save_ledger(cfg, context, site, stats.ledger, run_key)
        eps = {name: stats.ledger.epsilon(cfg.privacy.delta, name) for name in eps}

    values = {
        "num-examples": len(train_ds),
        "site": site,
        "lora_r": rt.rank,
        "train_loss": stats.mean_loss if math.isfinite(stats.mean_loss) else -1.0,
        # the enforcing accountant's figure, and both accountants' for comparison
        "epsilon": eps[cfg.privacy.accountant],
        "epsilon_rdp": eps["rdp"],
        "epsilon_prv": eps["prv"],
        "noise_multiplier": noise,
        "sample_rate": rate,
        "steps_total": stats.ledger.steps if stats.ledger else stats.steps,
        "truncated": train_ds.truncated,
        "steps": stats.steps,
        "examples_seen": stats.examples_seen,
        "train_seconds": stats.seconds,
    }
    update = adapter_state(rt.peft_model)
    if replay is not None:
        replay.put(digest, update, values)
    arrays = to_record(update, cfg.federation.transport_dtype)
    return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord(values)}), reply_to=msg)


def handle_evaluate(msg: Message, context: Context, cfg: RunConfig) -> Message:
    site = site_id(context)
    rt = runtime_for(cfg, site_rank(cfg, context, site))
    eval_ds = site_data(cfg, context, rt).eval
    load_global(rt, msg.content["arrays"])
    loss = evaluate_loss(rt.peft_model, eval_ds, cfg.train.eval_batch_size, rt.tokenizer.pad_token_id)
    metrics = MetricRecord({"num-examples": len(eval_ds), "site": site, "eval_loss": loss})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


class _StepBar:
    """A local-steps bar. In simulation Ray forwards every refresh as a new line, so it
    refreshes at most every few seconds."""

    def __init__(self, cfg: RunConfig, site: int, server_round: int):
        from tqdm import tqdm

        self.bar = tqdm(
            total=cfg.train.local_steps,
            desc=f"round {server_round} site {site}",
            unit="step",
            leave=True,
            mininterval=5.0,
            ascii=True,
            dynamic_ncols=False,
            ncols=80,
            disable=os.environ.get("FEDSLM_NO_PROGRESS") == "1",
        )

    def step(self, loss: float) -> None:
        self.bar.set_postfix_str(f"loss {loss:.3f}", refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
