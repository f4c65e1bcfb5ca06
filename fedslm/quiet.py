"""The one place where known-harmless library noise is silenced.

Each filter names a message we have checked is benign; anything else still shows.
"""

from __future__ import annotations

import logging
import os
import warnings

_HARMLESS = [
    # Opacus: its engine's secure_mode needs torchcsprng; fedslm passes generators filled
    # from OS entropy instead (fedslm.privacy.randomness)
    r".*Secure RNG turned off.*",
    r".*Full backward hook is firing.*",
    r".*Using a non-full backward hook.*",
    # peft probes an attribute that transformers deprecated
    r".*is_gradient_checkpointing.*",
    # Ray's notice about a future default for accelerator env vars
    r".*RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO.*",
    # Flower deprecates the Python run_simulation entry point in favour of `flwr run`
    r".*run_simulation.*deprecated.*",
]


def silence_known_noise() -> None:
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    for pattern in _HARMLESS:
        warnings.filterwarnings("ignore", message=pattern)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass
    logging.getLogger("opacus").setLevel(logging.ERROR)
    try:
        import datasets

        datasets.disable_progress_bars()  # per-split map/filter bars, many per site
    except ImportError:  # pragma: no cover
        pass
    # Hydra sets the root logger to INFO; these libraries then narrate their internals.
    for name in ("alembic", "matplotlib", "filelock", "urllib3", "datasets"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # flwr sets its logger to DEBUG when first imported: import it, then lower it. Its
    # own console handler prints warnings and errors; propagating to Hydra's root handler
    # as well would print each twice.
    import flwr.supercore.logger  # noqa: F401

    flwr_logger = logging.getLogger("flwr")
    flwr_logger.setLevel(logging.WARNING)
    flwr_logger.propagate = False
    if not any(isinstance(f, _DropFlowerDeprecation) for f in flwr_logger.filters):
        flwr_logger.addFilter(_DropFlowerDeprecation())


class _DropFlowerDeprecation(logging.Filter):
    """Flower deprecates the Python run_simulation API; it is still the way to run a
    simulation from a Python (Hydra) entry point, so that one notice is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "run_simulation" not in record.getMessage()
