"""Global adapters on disk: one safetensors file per round, never pickles."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def adapter_path(run_dir: Path, server_round: int) -> Path:
    return Path(run_dir) / "adapters" / f"round_{server_round:03d}.safetensors"


def save_adapter(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    tmp.replace(path)  # a crash mid-write never leaves a truncated checkpoint
    return path


def load_adapter(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))
