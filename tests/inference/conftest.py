"""Tiny trained runs for the inference tests, made once a session with the real ``fdet train``
path: any file of ``specs/shapes`` cut down to four steps of four 64² images and a backbone of
width 16 (seconds on a CPU)."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from fdet.cli import main

SHAPES = Path(__file__).resolve().parents[2] / "specs" / "shapes"

TINY_SETS: dict[str, Any] = {
    "model.backbone.width": 16,
    "data.train_images": 8,
    "data.val_images": 4,
    "data.image_size": 64,
    "train_transforms.min_size": [64],
    "train_transforms.max_size": 64,
    "val_transforms.min_size": [64],
    "val_transforms.max_size": 64,
    "batch_size": 4,
    "schedule.warmup.iters": 2,
    "iterations": 4,
    "eval_interval": 4,
    "eval_images": 4,
    "checkpoint_interval": 4,
    "log_interval": 2,
    "num_workers": 0,
    "precision": "fp32",
}

# Overrides under which a tiny run detects something: every detection kept (an untrained tiny
# model scores below the shapes specs' 0.05), at most 30 an image, and the validation resize at
# 96 px, so that results are mapped back from another scale than 1.
RETINANET_DETECTS: dict[str, Any] = {
    "model.postprocess.score_threshold": 0.0,
    "model.postprocess.topk_per_level": 100,
    "model.postprocess.max_detections": 30,
    "val_transforms.min_size": [96],
    "val_transforms.max_size": 96,
}
MASK_RCNN_DETECTS: dict[str, Any] = {
    "model.roi_head.postprocess.score_threshold": 0.0,
    "model.roi_head.postprocess.max_detections": 30,
    "model.rpn.pre_nms_topk_test": 200,
    "model.rpn.post_nms_topk_test": 100,
    "val_transforms.min_size": [96],
    "val_transforms.max_size": 96,
}

MakeTinyRun = Callable[..., Path]


def tiny_set_args(cache: Path, extra: Mapping[str, Any] | None = None) -> list[str]:
    """``--set`` options for a tiny run whose shapes set is cached in ``cache``; ``extra``
    overrides or adds fields (spec paths to JSON-able values)."""
    sets = {**TINY_SETS, "data.cache_dir": str(cache), **(extra or {})}
    args = []
    for path, value in sets.items():
        args += ["--set", f"{path}={json.dumps(value)}"]
    return args


@pytest.fixture(scope="session")
def make_tiny_run(tmp_path_factory: pytest.TempPathFactory) -> MakeTinyRun:
    """``make_tiny_run(file, extra=None)``: the run folder of ``specs/shapes/<file>`` trained
    tiny (``extra``: more ``--set`` fields, e.g. ``{"ema": {...}}``), trained on first use
    and reused for the rest of the session."""
    root = tmp_path_factory.mktemp("tiny-runs")
    cache = root / "shapes-cache"
    runs: dict[str, Path] = {}

    def make(file: str, extra: Mapping[str, Any] | None = None) -> Path:
        key = file + json.dumps(dict(extra or {}), sort_keys=True)
        if key not in runs:
            out = root / f"{Path(file).stem}-{len(runs)}"
            args = ["train", str(SHAPES / file), "--out", str(out), "--no-progress"]
            assert main(args + tiny_set_args(cache, extra)) == 0, f"tiny run of {file} failed"
            runs[key] = out
        return runs[key]

    return make


@pytest.fixture(scope="session")
def tiny_run(make_tiny_run: MakeTinyRun) -> Path:
    """A tiny trained RetinaNet run folder (``specs/shapes/retinanet_r18_fpn.py``)."""
    return make_tiny_run("retinanet_r18_fpn.py")
