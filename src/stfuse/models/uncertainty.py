"""Predictive uncertainty heads: a model that outputs 2B channels, B band values and B log-scales.

No registry entry: any registered architecture becomes a probabilistic model by being built with
``out_channels = 2 * B`` (training does it when ``uncertainty`` is not ``"none"``). The first B
channels are the mean (for :class:`stfuse.models.ResidualOnPrior`, the prior plus a correction),
the last B the log of the scale of the predictive distribution, all in normalised units (the
band's statistics, :mod:`stfuse.dataset`):

``laplace`` (the default of the workflow)
    density ``exp(-|y - mu| / b) / (2 b)``, loss ``|y - mu| / b + log b (+ log 2)``. Its location
    is the median: the mean part stays an L1 estimate, as with the plain head; std = sqrt(2) b.
``gaussian``
    density ``N(mu, sigma^2)``, loss ``(y - mu)^2 / (2 sigma^2) + log sigma (+ log(2 pi) / 2)``;
    std = sigma. The squared term weights large residuals more than the L1 of the plain head.

The log-scale is clamped to ``[LOG_SCALE_MIN, LOG_SCALE_MAX]`` (a scale between 1e-3 and 20 times
the band's standard deviation) before it is used, in training and inference alike, so a stray
output cannot give an infinite loss or a zero / overflowing std.
"""

from __future__ import annotations

import logging
import math

import numpy as np
from stfuse._optional import require_torch

torch = require_torch(__name__)
from torch import nn

__all__ = ["HEADS", "NONE", "LOG_SCALE_MIN", "LOG_SCALE_MAX", "check_head", "output_channels", "split",
           "nll", "std_factor", "nominal_coverage", "init_log_scale", "log_scale_of"]

logger = logging.getLogger("stfuse.models")

NONE = "none"
#: the heads, ``none`` first (a single output and the L1 loss)
HEADS = (NONE, "laplace", "gaussian")
LOG_SCALE_MIN = math.log(1e-3)
LOG_SCALE_MAX = math.log(20.0)
_NLL_CONST = {"laplace": math.log(2.0), "gaussian": 0.5 * math.log(2.0 * math.pi)}


def check_head(head) -> str:
    """``head`` checked: one of :data:`HEADS` (None -> ``"none"``, an old checkpoint's)."""
    if head is None:
        return NONE
    if head not in HEADS:
        raise ValueError(f"uncertainty must be one of {', '.join(HEADS)}, got {head!r}")
    return str(head)


def output_channels(n_bands: int, head) -> int:
    """Channels the network outputs for ``n_bands`` bands: B, or 2B with a scale head."""
    return int(n_bands) * (1 if check_head(head) == NONE else 2)


def split(pred: torch.Tensor, n_bands: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, clamped log-scale) of a (N, 2B, ...) output, both float32."""
    if pred.shape[1] != 2 * n_bands:
        raise ValueError(f"an uncertainty head outputs {2 * n_bands} channels for {n_bands} bands, "
                         f"the model gave {pred.shape[1]}")
    pred = pred.float()
    return pred[:, :n_bands], pred[:, n_bands:].clamp(LOG_SCALE_MIN, LOG_SCALE_MAX)


def nll(head: str, mean: torch.Tensor, log_scale: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Element-wise negative log-likelihood of ``target`` (same shape) under the head's distribution."""
    if head == "laplace":
        return (target - mean).abs() * torch.exp(-log_scale) + log_scale + _NLL_CONST[head]
    if head == "gaussian":
        return 0.5 * ((target - mean) * torch.exp(-log_scale)) ** 2 + log_scale + _NLL_CONST[head]
    raise ValueError(f"no likelihood for uncertainty head {head!r}")


def std_factor(head: str) -> float:
    """std = factor * exp(log-scale): sqrt(2) for Laplace (b), 1 for Gaussian (sigma)."""
    return {"laplace": math.sqrt(2.0), "gaussian": 1.0}[check_head(head)]


def nominal_coverage(head: str | None, multiples) -> np.ndarray:
    """Probability that the truth lies within ``k`` standard deviations of the prediction, for each
    multiple ``k``, if the head's distribution were exact: Laplace ``1 - exp(-sqrt(2) k)`` (75.7 %
    at 1 sd, 94.1 % at 2), Gaussian ``erf(k / sqrt(2))`` (68.3 %, 95.4 %; also for ``None``)."""
    k = np.asarray(multiples, dtype=np.float64)
    if head == "laplace":
        return 1.0 - np.exp(-math.sqrt(2.0) * k)
    return np.array([math.erf(v / math.sqrt(2.0)) for v in k.ravel()]).reshape(k.shape)


def log_scale_of(head: str, residuals: np.ndarray) -> float | None:
    """The maximum-likelihood constant log-scale of ``residuals`` (normalised units): log mean |r|
    (Laplace) or log sqrt(mean r^2) (Gaussian), clamped to the head's range; None without residuals."""
    r = np.asarray(residuals, dtype=np.float64).ravel()
    if r.size == 0:
        return None
    scale = np.abs(r).mean() if head == "laplace" else math.sqrt(float((r ** 2).mean()))
    return float(np.clip(math.log(max(scale, 1e-12)), LOG_SCALE_MIN, LOG_SCALE_MAX))


def init_log_scale(net: nn.Module, n_bands: int, value: float) -> bool:
    """Set the bias of the log-scale outputs (the last B of the 2B) of ``net``'s output layer (the
    last ``Conv2d``/``Linear`` producing 2B outputs) to ``value``, so a zero-initialised head starts
    at that scale everywhere. False (and a warning) when there is no such layer with a bias."""
    last = None
    for module in net.modules():
        if isinstance(module, nn.Conv2d) and module.out_channels == 2 * n_bands \
                or isinstance(module, nn.Linear) and module.out_features == 2 * n_bands:
            last = module
    if last is None or last.bias is None:
        logger.warning("uncertainty head: no output layer with %d outputs and a bias in %s; the "
                       "log-scale starts where the initialisation puts it", 2 * n_bands, type(net).__name__)
        return False
    with torch.no_grad():
        last.bias[n_bands:] = float(value)
    return True
