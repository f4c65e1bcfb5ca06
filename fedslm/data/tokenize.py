"""Chat formatting and the loss mask.

An instruction example becomes `prompt_ids + answer_ids + eos`, where the prompt is the
model's chat template up to the assistant turn; the mask is 1 exactly on the answer and
its closing eos (so the model learns to stop). Chat examples mask every assistant turn;
plain text is all target. Tokenisation runs through `datasets.map`, so it is cached on
disk for file-backed data and repeated runs skip it.
"""

from __future__ import annotations

from dataclasses import dataclass

import datasets
import torch
from torch.utils.data import Dataset


def chat_prompt(tokenizer, question: str, system_prompt: str | None = None) -> str:
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": question})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@dataclass
class Encoded:
    input_ids: list[int]
    loss_mask: list[int]
    truncated: bool


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _finish(ids: list[int], mask: list[int], max_length: int) -> Encoded:
    truncated = len(ids) > max_length
    return Encoded(ids[:max_length], mask[:max_length], truncated)


def encode(tokenizer, example: dict, max_length: int, system_prompt: str | None = None,
           loss_on: str = "answer") -> Encoded:
    """One example ({prompt, answer[, label]} | {messages} | {text}) as ids and loss mask.

    With a `label` (data.loss_on label or auto), the answer is tokenised as label + rest
    and only the label's tokens (and the eos, when the answer is the label alone) carry the
    loss; loss_on=all puts it on every token."""
    eos = [tokenizer.eos_token_id]
    if "text" in example:
        ids = _ids(tokenizer, example["text"]) + eos
        enc = _finish(ids, [1] * len(ids), max_length)
    elif "messages" in example:
        enc = _encode_chat(tokenizer, example["messages"], max_length)
    else:
        prompt = _ids(tokenizer, chat_prompt(tokenizer, example["prompt"], system_prompt))
        answer, label = example["answer"], example.get("label")
        if label is not None and answer != label:
            if not answer.startswith(label):
                raise ValueError(f"data.loss_on=label: an answer does not start with its label ({len(label)} "
                                 "characters); put {label} first in data.answer_template, or use data.loss_on=answer")
            head, rest = _ids(tokenizer, label), _ids(tokenizer, answer[len(label):]) + eos
            enc = _finish(prompt + head + rest, [0] * len(prompt) + [1] * len(head) + [0] * len(rest), max_length)
        else:
            ids = _ids(tokenizer, answer) + eos
            enc = _finish(prompt + ids, [0] * len(prompt) + [1] * len(ids), max_length)
    if loss_on == "all":
        enc.loss_mask = [1] * len(enc.input_ids)
    return enc


def _encode_chat(tokenizer, messages: list[dict], max_length: int) -> Encoded:
    """Loss on each assistant turn. The template is rendered turn by turn; each new piece
    of template text before an assistant turn is prompt, the turn's content + eos is answer."""
    ids: list[int] = []
    mask: list[int] = []
    consumed = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        if not prefix.startswith(consumed):
            raise ValueError("the chat template does not render conversations incrementally; use shape=instruction")
        piece = _ids(tokenizer, prefix[len(consumed):])
        answer = _ids(tokenizer, message["content"]) + [tokenizer.eos_token_id]
        ids += piece + answer
        mask += [0] * len(piece) + [1] * len(answer)
        consumed = prefix + message["content"] + tokenizer.eos_token
    return _finish(ids, mask, max_length)


def tokenize_table(tokenizer, examples: datasets.Dataset, max_length: int, system_prompt: str | None,
                   packing: bool = False, loss_on: str = "answer") -> "TokenizedDataset":
    """Tokenise a table of examples (columns prompt/answer[/label], messages or text)."""

    def fn(row: dict) -> dict:
        enc = encode(tokenizer, {k: v for k, v in row.items() if v is not None}, max_length, system_prompt, loss_on)
        return {"input_ids": enc.input_ids, "loss_mask": enc.loss_mask, "truncated": enc.truncated}

    mapped = examples.map(fn, remove_columns=examples.column_names, desc="tokenising")
    truncated = int(sum(mapped["truncated"]))
    kept = mapped.filter(lambda m: sum(m) > 0, input_columns="loss_mask")
    dropped = len(mapped) - len(kept)
    kept = kept.remove_columns("truncated")
    if packing:
        kept = pack(kept, max_length)
    return TokenizedDataset(kept, truncated=truncated, dropped=dropped)


def pack(table: datasets.Dataset, max_length: int) -> datasets.Dataset:
    """Concatenate whole documents into blocks of at most max_length tokens.

    A document is never split across blocks: with sample-level DP a block is one sample,
    so a record must influence exactly one sample for the per-record guarantee to hold."""
    blocks_ids, blocks_mask, cur_ids, cur_mask = [], [], [], []
    for ids, mask in zip(table["input_ids"], table["loss_mask"]):
        if cur_ids and len(cur_ids) + len(ids) > max_length:
            blocks_ids.append(cur_ids)
            blocks_mask.append(cur_mask)
            cur_ids, cur_mask = [], []
        cur_ids = cur_ids + ids
        cur_mask = cur_mask + mask
    if cur_ids:
        blocks_ids.append(cur_ids)
        blocks_mask.append(cur_mask)
    return datasets.Dataset.from_dict({"input_ids": blocks_ids, "loss_mask": blocks_mask})


class TokenizedDataset(Dataset):
    """Token ids and loss masks of one split, backed by an Arrow table."""

    def __init__(self, table: datasets.Dataset, truncated: int = 0, dropped: int = 0):
        self.table = table
        self.truncated = truncated
        self.dropped = dropped

    @classmethod
    def from_records(cls, tokenizer, records: list[dict], max_length: int,
                     system_prompt: str | None = None, loss_on: str = "answer") -> "TokenizedDataset":
        table = datasets.Dataset.from_list(records) if records else datasets.Dataset.from_dict({"text": []})
        return tokenize_table(tokenizer, table, max_length, system_prompt, loss_on=loss_on)

    def head(self, n: int) -> "TokenizedDataset":
        """The first n examples (the same ones every time)."""
        return TokenizedDataset(self.table.select(range(min(n, len(self)))), self.truncated, self.dropped)

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        # tensors, not a dict: Opacus's Poisson loader inspects item shapes
        row = self.table[int(i)]
        return torch.tensor(row["input_ids"]), torch.tensor(row["loss_mask"])

    def num_tokens(self) -> int:
        return sum(len(x) for x in self.table["input_ids"])


def make_collate(pad_id: int):
    """Right-pad a batch to its longest sequence. Items may carry a third tensor, a
    record's cached frozen-prefix states (length x hidden; fedslm.lora.frozen_prefix),
    padded with zeros into batch["hidden"]."""

    def collate(batch: list[tuple[torch.Tensor, ...]]) -> dict[str, torch.Tensor]:
        width = max((len(item[0]) for item in batch), default=0)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attn = torch.zeros((len(batch), width), dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        hidden = None
        if batch and len(batch[0]) == 3:
            hidden = torch.zeros((len(batch), width, batch[0][2].shape[-1]), dtype=batch[0][2].dtype)
        for i, (seq, loss_mask, *states) in enumerate(batch):
            n = len(seq)
            ids[i, :n] = seq
            attn[i, :n] = 1
            mask[i, :n] = loss_mask
            if hidden is not None:
                hidden[i, :n] = states[0]
        out = {"input_ids": ids, "attention_mask": attn, "loss_mask": mask}
        return out if hidden is None else {**out, "hidden": hidden}

    return collate
