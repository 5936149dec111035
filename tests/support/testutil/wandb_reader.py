"""The offline W&B run reader lives in the trainer (it reads resumed runs); tests use it from here."""

from titanforge.trainer.wandb_file import config, history, logged_steps  # noqa: F401
