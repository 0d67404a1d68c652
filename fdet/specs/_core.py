"""The base of every spec class, the registry of spec types by name, and shared validators."""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import attrs

if TYPE_CHECKING:
    from typing_extensions import Self


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


class Spec(metaclass=abc.ABCMeta):  # noqa: B024  (ABCMeta: bases may declare abstract members)
    """Base of all spec classes. Concrete subclasses are ``@attrs.frozen(kw_only=True)`` classes.

    Every subclass is recorded by its class name, which is its tag in JSON. Two different
    classes with the same name are an error, so the JSON form stays unambiguous.

    A subclass that is *not* an attrs class is an abstract base (an extension point such as
    :class:`fdet.specs.BoxLoss`): a field typed by it holds any of its concrete subclasses,
    fdet's or yours, chosen in JSON by the ``"type"`` tag. A base cannot be made itself.
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

    def __new__(cls, *args: Any, **kwargs: Any) -> Self:
        if not _is_concrete(cls):
            choices = ", ".join(sorted(concrete_subclasses(cls))) or "none yet"
            raise TypeError(
                f"{cls.__name__} is an abstract spec base; make one of its subclasses "
                f"(known: {choices})"
            )
        return super().__new__(cls)


def _is_concrete(cls: type) -> bool:
    """Whether a spec class is an attrs class (not an abstract base)."""
    return attrs.has(cls)


def spec_types() -> dict[str, type[Spec]]:
    """Every known concrete spec class by its JSON tag (class name)."""
    return {name: cls for name, cls in Spec._types.items() if _is_concrete(cls)}


def concrete_subclasses(base: type[Spec] | tuple[type[Spec], ...]) -> dict[str, type[Spec]]:
    """The known concrete spec classes that are subclasses of ``base`` (itself included when it
    is concrete), by JSON tag. Classes register when their module is imported."""
    return {name: cls for name, cls in spec_types().items() if issubclass(cls, base)}


def check(condition: bool, field: str, message: str) -> None:
    """Raise a :class:`SpecError` naming ``field`` unless ``condition`` holds."""
    if not condition:
        raise SpecError(message, field)


# --- validators (attrs style: (instance, attribute, value)) --------------------------------------


def positive(_: object, attribute: attrs.Attribute, value: float) -> None:
    if not value > 0:
        raise SpecError(f"must be > 0, got {value!r}", attribute.name)
    if not math.isfinite(value):
        raise SpecError(f"must be finite, got {value!r}", attribute.name)


def non_negative(_: object, attribute: attrs.Attribute, value: float) -> None:
    if not value >= 0:
        raise SpecError(f"must be >= 0, got {value!r}", attribute.name)
    if not math.isfinite(value):
        raise SpecError(f"must be finite, got {value!r}", attribute.name)


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


def spec_of(
    base: type[Spec], *, optional: bool = False
) -> Callable[[object, attrs.Attribute, object], None]:
    """Validator: the value is an instance of the spec class ``base`` (or None if
    ``optional``); the message lists the known classes that fit."""

    def validate(_: object, attribute: attrs.Attribute, value: object) -> None:
        if (value is None and optional) or isinstance(value, base):
            return
        choices = ", ".join(sorted(concrete_subclasses(base)))
        null = " or None" if optional else ""
        raise SpecError(
            f"expected a {base.__name__} spec ({choices}, or a subclass of your own){null}, "
            f"got {value!r}",
            attribute.name,
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
