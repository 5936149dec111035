"""The training loop, checkpoints, optimizer and metrics.

`train` and `TrainResult` are imported lazily, so `titanforge.trainer.config` (needed by the
config schema) does not pull in the loop, the data pipeline and every model.
"""

__all__ = ["TrainResult", "train"]


def __getattr__(name):
    if name in __all__:
        from titanforge.trainer import loop

        return getattr(loop, name)
    raise AttributeError(name)
