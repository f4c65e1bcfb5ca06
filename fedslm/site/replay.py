"""A round a site already trained is answered again from its saved reply, not trained twice.

After a coordinator crash, the SuperLink still holds the train messages of the run that
died; a site that reconnects receives and trains them, and the resumed run then asks for
the same round from the same global adapter. Training it again would charge the ledger a
second time for one round (and, near the budget, refuse it). Sending the reply already
released for that (run, round, global adapter) costs no new privacy: it is the same output.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from flwr.app import ArrayRecord

from fedslm.atomic import write_atomic


def round_digest(arrays: ArrayRecord, server_round: int, run_key: str | None) -> str:
    """What identifies a train request: the run, the round and the exact global tensors."""
    h = hashlib.sha256(f"{run_key}|{server_round}".encode())
    for name in sorted(arrays):
        h.update(name.encode())
        h.update(arrays[name].data)
    return h.hexdigest()


@dataclass
class SavedReply:
    tensors: dict[str, torch.Tensor]
    metrics: dict


class ReplyCache:
    """The site's last train reply, beside its ledger on its own disk."""

    def __init__(self, path: Path):
        self.path = path

    def get(self, digest: str) -> SavedReply | None:
        from safetensors import safe_open

        if not self.path.exists():
            return None
        with safe_open(str(self.path), "pt") as f:
            meta = f.metadata() or {}
            if meta.get("digest") != digest:
                return None
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        return SavedReply(tensors, json.loads(meta["metrics"]))

    def put(self, digest: str, tensors: dict[str, torch.Tensor], metrics: dict) -> None:
        from safetensors.torch import save_file

        plain = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        meta = {"digest": digest, "metrics": json.dumps(metrics)}
        write_atomic(self.path, lambda tmp: save_file(plain, str(tmp), metadata=meta))
