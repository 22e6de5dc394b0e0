"""Model registry: architectures by name.

An architecture is a module of this package that registers a builder::

    from stfuse.models import register

    @register("mynet")
    def build(in_channels: int, out_channels: int, *, width: int = 32) -> torch.nn.Module:
        ...

Every module of the package is imported when the package is, so dropping one file into
``stfuse/models/`` makes it available to :func:`build_model` (and to the training and
inference code, which store and look up the model by name and keyword parameters).

Contract for a model: ``forward(x)`` maps (N, in_channels, s, s) to (N, out_channels, s, s);
the output is the optical bands at the target date in normalised units. A model may set an
integer attribute ``size_multiple`` (tile sizes must be multiples of it; default 1).

:class:`ResidualOnPrior` (module :mod:`stfuse.models.residual`) wraps any such model so that it
predicts a correction to the temporal prior found among its inputs; training builds it when
the export holds the prior channels.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Callable

from stfuse._optional import require_torch

torch = require_torch(__name__)

__all__ = ["register", "build_model", "available", "size_multiple", "ResidualOnPrior",
           "zero_init_output"]

_REGISTRY: dict[str, Callable[..., torch.nn.Module]] = {}


def register(name: str):
    """Decorator: register ``builder(in_channels, out_channels, **params)`` under ``name``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"model name must be a non-empty string, got {name!r}")

    def deco(builder):
        if name in _REGISTRY and _REGISTRY[name] is not builder:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = builder
        return builder

    return deco


def available() -> list[str]:
    """Registered model names, sorted."""
    return sorted(_REGISTRY)


def build_model(name: str, in_channels: int, out_channels: int, **params) -> torch.nn.Module:
    """Build a registered model; unknown ``name`` -> ValueError listing the registered ones."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; registered models: {', '.join(available())}")
    try:
        return _REGISTRY[name](int(in_channels), int(out_channels), **params)
    except TypeError as exc:  # unknown keyword parameter
        raise ValueError(f"model {name!r}: bad parameters {params}: {exc}") from exc


def size_multiple(model: torch.nn.Module) -> int:
    """Tile sizes the model accepts are multiples of this."""
    return int(getattr(model, "size_multiple", 1))


for _info in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_info.name}")

from stfuse.models.residual import ResidualOnPrior, zero_init_output  # noqa: E402
