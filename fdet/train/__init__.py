"""Training: the engine, optimizers, schedules and checkpoints."""

from fdet.train.engine import TrainingError, TrainResult, load_run, train

__all__ = ["TrainResult", "TrainingError", "load_run", "train"]
