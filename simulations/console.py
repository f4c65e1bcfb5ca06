"""The simulation's console when it is quiet (`verbose=false`, the default): the round
table as the server prints it, and below it one live line per site (round, step, loss,
epsilon) redrawn from the sites' status files (fedslm.site.progress). Nothing else: the
sites' own lines are in run.log, and Ray does not forward its actors' output.

The live lines are drawn only on a terminal; piped output (CI, a log file) gets the
round table alone.
"""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

from fedslm.site.progress import LIVE_DIR

CLEAR_LINE, UP = "\x1b[2K", "\x1b[1A"


class LiveConsole:
    """A stand-in for sys.stdout during a simulation: every complete line written clears
    the live block, is printed, and the block is drawn again below it."""

    def __init__(self, run_dir: Path, stream=None, interval_s: float = 0.5):
        self.stream = stream or sys.stdout
        self.live_dir = Path(run_dir) / LIVE_DIR
        self.interval_s = interval_s
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.drawn = 0  # live lines on screen below the last printed line
        self.pending = ""
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._refresh, name="fedslm-live-console", daemon=True)

    # --- the file API print() uses ---------------------------------------------------
    def write(self, text: str) -> int:
        with self.lock:
            self.pending += text
            if "\n" in self.pending:
                done, self.pending = self.pending.rsplit("\n", 1)
                self._clear()
                self.stream.write(done + "\n")
                self._draw()
                self.stream.flush()
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return self.tty

    def fileno(self) -> int:
        return self.stream.fileno()

    # --- the live block --------------------------------------------------------------
    def lines(self) -> list[str]:
        out = []
        for path in sorted(self.live_dir.glob("site-*.json"), key=lambda p: int(p.stem.split("-")[1])):
            try:
                s = json.loads(path.read_text())
            except (OSError, ValueError):  # being replaced right now: next refresh
                continue
            parts = [f"  site {s['site']}", f"round {s.get('round', '-')}", s.get("phase", "")]
            if s.get("phase") == "training" and s.get("steps"):
                parts.append(f"step {s.get('step', 0)}/{s['steps']}")
            if s.get("loss") is not None:
                parts.append(f"loss {s['loss']:.3f}")
            if s.get("epsilon") is not None:
                parts.append(f"epsilon {s['epsilon']:.2f}")
            if s.get("eval_loss") is not None:
                parts.append(f"held-out {s['eval_loss']:.3f}")
            out.append("  ".join(p for p in parts if p))
        return out

    def _clear(self) -> None:
        if self.tty and self.drawn:
            self.stream.write((UP + CLEAR_LINE) * self.drawn + "\r")
            self.drawn = 0

    def _draw(self) -> None:
        if not self.tty:
            return
        lines = self.lines()
        for line in lines:
            self.stream.write(CLEAR_LINE + line + "\n")
        self.drawn = len(lines)

    def _refresh(self) -> None:
        while not self.stop.wait(self.interval_s):
            with self.lock:
                self._clear()
                self._draw()
                self.stream.flush()

    def __enter__(self) -> "LiveConsole":
        self.previous, sys.stdout = sys.stdout, self
        if self.tty:
            self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join(timeout=2)
        with self.lock:
            if self.pending:
                self.stream.write(self.pending + "\n")
                self.pending = ""
            self._clear()
            self.stream.flush()
        sys.stdout = self.previous
