"""Which category of a data set each of a model's labels stands for, matched by name.

A model predicts contiguous labels ``0..K-1``: label ``k`` is the ``k``-th category, by sorted
id, of the data it was trained on. Another data set may number the same categories otherwise
(or hold other categories under the same count), so evaluation maps labels to its category ids
through the class *names*, and refuses data whose names differ from the model's.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fdet import specs
from fdet.data.coco import DataError

__all__ = ["category_ids_by_name", "run_class_names"]


def _names_from_annotations(path: str | Path) -> tuple[str, ...] | None:
    """Category names of a COCO annotation file in label order (sorted by id); None when the
    file cannot be read or holds no usable categories."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        categories = data["categories"]
        pairs = sorted((int(c["id"]), str(c.get("name", c["id"]))) for c in categories)
    except (OSError, ValueError, TypeError, KeyError):
        return None
    return tuple(name for _, name in pairs) or None


def run_class_names(
    exp: specs.Experiment, checkpoint: Mapping[str, Any] | None = None
) -> tuple[str, ...] | None:
    """The class names of a trained run, in label order, or None when they cannot be told.

    Taken from the checkpoint's ``"class_names"`` when it records them; otherwise from the
    experiment's data: fdet's shapes set has fixed categories
    (:data:`fdet.data.shapes.CATEGORIES`), a COCO-format set's names are read from its
    validation annotation file (whose category ids training checks to equal the training
    set's). Names whose count differs from the model's ``num_classes`` are not trusted (None).
    """
    names: tuple[str, ...] | None = None
    recorded = checkpoint.get("class_names") if checkpoint is not None else None
    if isinstance(recorded, (list, tuple)) and all(isinstance(n, str) for n in recorded):
        names = tuple(recorded)
    elif isinstance(exp.data, specs.ShapesData):
        from fdet.data.shapes import CATEGORIES

        names = CATEGORIES
    elif isinstance(exp.data, specs.CocoData):
        names = _names_from_annotations(exp.data.val_annotations)
    num_classes = getattr(exp.model, "num_classes", None)
    if names is not None and num_classes is not None and len(names) != num_classes:
        return None
    return names


def _listing(names: Sequence[str]) -> str:
    return "[" + ", ".join(names) + "]"


def category_ids_by_name(
    class_names: Sequence[str],
    category_names: Sequence[str],
    category_ids: Sequence[int],
    *,
    source: str = "data",
) -> tuple[int, ...]:
    """The category id of each model label: ``class_names[k]`` (the model's label ``k``) is
    looked up among the data's ``category_names`` (with their ``category_ids``).

    Raises :class:`~fdet.data.coco.DataError`, naming ``source`` and listing both sets of
    names, unless the two hold the same names, each once.
    """
    problems = []
    for who, names in (
        ("the model's classes", class_names),
        ("the data's categories", category_names),
    ):
        repeated = sorted({n for n in names if list(names).count(n) > 1})
        if repeated:
            problems.append(f"{who} repeat {', '.join(map(repr, repeated))}")
    missing = [n for n in class_names if n not in category_names]
    extra = [n for n in category_names if n not in class_names]
    if missing:
        problems.append(f"missing from the data: {', '.join(missing)}")
    if extra:
        problems.append(f"not classes of the model: {', '.join(extra)}")
    if problems:
        raise DataError(
            f"{source}: the categories do not match the model's classes by name "
            f"({'; '.join(problems)}); the model has {_listing(class_names)}, "
            f"the data has {_listing(category_names)}"
        )
    by_name = dict(zip(category_names, category_ids))
    return tuple(int(by_name[name]) for name in class_names)
