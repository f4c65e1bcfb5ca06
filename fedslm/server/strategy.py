"""LoRA-aware aggregation as a Flower Message-API strategy.

`LoraStrategy` is a FedAvg subclass that hands the arithmetic to a scheme
(fedslm.lora.schemes: fedavg, ffa, exact, stack) and adds what a federation of real sites
needs around it: a deterministic draw of the sites per round, every reply checked before
it is used (fedslm.server.reply_checks), the aggregation error measured, bytes counted, and each
round recorded. Flower's server optimisers (FedAvgM, FedAdam, FedYogi) are put in front of
it by `build_strategy`, so their state and update rules are Flower's own.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterable

import numpy as np
import torch

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy

from fedslm.config import RunConfig, StrategyConfig
from fedslm.lora.adapter import a_digest
from fedslm.lora.algebra import distance, relative_error, weighted_sum
from fedslm.lora.schemes import Scheme, SiteUpdate
from fedslm.server.optimisers import optimiser_class, optimiser_kwargs
from fedslm.server.reply_checks import WEIGHT_KEY, norm_outliers, reply_problem, unchanged_or_zero
from fedslm.server.record import RunRecorder
from fedslm.transport import from_record, record_bytes, to_record



class LoraStrategy(FedAvg):
    """FedAvg's round structure with LoRA-aware aggregation and validated replies.

    Its own settings come from the class attribute `setup` (a LoraSetup), because Flower's
    optimiser strategies, put before it in the MRO, call FedAvg's constructor with
    FedAvg's arguments only.
    """

    setup: LoraSetup

    def __init__(self, **fedavg_kwargs):
        super().__init__(**fedavg_kwargs)
        self.exhausted: set[int] = set()  # nodes whose privacy budget is spent
        self.current: dict | None = None  # the global adapter sent this round (fp32)
        self.sent: dict | None = None  # ... as the sites received it (transport dtype)
        self.errors: dict[int, float] = {}
        # the median update norm of the last aggregated round: the yardstick for a round
        # with fewer than three replies, where a median cannot tell which one is wrong
        self.last_norm: float | None = None
        self.gave_up_round: int | None = None  # the round whose wait for sites expired
        # the sites asked to train this round, and those that answered (a reply or an error)
        self.asked: tuple[int, set[int]] = (0, set())
        self.heard: tuple[int, set[int]] = (0, set())

    @property
    def scheme(self) -> Scheme:
        return self.setup.scheme

    @property
    def recorder(self) -> RunRecorder:
        return self.setup.recorder

    def _downlink(self, arrays: ArrayRecord) -> ArrayRecord:
        return to_record(from_record(arrays), self.setup.transport_dtype)

    # --- which sites train ----------------------------------------------------------
    def online_nodes(self, server_round: int, grid: Grid) -> list[int]:
        """The nodes online now, after waiting at most federation.timeout_s for
        min_available_nodes of them (Flower's sampling waits forever, so one site lost for
        good would stall the run); with fewer, the round goes on with those online and
        aggregates only if min_sites valid replies come back."""
        # a round waits once: after its training waited in vain, its evaluation does not
        wait = 0.0 if self.gave_up_round == server_round else self.setup.wait_s
        deadline = time.monotonic() + wait
        while len(nodes := list(grid.get_node_ids())) < self.min_available_nodes and time.monotonic() < deadline:
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
        if len(nodes) < self.min_available_nodes:
            self.gave_up_round = server_round
            self.recorder.note(server_round, f"{len(nodes)} of the {self.min_available_nodes} sites waited for are "
                                             f"online after {self.setup.wait_s:g}s (federation.timeout_s); going on "
                                             "with those")
        return nodes

    def sample(self, server_round: int, grid: Grid) -> list[int]:
        """The round's sites: those that have trained in the fewest rounds so far, ties
        drawn with a generator seeded by (seed, round) over the sites sorted by site id
        (node ids differ between runs; site ids do not).

        A site's noise is calibrated for `expected_rounds` = ceil(rounds x k / sites)
        rounds; a uniform draw asks some sites more often than that, and they refuse once
        their budget is spent, leaving the round short. Taking the least-trained first
        keeps every site within its planned rounds while all are online."""
        nodes = [n for n in self.online_nodes(server_round, grid) if n not in self.exhausted]
        site_of = self.recorder.node_site
        order = sorted(nodes, key=lambda n: (site_of.get(n, math.inf), n))
        want = self.setup.per_round or max(1, int(len(order) * self.fraction_train))
        k = min(len(order), max(want, self.min_train_nodes))
        trained = self.recorder.rounds_trained()
        drawn = random.Random(self.setup.seed * 100_003 + server_round).sample(order, len(order))
        drawn.sort(key=lambda n: trained.get(site_of.get(n, -1), 0))  # stable: the draw breaks ties
        return sorted(drawn[:k])

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self.recorder.round_started(server_round)
        down = self._downlink(arrays)
        self.current, self.sent = from_record(arrays), from_record(down)
        if self.exhausted:
            self.recorder.note(server_round, f"{len(self.exhausted)} site(s) with a spent privacy budget not asked to train")
        config["server-round"] = server_round
        nodes = self.sample(server_round, grid)
        self.asked = (server_round, set(nodes))
        self.recorder.add_bytes_down(server_round, record_bytes(down) * len(nodes))
        record = RecordDict({"arrays": down, "config": config})
        return self._construct_messages(record, nodes, "train")

    # --- replies -> the next global adapter -----------------------------------------------
    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        self.heard_from(server_round, replies)
        updates: list[tuple[Message, SiteUpdate]] = []
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                self.site_error(server_round, msg)
                continue
            problem = self.reply_problem(msg)
            update = None
            if problem is None:
                metrics = msg.content.metric_records["metrics"]
                update = SiteUpdate(from_record(msg.content.array_records["arrays"]), int(metrics["lora_r"]),
                                    1.0 if self.setup.uniform_weights else float(metrics[WEIGHT_KEY]))
                problem = unchanged_or_zero(self.scheme, update, self.sent)
            if problem:
                self.recorder.rejected(server_round, node, f"invalid update: {problem}")
                continue
            updates.append((msg, update))
        # replies arrive in whatever order the sites finish; summing floats in that order
        # would make the same run differ in the last bits (and a resumed run not match)
        updates.sort(key=lambda mu: (int(mu[0].content.metric_records["metrics"].get("site", 2**31)),
                                     mu[0].metadata.src_node_id))

        # a norm far above the round's median: a diverged or malicious site
        norms = [distance(self.scheme.update_terms(u.tensors, u.rank), self.scheme.start_terms(self.sent, u.rank))
                 for _, u in updates]
        outliers = norm_outliers(norms, self.setup.max_norm_ratio, self.last_norm)
        for i in sorted(outliers, reverse=True):
            msg, _ = updates.pop(i)
            self.recorder.rejected(server_round, msg.metadata.src_node_id, f"invalid update: {outliers[i]}")
        for msg, u in updates:
            self.recorder.train_reply(server_round, msg.metadata.src_node_id, dict(msg.content.metric_records["metrics"]),
                                      record_bytes(msg.content.array_records["arrays"]))

        if self.too_few(server_round, len(updates)):
            return None, None
        sites = [u for _, u in updates]
        new, aggregate = self.scheme.combine(self.current, sites, self.setup.rule, self.setup.trim)
        if not all(torch.isfinite(t).all() for t in new.values()):
            self.recorder.note(server_round, "the aggregate is not finite; global adapter unchanged this round")
            return None, None
        kept = [n for i, n in enumerate(norms) if i not in outliers]
        self.last_norm = float(np.median(kept)) if kept else self.last_norm
        target = weighted_sum([self.scheme.update_terms(u.tensors, u.rank) for u in sites], [u.weight for u in sites])
        self.errors[server_round] = relative_error(aggregate, target)
        self.recorder.aggregation_error(server_round, self.errors[server_round])
        metrics = self.train_metrics_aggr_fn([_weighted(m.content, u.weight) for m, u in updates], "weight")
        return to_record(new), metrics

    def reply_problem(self, msg: Message) -> str | None:
        return reply_problem(msg.content, self.scheme, self.setup.global_rank,
                             needs_weight=not self.setup.uniform_weights, frozen_a=self.setup.frozen_a)

    def too_few(self, server_round: int, valid: int) -> bool:
        """Fewer valid replies than min_sites: the round keeps the global adapter (noted)."""
        if valid >= max(1, self.min_train_nodes):
            return False
        self.recorder.note(server_round,
                           f"only {valid} valid replies (< min {self.min_train_nodes}); global adapter unchanged this round")
        return True

    def heard_from(self, server_round: int, replies: list[Message]) -> None:
        if self.heard[0] != server_round:
            self.heard = (server_round, set())
        self.heard[1].update(m.metadata.src_node_id for m in replies)

    def silent(self, server_round: int) -> set[int]:
        """The sites asked to train this round that sent nothing back within
        federation.timeout_s: lost, or still busy with the training message (which a site
        serves before anything queued after it). Asking them to evaluate would only make
        the round wait for them a second time."""
        (asked_round, asked), (heard_round, heard) = self.asked, self.heard
        return asked - heard if asked_round == heard_round == server_round else set()

    def site_error(self, server_round: int, msg: Message) -> None:
        """A site refused or failed: record why; a spent budget takes it out of training."""
        node = msg.metadata.src_node_id
        if msg.error.reason.startswith("BudgetExceededError"):
            self.exhausted.add(node)
        self.recorder.rejected(server_round, node, f"site error: {msg.error.reason}")

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        if server_round == 0:
            self.recorder.round_started(0)
        else:
            self.recorder.training_done(server_round)
            # the round's final global adapter: after any server optimiser or DP wrapper
            rank, alpha, tensors = self.scheme.peft_view(from_record(arrays))
            self.recorder.global_adapter(server_round, tensors, {"rank": str(rank), "alpha": str(alpha)})
        limit = self.setup.evaluation(server_round)
        if self.fraction_evaluate == 0.0 or limit is None:
            return []
        config["eval-limit"] = limit
        down = self._downlink(arrays)
        silent = self.silent(server_round)
        nodes = [n for n in self.online_nodes(server_round, grid) if n not in silent]
        if silent:
            who = ", ".join(str(self.recorder.node_site.get(n, f"node {n}")) for n in sorted(silent))
            self.recorder.note(server_round, f"site(s) {who} did not answer this round's training within "
                                             "federation.timeout_s; not asked to evaluate it")
        want = max(int(len(nodes) * self.fraction_evaluate), self.min_evaluate_nodes)
        chosen = sorted(random.Random(self.setup.seed * 100_019 + server_round).sample(nodes, min(want, len(nodes))))
        config["server-round"] = server_round
        record = RecordDict({"arrays": down, "config": config})
        messages = list(self._construct_messages(record, chosen, "evaluate"))
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
        # each site's held-out loss counts once (its held-out size is not released)
        return self.evaluate_metrics_aggr_fn([_weighted(m.content, 1.0) for m in valid], "weight")


    # --- the server's checkpoint (fedslm.server.checkpoint) ----------------------------
    def state_dict(self) -> dict:
        return {"exhausted": sorted(self.exhausted), "errors": {str(k): v for k, v in self.errors.items()},
                "last_norm": self.last_norm, "flower": flower_state(self)}

    def load_state_dict(self, state: dict) -> None:
        self.exhausted = set(state["exhausted"])
        self.errors = {int(k): v for k, v in state["errors"].items()}
        self.last_norm = state.get("last_norm")
        load_flower_state(self, state["flower"])


class SiteErrorsFirst(Strategy):
    """Flower's client-level DP wrappers skip the whole round when any reply is an error,
    so a site that refuses (say, its budget is spent) would never reach fedslm's strategy,
    never be marked exhausted, and stall every later round. Error replies are taken out
    here and handed to fedslm's strategy; the wrapper clips and noises the rest. (A mean
    over fewer replies than the wrapper calibrated for is accounted at the noise it really
    had: fedslm.privacy.client_level.)"""

    def __init__(self, wrapper: Strategy, core: LoraStrategy):
        self.wrapper, self.core = wrapper, core

    def summary(self) -> None:
        self.wrapper.summary()

    def configure_train(self, server_round, arrays, config, grid):
        return self.wrapper.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        self.core.heard_from(server_round, replies)  # the wrapper passes on only the valid ones
        valid = []
        for msg in replies:
            if msg.has_error():
                self.core.site_error(server_round, msg)
            elif problem := self.core.reply_problem(msg):
                # Flower's clipping pairs arrays by position and subtracts with numpy's
                # broadcasting: a reply of the wrong keys or shapes must never reach it
                self.core.recorder.rejected(server_round, msg.metadata.src_node_id, f"invalid update: {problem}")
            else:
                valid.append(msg)
        # checked before the wrapper, which would otherwise move its adaptive clip norm (or
        # divide by zero replies) for a round fedslm's strategy then discards
        if self.core.too_few(server_round, len(valid)):
            return None, None
        return self.wrapper.aggregate_train(server_round, valid)

    def configure_evaluate(self, server_round, arrays, config, grid):
        return self.wrapper.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round, replies):
        return self.wrapper.aggregate_evaluate(server_round, replies)


def _weighted(content: RecordDict, weight: float) -> RecordDict:
    """A reply's metrics with the weight the aggregate gave it, for Flower's metric mean."""
    metrics = {k: v for k, v in content.metric_records["metrics"].items() if isinstance(v, (int, float))}
    return RecordDict({"metrics": MetricRecord({**metrics, "weight": float(weight)})})


# Attributes in which Flower's strategies and DP wrappers carry state from round to round
# (FedAvgM's momentum, FedAdam/FedYogi's moments, an adaptive clip norm)
_FLOWER_ARRAYS = ("current_arrays", "m_t", "v_t", "momentum_vector")
_FLOWER_SCALARS = ("clipping_norm",)


def flower_state(obj) -> dict:
    """The round-to-round state a Flower strategy object holds, as tensors in their own dtype."""
    out: dict = {}
    for attr in _FLOWER_ARRAYS:
        value = getattr(obj, attr, None)
        if value is None:
            continue
        if isinstance(value, ArrayRecord):
            kind, items = "record", {k: a.numpy() for k, a in value.items()}
        elif isinstance(value, dict):
            kind, items = "dict", value
        else:
            kind, items = "list", {str(i): v for i, v in enumerate(value)}
        out[attr] = {"kind": kind, "keys": list(items),
                     "arrays": {k: torch.from_numpy(np.ascontiguousarray(v).copy()) for k, v in items.items()}}
    for attr in _FLOWER_SCALARS:
        if isinstance(getattr(obj, attr, None), (int, float)):
            out[attr] = float(getattr(obj, attr))
    return out


def load_flower_state(obj, state: dict) -> None:
    for attr, saved in state.items():
        if not isinstance(saved, dict):
            setattr(obj, attr, saved)
            continue
        items = {k: saved["arrays"][k].numpy() for k in saved["keys"]}
        if saved["kind"] == "record":
            value = ArrayRecord({k: Array(v) for k, v in items.items()})
        elif saved["kind"] == "dict":
            value = items
        else:
            value = [items[k] for k in saved["keys"]]
        setattr(obj, attr, value)


class WrapperState:
    """A Flower wrapper strategy (client-level DP) as a checkpoint part."""

    def __init__(self, wrapper):
        self.wrapper = wrapper

    def state_dict(self) -> dict:
        return flower_state(self.wrapper)

    def load_state_dict(self, state: dict) -> None:
        load_flower_state(self.wrapper, state)


class LoraSetup:
    """What LoraStrategy needs beyond FedAvg's arguments."""

    def __init__(self, scheme: Scheme, recorder: RunRecorder, st: StrategyConfig, *, transport_dtype: str = "float32",
                 uniform_weights: bool = False, per_round: int = 0, seed: int = 0, wait_s: float = 60.0,
                 rounds: int = 0, eval_every: int = 1, eval_limit: int = 0):
        self.scheme = scheme
        self.recorder = recorder
        self.rule = st.aggregator
        self.trim = st.trim_fraction
        self.max_norm_ratio = st.max_norm_ratio
        self.transport_dtype = transport_dtype
        # Under DP every site counts the same: a weight from the site's own count is its
        # say-so (weight 1e9 made one site the aggregate), the count itself is private, and
        # client-level DP bounds a site's influence by the clip norm only in a uniform mean
        self.uniform_weights = uniform_weights
        self.per_round = per_round
        self.seed = seed
        self.wait_s = wait_s  # how long a round waits for the sites it needs (federation.timeout_s)
        self.rounds, self.eval_every, self.eval_limit = rounds, eval_every, eval_limit
        # FFA: the fingerprint every site's frozen A must match (computed once, not per reply)
        self.frozen_a = None if scheme.trains_a else a_digest(scheme.init)

    @property
    def global_rank(self) -> int:
        return self.scheme.rank

    def evaluation(self, server_round: int) -> int | None:
        """How many held-out rows each site scores after `server_round` (0 = all of them),
        or None: no evaluation this round. The base model and the last round get every row."""
        if server_round == 0 or server_round == self.rounds:
            return 0
        return self.eval_limit if server_round % self.eval_every == 0 else None


def build_strategy(setup: LoraSetup, st: StrategyConfig, **fedavg_kwargs) -> LoraStrategy:
    """LoraStrategy, behind Flower's FedAvgM / FedAdam / FedYogi when a server optimiser is set:
    their aggregate_train calls ours (the LoRA-aware mean), then steps the global adapter."""
    base = optimiser_class(st.server_optimizer)
    bases = (base, LoraStrategy) if base else (LoraStrategy,)
    cls = type(f"Lora{base.__name__ if base else 'Strategy'}_{setup.scheme.name}", bases, {"setup": setup})
    return cls(weighted_by_key=WEIGHT_KEY, **fedavg_kwargs, **optimiser_kwargs(st))


def strategy_for(cfg: RunConfig, scheme: Scheme, recorder: RunRecorder, per_round: int, min_sites: int) -> LoraStrategy:
    setup = LoraSetup(scheme, recorder, cfg.strategy, transport_dtype=cfg.federation.transport_dtype,
                      uniform_weights=cfg.privacy.enabled or cfg.privacy.client_level, per_round=cfg.federation.sites_per_round, seed=cfg.seed,
                      wait_s=cfg.federation.timeout_s, rounds=cfg.federation.rounds,
                      eval_every=cfg.federation.eval_every, eval_limit=cfg.federation.eval_limit)
    return build_strategy(
        setup, cfg.strategy,
        fraction_train=cfg.federation.fraction_train,
        fraction_evaluate=cfg.federation.fraction_evaluate,
        min_train_nodes=min_sites,
        min_evaluate_nodes=min_sites,
        min_available_nodes=min_sites,
    )


def describe_strategy(cfg: RunConfig) -> str:
    st = cfg.strategy
    parts = [st.name]
    if st.aggregator != "mean":
        parts.append(st.aggregator)
    if st.server_optimizer != "none":
        parts.append(f"server optimiser {st.server_optimizer} (lr {st.server_lr})")
    if st.proximal_mu:
        parts.append(f"FedProx mu {st.proximal_mu}")
    return " + ".join(parts)
