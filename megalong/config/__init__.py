"""Typed config tree, YAML loading with dotted overrides, DeepSpeed JSON rendering."""

from megalong.config.loader import config_from_dict, config_to_dict, load_config, parse_overrides, save_config
from megalong.config.schema import (
    AttentionConfig,
    CheckpointConfig,
    Config,
    ConfigError,
    DataConfig,
    LoggingConfig,
    LoraConfig,
    ModelConfig,
    ParallelConfig,
    RopeConfig,
    TrainConfig,
    ZeroConfig,
)

__all__ = [
    "AttentionConfig", "CheckpointConfig", "Config", "ConfigError", "DataConfig", "LoggingConfig",
    "LoraConfig", "ModelConfig", "ParallelConfig", "RopeConfig", "TrainConfig", "ZeroConfig",
    "config_from_dict", "config_to_dict", "load_config", "parse_overrides", "save_config",
]
