"""What one site does when a message arrives: check the run against its own policy, load
the global adapter, train or evaluate on its own data, and reply with what it may release.

What a reply carries is decided here (threat model, rule 1). Under DP a train reply holds
the adapter (covered by epsilon) and figures that are public by construction: the site id
and rank (its node config), the accountant's figures, the round's step counts. The
training loss, the examples seen, truncation counts and timings stay in the site's own
log. An evaluate reply releases one held-out loss per round; epsilon does not cover it, so
privacy.json names it and a site's policy may decline (`evaluate: false`).
"""

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
from fedslm.privacy.releases import DP_TRAIN_KEYS, NON_DP_TRAIN_KEYS
from fedslm.site.evaluate import evaluate_loss
from fedslm.site.ledger import LIFETIME_ACCOUNTANT, SiteLedger, check_run_key, data_fingerprint
from fedslm.site.policy import PolicyError
from fedslm.site.progress import site_progress
from fedslm.site.replay import ReplyCache, round_digest
from fedslm.site.runtime import (SiteSetup, load_global, runtime_for, shared_prefix_dir, site_id, site_rank, site_setup,
                                 site_split)
from fedslm.train import train_local
from fedslm.transport import to_record

def handle_train(msg: Message, context: Context, cfg: RunConfig | None, progress: bool = True) -> Message:
    setup = site_setup(context, cfg)
    cfg = setup.cfg
    site = site_id(context)
    server_round = int(msg.content["config"]["server-round"])
    run_key = _run_key(msg, context)
    rt = runtime_for(cfg, site_rank(cfg, context, site))
    train_ds = site_split(cfg, context, rt, setup.own_data, "train", shared_prefix_dir(setup))
    ledger = _ledger(setup, context)
    out = site_progress(cfg, context)

    replay = digest = None
    if cfg.privacy.enabled:
        # a round already released is sent again as it was, never trained (and charged) twice
        replay = ReplyCache(ledger.path.with_name(f"reply-{ledger.fingerprint[:24]}-{run_key}.safetensors"))
        digest = round_digest(msg.content["arrays"], server_round, run_key)
        saved = replay.get(digest)
        if saved is not None:
            out.say(f"site {site}: round {server_round} was already trained from this global adapter; "
                    "sending the same reply again (no new privacy cost)")
            arrays = to_record(saved.tensors, cfg.federation.transport_dtype)
            return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord(saved.metrics)}), reply_to=msg)
    load_global(rt, msg.content["arrays"])

    dp, noise, rate = None, 0.0, 0.0
    if cfg.privacy.enabled:
        plan = check_site_size(cfg.privacy, cfg.train, len(train_ds), expected_rounds(cfg.federation), site)
        # refuse before spending anything (raises BudgetExceededError with the numbers):
        # this run's target, then the data set's lifetime budget under the site's policy
        steps = cfg.train.steps_for(len(train_ds))
        ledger.run(run_key).check_budget(cfg.privacy, plan.noise_multiplier, plan.sample_rate, steps)
        ledger.check_lifetime(setup.policy.max_lifetime_epsilon, cfg.privacy.delta, plan.noise_multiplier,
                              plan.sample_rate, steps)
        dp, noise, rate = DPContext(cfg.privacy, plan, ledger.run(run_key)), plan.noise_multiplier, plan.sample_rate

    total = cfg.train.steps_for(len(train_ds))
    bar = _StepBar(cfg, site, server_round, total) if progress and cfg.train.progress and not out.quiet else None
    done = 0

    def stepped(loss: float) -> None:
        nonlocal done
        done += 1
        if bar:
            bar.step(loss)
        out.status(round=server_round, phase="training", step=done, steps=total, loss=loss)
    seed = hash((cfg.seed, site, server_round)) % (2**31)
    # The seed is public (it is in the run config), so it drives only what is not private:
    # batch order without DP and LoRA dropout (which DP forbids). Under DP, train_local
    # draws the Poisson batches and the noise from OS entropy. Seeding torch's global
    # generator here, after the runtime is built, makes a non-DP round independent of what
    # this process ran before (a fresh ClientApp process trains exactly like a warm one)
    torch.manual_seed(seed)
    stats = train_local(
        rt.peft_model,
        train_ds,
        cfg.train,
        pad_id=rt.tokenizer.pad_token_id,
        seed=seed,
        dp=dp,
        grad_sample_module=rt.grad_sample_module,
        progress=stepped,
        proximal_mu=cfg.strategy.proximal_mu,
    )
    if bar:
        bar.close()
    eps = {"rdp": 0.0, "prv": 0.0}
    lifetime = 0.0
    if stats.ledger is not None:
        ledger.record_round(run_key, server_round, stats.ledger)
        eps = {name: stats.ledger.epsilon(cfg.privacy.delta, name) for name in eps}
        lifetime = ledger.lifetime().epsilon(cfg.privacy.delta, LIFETIME_ACCOUNTANT)

    values = {
        "num-examples": len(train_ds),
        "site": site,
        "lora_r": rt.rank,
        "a_digest": rt.a_digest,
        "train_loss": stats.mean_loss if math.isfinite(stats.mean_loss) else -1.0,
        # the enforcing accountant's figure, and both accountants' for comparison
        "epsilon": eps[cfg.privacy.accountant],
        "epsilon_rdp": eps["rdp"],
        "epsilon_prv": eps["prv"],
        "epsilon_lifetime": lifetime,
        "noise_multiplier": noise,
        "sample_rate": rate,
        "steps_total": stats.ledger.steps if stats.ledger else stats.steps,
        "truncated": train_ds.truncated,
        "steps": stats.steps,
        "examples_seen": stats.examples_seen,
        "train_seconds": stats.seconds,
    }
    # the site's own log keeps what the reply does not carry
    out.say(f"site {site} round {server_round}: train loss {values['train_loss']:.4f} over {stats.examples_seen} "
            f"examples in {stats.seconds:.1f}s, epsilon {values['epsilon']:.3f} (lifetime {lifetime:.3f})")
    out.status(round=server_round, phase="trained", epsilon=values["epsilon"] if cfg.privacy.enabled else None)
    keys = DP_TRAIN_KEYS if cfg.privacy.enabled else NON_DP_TRAIN_KEYS
    values = {k: values[k] for k in keys}
    update = adapter_state(rt.peft_model)
    if replay is not None:
        replay.put(digest, update, values)
    arrays = to_record(update, cfg.federation.transport_dtype)
    return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord(values)}), reply_to=msg)


def handle_evaluate(msg: Message, context: Context, cfg: RunConfig | None) -> Message:
    setup = site_setup(context, cfg)
    cfg = setup.cfg
    if not setup.policy.evaluate:
        raise PolicyError(["evaluate: this site does not release held-out losses (site policy evaluate=false)"])
    site = site_id(context)
    server_round = int(msg.content["config"]["server-round"]) if "config" in msg.content.config_records else 0
    run_key = _run_key(msg, context)
    rt = runtime_for(cfg, site_rank(cfg, context, site))
    eval_ds = site_split(cfg, context, rt, setup.own_data, "eval", shared_prefix_dir(setup))
    limit = int(msg.content["config"].get("eval-limit", 0)) if "config" in msg.content.config_records else 0
    if 0 < limit < len(eval_ds):
        eval_ds = eval_ds.head(limit)  # an intermediate round's cheaper look (federation.eval_limit)
    # one release per round, counted in the ledger before it is made
    _ledger(setup, context).record_evaluation(run_key, server_round)
    load_global(rt, msg.content["arrays"])
    out = site_progress(cfg, context)
    out.status(round=server_round, phase="evaluating")
    loss = evaluate_loss(rt.peft_model, eval_ds, cfg.train.eval_batch_size, rt.tokenizer.pad_token_id)
    out.status(round=server_round, phase="evaluated", eval_loss=loss)
    return Message(RecordDict({"metrics": MetricRecord({"site": site, "eval_loss": loss})}), reply_to=msg)


def _run_key(msg: Message, context: Context) -> str:
    config = msg.content.config_records.get("config", {})
    return check_run_key(str(config["run-key"])) if "run-key" in config else f"flwr-{context.run_id}"


def _ledger(setup: SiteSetup, context: Context) -> SiteLedger:
    cfg = setup.cfg
    fingerprint = data_fingerprint(cfg.data, site_id(context), cfg.federation.sites, setup.own_data)
    return SiteLedger.open(setup.policy.state_dir, fingerprint)


class _StepBar:
    """A local-steps bar. In simulation Ray forwards every refresh as a new line, so it
    refreshes at most every few seconds."""

    def __init__(self, cfg: RunConfig, site: int, server_round: int, steps: int):
        from tqdm import tqdm

        self.bar = tqdm(
            total=steps,
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
