"""How often a deployed process asks whether something has arrived.

A federation's messages come in bursts: a site's reply is followed within moments by the
next message (the server needs only the other sites' replies and an aggregation), while
between runs nothing comes for hours. A fixed poll interval trades one against the
other: short, and every idle site loads its SuperLink; long, and each of a round's two
messages waits half an interval at every hop. `Backoff` polls quickly right after
activity and stretches the interval geometrically to the idle cap, so a message that
follows activity by t seconds is seen at most about (growth - 1) * t late, and an idle
process makes a handful of extra calls per message, then `cap` as before.
"""

from __future__ import annotations

import time


class Backoff:
    def __init__(self, cap: float, first: float = 0.02, growth: float = 1.5):
        if not 0 < first <= cap or growth < 1:
            raise ValueError(f"Backoff(cap={cap}, first={first}, growth={growth}): need 0 < first <= cap, growth >= 1")
        self.cap, self.first, self.growth = cap, first, growth
        self.interval = cap  # a process that has seen nothing yet is idle

    def reset(self) -> None:
        """Something arrived (or was sent): the next one is likely soon."""
        self.interval = self.first

    def next(self) -> float:
        """The interval to wait now; the following one is longer, up to the cap."""
        wait = self.interval
        self.interval = min(self.cap, self.interval * self.growth)
        return wait

    def wait(self) -> None:
        time.sleep(self.next())
