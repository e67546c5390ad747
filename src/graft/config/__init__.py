"""One typed config tree: YAML file + dotted `key=value` overrides, validated before anything loads.

Every field has a default and a one-line help (the `description`), so `graft config` can print the
whole tree and a recipe only has to name what it changes. The sections live in `schema`, reading and
checking a recipe in `loading`.
"""

from graft.config.loading import describe, load_config, parse_override
from graft.config.schema import (
    CheckpointConfig,
    Config,
    ConfigError,
    EvalConfig,
    GateConfig,
    GenerationConfig,
    GrpoConfig,
    HealthConfig,
    LoggingConfig,
    LoraConfig,
    ModelConfig,
    RewardsConfig,
    SftConfig,
    TaskConfig,
    TrainConfig,
    flatten,
)

__all__ = [
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "EvalConfig",
    "GateConfig",
    "GenerationConfig",
    "GrpoConfig",
    "HealthConfig",
    "LoggingConfig",
    "LoraConfig",
    "ModelConfig",
    "RewardsConfig",
    "SftConfig",
    "TaskConfig",
    "TrainConfig",
    "describe",
    "flatten",
    "load_config",
    "parse_override",
]
