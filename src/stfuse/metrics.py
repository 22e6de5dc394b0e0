"""Accuracy metrics for gap filling, the per-bin score table, and artificial gaps for evaluation.

Conventions
-----------
* Arrays are float; NaN (any non-finite value) means "no value". The element-wise metrics
  (:func:`mae`, :func:`rmse`, :func:`psnr`, :func:`sam`) use the elements selected by ``mask``
  (all if None) where *both* truth and prediction are finite, and return NaN when none is left.
* ``data_range`` (PSNR, SSIM) is always given explicitly, never inferred from the data; for
  surface reflectance in [0, 1] it is 1.0.
* The evaluation protocol hides real, observed pixels (:func:`transplant_masks` copies the
  cloud mask of another date onto an evaluation date), runs a method on the series with those
  pixels removed, and scores the method on the hidden pixels only (:func:`score`).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from skimage.metrics import structural_similarity

from stfuse.baselines import days_since_start

__all__ = [
    "CALIBRATION_MULTIPLES",
    "CLOUD_BINS",
    "GAP_BINS",
    "METRICS",
    "PART_COLUMNS",
    "SSIM_HALO",
    "SSIM_WIN",
    "ScoreSums",
    "apply_donors",
    "calibration",
    "calibration_from_totals",
    "calibration_parts",
    "clear_fraction",
    "days_to_nearest_valid",
    "mae",
    "merge_scores",
    "partial_scores",
    "psnr",
    "rmse",
    "sam",
    "score",
    "ssim_fill",
    "ssim_fill_parts",
    "ssim_hidden",
    "ssim_win_size",
    "transplant_donors",
    "transplant_masks",
    "valid_mask",
]

#: gap-length bin edges in days: [0,5), [5,10), [10,20), [20,40), [40,inf]
GAP_BINS = (0.0, 5.0, 10.0, 20.0, 40.0, np.inf)
#: cloud-fraction bin edges: [0,0.25), [0.25,0.5), [0.5,0.75), [0.75,1]
CLOUD_BINS = (0.0, 0.25, 0.5, 0.75, 1.0)
#: metric names in the order of :func:`score`'s table
METRICS = ("mae", "rmse", "psnr", "sam", "ssim")
ALL = "all"
SCORE_COLUMNS = ("band", "metric", "gap_bin", "cloud_bin", "value", "n_pixels", "n_unfilled")
#: columns of :func:`partial_scores`' table (``date`` is -1 on rows that are not per date)
PART_COLUMNS = ("band", "gap_bin", "cloud_bin", "date", "part", "value")
#: SSIM window side (skimage's default uniform 7 x 7 window), for images of at least 7 x 7
SSIM_WIN = 7
#: halo a block needs around its core so that the SSIM map on the core equals the region's:
#: a cell's SSIM depends only on the cells of its window, at most SSIM_WIN // 2 away (the
#: uniform filter is separable and local; at the region's edge the block's edge is the region's
#: edge, so skimage's 'reflect' padding is the same too)
SSIM_HALO = SSIM_WIN // 2


# --------------------------------------------------------------------------------------------
# element-wise metrics
# --------------------------------------------------------------------------------------------

def _pairs(truth, pred, mask) -> tuple[np.ndarray, np.ndarray]:
    truth = np.asarray(truth, dtype=np.float64)
    pred = np.asarray(pred, dtype=np.float64)
    if truth.shape != pred.shape:
        raise ValueError(f"truth {truth.shape} and pred {pred.shape} differ in shape")
    sel = np.isfinite(truth) & np.isfinite(pred)
    if mask is not None:
        sel &= np.broadcast_to(np.asarray(mask, dtype=bool), truth.shape)
    return truth[sel], pred[sel]


def _mse(truth, pred, mask=None) -> float:
    t, p = _pairs(truth, pred, mask)
    return float(np.mean((t - p) ** 2)) if t.size else float("nan")


def mae(truth, pred, mask=None) -> float:
    """Mean absolute error over the selected elements where both arrays are finite."""
    t, p = _pairs(truth, pred, mask)
    return float(np.mean(np.abs(t - p))) if t.size else float("nan")


def rmse(truth, pred, mask=None) -> float:
    """Root mean squared error over the selected elements where both arrays are finite."""
    return float(np.sqrt(_mse(truth, pred, mask)))


def _psnr_from_mse(mse: float, data_range: float) -> float:
    if not np.isfinite(mse):
        return float("nan")
    if mse == 0:
        return float("inf")
    return float(10.0 * np.log10(data_range**2 / mse))


def _check_range(data_range) -> float:
    data_range = float(data_range)
    if not data_range > 0:
        raise ValueError(f"data_range must be > 0, got {data_range!r}")
    return data_range


def psnr(truth, pred, data_range: float, mask=None) -> float:
    """Peak signal-to-noise ratio in dB, ``10 log10(data_range^2 / MSE)``; inf when MSE is 0."""
    return _psnr_from_mse(_mse(truth, pred, mask), _check_range(data_range))


def _angles(truth: np.ndarray, pred: np.ndarray, axis: int) -> np.ndarray:
    """Angle in degrees between the band vectors along ``axis``; NaN where a vector has a
    non-finite element or zero length. Uses 2 atan2(|u - v|, |u + v|) on the unit vectors,
    which is accurate for small angles (arccos of the cosine is not)."""
    a = np.moveaxis(np.asarray(truth, dtype=np.float64), axis, -1)
    b = np.moveaxis(np.asarray(pred, dtype=np.float64), axis, -1)
    na = np.linalg.norm(a, axis=-1, keepdims=True)
    nb = np.linalg.norm(b, axis=-1, keepdims=True)
    ok = (np.isfinite(a).all(axis=-1) & np.isfinite(b).all(axis=-1)
          & (na[..., 0] > 0) & (nb[..., 0] > 0))
    with np.errstate(invalid="ignore", divide="ignore"):
        u, v = a / na, b / nb
        ang = 2.0 * np.arctan2(np.linalg.norm(u - v, axis=-1), np.linalg.norm(u + v, axis=-1))
    return np.where(ok, np.degrees(ang), np.nan)


def sam(truth, pred, mask=None, axis: int = -3) -> float:
    """Spectral angle mapper: mean angle (degrees) between truth and prediction band vectors.

    ``axis`` is the band axis (default -3: band-first (B, H, W) or (T, B, H, W) images; use -1
    for (..., B) vectors). ``mask`` has the shape of the arrays without the band axis. Pixels
    with a non-finite band or a zero vector are left out. 0 for parallel vectors, 90 for
    orthogonal ones.
    """
    ang = _angles(truth, pred, axis)
    if mask is not None:
        ang = ang[np.broadcast_to(np.asarray(mask, dtype=bool), ang.shape)]
    ang = ang[np.isfinite(ang)]
    return float(ang.mean()) if ang.size else float("nan")


# --------------------------------------------------------------------------------------------
# SSIM on the hidden pixels
# --------------------------------------------------------------------------------------------

def _ssim_map(truth: np.ndarray, pred: np.ndarray, hidden: np.ndarray, data_range: float,
              win_size: int | None, *, fill: float | None = None,
              **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """SSIM map of the composite against the truth, and the pixels to average it over.

    ``fill``: the value put in place of NaN truth (and of unfilled hidden pixels); None = the
    mean of the finite truth of this image. A block of a larger region passes the region's
    value (:func:`ssim_fill`) so that its map equals the region's."""
    truth = np.asarray(truth, dtype=np.float64)
    pred = np.asarray(pred, dtype=np.float64)
    hidden = np.asarray(hidden, dtype=bool)
    if truth.ndim != 2 or truth.shape != pred.shape or truth.shape != hidden.shape:
        raise ValueError(f"truth, pred and hidden must be 2D of one shape, got "
                         f"{truth.shape}, {pred.shape}, {hidden.shape}")
    truth_ok = np.isfinite(truth)
    evaluated = hidden & truth_ok & np.isfinite(pred)
    if not truth_ok.any():
        return np.full(truth.shape, np.nan), evaluated
    if fill is None:
        fill = float(truth[truth_ok].mean())
    ref = np.where(truth_ok, truth, fill)
    inside = hidden & truth_ok
    comp = np.where(inside, np.where(np.isfinite(pred), pred, fill), ref)
    if win_size is None:
        win_size = ssim_win_size(truth.shape)
    if win_size < 3:
        raise ValueError(f"image {truth.shape} too small for SSIM (needs >= 3 x 3)")
    if win_size > min(truth.shape):
        raise ValueError(f"image {truth.shape} smaller than the SSIM window {win_size}: a block "
                         f"(core + halo) must be at least {win_size} cells along each side")
    smap = structural_similarity(ref, comp, data_range=data_range, win_size=win_size,
                                 full=True, **kwargs)[1]
    return smap, evaluated


def ssim_win_size(shape) -> int:
    """The SSIM window of an image (or region) of this 2D ``shape``: :data:`SSIM_WIN`, or the
    largest odd size that fits when a side is shorter. Below 3 SSIM is not defined (NaN)."""
    side = int(min(shape))
    return min(SSIM_WIN, side if side % 2 else side - 1)


def ssim_hidden(truth, pred, hidden, data_range: float, win_size: int | None = None, **kwargs) -> float:
    """SSIM of a filled 2D image, averaged over the hidden pixels only.

    The compared images are the truth and a *composite*: the truth outside ``hidden``, the
    prediction inside. So every SSIM window that overlaps hidden pixels compares the fill (and
    its fit with the surrounding real pixels) against the truth, and pixels further than half a
    window from the hidden region have no influence. The SSIM map
    (``skimage.metrics.structural_similarity(..., data_range=data_range, full=True)``, uniform
    ``win_size`` x ``win_size`` windows, default 7 or the largest odd size that fits) is then
    averaged over the hidden pixels where truth and prediction are finite.

    NaN handling: truth pixels that are NaN (e.g. clouds on the evaluation date itself) are set
    to the mean of the finite truth in *both* images, so they look identical; hidden pixels the
    method left NaN are set to that same mean in the composite (a "no information" value) and
    are not averaged. NaN if no hidden pixel is evaluated. ``kwargs`` go to skimage.
    """
    smap, evaluated = _ssim_map(truth, pred, hidden, _check_range(data_range), win_size, **kwargs)
    return float(smap[evaluated].mean()) if evaluated.any() else float("nan")


# --------------------------------------------------------------------------------------------
# gaps: validity, distance to the nearest valid date, artificial gaps
# --------------------------------------------------------------------------------------------

def valid_mask(obs) -> np.ndarray:
    """(T, H, W) True where every band of ``obs`` (T, B, H, W) is finite."""
    return np.isfinite(np.asarray(obs)).all(axis=1)


def days_to_nearest_valid(valid, times) -> np.ndarray:
    """(T, H, W) float days from each date to the nearest date where that pixel is valid.

    0 where the pixel is valid on the date itself, inf where it is never valid. For the
    evaluation, pass the validity of the series *given to the method* (after hiding), so that a
    hidden pixel's value is the length of the gap the method had to bridge.
    """
    valid = np.asarray(valid, dtype=bool)
    days = days_since_start(times)
    if valid.ndim != 3 or valid.shape[0] != days.size:
        raise ValueError(f"valid must be (T, H, W) with T = {days.size}, got {valid.shape}")
    t = days.size
    out = np.empty(valid.shape, dtype=np.float64)
    last = np.full(valid.shape[1:], -np.inf)  # time of the last valid date so far
    for i in range(t):
        last = np.where(valid[i], days[i], last)
        out[i] = days[i] - last
    nxt = np.full(valid.shape[1:], np.inf)
    for i in range(t - 1, -1, -1):
        nxt = np.where(valid[i], days[i], nxt)
        out[i] = np.minimum(out[i], nxt - days[i])
    return out


def clear_fraction(valid, observed=None) -> np.ndarray:
    """(T,) clear fraction of each date: the share of the *observed* pixels that are valid.

    ``valid`` (T, H, W) bool: clear on that date. ``observed`` (H, W) bool: the pixels the sensor
    observes at least once in the series (its footprint; in the cube, where the ``valid`` channel
    is not NaN on some date); None means every pixel. Pixels never observed count neither as
    clear nor as cloud. 0 on every date when no pixel is observed. The cloud fraction is
    ``1 - clear_fraction``. This is stfuse's one definition, also used by the pairing step
    (:func:`stfuse.bridge.clear_fractions`) and the benchmark's choice of evaluation dates.
    """
    valid = np.asarray(valid, dtype=bool)
    if valid.ndim != 3:
        raise ValueError(f"valid must be (T, H, W), got {valid.shape}")
    if observed is None:
        observed = np.ones(valid.shape[1:], dtype=bool)
    observed = np.asarray(observed, dtype=bool)
    if observed.shape != valid.shape[1:]:
        raise ValueError(f"observed must be (H, W) = {valid.shape[1:]}, got {observed.shape}")
    n = int(observed.sum())
    if n == 0:
        return np.zeros(valid.shape[0])
    return (valid & observed).reshape(valid.shape[0], -1).sum(axis=1) / n


def transplant_donors(cloud, eval_dates, seed, min_fraction: float = 0.05,
                      max_fraction: float = 0.7) -> dict[int, int]:
    """The donor date of each evaluation date, from the dates' cloud fractions alone (no pixel).

    ``cloud`` (T,): each date's cloud fraction (``1 - clear_fraction(valid, observed)``). For each
    evaluation date e (in the order given; negative indices count from the end), a donor d != e is
    drawn uniformly, with ``numpy.random.default_rng(seed)``, among the dates whose cloud fraction
    lies within [min_fraction, max_fraction]. Returns {e: d} in the order of ``eval_dates``; the
    same inputs and seed always give the same donors. Raises ValueError when an evaluation date
    has no donor. :func:`apply_donors` turns the donors into the hidden cells of any window.
    """
    cloud = np.asarray(cloud, dtype=np.float64)
    if cloud.ndim != 1:
        raise ValueError(f"cloud must be (T,), got {cloud.shape}")
    if not 0.0 <= min_fraction <= max_fraction <= 1.0:
        raise ValueError(f"need 0 <= min_fraction <= max_fraction <= 1, got {min_fraction}, {max_fraction}")
    t = cloud.shape[0]
    eval_dates = [int(e) for e in np.atleast_1d(np.asarray(eval_dates, dtype=np.int64))]
    for e in eval_dates:
        if not -t <= e < t:
            raise ValueError(f"evaluation date index {e} out of range for {t} dates")
    donors = np.flatnonzero((cloud >= min_fraction) & (cloud <= max_fraction))
    rng = np.random.default_rng(seed)
    out = {}
    for e in (e % t for e in eval_dates):
        choices = donors[donors != e]
        if choices.size == 0:
            raise ValueError(f"no donor date for evaluation date {e}: no other date has a cloud "
                             f"fraction within [{min_fraction}, {max_fraction}]")
        out[e] = int(rng.choice(choices))
    return out


def apply_donors(valid, donors: dict) -> np.ndarray:
    """Hidden cells (T, H, W) bool of ``valid`` (T, H, W) bool (clear cells) from the donors
    {e: d} of :func:`transplant_donors`: on each e, the cells valid on e and invalid on d. Per
    cell, so the hidden cells of a window are the region's, cut."""
    valid = np.asarray(valid, dtype=bool)
    if valid.ndim != 3:
        raise ValueError(f"valid must be (T, H, W), got {valid.shape}")
    hidden = np.zeros_like(valid)
    for e, d in donors.items():
        hidden[int(e)] = ~valid[int(d)] & valid[int(e)]
    return hidden


def transplant_masks(valid, eval_dates, seed, min_fraction: float = 0.05,
                     max_fraction: float = 0.7, observed=None) -> np.ndarray:
    """Artificial gaps: real cloud masks of other dates copied onto the evaluation dates.

    For each evaluation date e (in the order given), a donor date d != e is drawn uniformly,
    with ``numpy.random.default_rng(seed)``, among the dates whose cloud fraction
    (``1 - clear_fraction(valid, observed)``: the share of the pixels observed at least once
    that are not valid; ``observed`` (H, W) bool, None = every pixel) lies within
    [min_fraction, max_fraction]; the pixels invalid on d and valid on e are hidden on e.
    Pixels already invalid are never hidden, and dates that are not evaluation dates get no
    hidden pixel. The same inputs and seed always give the same result. Raises ValueError when
    an evaluation date has no donor.

    Computed as ``apply_donors(valid, transplant_donors(cloud, ...))``: the donor choice needs
    only the cloud fractions (region-wide counts), the hiding is per cell.

    Returns ``hidden`` (T, H, W) bool; the method then sees ``obs`` with NaN where hidden.
    """
    valid = np.asarray(valid, dtype=bool)
    if valid.ndim != 3:
        raise ValueError(f"valid must be (T, H, W), got {valid.shape}")
    cloud = 1.0 - clear_fraction(valid, observed)
    return apply_donors(valid, transplant_donors(cloud, eval_dates, seed, min_fraction, max_fraction))


# --------------------------------------------------------------------------------------------
# the score table
# --------------------------------------------------------------------------------------------

def _bin_labels(edges) -> list[str]:
    def fmt(x):
        return "inf" if np.isinf(x) else f"{x:g}"
    n = len(edges) - 1
    return [f"[{fmt(edges[i])},{fmt(edges[i + 1])}{']' if i == n - 1 else ')'}" for i in range(n)]


def _bin_index(values: np.ndarray, edges) -> np.ndarray:
    """Bin of each value: [e_i, e_i+1) and the last bin closed; -1 outside or NaN."""
    edges = np.asarray(edges, dtype=np.float64)
    if edges.ndim != 1 or edges.size < 2 or np.any(np.diff(edges) <= 0):
        raise ValueError(f"bin edges must be increasing, got {edges}")
    idx = np.searchsorted(edges, values, side="right") - 1
    idx = np.where(values == edges[-1], edges.size - 2, idx)  # last bin closed
    return np.where((idx >= 0) & (idx < edges.size - 1) & ~np.isnan(values), idx, -1)


def _core_slices(shape, core) -> tuple[slice, slice]:
    h, w = shape
    if core is None:
        return slice(0, h), slice(0, w)
    r0, c0, nr, nc = (int(v) for v in core)
    if not (0 <= r0 and 0 <= c0 and nr >= 0 and nc >= 0 and r0 + nr <= h and c0 + nc <= w):
        raise ValueError(f"core {tuple(core)} (row0, col0, rows, cols) is not inside the arrays' {(h, w)}")
    return slice(r0, r0 + nr), slice(c0, c0 + nc)


def ssim_fill_parts(truth, core=None) -> np.ndarray:
    """(2, T, B): sum and count of the finite truth of each date and band in ``core`` of a
    block (``truth`` (T, B, H, W); ``core`` as in :func:`partial_scores`). Summed over the
    blocks by :func:`ssim_fill`."""
    truth = np.asarray(truth, dtype=np.float64)
    if truth.ndim != 4:
        raise ValueError(f"truth must be (T, B, H, W), got {truth.shape}")
    rs, cs = _core_slices(truth.shape[2:], core)
    x = truth[:, :, rs, cs]
    ok = np.isfinite(x)
    return np.stack([np.where(ok, x, 0.0).sum(axis=(2, 3)), ok.sum(axis=(2, 3)).astype(np.float64)])


def ssim_fill(parts) -> np.ndarray:
    """(T, B) the region's SSIM fill value (the mean of the finite truth of each date and band,
    see :func:`ssim_hidden`) from the :func:`ssim_fill_parts` of all its blocks; NaN where there
    is no finite truth. Pass it to :func:`partial_scores` of every block."""
    total = np.sum(np.stack([np.asarray(p, dtype=np.float64) for p in parts]), axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total[1] > 0, total[0] / total[1], np.nan)


def partial_scores(truth, filled, hidden, bands, *, data_range: float = 1.0, gap_days=None,
                   cloud_fraction=None, core=None, win_size: int | None = None, ssim_fill=None,
                   gap_bins=GAP_BINS, cloud_bins=CLOUD_BINS) -> pd.DataFrame:
    """The additive parts of :func:`score`'s metrics over the hidden pixels of one block's core.

    Arguments as in :func:`score`, for a block of the region: the block's core plus a halo of up
    to :data:`SSIM_HALO` cells around it (clipped at the region's edge). ``core`` = (row0, col0,
    rows, cols) of the core inside the arrays given (None: all of them). Only pixels of the core
    are counted; the SSIM map is computed on the whole arrays given (core + halo), so that a core
    pixel's window sees its true neighbours and its SSIM equals the whole region's.

    So that blocks agree with the region, pass the region's values of what is not local:
    ``cloud_fraction`` (T,) per date over the whole region (not recomputed from the block);
    ``win_size`` the region's SSIM window (:func:`ssim_win_size` of the region's (H, W); None:
    of the arrays given); ``ssim_fill`` (T, B) the region's fill value for NaN truth
    (:func:`ssim_fill`; None: the mean of the finite truth of the arrays given). With the
    defaults and no ``core``, the arrays are the region itself, and
    ``merge_scores([partial_scores(...)])`` is :func:`score` (which is computed exactly so).

    Returns a table with columns :data:`PART_COLUMNS`, ``value`` a float sum, ``part`` one of:
    ``n``, ``n_unfilled`` (band 'all'), ``abs_err``, ``sq_err`` (sums of |error| and error^2 per
    band), ``sam_sum``, ``sam_n`` (band 'all'), per (gap_bin, cloud_bin) combination as in
    :func:`score` (date -1); per date ``date`` with evaluated core pixels, ``ssim_n`` (band
    'all') and ``ssim_sum`` per band (sum of the SSIM map on those pixels; left out when SSIM
    is undefined), with gap_bin 'all' and cloud_bin the date's bin label (``'none'`` outside the
    bins); and one ``data_range`` row. :func:`merge_scores` sums them over the blocks.
    """
    data_range = _check_range(data_range)
    (truth, pred), hidden, bands = _scored_arrays({"truth": truth, "pred": filled}, hidden, bands)
    t, nb, h, w = truth.shape
    rs, cs = _core_slices((h, w), core)
    if win_size is None:
        win_size = ssim_win_size((h, w))
    if ssim_fill is not None:
        ssim_fill = np.asarray(ssim_fill, dtype=np.float64)
        if ssim_fill.shape != (t, nb):
            raise ValueError(f"ssim_fill must be {(t, nb)}, got {ssim_fill.shape}")

    truth_ok = np.isfinite(truth).all(axis=1)
    pred_ok = np.isfinite(pred).all(axis=1)
    evaluated_full = hidden & truth_ok & pred_ok
    evaluated = evaluated_full[:, rs, cs]
    unfilled = (hidden & truth_ok & ~pred_ok)[:, rs, cs]
    tc, pc = truth[:, :, rs, cs], pred[:, :, rs, cs]
    ch, cw = evaluated.shape[1:]

    gap_labels = _bin_labels(gap_bins) if gap_days is not None else []
    cloud_labels = _bin_labels(cloud_bins) if cloud_fraction is not None else []
    if gap_days is not None:
        gap_days = np.asarray(gap_days, dtype=np.float64)
        if gap_days.shape != (t, h, w):
            raise ValueError(f"gap_days must be {(t, h, w)}, got {gap_days.shape}")
        gap_idx = _bin_index(gap_days[:, rs, cs], gap_bins)
    else:
        gap_idx = np.zeros((t, ch, cw), dtype=np.int64)
    if cloud_fraction is not None:
        cloud_fraction = np.asarray(cloud_fraction, dtype=np.float64)
        if cloud_fraction.shape != (t,):
            raise ValueError(f"cloud_fraction must be ({t},), got {cloud_fraction.shape}")
        date_cloud_idx = _bin_index(cloud_fraction, cloud_bins)
    else:
        date_cloud_idx = np.zeros(t, dtype=np.int64)
    cloud_idx = np.broadcast_to(date_cloud_idx[:, None, None], (t, ch, cw))

    # per evaluated core pixel: errors per band, spectral angle, bins
    ti, ri, ci = np.nonzero(evaluated)
    err = (pc[ti, :, ri, ci] - tc[ti, :, ri, ci])  # (n, B)
    ang = _angles(tc[ti, :, ri, ci], pc[ti, :, ri, ci], axis=-1)  # (n,)
    px_gap, px_cloud = gap_idx[ti, ri, ci], cloud_idx[ti, ri, ci]
    un_t, un_r, un_c = np.nonzero(unfilled)
    un_gap, un_cloud = gap_idx[un_t, un_r, un_c], cloud_idx[un_t, un_r, un_c]

    rows = [(ALL, ALL, ALL, -1, "data_range", data_range)]
    for g_label, g in [(ALL, None)] + [(lab, i) for i, lab in enumerate(gap_labels)]:
        for c_label, c in [(ALL, None)] + [(lab, i) for i, lab in enumerate(cloud_labels)]:
            sel = np.ones(ti.size, dtype=bool)
            usel = np.ones(un_t.size, dtype=bool)
            if g is not None:
                sel &= px_gap == g
                usel &= un_gap == g
            if c is not None:
                sel &= px_cloud == c
                usel &= un_cloud == c
            e = err[sel]
            # sums with the reductions np.mean uses, so that sum / n is bitwise score's mean
            abs_b, sq_b = np.abs(e).sum(axis=0), (e**2).sum(axis=0)
            rows.append((ALL, g_label, c_label, -1, "n", float(sel.sum())))
            rows.append((ALL, g_label, c_label, -1, "n_unfilled", float(usel.sum())))
            for b, name in enumerate(bands):
                rows.append((name, g_label, c_label, -1, "abs_err", float(abs_b[b])))
                rows.append((name, g_label, c_label, -1, "sq_err", float(sq_b[b])))
            a = ang[sel]
            a = a[np.isfinite(a)]
            rows.append((ALL, g_label, c_label, -1, "sam_sum", float(a.sum())))
            rows.append((ALL, g_label, c_label, -1, "sam_n", float(a.size)))

    # SSIM per date and band: sum of the map (of the whole block) on the evaluated core pixels
    ssim_n = evaluated.reshape(t, -1).sum(axis=1)
    for d in np.flatnonzero(ssim_n):
        k = int(date_cloud_idx[d])
        c_label = cloud_labels[k] if cloud_labels and k >= 0 else "none"
        rows.append((ALL, ALL, c_label, int(d), "ssim_n", float(ssim_n[d])))
        if win_size < 3:  # SSIM needs a 3 x 3 window: undefined, merged to NaN
            continue
        for b, name in enumerate(bands):
            fill = None if ssim_fill is None else float(ssim_fill[d, b])
            smap, _ = _ssim_map(truth[d, b], pred[d, b], hidden[d], data_range, win_size, fill=fill)
            rows.append((name, ALL, c_label, int(d), "ssim_sum", float(smap[rs, cs][evaluated[d]].sum())))
    return pd.DataFrame(rows, columns=list(PART_COLUMNS))


def merge_scores(parts) -> pd.DataFrame:
    """:func:`score`'s table from the :func:`partial_scores` of the blocks of a region.

    Every part is summed over the blocks (``math.fsum``: correctly rounded, so the result does
    not depend on the order of the blocks) and the metrics are finished as :func:`score` does
    (means = sums / counts, RMSE and PSNR from the MSE, SSIM per date then weighted by the dates'
    evaluated pixels). From a single part of the whole region the table is bitwise
    :func:`score`'s. From several blocks it equals the whole region's score up to the order of
    float summation inside the blocks (and of skimage's running-sum window filter, which starts
    at each block's edge): relative differences of order 1e-15, well below 1e-9.
    """
    sums = ScoreSums()
    for part in parts:
        sums.add(part)
    return sums.table()


class ScoreSums:
    """:func:`merge_scores` as a running sum: :meth:`add` folds in one block's :func:`partial_scores`
    table at a time and keeps only its floats (a row id and a value per row; the zero rows of every
    part but the first add nothing to a sum and are dropped), so merging the blocks of a whole
    Sentinel-2 tile holds a few arrays, not hundreds of tables. :meth:`table` sums each row over
    the parts with ``math.fsum`` (correctly rounded, so independent of the order of the parts) and
    finishes the metrics.
    """

    _KEYS = ("band", "gap_bin", "cloud_bin", "date", "part")

    def __init__(self):
        self._id: dict[tuple, int] = {}         # row key -> id, in first-seen order
        self._ids: list[np.ndarray] = []
        self._values: list[np.ndarray] = []
        self._ranges: set[float] = set()
        self._combos: list[tuple] | None = None  # (gap_bin, cloud_bin) rows and bands: the first part's
        self._bands: list[str] | None = None

    def add(self, part: pd.DataFrame) -> None:
        missing = set(PART_COLUMNS) - set(part.columns)
        if missing:
            raise ValueError(f"parts lack the columns {sorted(missing)}")
        is_range = (part.part == "data_range").to_numpy()
        self._ranges.update(float(v) for v in part.value.to_numpy()[is_range])
        part = part[~is_range]
        if self._combos is None:
            n_rows = part[part.part == "n"]
            self._combos = list(dict.fromkeys(zip(n_rows.gap_bin, n_rows.cloud_bin)))
            self._bands = list(dict.fromkeys(part.loc[part.part == "abs_err", "band"]))
        else:
            part = part[part.value.to_numpy() != 0]
        ids = self._id
        keys = zip(*(part[k].to_numpy() for k in self._KEYS))
        self._ids.append(np.fromiter((ids.setdefault(key, len(ids)) for key in keys), np.int64, len(part)))
        self._values.append(part.value.to_numpy(np.float64))

    def totals(self) -> dict[tuple, float]:
        """Row key -> its value summed over the parts (``math.fsum``)."""
        if not self._ids:
            return {}
        ids = np.concatenate(self._ids)
        order = np.argsort(ids, kind="stable")
        ids, values = ids[order], np.concatenate(self._values)[order]
        starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
        keys = list(self._id)
        return {keys[int(ids[a])]: math.fsum(g) for a, g in zip(starts, np.split(values, starts[1:]))}

    def table(self) -> pd.DataFrame:
        """:func:`score`'s table of everything added so far."""
        if self._combos is None:
            raise ValueError("merge_scores needs at least one part")
        if len(self._ranges) != 1:
            raise ValueError(f"parts disagree on data_range (or lack it): {sorted(self._ranges)}")
        data_range = next(iter(self._ranges))
        val = self.totals()
        combos, bands = self._combos, self._bands
        nb = len(bands)
        date_label = {int(d): c for (_, _, c, d, part) in self._id if part == "ssim_n"}
        dates = sorted(date_label)
        ssim_n = np.array([val[(ALL, ALL, date_label[d], d, "ssim_n")] for d in dates], dtype=np.float64)
        ssim_mean = np.array([[val.get((b, ALL, date_label[d], d, "ssim_sum"), np.nan) for b in bands]
                              for d in dates], dtype=np.float64).reshape(len(dates), nb)
        ssim_mean = ssim_mean / ssim_n[:, None] if dates else ssim_mean
        date_labels = np.array([date_label[d] for d in dates], dtype=object)

        rows = []
        for g_label, c_label in combos:
            n = int(val[(ALL, g_label, c_label, -1, "n")])
            n_un = int(val[(ALL, g_label, c_label, -1, "n_unfilled")])
            abs_b = np.array([val[(b, g_label, c_label, -1, "abs_err")] for b in bands], dtype=np.float64)
            sq_b = np.array([val[(b, g_label, c_label, -1, "sq_err")] for b in bands], dtype=np.float64)
            mse_b = sq_b / n if n else np.full(nb, np.nan)
            mae_b = abs_b / n if n else np.full(nb, np.nan)
            for b, name in enumerate(bands):
                rows.append((name, "mae", g_label, c_label, float(mae_b[b]), n, n_un))
                rows.append((name, "rmse", g_label, c_label, float(np.sqrt(mse_b[b])), n, n_un))
                rows.append((name, "psnr", g_label, c_label, _psnr_from_mse(mse_b[b], data_range), n, n_un))
            pooled_mse = float(mse_b.mean()) if n else float("nan")
            rows.append((ALL, "mae", g_label, c_label, float(mae_b.mean()) if n else float("nan"), n, n_un))
            rows.append((ALL, "rmse", g_label, c_label, float(np.sqrt(pooled_mse)), n, n_un))
            rows.append((ALL, "psnr", g_label, c_label, _psnr_from_mse(pooled_mse, data_range), n, n_un))
            sam_n = val[(ALL, g_label, c_label, -1, "sam_n")]
            sam_v = val[(ALL, g_label, c_label, -1, "sam_sum")] / sam_n if sam_n else float("nan")
            rows.append((ALL, "sam", g_label, c_label, float(sam_v), n, n_un))
            if g_label == ALL:  # SSIM: whole-image metric, only in the 'all' gap bin
                sel = np.ones(len(dates), dtype=bool) if c_label == ALL else date_labels == c_label
                wts = ssim_n[sel]
                if wts.sum() > 0:
                    per_band = (ssim_mean[sel] * wts[:, None]).sum(axis=0) / wts.sum()
                else:
                    per_band = np.full(nb, np.nan)
                for b, name in enumerate(bands):
                    rows.append((name, "ssim", g_label, c_label, float(per_band[b]), n, n_un))
                rows.append((ALL, "ssim", g_label, c_label, float(per_band.mean()) if nb else float("nan"),
                             n, n_un))
        out = pd.DataFrame(rows, columns=list(SCORE_COLUMNS))
        order = {m: i for i, m in enumerate(METRICS)}
        band_order = {b: i for i, b in enumerate(bands + [ALL])}
        out = out.sort_values(["metric", "band"], kind="stable",
                              key=lambda col: col.map(order if col.name == "metric" else band_order))
        return out.reset_index(drop=True)


def score(truth, pred, hidden, bands, *, data_range: float = 1.0, gap_days=None,
          cloud_fraction=None, gap_bins=GAP_BINS, cloud_bins=CLOUD_BINS) -> pd.DataFrame:
    """Score a filled series on the hidden pixels, overall and per gap-length / cloud bin.

    ``truth``, ``pred``: (T, B, H, W); ``hidden``: (T, H, W) bool; ``bands``: B band names;
    ``gap_days``: optional (T, H, W) days to the nearest valid observation of the input given to
    the method (:func:`days_to_nearest_valid`); ``cloud_fraction``: optional (T,) per date.

    Evaluated pixels: hidden, with every band of the truth finite and every band of the
    prediction finite; all bands and metrics use this one set. Hidden pixels with finite truth
    but a non-finite prediction are counted in ``n_unfilled`` and not scored.

    Returns a long table with columns band, metric, gap_bin, cloud_bin, value, n_pixels,
    n_unfilled, one row per combination of

    * band: each name in ``bands`` and ``'all'`` (all bands pooled: MAE over all values, RMSE
      and PSNR from the pooled MSE, SSIM the mean of the bands' SSIM);
    * metric: mae, rmse, psnr (``data_range``), sam (degrees; band ``'all'`` only, it is a
      spectral metric), ssim (:func:`ssim_hidden` with ``data_range``);
    * gap_bin: ``'all'`` and a label per gap-length bin (``'[0,5)'`` ... ``'[40,inf]'``; only
      ``'all'`` when ``gap_days`` is None);
    * cloud_bin: ``'all'`` and a label per cloud-fraction bin (only ``'all'`` when
      ``cloud_fraction`` is None).

    The last bin is closed on the right. Empty combinations are kept, with value NaN and
    n_pixels 0. SSIM is a 2D image metric: it is computed per date and band on the whole image
    (see :func:`ssim_hidden`) and averaged over dates weighted by their evaluated pixels; each
    value depends on whole windows, not on one pixel's gap length, so SSIM rows exist only in
    the ``'all'`` gap bin (cloud bins are per date and are fine); it is NaN for images smaller
    than 3 x 3 pixels. ``n_pixels`` counts
    evaluated pixel locations (date, row, column), the same for every band.

    Computed as ``merge_scores([partial_scores(...)])`` on the whole region, so that a region
    scored block by block (:func:`partial_scores` per block, then :func:`merge_scores`) uses the
    same code and gives the same table up to float summation order.
    """
    return merge_scores([partial_scores(truth, pred, hidden, bands, data_range=data_range,
                                        gap_days=gap_days, cloud_fraction=cloud_fraction,
                                        gap_bins=gap_bins, cloud_bins=cloud_bins)])


# --------------------------------------------------------------------------------------------
# calibration of a predictive standard deviation
# --------------------------------------------------------------------------------------------

#: sigma multiples k at which :func:`calibration_parts` counts the truth inside prediction +- k std
#: (1 and 2 are the ones reported; the others draw the reliability curve)
CALIBRATION_MULTIPLES = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0)
_CAL_N, _CAL_WITHIN = "cal_n", "cal_within_"


def _scored_arrays(cubes: dict, hidden, bands) -> tuple[list[np.ndarray], np.ndarray, list[str]]:
    """The (T, B, H, W) ``cubes`` as float64 (ValueError naming them unless all have one 4-d shape),
    ``hidden`` as bool (T, H, W) and the band names as str (one per band), checked."""
    arrays = [np.asarray(a, dtype=np.float64) for a in cubes.values()]
    shape = arrays[0].shape
    if arrays[0].ndim != 4 or any(a.shape != shape for a in arrays):
        names = " and ".join(cubes) if len(cubes) == 2 else ", ".join(list(cubes)[:-1]) + f" and {list(cubes)[-1]}"
        raise ValueError(f"{names} must be (T, B, H, W) of one shape, got "
                         f"{', '.join(str(a.shape) for a in arrays)}")
    hidden = np.asarray(hidden, dtype=bool)
    bands = [str(b) for b in bands]
    t, nb, h, w = shape
    if hidden.shape != (t, h, w):
        raise ValueError(f"hidden must be {(t, h, w)}, got {hidden.shape}")
    if len(bands) != nb:
        raise ValueError(f"{len(bands)} band names for {nb} bands")
    return arrays, hidden, bands


def calibration_parts(truth, pred, std, hidden, bands, *, core=None,
                      multiples=CALIBRATION_MULTIPLES) -> pd.DataFrame:
    """Counts for the calibration of a predictive standard deviation over the hidden pixels of a
    block's core, in :func:`partial_scores`' columns (so they travel and merge with them).

    ``truth``, ``pred``, ``std``: (T, B, H, W); ``hidden`` (T, H, W) bool; ``core`` as in
    :func:`partial_scores`. Evaluated pixels: those :func:`partial_scores` scores (hidden, truth
    and prediction finite in every band) whose std is finite in every band. Rows (gap_bin and
    cloud_bin ``'all'``, date -1): ``cal_n`` (band ``'all'``: evaluated pixels) and, per band and
    multiple k, ``cal_within_<k>``: pixels with ``|truth - pred| <= k * std``. Integer counts, so
    their sum over blocks is exact whatever the layout (:func:`calibration_from_totals`)."""
    (truth, pred, std), hidden, bands = _scored_arrays({"truth": truth, "pred": pred, "std": std}, hidden,
                                                       bands)
    t, nb, h, w = truth.shape
    rs, cs = _core_slices((h, w), core)
    ok = hidden & np.isfinite(truth).all(axis=1) & np.isfinite(pred).all(axis=1) & np.isfinite(std).all(axis=1)
    ti, ri, ci = np.nonzero(ok[:, rs, cs])
    tc, pc, sc = (a[:, :, rs, cs][ti, :, ri, ci] for a in (truth, pred, std))  # (n, B)
    err = np.abs(tc - pc)
    rows = [(ALL, ALL, ALL, -1, _CAL_N, float(ti.size))]
    for k in multiples:
        inside = (err <= float(k) * sc).sum(axis=0)
        rows += [(name, ALL, ALL, -1, f"{_CAL_WITHIN}{float(k):g}", float(inside[b])) for b, name in enumerate(bands)]
    return pd.DataFrame(rows, columns=list(PART_COLUMNS))


def calibration_from_totals(totals: dict) -> dict | None:
    """The calibration of the counts of :func:`calibration_parts`, summed (e.g.
    :meth:`ScoreSums.totals` of the blocks' parts): ``n`` (evaluated pixels), ``multiples``,
    ``bands``, ``observed`` {band or ``'all'``: share of pixels within k std, per multiple;
    ``'all'`` pools the bands}. None when the totals hold no calibration counts."""
    n_key = (ALL, ALL, ALL, -1, _CAL_N)
    if n_key not in totals:
        return None
    n = int(totals[n_key])
    counts: dict[str, dict[float, float]] = {}
    for (band, _, _, _, part), value in totals.items():
        if part.startswith(_CAL_WITHIN):
            counts.setdefault(band, {})[float(part[len(_CAL_WITHIN):])] = value
    bands = list(counts)
    multiples = sorted({k for c in counts.values() for k in c})
    observed = {b: [counts[b].get(k, 0.0) / n if n else float("nan") for k in multiples] for b in bands}
    observed[ALL] = [sum(counts[b].get(k, 0.0) for b in bands) / (n * len(bands)) if n and bands else float("nan")
                     for k in multiples]
    return {"n": n, "multiples": multiples, "bands": bands, "observed": observed}


def calibration(truth, pred, std, hidden, bands, *, multiples=CALIBRATION_MULTIPLES) -> dict:
    """:func:`calibration_from_totals` of a whole region (:func:`calibration_parts` of all of it)."""
    part = calibration_parts(truth, pred, std, hidden, bands, multiples=multiples)
    totals = {tuple(r[:5]): float(r[5]) for r in part.itertuples(index=False)}
    return calibration_from_totals(totals)
