"""The run configuration, shared by the coordinator and every site.

- `schema`: the typed dataclasses, and every default (conf/ presets hold only differences);
- `checks`: `validate`, each set of choices read from the module that implements it;
- `flat`: the one codec to and from Flower's flat run_config, and a run dir's config;
- `compose`: Hydra composition of conf/ (the simulation entry, CLI tools, tests);
- `pyproject`: the generated `[tool.flwr.app.config]` table a deployed run reads.

Importing this package loads neither Hydra nor any implementation: a deployed site parses
its run_config in a fresh process per message.
"""

from fedslm.config.checks import validate
from fedslm.config.errors import ConfigError
from fedslm.config.flat import from_run_config, load_run_config, to_run_config
from fedslm.config.schema import (
    DataConfig,
    FederationConfig,
    LoraConfig,
    ModelConfig,
    PrivacyConfig,
    RunConfig,
    ServerEvalConfig,
    StrategyConfig,
    TinyModelConfig,
    TrainConfig,
    WarmStartConfig,
)

__all__ = [
    "ConfigError", "DataConfig", "FederationConfig", "LoraConfig", "ModelConfig", "PrivacyConfig", "RunConfig",
    "ServerEvalConfig", "StrategyConfig", "TinyModelConfig", "TrainConfig", "WarmStartConfig", "from_run_config", "load_run_config",
    "to_run_config", "validate",
]
