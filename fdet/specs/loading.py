"""Loading spec files: plain Python modules with module-level constants, or JSON."""

from __future__ import annotations

import hashlib
import importlib.util
import sys
import types
from pathlib import Path
from typing import TypeVar

from fdet.specs._core import Spec, SpecError
from fdet.specs.serde import from_json

S = TypeVar("S", bound=Spec)

DEFAULT_NAMES = ("EXPERIMENT", "MODEL")
"""Constants looked up, in order, when :func:`load` is not told which one to take."""


def load_module(path: str | Path) -> types.ModuleType:
    """Import a Python spec file by path (spec files need not be on ``sys.path``).

    Derived spec files use it to import their base::

        BASE = load_module(Path(__file__).with_name("r50_fpn_1x_coco.py"))
        MODEL = attrs.evolve(BASE.MODEL, backbone=attrs.evolve(BASE.MODEL.backbone, depth=101))
    """
    path = Path(path).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"spec file not found: {path}")
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:12]
    name = f"fdet_specfile_{path.stem}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise SpecError(f"cannot import {path} as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def load(path: str | Path, expected: type[S] | None = None, *, name: str | None = None) -> S:
    """The spec in a ``.py`` spec file (its constant ``name``, else the first of
    :data:`DEFAULT_NAMES` it defines) or in a ``.json`` file written by ``to_json``."""
    path = Path(path)
    if path.suffix == ".json":
        if not path.is_file():
            raise FileNotFoundError(f"spec file not found: {path}")
        spec: Spec = from_json(path.read_text(encoding="utf-8"), expected, source=str(path))
    elif path.suffix == ".py":
        module = load_module(path)
        names = (name,) if name else DEFAULT_NAMES
        found = [n for n in names if hasattr(module, n)]
        if not found:
            consts = [k for k, v in vars(module).items() if isinstance(v, Spec)]
            raise SpecError(
                f"defines none of {', '.join(names)}"
                + (f"; its spec constants are: {', '.join(consts)}" if consts else ""),
                source=str(path),
            )
        spec = getattr(module, found[0])
        if not isinstance(spec, Spec):
            raise SpecError(f"{found[0]} is a {type(spec).__name__}, not a spec", source=str(path))
    else:
        raise SpecError(
            f"unknown spec file type {path.suffix!r}: use .py or .json", source=str(path)
        )
    if expected is not None and not isinstance(spec, expected):
        raise SpecError(
            f"holds a {type(spec).__name__}, expected a {expected.__name__}", source=str(path)
        )
    return spec  # type: ignore[return-value]
