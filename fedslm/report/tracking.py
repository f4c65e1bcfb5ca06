"""The experiment tracker: TensorBoard event files in the run directory (`tracking=tensorboard`,
the default; `tracking=none` turns it off).

TensorBoard rather than MLflow: its store is plain files beside the run, so nothing needs a
server or a database, it adds one light dependency (torch writes the events itself through
torch.utils.tensorboard), and a sweep needs no set-up: `tensorboard --logdir
multirun/DATE/TIME` shows the sweep as one experiment with one run per job (each job's
`tensorboard/` folder), with the jobs' settings and final figures in its HParams tab.

What is logged is what the run directory already holds: the run's settings that differ
from the defaults (as hparams), per round and site the held-out loss and epsilon, bytes
and seconds per round, the server's own metric; at the end the final figures, the model
card's text, the curves and the run report's path.
"""

from __future__ import annotations

from pathlib import Path

TRACKERS = ("tensorboard", "none")
EVENTS_DIR = "tensorboard"


class TensorBoardTracker:
    """A fedslm.server.outputs Writer (duck-typed: it has the writer's hooks)."""

    def __init__(self, run_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.run_dir = Path(run_dir)
        self.writer = SummaryWriter(log_dir=str(self.run_dir / EVENTS_DIR))

    def rejected(self, r: int, line: str) -> None:
        self.writer.add_text("rejected", line, r)

    def note(self, r: int, text: str) -> None: ...

    def server_evaluated(self, r: int, metrics: dict) -> None:
        for k, v in metrics.items():
            if isinstance(v, (int, float)):
                self.writer.add_scalar(f"server/{k}", v, r)

    def global_adapter(self, r: int, tensors: dict, meta: dict[str, str]) -> None: ...

    def round_finished(self, r: int, rl, rows: list[dict]) -> None:
        for row in rows:
            site = row.get("site")
            for key in ("eval_loss", "epsilon"):
                if row.get(key) is not None:
                    self.writer.add_scalar(f"{key}/site_{site}", row[key], r)
        if r > 0:
            self.writer.add_scalar("round/seconds", rl.seconds, r)
            self.writer.add_scalar("round/bytes_up", rl.bytes_up, r)
            self.writer.add_scalar("round/bytes_down", rl.bytes_down, r)
            self.writer.add_scalar("round/rejected", len(rl.rejected), r)
        self.writer.flush()

    def restored(self, done: int) -> None: ...

    def finished(self, record, summary: dict, target_epsilon: float | None) -> None:
        import json

        from fedslm.report.html import changed_settings

        config_file = self.run_dir / "run_config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        hparams = {k: (v if isinstance(v, (int, float, str, bool)) else json.dumps(v))
                   for k, v in changed_settings(config).items()}
        final = {f"final/{k}": float(summary[k]) for k in ("eval_loss_final", "eval_loss_initial", "epsilon", "seconds")
                 if isinstance(summary.get(k), (int, float))}
        # the hparams summary through this run's own writer (add_hparams would open a second
        # run beside it), so TensorBoard lists one run per job with its settings and figures
        from torch.utils.tensorboard.summary import hparams as hparams_summary

        for part in hparams_summary(hparams or {"defaults": "all"}, final):
            self.writer.file_writer.add_summary(part)
        for key, value in final.items():
            self.writer.add_scalar(key, value, record.rounds)
        card = self.run_dir / "model" / "README.md"
        if card.is_file():
            self.writer.add_text("model card", card.read_text())
        curves = self.run_dir / "curves.png"
        if curves.is_file():
            import numpy as np
            from PIL import Image

            self.writer.add_image("curves", np.asarray(Image.open(curves).convert("RGB")), dataformats="HWC")
        self.writer.add_text("report", f"report.html: {self.run_dir / 'report.html'}")
        self.writer.close()
