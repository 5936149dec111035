"""The training loop, checkpoints, optimizer and metrics."""

from titanforge.trainer.loop import TrainResult, train

__all__ = ["TrainResult", "train"]
