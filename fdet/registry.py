"""Builders keyed by spec type: ``register(specs.X)`` records one, ``build(spec)`` calls it.

Registration is explicit (a decorator on the builder function) and there are no scopes: one
builder a spec class. fdet's own builders live in ``fdet.models`` (modules, norm layers),
``fdet.train.schedule`` (warm-ups, decays) and ``fdet.train.optim`` (optimizers), and are
imported on the first ``build``; builders for your own spec classes register when your module
is imported.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from fdet.specs import Spec

F = TypeVar("F", bound=Callable[..., Any])

_BUILDERS: dict[type[Spec], Callable[..., Any]] = {}


class RegistryError(LookupError):
    """No builder (or two builders) for a spec type."""


def register(spec_type: type[Spec]) -> Callable[[F], F]:
    """Decorator: ``fn(spec, **shape_kwargs)`` builds objects for ``spec_type`` specs."""
    if not (isinstance(spec_type, type) and issubclass(spec_type, Spec)):
        raise TypeError(f"register() takes a spec class, got {spec_type!r}")

    def decorate(fn: F) -> F:
        known = _BUILDERS.get(spec_type)
        if known is not None and (known.__module__, known.__qualname__) != (
            fn.__module__,
            fn.__qualname__,
        ):
            raise RegistryError(
                f"{spec_type.__name__} already has a builder: "
                f"{known.__module__}.{known.__qualname__}"
            )
        _BUILDERS[spec_type] = fn
        return fn

    return decorate


def _ensure_builtin() -> None:
    # Import statements (not importlib) so that a build inside torch.compile traces: each module
    # registers fdet's builders for its spec types when imported.
    from fdet import models  # noqa: F401
    from fdet.models import layers  # noqa: F401
    from fdet.train import optim, schedule  # noqa: F401


def builder_for(spec_type: type[Spec]) -> Callable[..., Any]:
    """The builder registered for ``spec_type`` (or its nearest registered base class)."""
    _ensure_builtin()
    for cls in spec_type.__mro__:
        if cls in _BUILDERS:
            return _BUILDERS[cls]
    raise RegistryError(
        f"no builder is registered for {spec_type.__module__}.{spec_type.__qualname__}; "
        f"import the module that defines it (decorated with "
        f"@fdet.register({spec_type.__name__})) before calling build"
    )


def build(spec: Spec, **shape_kwargs: Any) -> Any:
    """Build the object described by ``spec``; ``shape_kwargs`` carry what the spec cannot know
    by itself (e.g. ``in_channels`` of a neck)."""
    if not isinstance(spec, Spec):
        raise TypeError(f"build() takes a spec, got {type(spec).__name__}")
    return builder_for(type(spec))(spec, **shape_kwargs)


def registered() -> dict[type[Spec], Callable[..., Any]]:
    """Every spec type with a builder."""
    _ensure_builtin()
    return dict(_BUILDERS)
