"""Training: the engine, optimizers, schedules and checkpoints."""

from fdet.train.checkpoint import CheckpointError
from fdet.train.engine import TrainingError, TrainResult, load_run, train
from fdet.train.run_dir import resolve_checkpoint

__all__ = [
    "CheckpointError",
    "TrainResult",
    "TrainingError",
    "load_run",
    "resolve_checkpoint",
    "train",
]
