"""Command-line edits of a spec: ``--set optimizer.lr=0.02 --set ema='{"decay": 0.999}'``.

Each override is ``PATH=VALUE``. ``PATH`` names a field through the spec tree with dots
(``model.head.num_classes``). ``VALUE`` is read as JSON when it parses (``0.01``, ``true``,
``null``, ``[0.5, 0.8]``, ``{"decay": 0.999}``) and as a plain string otherwise, so
``precision=bf16`` works; a string that would parse as JSON is quoted (``name='"true"'``).

The edits are made on the spec's JSON form (:func:`fdet.specs.to_dict`), which is then read back
with :func:`fdet.specs.from_dict`: every check a spec file gets (types, unknown keys, ranges,
rules across fields) applies to the result, with errors that name the path. All overrides are
applied before that check, so their order never matters to rules across fields
(``batch_size=6`` and ``accumulate=3`` in either order).

An object value replaces the whole object: fields it leaves out take their defaults. When the
field can hold several spec types (``optimizer``: any :class:`~fdet.specs.Optimizer`, such as
SGD or AdamW) and the object has no ``"type"``, the current type is kept;
``optimizer={"type": "AdamW"}`` switches type, to any class of the field's base that has been
imported, yours included (``schedule.decay={"type": "MyDecay", "rate": 2}``). A path through a
null field (``ema.decay`` while ``ema`` is null) is an error: set the whole object first
(``ema={"decay": 0.99}``).
"""

from __future__ import annotations

import difflib
import json
import math
import types
from collections.abc import Sequence
from typing import Any, TypeVar, Union, get_args, get_origin

import attrs

from fdet.specs._core import Spec, SpecError, concrete_subclasses
from fdet.specs.serde import from_dict, to_dict

S = TypeVar("S", bound=Spec)

_MISSING = object()


def parse_override(item: str) -> tuple[str, Any]:
    """``"PATH=VALUE"`` → ``(PATH, value)``: the value parsed as JSON, or the raw string."""
    path, sep, raw = item.partition("=")
    path = path.strip()
    if not sep or not path:
        raise SpecError(f"override {item!r} is not PATH=VALUE (e.g. optimizer.lr=0.01)")
    if any(not segment.strip() for segment in path.split(".")):
        raise SpecError(f"override {item!r} has an empty segment in its path", path)
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    bad = _non_finite(value)
    if bad is not None:
        where, number = bad
        raise SpecError(
            f"{number} is not a finite number (in {item!r}); spec numbers must be finite",
            path + where,
        )
    return path, value


def _non_finite(value: Any, where: str = "") -> tuple[str, float] | None:
    """The place and value of the first infinite or NaN number in a parsed JSON value (Python's
    json reads ``Infinity``, ``NaN`` and overflowing literals such as ``1e999``)."""
    if isinstance(value, float) and not math.isfinite(value):
        return where, value
    if isinstance(value, list):
        items = ((f"[{i}]", v) for i, v in enumerate(value))
    elif isinstance(value, dict):
        items = ((f".{k}", v) for k, v in value.items())
    else:
        return None
    for key, item in items:
        found = _non_finite(item, where + key)
        if found is not None:
            return found
    return None


def apply_overrides(spec: S, overrides: Sequence[str]) -> S:
    """``spec`` with every ``PATH=VALUE`` of ``overrides`` applied, validated as a whole.

    Raises :class:`fdet.specs.SpecError` naming the path for a malformed item, an unknown key
    (with the keys allowed there), a path through a null field, or a value the spec rejects.
    """
    if isinstance(overrides, str):
        raise TypeError("overrides must be a sequence of 'PATH=VALUE' strings, not one string")
    if not overrides:
        return spec
    envelope = to_dict(spec)
    parsed = [(item, *parse_override(item)) for item in overrides]
    for _, path, value in parsed:
        _assign(envelope["spec"], type(spec), [s.strip() for s in path.split(".")], value)
    try:
        return from_dict(envelope, type(spec))
    except SpecError as e:
        culprits = [item for item, path, _ in parsed if _related(path, e.path)]
        suffix = f" (set by {', '.join(map(repr, culprits))})" if culprits else ""
        raise SpecError(e.message + suffix, e.path) from None


def _related(override_path: str, error_path: str) -> bool:
    """Whether an override at ``override_path`` touches the value at ``error_path``."""
    if not error_path:
        return False
    for outer, inner in ((override_path, error_path), (error_path, override_path)):
        if inner == outer or inner.startswith((outer + ".", outer + "[")):
            return True
    return False


def _spec_classes(annotation: Any) -> tuple[type[Spec], ...]:
    """The spec classes a field's annotation admits (``Optimizer``, ``EMA | None``)."""
    if get_origin(annotation) in (Union, types.UnionType):
        return tuple(c for a in get_args(annotation) for c in _spec_classes(a))
    if isinstance(annotation, type) and issubclass(annotation, Spec):
        return (annotation,)
    return ()


def _fields(cls: type) -> dict[str, attrs.Attribute]:
    attrs.resolve_types(cls)
    return {f.name: f for f in attrs.fields(cls)}


def _names(allowed: tuple[type[Spec], ...]) -> str:
    return ", ".join(sorted(concrete_subclasses(allowed))) or "none known"


def _node_class(node: dict[str, Any], allowed: tuple[type[Spec], ...], where: str) -> type:
    """The spec class of a JSON object found where ``allowed`` classes (or their subclasses)
    may stand."""
    tag = node.get("type")
    if tag is None:
        if len(allowed) == 1 and attrs.has(allowed[0]):
            return allowed[0]
        raise SpecError(f'needs a "type" key, one of: {_names(allowed)}', where)
    cls = concrete_subclasses(allowed).get(tag) if isinstance(tag, str) else None
    if cls is None:
        raise SpecError(
            f"unknown type {json.dumps(tag)}; expected one of: {_names(allowed)}", where
        )
    return cls


def _default_json(field: attrs.Attribute) -> Any:
    """The JSON form of a field's default (for a path into a field an earlier override left
    out of an object); ``{}`` for a required field."""
    default = field.default
    if default is attrs.NOTHING:
        return {}
    factory = getattr(default, "factory", None)  # an attrs.Factory
    if callable(factory):
        if getattr(default, "takes_self", False):
            return {}
        default = factory()
    return to_dict(default)["spec"] if isinstance(default, Spec) else default


def _nested(segments: Sequence[str], value: Any) -> dict[str, Any]:
    out: Any = value
    for segment in reversed(segments):
        out = {segment: out}
    return out


def _assign(root: dict[str, Any], root_cls: type[Spec], segments: list[str], value: Any) -> None:
    full = ".".join(segments)
    node: dict[str, Any] = root
    allowed: tuple[type[Spec], ...] = (root_cls,)
    for i, segment in enumerate(segments):
        where = ".".join(segments[:i])
        here = ".".join(segments[: i + 1])
        cls = _node_class(node, allowed, where)
        fields = _fields(cls)
        if segment == "type":
            choices = _names(allowed)
            raise SpecError(
                f"a spec's type is chosen by setting the whole object, e.g. "
                f'{where or "<root>"}={{"type": "{cls.__name__}", ...}} (types here: {choices})',
                full,
            )
        if segment not in fields:
            close = difflib.get_close_matches(segment, list(fields), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            at = f" (at {here})" if here != full else ""
            raise SpecError(
                f"unknown key {segment!r} in {cls.__name__}{at}; {hint}"
                f"allowed keys: {', '.join(fields)}",
                full,
            )
        field = fields[segment]
        child_classes = _spec_classes(field.type)
        current = node.get(segment, _MISSING)
        if i == len(segments) - 1:
            if (
                isinstance(value, dict)
                and "type" not in value
                and isinstance(current, dict)
                and isinstance(current.get("type"), str)
            ):
                value = {"type": current["type"], **value}
            node[segment] = value
            return
        if current is _MISSING:
            current = node[segment] = _default_json(field)
        rest = segments[i + 1 :]
        if current is None:
            example = f"{here}={json.dumps(_nested(rest, value))}"
            raise SpecError(f"{here} is null; set {here}={{...}} first, e.g. {example}", full)
        if isinstance(current, list):
            raise SpecError(
                f"{here} is a list; set it whole, e.g. {here}={json.dumps(current)}", full
            )
        if not isinstance(current, dict) or not child_classes:
            raise SpecError(
                f"{here} is {json.dumps(current)}, not an object, so it has no key {rest[0]!r}",
                full,
            )
        node, allowed = current, child_classes
    raise AssertionError("unreachable")
