"""One config schema shared by the JAX and PyTorch backends."""

from configs.presets import (PRESETS, get_preset, imagenet_256, imagenet_512, resolve, seed_imagenet_256,
                             seed_imagenet_512, tiny)
from configs.schema import MaskGITConfig
from configs.sections import (ConfigError, DataConfig, SamplerConfig, TokenizerConfig, TrainConfig, TransformerConfig,
                              check_schedule_name)

__all__ = [
    "ConfigError", "DataConfig", "MaskGITConfig", "SamplerConfig", "TokenizerConfig", "TrainConfig",
    "TransformerConfig", "PRESETS", "get_preset", "imagenet_256", "imagenet_512", "resolve", "tiny",
    "seed_imagenet_256", "seed_imagenet_512",
    "check_schedule_name",
]
