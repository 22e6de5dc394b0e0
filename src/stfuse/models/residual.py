"""Residual learning on top of the temporal prior, for any registered architecture.

:class:`ResidualOnPrior` wraps a network ``net`` (N, C_in, s, s) -> (N, B, s, s) and adds the
prior that is already among its inputs::

    out = x[:, prior_indices] * x[:, present_index] + net(x)

``prior_indices`` are the ``<band>@prior`` inputs in target band order (normalised with the
statistics of their band, so in the units of the output) and ``present_index`` the
``prior_present@t`` flag (see :mod:`stfuse.dataset`); where no prior exists the network predicts
on its own. With an uncertainty head (:mod:`stfuse.models.uncertainty`, ``extra_channels = B``) the
network outputs 2B channels and the prior is added to the first B only: the log-scales pass through. :func:`zero_init_output` zeroes the network's output layer, so that a fresh model
starts out predicting exactly the prior (per-pixel linear interpolation in time) and training
only learns the correction.

The wrapper is no registry entry: the training code builds it around the registered model
from the checkpoint's ``residual`` entry (``{"prior_indices": [...], "present_index": i}``);
its ``state_dict`` is the network's with a ``net.`` prefix.
"""

from __future__ import annotations

import logging
import numbers

from stfuse._optional import require_torch

torch = require_torch(__name__)
from torch import nn

__all__ = ["ResidualOnPrior", "zero_init_output"]

logger = logging.getLogger("stfuse.models")


def _index(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    return int(value)


class ResidualOnPrior(nn.Module):
    """``out = prior * present + net(x)``, the prior and its flag read from the input ``x``."""

    def __init__(self, net: nn.Module, prior_indices, present_index: int, extra_channels: int = 0):
        super().__init__()
        prior = [_index(i, "prior_indices[...]") for i in prior_indices]
        if not prior:
            raise ValueError("prior_indices must name at least one input channel")
        present = _index(present_index, "present_index")
        if present in prior:
            raise ValueError(f"present_index {present} is also a prior index")
        self.net = net
        self.prior_indices = prior
        self.present_index = present
        self.extra_channels = _index(extra_channels, "extra_channels")
        self.size_multiple = int(getattr(net, "size_multiple", 1))
        self.register_buffer("_prior_idx", torch.tensor(prior, dtype=torch.long),
                             persistent=False)

    def spec(self) -> dict:
        """The plain configuration stored in a checkpoint (``residual``)."""
        return {"prior_indices": list(self.prior_indices), "present_index": self.present_index}

    def prior(self, x: torch.Tensor) -> torch.Tensor:
        """The prior part of the output: (N, B, s, s), 0 where the prior is absent."""
        present = x[:, self.present_index:self.present_index + 1]
        return x.index_select(1, self._prior_idx) * present

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n_in = x.shape[1]
        if max(self.present_index, *self.prior_indices) >= n_in:
            raise ValueError(f"input has {n_in} channels but the prior is expected at "
                             f"{self.prior_indices} / {self.present_index}")
        delta = self.net(x)
        n_bands = len(self.prior_indices)
        if delta.shape[1] != n_bands + self.extra_channels:
            raise ValueError(f"the network predicts {delta.shape[1]} channels but the prior has "
                             f"{n_bands} bands" + (f" (plus {self.extra_channels} scale outputs)"
                                                   if self.extra_channels else ""))
        if not self.extra_channels:
            return self.prior(x) + delta  # type promotion: float32 sum even under float16 autocast
        # the prior goes onto the band values only; the log-scales pass through (as float32)
        return torch.cat([self.prior(x) + delta[:, :n_bands], delta[:, n_bands:].float()], dim=1)


def zero_init_output(net: nn.Module, out_channels: int) -> bool:
    """Zero the weights and bias of ``net``'s output layer: the last ``Conv2d``/``Linear`` (in
    registration order) producing ``out_channels``. Returns False (and logs a warning) when
    there is none, leaving ``net`` untouched."""
    last = None
    for module in net.modules():
        if isinstance(module, nn.Conv2d) and module.out_channels == out_channels \
                or isinstance(module, nn.Linear) and module.out_features == out_channels:
            last = module
    if last is None:
        logger.warning("residual model: no output layer with %d outputs found in %s; not "
                       "zero-initialised (training starts away from the prior)", out_channels,
                       type(net).__name__)
        return False
    with torch.no_grad():
        last.weight.zero_()
        if last.bias is not None:
            last.bias.zero_()
    return True
