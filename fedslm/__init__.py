"""fedslm: federated, differentially private LoRA fine-tuning of small language models."""

import logging as _logging

__version__ = "0.1.0"

# transformers imports torchao (the int8 export) whenever it is installed; on import,
# torchao reports each CUDA kernel library it cannot load on a CPU machine and registers
# enums with torch's pytree the deprecated way. Its CPU int8 path needs neither. This runs
# before any fedslm module imports transformers, so those lines never show.
_logging.getLogger("torchao").setLevel(_logging.ERROR)
_logging.getLogger("torch.utils._pytree").setLevel(_logging.ERROR)
