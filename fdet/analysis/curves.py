"""Training curves from the ``log.jsonl`` of runs: loss terms, learning rate, validation metrics.

A run's ``log.jsonl`` (written by :class:`fdet.train.hooks.Logs`) holds one JSON object a line,
each with an ``iteration``. Training lines carry the window's mean of every loss term (``loss``
and the detector's named terms, with their ``*_count`` normalizers), ``lr``, ``it_per_s``,
``elapsed_s`` and ``data_wait_ms``; evaluation lines carry ``eval`` (COCO metrics, per-class AP,
``segm`` for masks, ``val_*`` losses) and, with an EMA, ``eval_ema``.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import attrs
import numpy as np

__all__ = [
    "LogError",
    "RunCurves",
    "Series",
    "plot_training_curves",
    "read_log",
    "run_curves",
    "training_curves",
]

LOG_NAME = "log.jsonl"
# training-line values that are not losses
_NOT_LOSSES = frozenset({"lr", "it_per_s", "elapsed_s", "data_wait_ms"})
_EVAL_KEYS = ("eval", "eval_ema")


class LogError(ValueError):
    """A line of a log that is not a JSON object with an integer ``iteration``."""


def _log_path(run: str | Path) -> Path:
    path = Path(run)
    return path / LOG_NAME if path.is_dir() else path


def read_log(
    path: str | Path, *, on_error: Literal["raise", "skip"] = "raise"
) -> list[dict[str, Any]]:
    """The records of a ``log.jsonl`` (or of the one in the run folder ``path``), in file order.

    Blank lines are ignored. A line that is not a JSON object with an integer ``iteration``
    raises :class:`LogError` naming the file and line number; with ``on_error="skip"`` such
    lines are left out instead and one ``UserWarning`` says how many and which (a run killed
    mid-write can leave a truncated last line).
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f'on_error: must be "raise" or "skip", got {on_error!r}')
    file = _log_path(path)
    if not file.is_file():
        raise FileNotFoundError(f"no training log at {file}")
    records: list[dict[str, Any]] = []
    skipped: list[int] = []
    with open(file, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            problem = None
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                problem = f"not JSON ({e.msg} at column {e.colno})"
            else:
                if not isinstance(record, dict):
                    problem = f"a JSON {type(record).__name__}, not an object"
                elif not isinstance(record.get("iteration"), int) or isinstance(
                    record.get("iteration"), bool
                ):
                    problem = f"no integer 'iteration' (got {record.get('iteration')!r})"
            if problem is None:
                records.append(record)
            elif on_error == "skip":
                skipped.append(number)
            else:
                raise LogError(f"{file}, line {number}: {problem}")
    if skipped:
        shown = ", ".join(map(str, skipped[:10])) + (" …" if len(skipped) > 10 else "")
        warnings.warn(
            f"{file}: skipped {len(skipped)} malformed line(s): {shown}", UserWarning, stacklevel=2
        )
    return records


class Series(NamedTuple):
    """One curve: ``values[i]`` logged at ``iterations[i]`` (float64; NaN where COCO reports
    -1, "no ground truth in this range")."""

    iterations: np.ndarray
    values: np.ndarray


@attrs.frozen(kw_only=True)
class RunCurves:
    """The curves of one run, keyed by name.

    - ``losses``: each loss term of the training lines (``loss`` is the weighted total);
    - ``lr``: the learning rate of the first parameter group;
    - ``train``: every other number on training lines (``it_per_s``, ``*_count`` …);
    - ``eval``: every number on evaluation lines, nested keys joined by ``/``:
      ``eval/AP``, ``eval/segm/AP50``, ``eval/per_class_ap/cat``, ``eval/val_loss``,
      ``eval_ema/AP`` ….
    """

    label: str
    path: Path
    losses: dict[str, Series]
    lr: Series
    train: dict[str, Series]
    eval: dict[str, Series]


def _flatten(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in record.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}/"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _collect(points: dict[str, list[tuple[int, float]]]) -> dict[str, Series]:
    out = {}
    for name, pairs in points.items():
        its, vals = zip(*pairs)
        out[name] = Series(np.asarray(its, dtype=np.int64), np.asarray(vals, dtype=np.float64))
    return out


def run_curves(run: str | Path, label: str | None = None) -> RunCurves:
    """The :class:`RunCurves` of one run folder (or ``log.jsonl`` file)."""
    file = _log_path(run)
    train: dict[str, list[tuple[int, float]]] = {}
    evals: dict[str, list[tuple[int, float]]] = {}
    for record in read_log(file):
        it = record["iteration"]
        is_eval = any(k in record for k in _EVAL_KEYS)
        source = {k: v for k, v in record.items() if k in _EVAL_KEYS} if is_eval else record
        target = evals if is_eval else train
        for name, value in _flatten(source).items():
            number = _number(value)
            if name == "iteration" or number is None:
                continue
            if is_eval and number == -1.0:
                number = math.nan
            target.setdefault(name, []).append((it, number))
    series = _collect(train)
    losses = {k: v for k, v in series.items() if k not in _NOT_LOSSES and not k.endswith("_count")}
    empty = Series(np.zeros(0, dtype=np.int64), np.zeros(0))
    return RunCurves(
        label=label if label is not None else (file.parent.name or str(file)),
        path=file,
        losses=losses,
        lr=series.get("lr", empty),
        train={k: v for k, v in series.items() if k not in losses and k != "lr"},
        eval=_collect(evals),
    )


def _labels(runs: Sequence[str | Path], labels: Sequence[str] | None) -> list[str]:
    if labels is not None:
        if len(labels) != len(runs):
            raise ValueError(f"labels: got {len(labels)} for {len(runs)} runs")
        names = list(labels)
    else:
        names = [_log_path(r).parent.name or str(r) for r in runs]
    seen: dict[str, int] = {}
    unique = []
    for name in names:  # the same folder name twice: number the later ones
        seen[name] = seen.get(name, 0) + 1
        unique.append(name if seen[name] == 1 else f"{name} ({seen[name]})")
    return unique


def training_curves(
    runs: Sequence[str | Path], labels: Sequence[str] | None = None
) -> dict[str, RunCurves]:
    """The curves of several runs (folders or ``log.jsonl`` files), keyed by label: ``labels``,
    else each run folder's name (numbered where two are the same). See :class:`RunCurves`."""
    if isinstance(runs, (str, Path)):
        runs = [runs]
    return {
        name: run_curves(run, name) for name, run in zip(_labels(runs, labels), runs, strict=True)
    }


_EVAL_PLOTS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def plot_training_curves(
    runs: Sequence[str | Path], out_dir: str | Path, labels: Sequence[str] | None = None
) -> list[Path]:
    """Overlay the curves of ``runs`` (one colour a run) in PNGs under ``out_dir``; returns
    the paths written, of ``losses.png`` (one panel a loss term), ``lr.png``,
    ``eval_bbox.png`` / ``eval_segm.png`` (COCO AP, AP50 … against iteration, where some run
    evaluated boxes / masks) and ``val_losses.png`` (where some run logged validation losses).
    A run without a given curve is absent from its panel; a curve no run has a finite value
    of (``APl`` on a set without large objects) gets no panel."""
    from matplotlib.figure import Figure

    curves = training_curves(runs, labels)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []

    def panels(name: str, keys: list[str], pick: Any, ylabel: str, log_y: bool = False) -> None:
        def finite(key: str) -> bool:  # a panel with nothing to draw (APl: -1 throughout) goes
            found = (pick(run, key) for run in curves.values())
            return any(s is not None and np.isfinite(s.values).any() for s in found)

        keys = [k for k in keys if finite(k)]
        if not keys:
            return
        cols = min(3, len(keys))
        rows = -(-len(keys) // cols)
        fig = Figure(figsize=(4.5 * cols, 3.2 * rows))
        axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
        for ax, key in zip(axes, keys):
            for index, run in enumerate(curves.values()):
                s = pick(run, key)
                if s is not None and len(s.iterations):
                    ax.plot(
                        s.iterations,
                        s.values,
                        color=f"C{index % 10}",
                        marker="." if len(s.iterations) < 30 else None,
                        label=run.label,
                    )
            ax.set_title(key)
            ax.set_xlabel("iteration")
            ax.set_ylabel(ylabel)
            if log_y:
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
        for ax in axes[len(keys) :]:
            ax.set_visible(False)
        axes[0].legend(fontsize=8)
        fig.tight_layout()
        path = out / name
        fig.savefig(path, dpi=100)
        paths.append(path)

    def union(names: Any) -> list[str]:
        keys: list[str] = []
        for run in curves.values():
            keys += [k for k in names(run) if k not in keys]
        return keys

    loss_keys = union(lambda r: r.losses)
    loss_keys.sort(key=lambda k: (k != "loss", k))
    panels("losses.png", loss_keys, lambda r, k: r.losses.get(k), "loss")
    panels("lr.png", ["lr"] if any(len(r.lr.iterations) for r in curves.values()) else [],
           lambda r, k: r.lr, "learning rate")  # fmt: skip
    evals = union(lambda r: r.eval)
    for kind, prefix in (("bbox", "eval/"), ("segm", "eval/segm/")):
        keys = [f"{prefix}{m}" for m in _EVAL_PLOTS if f"{prefix}{m}" in evals]
        panels(f"eval_{kind}.png", keys, lambda r, k: r.eval.get(k), "COCO metric")
    val = [k for k in evals if k.startswith("eval/val_")]
    panels("val_losses.png", val, lambda r, k: r.eval.get(k), "validation loss")
    return paths
