"""The frozen prefix: with LoRA on the top K decoder layers only (`lora.layers=K`), the
layers below never change, so their output for a record is the same every step, epoch
and round. A site computes it once per record (`CachedStates.build`) and every later
forward runs only the embedding lookup, the top K layers, the final norm and the head
(`replayed`), which on a CPU is most of the cost of a 30-layer model gone.

Nothing about privacy changes: the cache is a function of the site's record and the
public base model, and it stays in the site's process.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from fedslm.atomic import write_atomic
from fedslm.data.tokenize import TokenizedDataset, make_collate
from fedslm.device import autocast, model_device, to_device


def first_trained_layer(model) -> int:
    """Index of the lowest decoder layer with LoRA (0 when every layer has it)."""
    config = getattr(model, "peft_config", {}).get(getattr(model, "active_adapter", "default"))
    layers = getattr(config, "layers_to_transform", None) if config is not None else None
    return min(layers) if layers else 0


def _decoder(model):
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    return lm.get_decoder()


class _PassThrough(torch.nn.Module):
    """A frozen bottom layer during a replayed forward: returns its input, or (the last
    one) the cached output of the whole frozen stack."""

    def __init__(self, states: torch.Tensor | None = None):
        super().__init__()
        self.states = states

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states if self.states is None else self.states


@contextmanager
def replayed(model, states: torch.Tensor):
    """Run `model` with its frozen bottom layers replaced by `states` (batch x length x
    hidden, the output of the last frozen layer). The layer list keeps its length, so
    models that pick a mask per layer index (Gemma-2, Qwen2) still pick the right one."""
    first = first_trained_layer(model)
    if first == 0:
        raise ValueError("this model has LoRA on every layer: no frozen prefix to replay")
    layers = _decoder(model).layers
    originals = [layers[i] for i in range(first)]
    try:
        for i in range(first):
            layers[i] = _PassThrough(states if i == first - 1 else None)
        yield
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer


class CachedStates(Dataset):
    """A tokenised split with each record's frozen-prefix output beside it: items are
    (input_ids, loss_mask, states), which `make_collate` pads into batch["hidden"]."""

    def __init__(self, tokens: TokenizedDataset, states: list[torch.Tensor]):
        self.tokens, self.states = tokens, states
        self.truncated, self.dropped = tokens.truncated, tokens.dropped

    @classmethod
    @torch.no_grad()
    def build(cls, model, tokens: TokenizedDataset, pad_id: int, batch_size: int = 8, progress=None) -> "CachedStates":
        """Run the frozen layers once over every record and keep each record's output
        (its real positions only; right padding never reaches them under causal attention)."""
        first = first_trained_layer(model)
        if first == 0:
            raise ValueError("this model has LoRA on every layer: no frozen prefix to cache")
        decoder = _decoder(model)
        captured: list[torch.Tensor] = []
        hook = decoder.layers[first - 1].register_forward_hook(lambda _m, _i, out: captured.append(
            out[0] if isinstance(out, tuple) else out))
        # the layers above the prefix are not needed for the cache: stop after it
        above = [decoder.layers[i] for i in range(first, len(decoder.layers))]
        was_training = model.training
        model.eval()
        states: list[torch.Tensor] = []
        try:
            for i in range(first, len(decoder.layers)):
                decoder.layers[i] = _PassThrough()
            loader = DataLoader(tokens, batch_size=batch_size, shuffle=False, collate_fn=make_collate(pad_id))
            device = model_device(model)
            for batch in loader:
                captured.clear()
                batch = to_device(batch, device)
                with autocast(model):
                    decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                lengths = batch["attention_mask"].sum(dim=1).tolist()
                # kept in host memory (a site's whole split would crowd an accelerator's);
                # each batch moves its rows back in sequence_losses
                states.extend(captured[0][j, :n].to("cpu", copy=True) for j, n in enumerate(lengths))
                if progress:
                    progress(len(states), len(tokens))
        finally:
            hook.remove()
            for i, layer in enumerate(above, start=first):
                decoder.layers[i] = layer
            model.train(was_training)
        return cls(tokens, states)

    def save(self, path: Path) -> None:
        """One file, whole or absent (other processes of the same simulation read it)."""
        from safetensors.torch import save_file

        lengths = torch.tensor([len(s) for s in self.states], dtype=torch.long)
        flat = torch.cat(self.states) if self.states else torch.zeros(0)
        write_atomic(path, lambda tmp: save_file({"states": flat.contiguous(), "lengths": lengths}, str(tmp)))

    @classmethod
    def load(cls, path: Path, tokens: TokenizedDataset) -> "CachedStates":
        from safetensors.torch import load_file

        saved = load_file(str(path))
        states = list(torch.split(saved["states"], saved["lengths"].tolist()))
        if len(states) != len(tokens) or any(len(s) != len(tokens[i][0]) for i, s in enumerate(states)):
            raise ValueError(f"{path} does not hold this split's records")
        return cls(tokens, states)

    def head(self, n: int) -> "CachedStates":
        return CachedStates(self.tokens.head(n), self.states[:n])

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids, mask = self.tokens[i]
        return ids, mask, self.states[int(i)]

    def num_tokens(self) -> int:
        return self.tokens.num_tokens()
