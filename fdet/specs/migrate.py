"""Reading spec JSON written by an older fdet: one function a schema-version step.

:func:`fdet.specs.from_dict` checks the envelope's ``schema_version`` and passes its ``"spec"``
tree through :data:`MIGRATIONS` (``MIGRATIONS[v]`` turns a version-``v`` tree into a
version-``v + 1`` tree) up to :data:`SCHEMA_VERSION`, then reads it as usual. A step walks the
tree by the ``"type"`` tags of its objects and rewrites the objects of the classes that changed,
on a copy: plain JSON in, plain JSON out, no spec classes involved.

Version history:

1. The first layout.
2. Open extension points: ``Schedule`` holds a ``warmup`` spec (``LinearWarmup``,
   ``ConstantWarmup`` or null) and a ``decay`` spec (``StepDecay``, ``CosineDecay``,
   ``PolyDecay``, ``ConstantDecay``) instead of ``kind``/``warmup`` strings; ``ResNet.norm``,
   ``FPN.norm`` and ``RetinaHead.norm`` are norm specs (``FrozenBatchNorm``, ``BatchNorm``,
   ``GroupNorm(groups)``, or null for none) instead of strings with ``gn_groups``; fields typed
   by an abstract base (``Experiment.model``, ``RetinaNet.cls_loss``) need their ``"type"``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

from fdet.specs._core import SpecError

SCHEMA_VERSION = 2
"""Version of the JSON layout this fdet writes. Older versions are migrated when read; newer
ones are refused with a clear message."""

Tree = Any  # JSON values: dict, list, str, int, float, bool, None
Rule = Callable[[dict[str, Any], str], dict[str, Any]]


def migrate(tree: Tree, version: int) -> Tree:
    """The spec tree of a ``version`` envelope in the layout of :data:`SCHEMA_VERSION` (a copy;
    ``tree`` is left as it is). Errors name the path of the value that cannot be migrated."""
    for step in range(version, SCHEMA_VERSION):
        tree = MIGRATIONS[step](tree)
    return tree


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _rewrite(
    node: Tree,
    rules: Mapping[str, Rule],
    implied: Mapping[tuple[str, str], str],
    path: str = "",
    tag: str | None = None,
) -> Tree:
    """``node`` with every object rewritten bottom-up by the rule of its ``"type"`` (or of
    ``tag``, the type its field implies when the object has none)."""
    if isinstance(node, list):
        return [_rewrite(x, rules, implied, f"{path}[{i}]") for i, x in enumerate(node)]
    if not isinstance(node, dict):
        return node
    own = node.get("type", tag)
    out: dict[str, Any] = {} if "type" in node or tag is None else {"type": tag}
    for key, value in node.items():
        child = implied.get((own, key)) if isinstance(own, str) else None
        out[key] = _rewrite(value, rules, implied, _join(path, key), child)
    rule = rules.get(own) if isinstance(own, str) else None
    return rule(out, path) if rule is not None else out


def _pick(value: Any, choices: Mapping[str, Any], path: str) -> Any:
    if isinstance(value, str) and value in choices:
        return choices[value]
    allowed = ", ".join(json.dumps(c) for c in choices)
    raise SpecError(f"must be one of {allowed}; got {json.dumps(value)}", path)


# --- 1 → 2 ---------------------------------------------------------------------------------------

# Version 1 fields whose class was fixed, so their objects could leave out "type".
_V1_IMPLIED = {
    ("Experiment", "model"): "RetinaNet",
    ("Experiment", "schedule"): "Schedule",
    ("RetinaNet", "backbone"): "ResNet",
    ("RetinaNet", "neck"): "FPN",
    ("RetinaNet", "head"): "RetinaHead",
    ("RetinaNet", "cls_loss"): "SigmoidFocalLoss",
}


def _v1_schedule(node: dict[str, Any], path: str) -> dict[str, Any]:
    old = dict(node)
    kind = old.pop("kind", "step")
    warmup = old.pop("warmup", "linear")
    iters = old.pop("warmup_iters", 500)
    factor = old.pop("warmup_factor", 0.001)
    milestones = old.pop("milestones", [8 / 12, 11 / 12])
    gamma = old.pop("gamma", 0.1)
    min_factor = old.pop("min_factor", 0.0)
    power = old.pop("power", 1.0)
    decays = {
        "step": {"type": "StepDecay", "milestones": milestones, "gamma": gamma},
        "cosine": {"type": "CosineDecay", "min_factor": min_factor},
        "poly": {"type": "PolyDecay", "power": power, "min_factor": min_factor},
        "flat": {"type": "ConstantDecay"},
    }
    warmups = {
        "linear": {"type": "LinearWarmup", "iters": iters, "factor": factor},
        "constant": {"type": "ConstantWarmup", "iters": iters, "factor": factor},
        "none": None,
    }
    return {
        **old,
        "warmup": _pick(warmup, warmups, _join(path, "warmup")),
        "decay": _pick(kind, decays, _join(path, "kind")),
    }


# Version 1 norm strings allowed by each class, and their version 2 specs (gn: group norm with
# the class's gn_groups, or 32 groups for FPN, which had no gn_groups field).
_V1_NORMS = {
    "ResNet": ("frozen_bn", ("frozen_bn", "bn", "gn")),
    "FPN": ("none", ("none", "bn", "gn")),
    "RetinaHead": ("none", ("none", "gn")),
}


def _v1_norm(node: dict[str, Any], path: str) -> dict[str, Any]:
    old = dict(node)
    default, allowed = _V1_NORMS[node["type"]]
    kind = old.pop("norm", default)
    groups = 32 if node["type"] == "FPN" else old.pop("gn_groups", 32)
    norms: dict[str, Any] = {
        "none": None,
        "frozen_bn": {"type": "FrozenBatchNorm"},
        "bn": {"type": "BatchNorm"},
        "gn": {"type": "GroupNorm", "groups": groups},
    }
    old["norm"] = _pick(kind, {k: norms[k] for k in allowed}, _join(path, "norm"))
    return old


_V1_RULES: dict[str, Rule] = {
    "Schedule": _v1_schedule,
    "ResNet": _v1_norm,
    "FPN": _v1_norm,
    "RetinaHead": _v1_norm,
}


def v1_to_v2(tree: Tree) -> Tree:
    """Version 1 → 2: schedules and norms as specs (see the module's version history)."""
    return _rewrite(tree, _V1_RULES, _V1_IMPLIED)


MIGRATIONS: dict[int, Callable[[Tree], Tree]] = {1: v1_to_v2}
"""``MIGRATIONS[v]``: a version-``v`` spec tree to version ``v + 1``."""
