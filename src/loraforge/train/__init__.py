"""Fine-tuning: ``train(config) -> (model, metrics)`` and its typed ``TrainConfig``.

import loraforge as lf
model, metrics = lf.train("configs/quickstart.yaml")
model, metrics = lf.train(lf.TrainConfig.from_yaml("my.yaml", ["lora.r=32"]))
"""

import sys
import types

from .config import ConfigError, TrainConfig
from .data import DataError
from .loop import train

__all__ = ["ConfigError", "DataError", "TrainConfig", "train"]


class _CallableModule(types.ModuleType):
    """Importing ``loraforge.train.<anything>`` makes Python set the attribute ``loraforge.train``
    to this package, shadowing the ``lf.train`` function; calling the package calls it."""

    def __call__(self, *args, **kwargs):
        return train(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
