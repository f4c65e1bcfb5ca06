"""What a site says while it works: its log lines and its live status.

A deployed site prints to its own log (the worker's output, on the site's machine). In a
simulation every site shares the operator's console: by default (`verbose=false`) a
site's lines go to the run's run.log instead, and its live status (round, step, loss,
epsilon) to a small file per site that the console redraws as one line per site
(simulations/console.py). `verbose=true` prints everything, as a deployed site does.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

LIVE_DIR = ".live"  # in a simulation's run directory, removed when it ends


class SiteProgress:
    def __init__(self, run_dir: Path | None, site: int, quiet: bool):
        self.site = site
        self.quiet = quiet and run_dir is not None
        self.log = Path(run_dir) / "run.log" if self.quiet else None
        self.status_file = Path(run_dir) / LIVE_DIR / f"site-{site}.json" if self.quiet else None
        self.fields: dict = {}
        if self.status_file is not None and self.status_file.is_file():
            try:  # the line so far (this site's last message may have run in another process)
                self.fields = {k: v for k, v in json.loads(self.status_file.read_text()).items() if k != "site"}
            except ValueError:
                pass

    def say(self, text: str) -> None:
        if self.log is None:
            print(text, flush=True)
            return
        # one write per line in append mode: lines of concurrent site processes never interleave
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "a") as f:
            f.write(text.rstrip("\n") + "\n")

    def status(self, **fields) -> None:
        """Update the live line (simulation, quiet); a no-op otherwise."""
        if self.status_file is None:
            return
        self.fields.update(fields)
        self.status_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.status_file.with_name(f".{self.status_file.name}.{os.getpid()}")
        tmp.write_text(json.dumps({"site": self.site, **self.fields}))
        os.replace(tmp, self.status_file)


def site_progress(cfg, context) -> SiteProgress:
    """Quiet only in a simulation (one machine, one console; Flower's engine sets the
    partition id) without verbose=true."""
    simulated = "partition-id" in context.node_config
    site = int(context.node_config.get("site-id", context.node_config.get("partition-id", -1)))
    return SiteProgress(Path(cfg.output_dir) if simulated else None, site, simulated and not cfg.verbose)
