"""Chat formatting and the answer-only loss mask.

Each record becomes `prompt_ids + answer_ids + eos`, where the prompt is the model's chat
template up to the assistant turn. Only answer tokens (and the closing eos, so the model
learns to stop) count in the loss: the mask is 1 exactly there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from fedslm.data.clinic import SYSTEM_PROMPT


def chat_prompt(tokenizer, question: str) -> str:
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@dataclass
class Encoded:
    input_ids: list[int]
    loss_mask: list[int]
    truncated: bool


def encode(tokenizer, record: dict, max_length: int) -> Encoded:
    prompt = tokenizer(chat_prompt(tokenizer, record["prompt"]), add_special_tokens=False)["input_ids"]
    answer = tokenizer(record["answer"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = prompt + answer
    mask = [0] * len(prompt) + [1] * len(answer)
    truncated = len(ids) > max_length
    if truncated:
        ids, mask = ids[:max_length], mask[:max_length]
    return Encoded(ids, mask, truncated)


class TokenizedDataset(Dataset):
    """Pre-tokenised records; examples whose answer is cut away entirely are dropped."""

    def __init__(self, tokenizer, records: list[dict], max_length: int):
        encoded = [encode(tokenizer, r, max_length) for r in records]
        self.examples = [e for e in encoded if sum(e.loss_mask) > 0]
        self.truncated = sum(e.truncated for e in encoded)
        self.dropped = len(encoded) - len(self.examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        # tensors, not a dataclass: Opacus's Poisson loader inspects item shapes
        e = self.examples[i]
        return torch.tensor(e.input_ids), torch.tensor(e.loss_mask)


def make_collate(pad_id: int):
    """Right-pad a batch to its longest sequence."""

    def collate(batch: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
        width = max((len(ids) for ids, _ in batch), default=0)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attn = torch.zeros((len(batch), width), dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, (seq, loss_mask) in enumerate(batch):
            n = len(seq)
            ids[i, :n] = seq
            attn[i, :n] = 1
            mask[i, :n] = loss_mask
        return {"input_ids": ids, "attention_mask": attn, "loss_mask": mask}

    return collate
