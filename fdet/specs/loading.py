"""Loading spec files: plain Python modules with module-level constants, or JSON."""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import attrs

from fdet.specs._core import Spec, SpecError, spec_types
from fdet.specs.serde import from_json

S = TypeVar("S", bound=Spec)

DEFAULT_NAMES = ("EXPERIMENT", "MODEL", "TTA")
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
    except Exception as e:
        del sys.modules[name]
        located = _file_error(e, path)
        if located is e:
            raise
        raise located from e
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _shown(filename: str | Path) -> str:
    """A file name as people read it: relative to the current folder when inside it."""
    path = Path(filename)
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except (ValueError, OSError):
        return str(path)


_UNEXPECTED = re.compile(r"^(\w+)\.__init__\(\) got an unexpected keyword argument '(\w+)'")
_MISSING = re.compile(r"^(\w+)\.__init__\(\) missing \d+ required keyword-only arguments?: (.+)$")


def _describe(error: Exception) -> str:
    """What went wrong, in the words of the spec classes where it is about one."""
    text = str(error)
    if isinstance(error, FileNotFoundError):  # "spec file not found: ..." says it all
        return text
    if isinstance(error, TypeError):
        unexpected, missing = _UNEXPECTED.match(text), _MISSING.match(text)
        found = unexpected or missing
        cls = spec_types().get(found.group(1)) if found is not None else None
        if cls is not None and unexpected is not None:
            keyword = unexpected.group(2)
            fields = [f.name for f in attrs.fields(typing.cast(Any, cls))]
            close = difflib.get_close_matches(keyword, fields, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            return (
                f"unknown keyword {keyword!r} for {cls.__name__}; {hint}"
                f"allowed keywords: {', '.join(fields)}"
            )
        if cls is not None and missing is not None:
            return f"{cls.__name__} needs {missing.group(2)}"
    return f"{type(error).__name__}: {text}"


def _file_error(error: Exception, path: Path) -> Exception:
    """The error of running a spec file, as a :class:`SpecError` naming the file and line.

    A ``SpecError`` that already names its file (one from a spec file this one loads) stays
    as it is."""
    if isinstance(error, SpecError) and error.source:
        return error
    if isinstance(error, SyntaxError):
        where = f"{_shown(error.filename or path)}:{error.lineno}"
        code = f": {error.text.strip()}" if error.text and error.text.strip() else ""
        return SpecError(f"syntax error: {error.msg}{code}", source=where)
    line = None
    tb = error.__traceback__
    while tb is not None:  # the innermost line of this file that the error passed through
        if Path(tb.tb_frame.f_code.co_filename) == path:
            line = tb.tb_lineno
        tb = tb.tb_next
    where = _shown(path) if line is None else f"{_shown(path)}:{line}"
    if isinstance(error, SpecError):
        return SpecError(error.message, error.path, source=where)
    return SpecError(_describe(error), source=where)


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
