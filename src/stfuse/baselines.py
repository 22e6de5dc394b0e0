"""Reference gap-filling methods for optical time series, to benchmark the SAR-optical model against.

Every method has the same interface as the neural model::

    filled = fill(obs, times, sar=None, **params)

``obs``
    float array (T, B, H, W): the optical bands, NaN (or any non-finite value) where the pixel is
    not observed (cloud, artificial gap, no data).
``times``
    length-T datetimes, strictly increasing: ``numpy.datetime64`` array, ``pandas.DatetimeIndex``
    or anything :class:`pandas.DatetimeIndex` accepts. Naive times are taken as UTC; only time
    differences matter.
``sar``
    optional float array (T, S, H, W): the SAR bands paired with each optical date (NaN where
    no SAR was paired). Only :func:`sar_regression` uses it; the others ignore it.

The result has the shape and dtype of ``obs``, equals ``obs`` bit for bit wherever ``obs`` is
finite, and holds an estimate at every gap where the method has something to go on. Each
(band, pixel) series is treated independently, so a band may be missing on its own.

All methods are vectorised over pixels: the only Python loops run over dates (or bands, or
chunks of pixels to bound memory). Internally they compute in float64.

Methods (also in :data:`BASELINES`, callable through :func:`run_baseline`):

``nearest``   :func:`nearest_in_time`: value of the nearest valid date (ties: the earlier one).
``linear``    :func:`linear_in_time`: linear interpolation in time, constant extension at the ends.
``whittaker`` :func:`whittaker`: Whittaker smoother (2nd-order, divided differences, gap weights 0).
``sar_regression`` :func:`sar_regression`: optical ~ a + sum_s c_s * SAR_s, linear fallback.
``harmonic``  :func:`harmonic`: HANTS-style fit of a mean and yearly harmonics, outliers rejected.

Whittaker's lambda can be chosen from the data (:func:`whittaker_tuning`, :func:`choose_whittaker_lambda`):
by leave-out on the observed values only, so a benchmark that tunes it never looks at the cells it scores.
"""

from __future__ import annotations

import logging
from typing import Callable, NamedTuple

import numpy as np
import pandas as pd

__all__ = [
    "BASELINES",
    "DEFAULT_WHITTAKER_LAMBDA",
    "SarStats",
    "WHITTAKER_LAMBDA_GRID",
    "days_since_start",
    "choose_whittaker_lambda",
    "fit_sar_regression",
    "harmonic",
    "linear_in_time",
    "merge_sar_stats",
    "nearest_in_time",
    "run_baseline",
    "sar_regression",
    "sar_regression_stats",
    "solve_sar_regression",
    "whittaker",
    "whittaker_smooth",
    "whittaker_tuning",
]

logger = logging.getLogger("stfuse.baselines")

#: default Whittaker lambda, in "daily grid" units (see :func:`whittaker`)
DEFAULT_WHITTAKER_LAMBDA = 1000.0
#: the candidates of :func:`whittaker_tuning`: 10 .. 1e5, two per decade (ascending: ties go to the smaller)
WHITTAKER_LAMBDA_GRID = tuple(float(v) for v in 10.0 ** np.linspace(1.0, 5.0, 9))
#: :func:`whittaker_tuning` holds out every k-th observed value of a series ...
TUNING_EVERY = 5
#: ... of about one cell in this many (a hash of the cell's position in the region: any block layout)
TUNING_STRIDE = 8
#: (band, pixel) series processed at once; bounds the float64 work arrays to about T x 0.5 MiB each
CHUNK = 65_536
_NS_PER_DAY = 86_400 * 10**9


# --------------------------------------------------------------------------------------------
# input handling
# --------------------------------------------------------------------------------------------

def days_since_start(times) -> np.ndarray:
    """Float64 days since the first of ``times`` (which must be strictly increasing).

    Accepts a ``numpy.datetime64`` array, a :class:`pandas.DatetimeIndex` or anything that
    :class:`pandas.DatetimeIndex` accepts; tz-aware times are converted to UTC, naive ones are
    taken as UTC.
    """
    idx = pd.DatetimeIndex(times)
    if idx.tz is not None:
        idx = idx.tz_convert("UTC").tz_localize(None)
    if idx.hasnans:
        raise ValueError("times contain NaT")
    ns = idx.as_unit("ns").asi8.astype(np.int64)
    if ns.size and np.any(np.diff(ns) <= 0):
        raise ValueError("times must be strictly increasing")
    if ns.size == 0:
        return np.zeros(0, dtype=np.float64)
    return (ns - ns[0]).astype(np.float64) / _NS_PER_DAY


def _check_obs(obs, times) -> tuple[np.ndarray, np.ndarray]:
    obs = np.asarray(obs)
    if obs.ndim != 4:
        raise ValueError(f"obs must be (T, B, H, W), got shape {obs.shape}")
    if not np.issubdtype(obs.dtype, np.floating):
        raise ValueError(f"obs must be a float array (NaN marks gaps), got {obs.dtype}")
    days = days_since_start(times)
    if days.size != obs.shape[0]:
        raise ValueError(f"times has {days.size} dates but obs has {obs.shape[0]}")
    return obs, days


def _check_sar(sar, obs: np.ndarray) -> np.ndarray:
    if sar is None:
        raise ValueError("sar_regression needs sar (T, S, H, W)")
    sar = np.asarray(sar)
    t, _, h, w = obs.shape
    if sar.ndim != 4 or sar.shape[0] != t or sar.shape[2:] != (h, w) or sar.shape[1] < 1:
        raise ValueError(f"sar must be (T, S, H, W) = ({t}, S>=1, {h}, {w}), got {sar.shape}")
    return sar


def _per_series(obs: np.ndarray, days: np.ndarray,
                func: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]) -> np.ndarray:
    """Apply ``func(y (T, n) float64, valid (T, n) bool, days) -> estimate (T, n)`` to every
    (band, pixel) series, a chunk of columns at a time, and keep the observed values."""
    t = obs.shape[0]
    flat = obs.reshape(t, -1)
    out = np.array(obs, copy=True, order="C")
    out_flat = out.reshape(t, -1)  # a view: out is a fresh C-contiguous array
    n = flat.shape[1]
    for start in range(0, n, CHUNK):
        stop = min(start + CHUNK, n)
        y = flat[:, start:stop].astype(np.float64)
        valid = np.isfinite(y)
        if valid.all():
            continue
        y[~valid] = 0.0
        est = func(y, valid, days)
        block = out_flat[:, start:stop]
        out_flat[:, start:stop] = np.where(valid, block, est.astype(obs.dtype, copy=False))
    return out


def _bracket(y: np.ndarray, valid: np.ndarray, days: np.ndarray):
    """Previous and next valid value of each (date, series), at or around the date, and their
    distances in days (inf where there is none; 0 on valid dates). One pass forwards carrying
    the last valid value and time, one pass backwards carrying the next ones."""
    t, n = y.shape
    y_prev, y_next = np.empty((t, n)), np.empty((t, n))
    d_prev, d_next = np.empty((t, n)), np.empty((t, n))
    val, when = np.zeros(n), np.full(n, -np.inf)
    for i in range(t):
        val = np.where(valid[i], y[i], val)
        when = np.where(valid[i], days[i], when)
        y_prev[i], d_prev[i] = val, days[i] - when
    val, when = np.zeros(n), np.full(n, np.inf)
    for i in range(t - 1, -1, -1):
        val = np.where(valid[i], y[i], val)
        when = np.where(valid[i], days[i], when)
        y_next[i], d_next[i] = val, when - days[i]
    return y_prev, y_next, d_prev, d_next, np.isfinite(d_prev), np.isfinite(d_next)


# --------------------------------------------------------------------------------------------
# nearest and linear in time
# --------------------------------------------------------------------------------------------

def _nearest_estimate(y, valid, days):
    y_prev, y_next, d_prev, d_next, has_prev, has_next = _bracket(y, valid, days)
    est = np.where(d_prev <= d_next, y_prev, y_next)  # tie: the earlier date
    return np.where(has_prev | has_next, est, np.nan)


def nearest_in_time(obs, times, sar=None) -> np.ndarray:
    """Fill each gap with the value of the nearest valid date of the same band and pixel.

    Distances are measured in real time (``times``), not in date index; on a tie the earlier
    date wins. NaN remains only where the series of that band and pixel has no valid value at all.
    ``sar`` is ignored.
    """
    obs, days = _check_obs(obs, times)
    return _per_series(obs, days, _nearest_estimate)


def _linear_estimate(y, valid, days):
    y_prev, y_next, d_prev, d_next, has_prev, has_next = _bracket(y, valid, days)
    both = has_prev & has_next
    span = np.where(both, d_prev + d_next, 1.0)
    span = np.where(span > 0, span, 1.0)  # valid dates themselves: d_prev = d_next = 0
    frac = np.where(both, d_prev / span, 0.0)
    est = y_prev + frac * (y_next - y_prev)
    est = np.where(both, est, np.where(has_prev, y_prev, y_next))  # constant extension at the ends
    return np.where(has_prev | has_next, est, np.nan)


def linear_in_time(obs, times, sar=None) -> np.ndarray:
    """Linear interpolation in time between the previous and next valid dates of each series.

    The weights use the real time differences, so unequal spacing is handled. Before the first
    and after the last valid date the nearest valid value is carried (constant extension); NaN
    remains only where a series has no valid value at all. This is what GRASS ``t.rast.gapfill``
    does for whole maps, applied per pixel. ``sar`` is ignored.
    """
    obs, days = _check_obs(obs, times)
    return _per_series(obs, days, _linear_estimate)


# --------------------------------------------------------------------------------------------
# Whittaker smoother
# --------------------------------------------------------------------------------------------

def _penalty_diagonals(days: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Diagonals 0, 1, 2 of the symmetric pentadiagonal penalty matrix P = D' V D.

    D is the (T-2, T) matrix of second divided differences on the irregular times and V the
    diagonal of weights 2 (x[i+2] - x[i]); then z' P z approximates the integral of z''(t)^2
    over days and, for daily dates, equals sum (z[i] - 2 z[i+1] + z[i+2])^2 exactly.
    """
    t = days.size
    p = np.zeros((t, t))
    if t >= 3:
        h1 = np.diff(days)[:-1]
        h2 = np.diff(days)[1:]
        s = h1 + h2
        rows = np.arange(t - 2)
        d = np.zeros((t - 2, t))
        d[rows, rows] = 1.0 / (h1 * s)
        d[rows, rows + 1] = -(1.0 / h1 + 1.0 / h2) / s
        d[rows, rows + 2] = 1.0 / (h2 * s)
        p = d.T @ (2.0 * s[:, None] * d)
    return (np.diagonal(p).copy(), np.concatenate([np.diagonal(p, 1), [0.0]]),
            np.concatenate([np.diagonal(p, 2), [0.0, 0.0]]))


def _pentadiagonal_solve(a0: np.ndarray, a1: np.ndarray, a2: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Solve A x = b for many symmetric positive-definite pentadiagonal systems at once.

    a0 (T, n): main diagonal per system; a1 (T,), a2 (T,): first and second super-diagonals,
    shared by all systems (a1[T-1], a2[T-2:] unused); b (T, n). Banded Cholesky A = L L', with the
    loops over the T rows and every operation vectorised over the n systems.
    """
    t, n = b.shape
    l0 = np.empty((t, n))  # L[i, i]
    l1 = np.zeros((t, n))  # L[i+1, i]
    l2 = np.zeros((t, n))  # L[i+2, i]
    for i in range(t):
        diag = a0[i].copy()
        if i >= 1:
            diag -= l1[i - 1] ** 2
        if i >= 2:
            diag -= l2[i - 2] ** 2
        l0[i] = np.sqrt(diag)
        if i + 1 < t:
            off = a1[i] - (l2[i - 1] * l1[i - 1] if i >= 1 else 0.0)
            l1[i] = off / l0[i]
        if i + 2 < t:
            l2[i] = a2[i] / l0[i]
    y = np.empty((t, n))
    for i in range(t):
        acc = b[i].copy()
        if i >= 1:
            acc -= l1[i - 1] * y[i - 1]
        if i >= 2:
            acc -= l2[i - 2] * y[i - 2]
        y[i] = acc / l0[i]
    x = np.empty((t, n))
    for i in range(t - 1, -1, -1):
        acc = y[i].copy()
        if i + 1 < t:
            acc -= l1[i] * x[i + 1]
        if i + 2 < t:
            acc -= l2[i] * x[i + 2]
        x[i] = acc / l0[i]
    return x


def _whittaker_core(yz: np.ndarray, w: np.ndarray, days: np.ndarray, lam: float) -> np.ndarray:
    """Solve (W + lam P) z = W y for every column: yz (T, n) with 0 where w == 0, w (T, n) >= 0.

    Columns with fewer than two positive weights are not positive definite: they come back
    constant (one weighted value) or NaN (none).
    """
    p0, p1, p2 = _penalty_diagonals(days)
    pos = w > 0
    n_pos = pos.sum(axis=0)
    solvable = n_pos >= 2  # W + lam P is positive definite iff >= 2 distinct weighted times
    ws = np.where(solvable, w, 1.0)  # dummy well-posed systems elsewhere, overwritten below
    z = _pentadiagonal_solve(ws + lam * p0[:, None], lam * p1, lam * p2, ws * yz)
    if not solvable.all():
        one = n_pos == 1
        z[:, one] = (yz * pos).sum(axis=0)[one]
        z[:, n_pos == 0] = np.nan
    return z


def _whittaker_estimate(y, valid, days, lam):
    return _whittaker_core(y, valid.astype(np.float64), days, lam)


def whittaker_smooth(y, days, lam: float = DEFAULT_WHITTAKER_LAMBDA, weights=None) -> np.ndarray:
    """The raw Whittaker smoother: minimise sum w (y - z)^2 + lam z' P z for each column of y.

    ``y`` (T, ...) float; ``days`` length-T strictly increasing float days, or datetimes;
    ``weights`` (T, ...) non-negative, default 1 where y is finite and 0 elsewhere (non-finite y
    always get weight 0). Returns z with the shape of y, float64, *including* the smoothed
    values at the observed dates (unlike :func:`whittaker`, which keeps the observations).
    Columns with one weighted value come back constant, with none NaN. See :func:`whittaker` for P.
    """
    y = np.asarray(y, dtype=np.float64)
    days = np.asarray(days)
    days = days.astype(np.float64) if np.issubdtype(days.dtype, np.number) else days_since_start(days)
    if days.ndim != 1 or days.size != y.shape[0] or np.any(np.diff(days) <= 0):
        raise ValueError("days must be strictly increasing with one value per row of y")
    if not lam >= 0:
        raise ValueError(f"lam must be >= 0, got {lam!r}")
    shape = y.shape
    y2 = y.reshape(shape[0], -1)
    finite = np.isfinite(y2)
    w = np.ones_like(y2) if weights is None else np.asarray(weights, np.float64).reshape(y2.shape)
    if np.any(w < 0):
        raise ValueError("weights must be >= 0")
    w = np.where(finite, w, 0.0)
    z = _whittaker_core(np.where(w > 0, y2, 0.0), w, days, float(lam))
    return z.reshape(shape)


def whittaker(obs, times, sar=None, lam: float = DEFAULT_WHITTAKER_LAMBDA) -> np.ndarray:
    """Whittaker smoother (Eilers 2003, second-order penalty) with zero weights on the gaps.

    For each band and pixel, z minimises ``sum_i w_i (y_i - z_i)^2 + lam * z' P z`` with
    w_i = 1 on valid dates and 0 on gaps; the estimates z fill the gaps, observed values are
    returned unchanged.

    Irregular time steps: the unknowns are the values at the T actual dates (no daily grid).
    The penalty uses second *divided* differences (Eilers' ``ddmat``),
    DD_i = ((z[i+2] - z[i+1]) / h2 - (z[i+1] - z[i]) / h1) / (h1 + h2) with h in days, each
    squared term weighted by 2 (h1 + h2). This weighting makes z' P z approximate the integral
    of z''(t)^2 dt (t in days) and, when the dates are exactly one day apart, equal the
    classic sum of squared second differences on a daily grid. So ``lam`` has the meaning of a
    daily-grid lambda: for regularly spaced dates h days apart it acts like the classic
    per-step lambda ``lam / h**3``. Linear trends are not penalised (they are the null space).

    Default ``lam`` = 1000 (:data:`DEFAULT_WHITTAKER_LAMBDA`): the classic smoother's 50 %
    cut-off period is about 2 pi lam^(1/4) days, ~35 days, i.e. it keeps seasonal phenology
    and damps date-to-date noise; for 5-day revisits it is a per-step lambda of 8.

    The systems (W + lam P) z = W y are pentadiagonal; all (band, pixel) series are solved at
    once with a banded Cholesky vectorised over series (loops over the T dates only), so the
    cost is O(T * n_series) whatever the number of distinct gap patterns.

    Before the first and after the last valid date the estimate continues the smoothed curve
    as a straight line (the penalty's null space), unlike the constant extension of
    :func:`linear_in_time`; long end gaps can therefore drift. Series with a single valid date
    are filled with that value (constant); series with none stay NaN. ``sar`` is ignored.
    """
    obs, days = _check_obs(obs, times)
    if not lam >= 0:
        raise ValueError(f"lam must be >= 0, got {lam!r}")
    return _per_series(obs, days, lambda y, v, d: _whittaker_estimate(y, v, d, float(lam)))


# --------------------------------------------------------------------------------------------
# Whittaker's lambda by leave-out on the observed values
# --------------------------------------------------------------------------------------------

def _cell_hash(rows: np.ndarray, cols: np.ndarray, seed: int) -> np.ndarray:
    """A well-mixed uint64 per cell from its (global) row and column (splitmix64's finaliser)."""
    with np.errstate(over="ignore"):
        x = (rows.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
             ^ (cols.astype(np.uint64) + np.uint64(0x632BE59BD9B4E019)) * np.uint64(0xD6E8FEB86659FD93)
             ^ np.uint64(seed & 0xFFFFFFFF) * np.uint64(0xA0761D6478BD642F))
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return x


def tuning_cells(shape, origin=(0, 0), *, every: int = TUNING_EVERY, stride: int = TUNING_STRIDE,
                 seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The cells of an (h, w) window at ``origin`` (its first row and column in the region) that take part in
    :func:`whittaker_tuning` (bool (h, w)), and each cell's offset in 0..every-1 (which observed values it
    holds out). Both depend on the cell's position in the region only, so blocks agree with the whole."""
    h, w = (int(v) for v in shape)
    rows, cols = np.meshgrid(np.arange(h) + int(origin[0]), np.arange(w) + int(origin[1]), indexing="ij")
    x = _cell_hash(rows, cols, seed)
    return x % np.uint64(stride) == 0, ((x // np.uint64(stride)) % np.uint64(every)).astype(np.int64)


def whittaker_tuning(obs, times, lambdas=WHITTAKER_LAMBDA_GRID, *, origin=(0, 0), every: int = TUNING_EVERY,
                     stride: int = TUNING_STRIDE, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Leave-out criterion of each candidate lambda on the *observed* values of ``obs`` (T, B, H, W).

    Of the cells :func:`tuning_cells` picks (about one in ``stride``), each (band, cell) series holds out
    every ``every``-th of its observed values (from its own offset), is smoothed from the rest with each
    lambda (:func:`whittaker_smooth`: zero weights on the gaps and on the held-out values) and the squared
    errors on the held-out values are summed. Non-finite values of ``obs`` are gaps and are never read:
    give it the series the methods get. Series with fewer than 3 values left are skipped (their fit
    does not depend on lambda). ``origin``: the window's first row and column in the region.

    Returns ``sse`` (L,) float64 and ``n`` (L,) int64, the held-out values counted: additive over the
    blocks of a region (sum them, then :func:`choose_whittaker_lambda`)."""
    obs, days = _check_obs(obs, times)
    lambdas = [float(v) for v in lambdas]
    t, nb = obs.shape[:2]
    pick, offset = tuning_cells(obs.shape[2:], origin, every=every, stride=stride, seed=seed)
    y = obs[:, :, pick].reshape(t, -1).astype(np.float64)           # (T, B * cells)
    off = np.broadcast_to(offset[pick], (nb, int(pick.sum()))).reshape(-1)
    valid = np.isfinite(y)
    held = valid & ((np.cumsum(valid, axis=0) - 1 + off) % every == 0)
    train = valid & ~held
    use = (train.sum(axis=0) >= 3) & held.any(axis=0)
    y, held, train = y[:, use], held[:, use], train[:, use]
    sse, n = np.zeros(len(lambdas)), np.zeros(len(lambdas), dtype=np.int64)
    for start in range(0, y.shape[1], CHUNK):
        cols = slice(start, start + CHUNK)
        yc, hc, tc = y[:, cols], held[:, cols], train[:, cols]
        for i, lam in enumerate(lambdas):
            z = _whittaker_core(np.where(tc, yc, 0.0), tc.astype(np.float64), days, lam)
            err = (z - yc)[hc]
            sse[i] += float(np.dot(err, err))
            n[i] += err.size
    return sse, n


def choose_whittaker_lambda(sse, n, lambdas=WHITTAKER_LAMBDA_GRID) -> tuple[float, np.ndarray]:
    """The lambda of least mean squared leave-out error (:func:`whittaker_tuning`'s sums, possibly merged
    over blocks), and the mean squared error of each candidate (NaN where nothing was held out).

    Ties (within a relative 1e-9, so that float summation order over blocks cannot flip the choice) go to
    the smaller lambda. Nothing held out at all: :data:`DEFAULT_WHITTAKER_LAMBDA`, with a warning."""
    sse, n = np.asarray(sse, dtype=np.float64), np.asarray(n, dtype=np.int64)
    lambdas = np.asarray(lambdas, dtype=np.float64)
    if not (sse.shape == n.shape == lambdas.shape) or np.any(np.diff(lambdas) <= 0):
        raise ValueError("sse, n and lambdas must have one value per candidate, lambdas increasing")
    mse = np.where(n > 0, sse / np.maximum(n, 1), np.nan)
    if not np.isfinite(mse).any():
        logger.warning("whittaker tuning: no observed value could be held out; lambda %g", DEFAULT_WHITTAKER_LAMBDA)
        return DEFAULT_WHITTAKER_LAMBDA, mse
    best = np.nanmin(mse)
    return float(lambdas[np.flatnonzero(mse <= best * (1.0 + 1e-9))[0]]), mse


# --------------------------------------------------------------------------------------------
# SAR regression
# --------------------------------------------------------------------------------------------

class SarStats(NamedTuple):
    """Sufficient statistics of :func:`fit_sar_regression` over some dates and pixels, per band b.

    ``n`` (B,) samples; ``mean_f`` (B, S), ``mean_y`` (B,) their means; ``cov`` (B, S, S) and
    ``rhs`` (B, S) the *centred* normal equations: sum (f - mean_f)(f - mean_f)' and
    sum (f - mean_f)(y - mean_y). Parts of a region (blocks) merge with :func:`merge_sar_stats`;
    :func:`solve_sar_regression` turns the region's statistics into the coefficients.
    """

    n: np.ndarray
    mean_f: np.ndarray
    mean_y: np.ndarray
    cov: np.ndarray
    rhs: np.ndarray


def sar_regression_stats(obs, sar) -> SarStats:
    """:class:`SarStats` of ``obs`` (T, B, H, W) on ``sar`` (T, S, H, W): every date and pixel where
    the band and every SAR band are finite. Accumulated date by date in two passes (means, then
    centred cross-products), so memory stays at one date's worth of the arrays given."""
    obs = np.asarray(obs)
    sar = np.asarray(sar)
    _check_sar(sar, obs)
    t, nb = obs.shape[:2]
    s = sar.shape[1]
    n = np.zeros(nb)
    sum_f, sum_y = np.zeros((nb, s)), np.zeros(nb)
    cov, rhs = np.zeros((nb, s, s)), np.zeros((nb, s))

    def samples(i, band):
        f = sar[i].reshape(s, -1).astype(np.float64)
        y = obs[i, band].reshape(-1).astype(np.float64)
        m = np.isfinite(f).all(axis=0) & np.isfinite(y)
        return f[:, m], y[m]

    for i in range(t):
        for band in range(nb):
            f, y = samples(i, band)
            n[band] += y.size
            sum_f[band] += f.sum(axis=1)
            sum_y[band] += y.sum()
    mu_f = sum_f / np.maximum(n, 1)[:, None]
    mu_y = sum_y / np.maximum(n, 1)
    for i in range(t):
        for band in range(nb):
            f, y = samples(i, band)
            fc = f - mu_f[band][:, None]
            cov[band] += fc @ fc.T
            rhs[band] += fc @ (y - mu_y[band])
    return SarStats(n, mu_f, mu_y, cov, rhs)


def merge_sar_stats(parts) -> SarStats:
    """The :class:`SarStats` of the union of disjoint sets of samples (e.g. the blocks of a region).

    Pairwise update of the means and centred cross-products (Chan, Golub & LeVeque 1979): with
    d the difference of the two parts' means, cov = cov_a + cov_b + d d' n_a n_b / n -- exact
    algebra, so the merged statistics are those of the whole up to float rounding (relative
    1e-15), and stable where the raw sums X'X, X'y would cancel (SAR in dB: means ~ -15, spreads
    of a few dB). One part is returned unchanged, so a whole-region fit is bit for bit the same.
    """
    parts = list(parts)
    if not parts:
        raise ValueError("merge_sar_stats needs at least one part")
    acc = parts[0]
    for part in parts[1:]:
        na, nb_ = acc.n, part.n
        n = na + nb_
        nn = np.maximum(n, 1)
        df = part.mean_f - acc.mean_f          # (B, S)
        dy = part.mean_y - acc.mean_y          # (B,)
        wb = nb_ / nn                          # share of the new part: 1.0 exactly when acc is empty
        cross = na * nb_ / nn                  # 0 when either part is empty
        acc = SarStats(n, acc.mean_f + df * wb[:, None], acc.mean_y + dy * wb,
                       acc.cov + part.cov + np.einsum("bi,bj->bij", df, df) * cross[:, None, None],
                       acc.rhs + part.rhs + df * (dy * cross)[:, None])
    return acc


def solve_sar_regression(stats: SarStats) -> np.ndarray:
    """Coefficients (B, 1 + S) from :class:`SarStats` (see :func:`fit_sar_regression`)."""
    n, mu_f, mu_y, cov, rhs = stats
    nb, s = mu_f.shape
    coef = np.full((nb, 1 + s), np.nan)
    for band in range(nb):
        if n[band] < s + 1:
            logger.warning("sar_regression: band %d has %d samples with SAR, fewer than %d",
                           band, int(n[band]), s + 1)
            continue
        eig = np.linalg.eigvalsh(cov[band])
        if not eig[0] > 1e-12 * max(eig[-1], 1e-300):
            logger.warning("sar_regression: band %d: SAR features are rank deficient", band)
            continue
        sol = np.linalg.solve(cov[band], rhs[band])
        coef[band, 0] = mu_y[band] - mu_f[band] @ sol
        coef[band, 1:] = sol
    return coef


def fit_sar_regression(obs, sar) -> np.ndarray:
    """Least-squares coefficients (B, 1 + S) of ``obs[:, b] ~ a + sum_s c_s * sar[:, s]``.

    Pooled over all dates and pixels where the band and every SAR band are finite; row b is
    (a, c_0, ..., c_{S-1}) in the order of the SAR bands. A band with fewer than S + 1 such
    samples, or rank-deficient (e.g. constant) SAR values, gets a row of NaN. Solved through
    the centred normal equations, accumulated date by date (two passes: means, then
    cross-products), so memory stays at one date's worth whatever the length of the series.

    For a region too large to hold at once, fit block by block with the same result:
    ``solve_sar_regression(merge_sar_stats(sar_regression_stats(o, s) for o, s in blocks))``,
    then pass the coefficients to :func:`sar_regression` (``coef=``) of every block.
    """
    return solve_sar_regression(sar_regression_stats(obs, sar))


def _fit_per_pixel(y: np.ndarray, feats: np.ndarray, ok_sar: np.ndarray, min_samples: int):
    """Per-pixel least squares: y (T, P), feats (S, T, P), ok_sar (T, P) -> coef (1+S, P), NaN
    columns where a pixel has too few samples or degenerate SAR values."""
    s, _, npx = feats.shape
    m = np.isfinite(y) & ok_sar  # (T, P)
    n = m.sum(axis=0)
    nn = np.maximum(n, 1).astype(np.float64)
    yz = np.where(m, y, 0.0)
    fz = np.where(m[None], feats, 0.0)
    mu_f = fz.sum(axis=1) / nn  # (S, P)
    mu_y = yz.sum(axis=0) / nn
    fc = np.where(m[None], fz - mu_f[:, None], 0.0)
    yc = np.where(m, yz - mu_y, 0.0)
    cov = np.einsum("itp,jtp->pij", fc, fc)  # (P, S, S)
    rhs = np.einsum("itp,tp->pi", fc, yc)  # (P, S)
    eig = np.linalg.eigvalsh(cov)  # ascending, per pixel
    ok = (n >= max(min_samples, s + 1)) & (eig[:, 0] > 1e-9 * np.maximum(eig[:, -1], 1e-300))
    coef = np.full((1 + s, npx), np.nan)
    if ok.any():
        sol = np.linalg.solve(cov[ok], rhs[ok][..., None])[..., 0]  # (P_ok, S)
        coef[1:, ok] = sol.T
        coef[0, ok] = mu_y[ok] - np.einsum("ip,pi->p", mu_f[:, ok], sol)
    return coef


def sar_regression(obs, times, sar, per_pixel: bool = False, min_samples: int = 10, coef=None) -> np.ndarray:
    """Fill gaps from the paired SAR with a per-band linear regression, else linearly in time.

    For each optical band b: ``obs_b ~ a_b + sum_s c_{b,s} * sar_s`` over all S SAR bands
    (e.g. a + b VV + c VH), fitted by least squares on every date and pixel where the band and
    all SAR bands are finite (:func:`fit_sar_regression`). The SAR of this project is in dB,
    so a VH - VV "ratio" feature would be an exact linear combination of VV and VH and is not
    added.

    ``per_pixel=True``: each pixel with at least ``min_samples`` (and at least S + 1) dates
    where the band and the SAR are valid, and non-degenerate SAR values, gets its own
    coefficients; other pixels use the pooled fit. Off by default: with tens of dates and
    speckle-noisy SAR a per-pixel fit overfits easily.

    Gaps whose date has a finite value in every SAR band get the regression estimate, even at
    pixels never observed optically; gaps without SAR (or every gap of a band whose fit failed)
    fall back to :func:`linear_in_time`. NaN remains only where neither is possible (no SAR
    on that date and no valid optical value in the series). Estimates are not clipped.

    ``coef``: precomputed pooled coefficients (B, 1 + S), e.g. fitted over a whole region whose
    blocks are filled one at a time (see :func:`fit_sar_regression`); None fits them on ``obs``.
    Everything else is per pixel, so a block filled with the region's ``coef`` equals the same
    cells of the region filled at once.
    """
    obs, _ = _check_obs(obs, times)
    sar = _check_sar(sar, obs)
    t, nb, h, w = obs.shape
    s = sar.shape[1]
    out = linear_in_time(obs, times)
    if coef is None:
        coef = fit_sar_regression(obs, sar)
    else:
        coef = np.asarray(coef, dtype=np.float64)
        if coef.shape != (nb, 1 + s):
            raise ValueError(f"coef must be (B, 1 + S) = ({nb}, {1 + s}), got {coef.shape}")
    obs_flat = obs.reshape(t, nb, h * w)
    sar_flat = sar.reshape(t, s, h * w)
    out_flat = out.reshape(t, nb, h * w)  # a view: out is a fresh C-contiguous array
    for start in range(0, h * w, CHUNK):
        stop = min(start + CHUNK, h * w)
        feats = np.moveaxis(sar_flat[:, :, start:stop], 1, 0).astype(np.float64)  # (S, T, p)
        ok_sar = np.isfinite(feats).all(axis=0)  # (T, p)
        feats = np.where(ok_sar[None], feats, 0.0)
        for band in range(nb):
            y = obs_flat[:, band, start:stop].astype(np.float64)
            gap = ~np.isfinite(y) & ok_sar
            if not gap.any():
                continue
            use = np.broadcast_to(coef[band][:, None], (1 + s, stop - start))
            if per_pixel:
                own = _fit_per_pixel(y, feats, ok_sar, int(min_samples))
                use = np.where(np.isfinite(own).all(axis=0), own, use)
            pred = use[0][None] + np.einsum("sp,stp->tp", use[1:], feats)
            fill = gap & np.isfinite(pred)
            block = out_flat[:, band, start:stop]
            out_flat[:, band, start:stop] = np.where(fill, pred.astype(obs.dtype), block)
    return out


# --------------------------------------------------------------------------------------------
# harmonic (HANTS-style)
# --------------------------------------------------------------------------------------------

#: HANTS' settings of :func:`harmonic`: harmonics of a year, fit error tolerance (data units: reflectance),
#: rejection rounds, and the degree of overdetermination (values kept beyond the 2 n + 1 parameters)
DEFAULT_HARMONICS = 2
HARMONIC_PERIOD_DAYS = 365.25
HARMONIC_TOLERANCE = 0.05
HARMONIC_ITERATIONS = 5
HARMONIC_DOD = 1
_REJECT_SIGN = {"low": 1.0, "high": -1.0}


def _harmonic_design(days: np.ndarray, n_harmonics: int, period: float) -> np.ndarray:
    """(T, 1 + 2 n): 1, cos(k w t), sin(k w t) for k = 1..n, w = 2 pi / period."""
    cols = [np.ones_like(days)]
    for k in range(1, n_harmonics + 1):
        angle = 2.0 * np.pi * k * days / period
        cols += [np.cos(angle), np.sin(angle)]
    return np.stack(cols, axis=1)


def _harmonic_fit(y: np.ndarray, w: np.ndarray, design: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weighted least squares per column: the fitted curves (T, n) and whether each fit is well posed (n,).

    The normal equations of all columns at once: A' W A as one matrix product over the pairs of design
    columns; ill-conditioned columns (e.g. a short season seen only at its start) are not solved."""
    t, k = design.shape
    pairs = (design[:, :, None] * design[:, None, :]).reshape(t, k * k)
    normal = (pairs.T @ w).T.reshape(-1, k, k)                 # (n, k, k)
    rhs = (design.T @ (w * y)).T                               # (n, k)
    eig = np.linalg.eigvalsh(normal)
    ok = eig[:, 0] > 1e-10 * np.maximum(eig[:, -1], 1e-300)
    coef = np.zeros((y.shape[1], k))
    if ok.any():
        coef[ok] = np.linalg.solve(normal[ok], rhs[ok][..., None])[..., 0]
    return design @ coef.T, ok


def _rejected(err: np.ndarray, w: np.ndarray, n_out: np.ndarray, max_out: np.ndarray, ok: np.ndarray,
              tolerance: float) -> np.ndarray:
    """HANTS' rejection round: where the worst error beyond the fit exceeds the tolerance, the values whose
    error exceeds half of it, the worst first, while fewer than ``max_out`` are out. (T, n) bool."""
    err = np.where(w > 0, err, -np.inf)
    worst = err.max(axis=0)
    active = np.flatnonzero(ok & (worst > tolerance) & (n_out < max_out))
    out = np.zeros(err.shape, dtype=bool)
    if active.size:                                            # rank only the series that reject something
        e, top = err[:, active], worst[active]
        rank = np.argsort(np.argsort(-e, axis=0, kind="stable"), axis=0, kind="stable")  # 0 = the worst
        out[:, active] = (e > 0.5 * top) & (rank < (max_out - n_out)[active])
    return out


def _harmonic_estimate(y, valid, days, n_harmonics, period, tolerance, iterations, reject):
    design = _harmonic_design(days, n_harmonics, period)
    min_obs = design.shape[1] + HARMONIC_DOD                   # 2 n + 2
    w = valid.astype(np.float64)
    n_obs = valid.sum(axis=0)
    max_out = np.maximum(n_obs - min_obs, 0)
    n_out = np.zeros_like(n_obs)
    for round_ in range(iterations + 1):
        fit, ok = _harmonic_fit(y, w, design)
        if round_ == iterations or reject == "none":
            break
        diff = fit - y
        err = np.abs(diff) if reject == "both" else _REJECT_SIGN[reject] * diff
        out = _rejected(err, w, n_out, max_out, ok, tolerance)
        if not out.any():
            break
        w[out] = 0.0
        n_out = n_out + out.sum(axis=0)
    fall_back = ~ok | (n_obs < min_obs)                         # too few values, or ill-posed: linear
    if fall_back.any():
        fit[:, fall_back] = _linear_estimate(y[:, fall_back], valid[:, fall_back], days)
    return fit


def harmonic(obs, times, sar=None, n_harmonics: int = DEFAULT_HARMONICS, period: float = HARMONIC_PERIOD_DAYS,
             tolerance: float = HARMONIC_TOLERANCE, iterations: int = HARMONIC_ITERATIONS,
             reject: str = "low") -> np.ndarray:
    """Harmonic analysis of time series (HANTS, Roerink et al. 2000; GRASS ``r.hants``), per band and pixel.

    Least squares fit of a mean plus ``n_harmonics`` harmonics of ``period`` days (a year by default:
    n = 2 keeps the yearly and half-yearly cycles) to the observed values, in real time (irregular dates
    are fine). Then up to ``iterations`` rounds of HANTS' outlier rejection: where the worst value on the
    ``reject`` side of the fit lies more than ``tolerance`` (data units) from it, the values beyond half
    that error are dropped, the worst first, keeping at least 2 n + 2, and the curve refitted. ``reject``:
    ``"low"`` (HANTS' "Lo": values below the fit, as clouds and shadows in NDVI or dark-shadow
    reflectances), ``"high"`` (bright clouds in reflectance), ``"both"``, or ``"none"``. The final curve fills
    the gaps; observed values are returned unchanged (outliers included).

    Series with fewer than 2 n + 2 observed values, or whose observed dates cannot pin the harmonics down
    (an ill-conditioned fit, e.g. all values within a few days), fall back to :func:`linear_in_time` (its
    value for a single observation; NaN for none). Vectorised over series: the normal equations of every
    series as one matrix product, one batched solve per round. ``sar`` is ignored.
    """
    obs, days = _check_obs(obs, times)
    if int(n_harmonics) < 0 or not period > 0 or not tolerance >= 0 or int(iterations) < 0:
        raise ValueError("harmonic needs n_harmonics >= 0, period > 0, tolerance >= 0 and iterations >= 0")
    if reject not in ("low", "high", "both", "none"):
        raise ValueError(f"reject must be 'low', 'high', 'both' or 'none', got {reject!r}")
    return _per_series(obs, days, lambda y, v, d: _harmonic_estimate(
        y, v, d, int(n_harmonics), float(period), float(tolerance), int(iterations), reject))


# --------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------

BASELINES: dict[str, Callable[..., np.ndarray]] = {
    "nearest": nearest_in_time,
    "linear": linear_in_time,
    "whittaker": whittaker,
    "sar_regression": sar_regression,
    "harmonic": harmonic,
}


def run_baseline(name: str, obs, times, sar=None, **params) -> np.ndarray:
    """Run the baseline called ``name`` (a key of :data:`BASELINES`) with extra ``params``."""
    try:
        func = BASELINES[name]
    except KeyError:
        raise ValueError(f"unknown baseline {name!r}; choose from {sorted(BASELINES)}") from None
    return func(obs, times, sar, **params)
