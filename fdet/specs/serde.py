"""Specs to JSON and back, with cattrs.

The JSON form is an envelope ``{"schema_version": 2, "spec": {...}}`` whose spec objects carry
their class name under ``"type"``; a field typed by an abstract base (``box_loss: BoxLoss``)
takes any imported concrete subclass by that tag. Reading is strict: an unknown or misspelled
key, a value of the wrong type, a missing required field or an impossible value is a
:class:`SpecError` whose path names the place (``head.num_clases``) and, for keys, lists the
allowed ones. Files of an older ``schema_version`` are migrated first (:mod:`fdet.specs.migrate`).
"""

from __future__ import annotations

import difflib
import json
import math
import types
import typing
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import attrs
import cattrs

from fdet.specs._core import Spec, SpecError, concrete_subclasses
from fdet.specs.migrate import SCHEMA_VERSION, migrate

S = TypeVar("S", bound=Spec)

_converter = cattrs.Converter()


# --- structure hooks: strict primitives ---------------------------------------------------------


def _describe(value: Any) -> str:
    kind = {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )
    return f"{kind} ({json.dumps(value)[:60]})" if not isinstance(value, dict) else kind


def _int(value: Any, _: type) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(f"expected an integer, got {_describe(value)}")
    return value


def _float(value: Any, _: type) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SpecError(f"expected a number, got {_describe(value)}")
    if not math.isfinite(value):  # Python's json reads Infinity and NaN; a spec never holds them
        raise SpecError(f"expected a finite number, got {value}")
    return float(value)


def _bool(value: Any, _: type) -> bool:
    if not isinstance(value, bool):
        raise SpecError(f"expected true or false, got {_describe(value)}")
    return value


def _str(value: Any, _: type) -> str:
    if not isinstance(value, str):
        raise SpecError(f"expected a string, got {_describe(value)}")
    return value


_converter.register_structure_hook(int, _int)
_converter.register_structure_hook(float, _float)
_converter.register_structure_hook(bool, _bool)
_converter.register_structure_hook(str, _str)


# --- structure hooks: containers, literals, unions, specs ---------------------------------------


def _is_tuple(t: Any) -> bool:
    return get_origin(t) is tuple


def _tuple_hook(t: Any) -> Any:
    args = get_args(t)
    variadic = len(args) == 2 and args[1] is Ellipsis

    def structure(value: Any, _: Any) -> tuple[Any, ...]:
        if not isinstance(value, (list, tuple)):
            raise SpecError(f"expected a list, got {_describe(value)}")
        if not variadic and len(value) != len(args):
            raise SpecError(f"expected a list of {len(args)} values, got {len(value)}")
        out = []
        for i, item in enumerate(value):
            try:
                out.append(_converter.structure(item, args[0] if variadic else args[i]))
            except SpecError as e:
                raise e.under(f"[{i}]") from None
        return tuple(out)

    return structure


def _is_literal(t: Any) -> bool:
    return get_origin(t) is Literal


def _literal_hook(t: Any) -> Any:
    allowed = get_args(t)

    def structure(value: Any, _: Any) -> Any:
        for a in allowed:
            if value == a and type(value) is type(a):
                return value
        raise SpecError(
            f"must be one of {', '.join(json.dumps(a) for a in allowed)}; got {_describe(value)}"
        )

    return structure


def _is_union(t: Any) -> bool:
    return get_origin(t) in (Union, types.UnionType)


def _union_hook(t: Any) -> Any:
    members = [m for m in get_args(t) if m is not type(None)]
    optional = len(members) < len(get_args(t))
    specs_only = all(isinstance(m, type) and issubclass(m, Spec) for m in members)

    def structure(value: Any, _: Any) -> Any:
        if value is None:
            if optional:
                return None
            raise SpecError("must not be null")
        if len(members) == 1:
            return _converter.structure(value, members[0])
        if specs_only:
            return _structure_tagged(value, tuple(members))
        errors = []
        for m in members:
            try:
                return _converter.structure(value, m)
            except SpecError as e:
                errors.append(e.message)
        raise SpecError(" or ".join(errors))

    return structure


def _is_spec(t: Any) -> bool:
    return isinstance(t, type) and issubclass(t, Spec) and attrs.has(t)


def _is_spec_base(t: Any) -> bool:
    """An abstract spec base (``BoxLoss``): any concrete subclass, chosen by ``"type"``."""
    return isinstance(t, type) and issubclass(t, Spec) and not attrs.has(t)


_FIELDS: dict[type, tuple[attrs.Attribute, ...]] = {}


def _fields(cls: type) -> tuple[attrs.Attribute, ...]:
    """The attrs fields of a spec class, with string annotations resolved (cached)."""
    if cls not in _FIELDS:
        attrs.resolve_types(cls)
        _FIELDS[cls] = tuple(attrs.fields(cls))
    return _FIELDS[cls]


def _choices(allowed: tuple[type, ...]) -> str:
    if Spec in allowed:
        return "a spec class name (see fdet.specs.spec_types())"
    names = ", ".join(sorted(concrete_subclasses(allowed)))
    return names or f"no {' or '.join(c.__name__ for c in allowed)} class is imported"


def _structure_tagged(value: Any, allowed: tuple[type, ...]) -> Spec:
    """A spec object whose class is named by its ``"type"`` key: a concrete subclass of one of
    ``allowed`` (fdet's, or one of your own that has been imported)."""
    if not isinstance(value, dict):
        raise SpecError(f"expected an object, got {_describe(value)}")
    tag = value.get("type")
    if tag is None:
        raise SpecError(f'needs a "type" key, one of: {_choices(allowed)}')
    cls = concrete_subclasses(allowed).get(tag) if isinstance(tag, str) else None
    if cls is None:
        raise SpecError(
            f"unknown type {json.dumps(tag)}; expected one of: {_choices(allowed)} (a spec class "
            f"of your own must be imported first: fdet's commands take --import MODULE)",
            "type",
        )
    return _structure_spec(value, cls)


def _structure_spec(value: Any, cls: type[S]) -> S:
    if not isinstance(value, dict):
        raise SpecError(f"expected an object ({cls.__name__}), got {_describe(value)}")
    tag = value.get("type", cls.__name__)
    if tag != cls.__name__:
        return typing.cast(S, _structure_tagged(value, (cls,)))
    fields = _fields(cls)
    names = [f.name for f in fields]
    for key in value:
        if key != "type" and key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise SpecError(
                f"unknown key in {cls.__name__}; {hint}allowed keys: {', '.join(names)}",
                str(key),
            )
    kwargs: dict[str, Any] = {}
    for f in fields:
        if f.name not in value:
            if f.default is attrs.NOTHING:
                raise SpecError(f"missing required field of {cls.__name__}", f.name)
            continue
        try:
            kwargs[f.name] = _converter.structure(value[f.name], typing.cast(type, f.type))
        except SpecError as e:
            raise e.under(f.name) from None
    try:
        return cls(**kwargs)
    except SpecError:
        raise
    except (TypeError, ValueError) as e:
        raise SpecError(f"{cls.__name__}: {e}") from None


_converter.register_structure_hook_factory(_is_tuple, _tuple_hook)
_converter.register_structure_hook_factory(_is_literal, _literal_hook)
_converter.register_structure_hook_factory(_is_union, _union_hook)
_converter.register_structure_hook_factory(
    _is_spec, lambda cls: lambda value, _: _structure_spec(value, cls)
)
_converter.register_structure_hook_factory(
    _is_spec_base, lambda cls: lambda value, _: _structure_tagged(value, (cls,))
)


# --- unstructure ----------------------------------------------------------------------------------


def _unstructure_spec(spec: Spec) -> dict[str, Any]:
    out: dict[str, Any] = {"type": type(spec).__name__}
    for f in _fields(type(spec)):
        out[f.name] = _converter.unstructure(getattr(spec, f.name))
    return out


_converter.register_unstructure_hook_func(
    lambda t: isinstance(t, type) and issubclass(t, Spec), _unstructure_spec
)
_converter.register_unstructure_hook(tuple, lambda v: [_converter.unstructure(x) for x in v])


# --- public API -----------------------------------------------------------------------------------


def to_dict(spec: Spec) -> dict[str, Any]:
    """The JSON-ready envelope ``{"schema_version": …, "spec": {"type": …, …}}``."""
    if not isinstance(spec, Spec):
        raise TypeError(f"expected a spec (an fdet.specs class), got {type(spec).__name__}")
    return {"schema_version": SCHEMA_VERSION, "spec": _converter.unstructure(spec)}


def to_json(spec: Spec, *, indent: int | None = 2) -> str:
    """The spec as JSON text; ``from_json(to_json(s)) == s``."""
    try:
        return json.dumps(to_dict(spec), indent=indent, allow_nan=False)
    except ValueError as e:  # NaN or inf somewhere
        raise SpecError(f"cannot be written as JSON: {e}") from None


def from_dict(data: Any, expected: type[S] | None = None, *, source: str = "") -> S:
    """Read an envelope made by :func:`to_dict` (by this fdet, or by an older one: its spec is
    migrated to :data:`SCHEMA_VERSION` first); ``expected`` checks the root spec's class."""
    where = f"{source}: " if source else ""
    if not isinstance(data, dict):
        raise SpecError(f"{where}expected a JSON object at the top, got {_describe(data)}")
    unknown = sorted(set(data) - {"schema_version", "spec"})
    if unknown:
        raise SpecError(
            f"{where}unknown top-level key {unknown[0]!r}; allowed keys: schema_version, spec"
        )
    version = data.get("schema_version")
    if version is None:
        raise SpecError(f'{where}missing "schema_version" (this fdet writes {SCHEMA_VERSION})')
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise SpecError(f"{where}schema_version must be a positive integer, got {version!r}")
    if version > SCHEMA_VERSION:
        raise SpecError(
            f"{where}schema_version {version} was written by a newer fdet; "
            f"this one reads up to {SCHEMA_VERSION}"
        )
    if "spec" not in data:
        raise SpecError(f'{where}missing "spec"')
    try:
        tree = migrate(data["spec"], version)
    except SpecError as e:
        raise SpecError(f"{e.message} (schema_version {version})", e.path, source=source) from None
    try:
        spec = _structure_tagged(tree, (expected or Spec,))
    except SpecError as e:
        note = "" if version == SCHEMA_VERSION else f" (read as schema_version {SCHEMA_VERSION})"
        raise SpecError(e.message + note, e.path, source=source) from None
    return typing.cast(S, spec)


def from_json(text: str, expected: type[S] | None = None, *, source: str = "") -> S:
    """Parse JSON written by :func:`to_json`. Errors name the path of the bad value."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        where = f"{source}: " if source else ""
        raise SpecError(
            f"{where}invalid JSON at line {e.lineno} column {e.colno}: {e.msg}"
        ) from None
    return from_dict(data, expected, source=source)


def format_tree(spec: Spec, *, indent: str = "  ") -> str:
    """An indented, human-readable view of a spec tree (one field a line)."""
    lines: list[str] = []

    def walk(node: Spec, depth: int) -> None:
        for f in _fields(type(node)):
            value = getattr(node, f.name)
            pad = indent * depth
            if isinstance(value, Spec):
                lines.append(f"{pad}{f.name}: {type(value).__name__}")
                walk(value, depth + 1)
            else:
                lines.append(f"{pad}{f.name}: {value!r}")

    lines.append(type(spec).__name__)
    walk(spec, 1)
    return "\n".join(lines)
