"""The base of every spec class, the registry of spec types by name, and shared validators."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import attrs


class SpecError(ValueError):
    """A spec that cannot exist: a bad value, an unknown key, a wrong type.

    ``path`` is the dotted location inside the spec tree (``head.num_classes``), empty at the
    root; ``source`` names the file it came from, if any.
    """

    def __init__(self, message: str, path: str = "", *, source: str = "") -> None:
        self.message = message
        self.path = path
        self.source = source
        where = ": ".join(p for p in (source, path) if p)
        super().__init__(f"{where}: {message}" if where else message)

    def under(self, parent: str) -> SpecError:
        """The same error seen from one level up (``parent`` prepended to the path)."""
        if not parent:
            return self
        if not self.path:
            path = parent
        elif self.path.startswith("["):
            path = f"{parent}{self.path}"
        else:
            path = f"{parent}.{self.path}"
        return SpecError(self.message, path, source=self.source)


class Spec:
    """Base of all spec classes. Subclasses are ``@attrs.frozen(kw_only=True)`` classes.

    Every subclass is recorded by its class name, which is its tag in JSON. Two different
    classes with the same name are an error, so the JSON form stays unambiguous.
    """

    __slots__ = ()
    _types: ClassVar[dict[str, type[Spec]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        name = cls.__name__
        known = Spec._types.get(name)
        if known is not None and (known.__module__, known.__qualname__) != (
            cls.__module__,
            cls.__qualname__,
        ):
            raise TypeError(
                f"spec type name {name!r} is taken by {known.__module__}.{known.__qualname__}; "
                f"rename {cls.__module__}.{cls.__qualname__}"
            )
        Spec._types[name] = cls  # attrs replaces the class once (slots): keep the last one


def spec_types() -> dict[str, type[Spec]]:
    """Every known spec class by its JSON tag (class name)."""
    return dict(Spec._types)


def check(condition: bool, field: str, message: str) -> None:
    """Raise a :class:`SpecError` naming ``field`` unless ``condition`` holds."""
    if not condition:
        raise SpecError(message, field)


# --- validators (attrs style: (instance, attribute, value)) --------------------------------------


def positive(_: object, attribute: attrs.Attribute, value: float) -> None:
    if not value > 0:
        raise SpecError(f"must be > 0, got {value!r}", attribute.name)


def non_negative(_: object, attribute: attrs.Attribute, value: float) -> None:
    if not value >= 0:
        raise SpecError(f"must be >= 0, got {value!r}", attribute.name)


def finite(_: object, attribute: attrs.Attribute, value: float | None) -> None:
    if value is not None and not math.isfinite(value):
        raise SpecError(f"must be finite, got {value!r}", attribute.name)


def probability(_: object, attribute: attrs.Attribute, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise SpecError(f"must be in [0, 1], got {value!r}", attribute.name)


def open_unit(_: object, attribute: attrs.Attribute, value: float) -> None:
    if not 0.0 < value < 1.0:
        raise SpecError(f"must be in (0, 1), got {value!r}", attribute.name)


def one_of(*allowed: object) -> Callable[[object, attrs.Attribute, object], None]:
    def validate(_: object, attribute: attrs.Attribute, value: object) -> None:
        if value not in allowed:
            raise SpecError(
                f"must be one of {', '.join(map(repr, allowed))}; got {value!r}", attribute.name
            )

    return validate


def non_empty(_: object, attribute: attrs.Attribute, value: Sequence[object]) -> None:
    if len(value) == 0:
        raise SpecError("must not be empty", attribute.name)


def each(
    item: Callable[[object, attrs.Attribute, Any], None],
) -> Callable[[object, attrs.Attribute, Sequence[Any]], None]:
    """Apply ``item`` to every element; the error names the element (``ratios[2]``)."""

    def validate(instance: object, attribute: attrs.Attribute, value: Sequence[Any]) -> None:
        for i, v in enumerate(value):
            try:
                item(instance, attribute, v)
            except SpecError as e:
                raise SpecError(e.message, f"{attribute.name}[{i}]") from None

    return validate


def length(n: int) -> Callable[[object, attrs.Attribute, Sequence[object]], None]:
    def validate(_: object, attribute: attrs.Attribute, value: Sequence[object]) -> None:
        if len(value) != n:
            raise SpecError(f"must have {n} values, got {len(value)}", attribute.name)

    return validate


def to_tuple(value: Any) -> Any:
    """Converter: lists become tuples so specs stay hashable and compare equal after JSON."""
    if isinstance(value, list):
        return tuple(to_tuple(v) for v in value)
    return value


def float_tuple(value: Any) -> Any:
    """Converter: a sequence of numbers becomes a tuple of floats (others pass through unchanged
    so that validation reports them)."""
    if isinstance(value, (list, tuple)):
        return tuple(
            float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v
            for v in value
        )
    return value


def int_tuple(value: Any) -> Any:
    """Converter: lists become tuples (of ints, validated elsewhere)."""
    if isinstance(value, list):
        return tuple(value)
    return value
