"""What a run directory holds, for the server that writes it and the tools that read it
(export, evaluate, audit): one safetensors file per round's global adapter, never pickles.

  run_config.json        the flat config of the run (fedslm.config.load_run_config)
  adapters/round_NNN     each round's global adapter, peft LoRA names, rank/alpha metadata
  privacy.json           the guarantee as data; summary.json, metrics.jsonl, curves.png
  checkpoint/            the server's resumable state (fedslm.server.checkpoint)
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fedslm.atomic import write_atomic


RUN_MARKER = ".fedslm-run"  # written by the simulation's driver before any site starts


def mark_run_dir(run_dir: Path) -> None:
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    (Path(run_dir) / RUN_MARKER).write_text("the simulation's driver wrote this; its sites check they see it\n")


def check_shared(run_dir: Path, what: str) -> None:
    """A simulated site on a Ray cluster keeps its ledger, replies and logs in the run
    directory: on a node that does not see the driver's, its ledger would split and
    under-count. Refuse instead."""
    from fedslm.config import ConfigError

    if not (Path(run_dir) / RUN_MARKER).is_file():
        raise ConfigError([
            f"this site process runs on a node that does not see the run directory {run_dir} ({what}): with "
            "federation.ray_address, put output_dir (and privacy.ledger_dir) on a filesystem every node shares, "
            "or the sites' privacy ledgers would be split between nodes"])


def adapter_path(run_dir: Path, server_round: int) -> Path:
    return Path(run_dir) / "adapters" / f"round_{server_round:03d}.safetensors"


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    contiguous = {k: v.contiguous() for k, v in tensors.items()}
    return write_atomic(path, lambda tmp: save_file(contiguous, str(tmp), metadata=metadata))


def save_adapter(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    return save_tensors(path, tensors, metadata)


def load_adapter(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))
