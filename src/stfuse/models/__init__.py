"""Model registry: architectures by name.

An architecture is a module of this package that registers a builder::

    from stfuse.models import register

    @register("mynet")
    def build(in_channels: int, out_channels: int, *, width: int = 32) -> torch.nn.Module:
        ...

Every module of the package is imported when the package is, so dropping one file into
``stfuse/models/`` makes it available to :func:`build_model` (and to the training and
inference code, which store and look up the model by name and keyword parameters).

A model that treats each date as a token registers with ``layout="sequence"``
(``@register("tattn", layout="sequence")``): training then builds its inputs with the sequence
layout of :class:`stfuse.dataset.InputAssembler` and passes the builder ``tokens=`` (the
assembler's :meth:`~stfuse.dataset.InputAssembler.token_layout`: which input channels belong to
which date), which the checkpoint keeps (``input_layout``, ``token_layout``).

``revision=`` (default 1) numbers an architecture whose weights changed shape under the same name;
checkpoints record it (``model_revision``), and a checkpoint of another revision is refused with a
clear error instead of a state-dict mismatch (``tattn`` is at revision 2: patches and cross-attention).

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

__all__ = ["register", "build_model", "available", "size_multiple", "input_layout", "revision",
           "ResidualOnPrior", "zero_init_output"]

_REGISTRY: dict[str, Callable[..., torch.nn.Module]] = {}
_LAYOUT: dict[str, str] = {}
_REVISION: dict[str, int] = {}
LAYOUTS = ("stacked", "sequence")  # those of stfuse.dataset.InputAssembler


def register(name: str, layout: str = "stacked", revision: int = 1):
    """Decorator: register ``builder(in_channels, out_channels, **params)`` under ``name``;
    ``layout="sequence"``: the builder also takes ``tokens=``; ``revision``: see the module docstring."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"model name must be a non-empty string, got {name!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"model {name!r}: layout must be one of {LAYOUTS}, got {layout!r}")

    def deco(builder):
        if name in _REGISTRY and _REGISTRY[name] is not builder:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = builder
        _LAYOUT[name] = layout
        _REVISION[name] = int(revision)
        return builder

    return deco


def input_layout(name: str) -> str:
    """The input layout the registered model ``name`` reads (``"stacked"`` or ``"sequence"``)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; registered models: {', '.join(available())}")
    return _LAYOUT[name]


def revision(name: str) -> int:
    """The architecture revision of the registered model ``name`` (module docstring)."""
    input_layout(name)  # the unknown-name error
    return _REVISION[name]


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
