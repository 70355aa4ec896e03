"""Fine-tuning: ``train(config) -> (model, metrics)`` and its typed ``TrainConfig``.

import loraforge as lf
model, metrics = lf.train("configs/quickstart.yaml")
model, metrics = lf.train(lf.TrainConfig.from_yaml("my.yaml", ["lora.r=32"]))
"""

from .config import ConfigError, TrainConfig
from .data import DataError
from .loop import train

__all__ = ["ConfigError", "DataError", "TrainConfig", "train"]
