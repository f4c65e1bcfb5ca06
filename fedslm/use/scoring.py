"""Scores of held-out answers: option log-likelihoods, exact match, contains-answer, macro-F1."""

from __future__ import annotations

import torch

from fedslm.device import autocast, base_dtype, model_device
from fedslm.losses import soft_cap


def exact_match(predictions: list[str], answers: list[str]) -> float:
    """Share of predictions equal to the answer, ignoring case and surrounding space."""
    if not answers:
        return 0.0
    return sum(p.strip().lower() == a.strip().lower() for p, a in zip(predictions, answers, strict=True)) / len(answers)


def contains_answer(predictions: list[str], answers: list[str]) -> float:
    """Share of predictions that contain the answer (case-insensitive): generous to a
    model that explains, where exact match is not."""
    if not answers:
        return 0.0
    return sum(a.strip().lower() in p.lower() for p, a in zip(predictions, answers, strict=True)) / len(answers)


def macro_f1(predictions: list[str], golds: list[str]) -> float:
    """Unweighted mean of per-class F1 over every class seen in gold or predictions."""
    classes = set(golds) | set(predictions)
    if not classes:
        return 0.0
    total = 0.0
    for c in classes:
        tp = sum(p == c and g == c for p, g in zip(predictions, golds, strict=True))
        pred_c, gold_c = predictions.count(c), golds.count(c)
        total += 2 * tp / (pred_c + gold_c) if pred_c + gold_c else 0.0
    return total / len(classes)


def _head(model):
    """The decoder stack and a function from its final hidden states to next-token
    log-probabilities, so the vocabulary projection runs only where a score is read."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PeftModel's LoRA-patched model
    head = lm.get_output_embeddings()

    def logprobs(hidden: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(soft_cap(lm, head(hidden).float()), dim=-1)

    return lm.base_model, logprobs


class _OptionTree:
    """The options as a prefix tree of token ids. Node 0 is the end of the prompt; every
    other node is one option prefix, and its hidden state predicts the next tokens. Options
    that share a prefix ("card_arrival", "card_linking") share its nodes, so the shared
    tokens run once per question, not once per option."""

    def __init__(self, options: list[list[int]]):
        if not options or any(len(o) == 0 for o in options):
            raise ValueError("every option needs at least one token")
        self.token, self.parent, self.depth = [-1], [-1], [0]
        self.children: list[dict[int, int]] = [{}]
        self.ends: list[list[int]] = [[]]
        for i, option in enumerate(options):
            node = 0
            for t in option:
                if t not in self.children[node]:
                    self.children[node][t] = len(self.token)
                    self.token.append(t)
                    self.parent.append(node)
                    self.depth.append(self.depth[node] + 1)
                    self.children.append({})
                    self.ends.append([])
                node = self.children[node][t]
            self.ends[node].append(i)

    def inner_below(self, node: int) -> list[int]:
        """`node` and every node under it that has children, parents first: the nodes
        whose forward completes every option below `node`."""
        out, k = [node], 0
        while k < len(out):
            out += [c for c in self.children[out[k]].values() if self.children[c]]
            k += 1
        return out


class OptionScorer:
    """Scores one fixed set of options after many prompts.

    The prompts' common start (the system prompt and instruction of a held-out set) runs
    once and stays in the KV cache; each question runs only its own tokens on top of it,
    and the options run as a prefix tree after that: each node's token sits at its depth's
    position and attends to the prompt and its own ancestors only, through an explicit 4D
    mask, so a node's hidden state is the one a plain forward over prompt + option gives."""

    def __init__(self, model, options: list[list[int]], shared_prefix: list[int] | tuple = ()):
        from transformers import DynamicCache

        self.tree = _OptionTree(options)
        model.eval()
        self.decoder, self.logprobs = _head(model)
        self.dtype, self.device = base_dtype(self.decoder), model_device(self.decoder)
        self.autocast = autocast(self.decoder)
        # full-length layers even for sliding-window models: the tree's mask is explicit
        self.cache, self.prefix = DynamicCache(), list(shared_prefix)
        self.window = getattr(self.decoder.config, "sliding_window", None)
        if self.prefix:
            with torch.no_grad(), self.autocast:
                self.decoder(input_ids=self._tensor([self.prefix]), past_key_values=self.cache, use_cache=True)

    def _tensor(self, rows) -> torch.Tensor:
        return torch.tensor(rows, device=self.device)

    def _start(self, prompt_ids: list[int]) -> torch.Tensor:
        """Put a prompt in the cache (after the shared prefix); its next-token log-probs."""
        n = len(self.prefix)
        if list(prompt_ids[:n]) != self.prefix or len(prompt_ids) == n:
            raise ValueError("the prompt must extend the scorer's shared prefix by at least one token")
        longest = len(prompt_ids) + max(self.tree.depth)
        if self.window and longest > self.window:
            raise ValueError(f"prompt + option is {longest} tokens, longer than the model's sliding window "
                             f"({self.window}); shorten data.max_length")
        self.cache.crop(-(self.cache.get_seq_length() - n)) if self.cache.get_seq_length() > n else None
        self.prompt_len, self.slot = len(prompt_ids), {}
        with self.autocast:
            out = self.decoder(input_ids=self._tensor([prompt_ids[n:]]),
                               position_ids=torch.arange(n, len(prompt_ids), device=self.device)[None],
                               past_key_values=self.cache, use_cache=True)
        return self.logprobs(out.last_hidden_state[0, -1:])[0].cpu()  # read item by item below

    def _run(self, nodes: list[int]) -> torch.Tensor:
        """Log-probabilities predicted at each node, shape (len(nodes), vocab). A node's
        ancestors must have run before or be in `nodes` ahead of it."""
        tree, start = self.tree, self.prompt_len + len(self.slot)
        for k, n in enumerate(nodes):
            self.slot[n] = start + k
        # built on the host (one small write per ancestor), moved once
        mask = torch.full((1, 1, len(nodes), start + len(nodes)), torch.finfo(self.dtype).min, dtype=self.dtype)
        mask[..., :self.prompt_len] = 0
        for k, n in enumerate(nodes):
            a = n
            while a > 0:
                mask[0, 0, k, self.slot[a]] = 0
                a = tree.parent[a]
        ids = self._tensor([[tree.token[n] for n in nodes]])
        pos = self._tensor([[self.prompt_len + tree.depth[n] - 1 for n in nodes]])
        with self.autocast:
            hidden = self.decoder(input_ids=ids, attention_mask=mask.to(self.device), position_ids=pos,
                                  past_key_values=self.cache, use_cache=True).last_hidden_state[0]
        return self.logprobs(hidden).cpu()

    @torch.no_grad()
    def scores(self, prompt_ids: list[int]) -> torch.Tensor:
        """log p(option | prompt) for every option, summed over its tokens."""
        tree = self.tree
        root = self._start(prompt_ids)
        inner = [n for n in range(1, len(tree.token)) if tree.children[n]]  # creation order: parents first
        logp = {0: root, **dict(zip(inner, self._run(inner) if inner else []))}
        score = [0.0] * len(tree.token)
        out = torch.empty(sum(len(e) for e in tree.ends))
        for n in range(1, len(tree.token)):
            score[n] = score[tree.parent[n]] + logp[tree.parent[n]][tree.token[n]].item()
            for i in tree.ends[n]:
                out[i] = score[n]
        return out

    @torch.no_grad()
    def best(self, prompt_ids: list[int], wave: int = 32) -> int:
        """The index of the most likely option: the argmax of `scores`, found without
        scoring every option.

        A prefix's summed log-probability bounds every option below it (each further token
        adds a log-probability <= 0), so the search runs the most promising prefixes first
        and stops when no unexplored prefix can beat the best complete option. Exact, not
        a beam: a prefix is skipped only when it cannot win.

        Each forward pays a fixed cost (every weight streamed, every layer's overhead)
        whatever its length, so it carries about `wave` nodes (or half of those still open):
        the most promising prefix with everything below it, so that its options are
        complete after one forward instead of one per token and their scores prune the rest
        early, and the next prefixes one token further. (Every open prefix with its subtree
        would run nodes a flat model's bound never needed.)"""
        tree = self.tree
        best, best_score = -1, float("-inf")
        frontier: dict[int, float] = {}  # nodes whose score is known and whose children have not run

        def reached(parent: int, logp: torch.Tensor, base: float) -> None:
            nonlocal best, best_score
            for t, child in tree.children[parent].items():
                s = base + logp[t].item()
                for i in tree.ends[child]:
                    if s > best_score or (s == best_score and i < best):
                        best, best_score = i, s
                if tree.children[child]:
                    frontier[child] = s

        reached(0, self._start(prompt_ids), 0.0)
        while True:
            open_ = sorted((n for n, s in frontier.items() if s >= best_score), key=frontier.get, reverse=True)
            if not open_:
                return best
            # the leading prefix with everything below it, the next ones a token further
            budget = max(wave, len(open_) // 2)
            lead = tree.inner_below(open_[0])
            batch = lead[:1] if len(lead) > budget else lead
            batch += open_[1:1 + max(0, budget - len(batch))]
            # parents first, so a node's score is set by the time its own row is read
            for n, logp in zip(batch, self._run(batch)):
                reached(n, logp, frontier.pop(n))


def option_logprobs(model, prompt_ids: list[int], options: list[list[int]]) -> torch.Tensor:
    """log p(option | prompt) for each option, summed over its tokens, shape (n_options,)."""
    return OptionScorer(model, options).scores(prompt_ids)
