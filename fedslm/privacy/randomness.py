"""Where a site's DP randomness comes from: the operating system's entropy, fresh for every
round, never a seed in the run config, a file or a message.

If the coordinator could reproduce the Gaussian noise or the Poisson batches (as it could
while they were seeded from `seed`, site and round), it could subtract the noise from the
update it receives and epsilon would be infinite. Opacus's own `secure_mode` needs
torchcsprng, which has no build for this torch; instead each generator here is a torch
Mersenne Twister whose whole 19,968-bit state is filled from `os.urandom` (never written
anywhere), and the DP optimizer samples noise with Opacus's floating-point-safe method
(the sum of four draws; Mironov 2012, Holohan & Braghin 2021).

Tests that compare two private runs need the same draws in both: `reproducible_for_tests`
is the one switch, a Python context manager that no config key, node config or message
can reach.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

_MT_WORDS = 624
_STATE_OFFSET = 24  # torch's CPU generator state: seed u64, left i32, seeded i32, next u64, then the words
_reproducible = False


@dataclass
class DPRandomness:
    """The two generators of one private local round."""

    sampling: torch.Generator  # Opacus's Poisson sampler (it inherits the loader's generator)
    noise: torch.Generator  # the Gaussian noise the optimizer adds

    @classmethod
    def secret(cls, test_seed: int) -> "DPRandomness":
        """OS entropy; `test_seed` is used only inside `reproducible_for_tests`."""
        if _reproducible:
            return cls(torch.Generator().manual_seed(test_seed), torch.Generator().manual_seed(test_seed + 1))
        return cls(entropy_generator(), entropy_generator())


def entropy_generator() -> torch.Generator:
    """A CPU generator whose Mersenne Twister state is 624 words from os.urandom."""
    template = torch.Generator().manual_seed(0).get_state().numpy().copy()
    words = np.frombuffer(os.urandom(4 * _MT_WORDS), dtype=np.uint32).astype(np.uint64)
    template[_STATE_OFFSET:_STATE_OFFSET + 8 * _MT_WORDS] = words.view(np.uint8)
    template[8:12] = np.array([1], dtype=np.int32).view(np.uint8)  # left=1: twist before the first draw
    g = torch.Generator()
    g.set_state(torch.from_numpy(template))
    return g


@contextmanager
def reproducible_for_tests():
    """Tests only: DP randomness from the caller's seed, so two private runs can be compared."""
    global _reproducible
    before, _reproducible = _reproducible, True
    try:
        yield
    finally:
        _reproducible = before
