"""Files that are either whole or absent: written beside their target, then renamed.

A crash mid-write must never leave a truncated ledger (it would under-count epsilon), a
half-written checkpoint (resume would load garbage) or a partial adapter."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def write_atomic(path: Path | str, write: Callable[[Path], object] | str, durable: bool = False) -> Path:
    """Write `path` through a temporary sibling and one rename. `write` is the text to
    write, or a function that writes the file at the path it is given. `durable` fsyncs
    the file and its directory, so a power cut cannot undo a ledger entry."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        if isinstance(write, str):
            tmp.write_text(write)
        else:
            write(tmp)
        if durable:
            fsync_path(tmp)
        tmp.replace(path)
        if durable:
            fsync_path(path.parent)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def fsync_path(path: Path) -> None:
    """Flush a file's contents, or a directory's entries (a rename), to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
