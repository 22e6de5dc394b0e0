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

import numpy as np
import pandas as pd
from skimage.metrics import structural_similarity

from stfuse.baselines import days_since_start

__all__ = [
    "CLOUD_BINS",
    "GAP_BINS",
    "METRICS",
    "clear_fraction",
    "days_to_nearest_valid",
    "mae",
    "psnr",
    "rmse",
    "sam",
    "score",
    "ssim_hidden",
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
              win_size: int | None, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """SSIM map of the composite against the truth, and the pixels to average it over."""
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
    fill = float(truth[truth_ok].mean())
    ref = np.where(truth_ok, truth, fill)
    inside = hidden & truth_ok
    comp = np.where(inside, np.where(np.isfinite(pred), pred, fill), ref)
    if win_size is None:
        side = min(truth.shape)
        win_size = min(7, side if side % 2 else side - 1)
    if win_size < 3:
        raise ValueError(f"image {truth.shape} too small for SSIM (needs >= 3 x 3)")
    smap = structural_similarity(ref, comp, data_range=data_range, win_size=win_size,
                                 full=True, **kwargs)[1]
    return smap, evaluated


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

    Returns ``hidden`` (T, H, W) bool; the method then sees ``obs`` with NaN where hidden.
    """
    valid = np.asarray(valid, dtype=bool)
    if valid.ndim != 3:
        raise ValueError(f"valid must be (T, H, W), got {valid.shape}")
    if not 0.0 <= min_fraction <= max_fraction <= 1.0:
        raise ValueError(f"need 0 <= min_fraction <= max_fraction <= 1, got {min_fraction}, {max_fraction}")
    t = valid.shape[0]
    eval_dates = [int(e) for e in np.atleast_1d(np.asarray(eval_dates, dtype=np.int64))]
    for e in eval_dates:
        if not -t <= e < t:
            raise ValueError(f"evaluation date index {e} out of range for {t} dates")
    eval_dates = [e % t for e in eval_dates]
    cloud = 1.0 - clear_fraction(valid, observed)
    donors = np.flatnonzero((cloud >= min_fraction) & (cloud <= max_fraction))
    rng = np.random.default_rng(seed)
    hidden = np.zeros_like(valid)
    for e in eval_dates:
        choices = donors[donors != e]
        if choices.size == 0:
            raise ValueError(f"no donor date for evaluation date {e}: no other date has a cloud "
                             f"fraction within [{min_fraction}, {max_fraction}]")
        d = int(rng.choice(choices))
        hidden[e] = ~valid[d] & valid[e]
    return hidden


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
    """
    truth = np.asarray(truth, dtype=np.float64)
    pred = np.asarray(pred, dtype=np.float64)
    hidden = np.asarray(hidden, dtype=bool)
    bands = [str(b) for b in bands]
    data_range = _check_range(data_range)
    if truth.ndim != 4 or truth.shape != pred.shape:
        raise ValueError(f"truth and pred must be (T, B, H, W) of one shape, got {truth.shape}, {pred.shape}")
    t, nb, h, w = truth.shape
    if hidden.shape != (t, h, w):
        raise ValueError(f"hidden must be {(t, h, w)}, got {hidden.shape}")
    if len(bands) != nb:
        raise ValueError(f"{len(bands)} band names for {nb} bands")

    truth_ok = np.isfinite(truth).all(axis=1)
    pred_ok = np.isfinite(pred).all(axis=1)
    evaluated = hidden & truth_ok & pred_ok
    unfilled = hidden & truth_ok & ~pred_ok

    gap_labels = _bin_labels(gap_bins) if gap_days is not None else []
    cloud_labels = _bin_labels(cloud_bins) if cloud_fraction is not None else []
    if gap_days is not None:
        gap_days = np.asarray(gap_days, dtype=np.float64)
        if gap_days.shape != (t, h, w):
            raise ValueError(f"gap_days must be {(t, h, w)}, got {gap_days.shape}")
        gap_idx = _bin_index(gap_days, gap_bins)
    else:
        gap_idx = np.zeros((t, h, w), dtype=np.int64)
    if cloud_fraction is not None:
        cloud_fraction = np.asarray(cloud_fraction, dtype=np.float64)
        if cloud_fraction.shape != (t,):
            raise ValueError(f"cloud_fraction must be ({t},), got {cloud_fraction.shape}")
        date_cloud_idx = _bin_index(cloud_fraction, cloud_bins)
    else:
        date_cloud_idx = np.zeros(t, dtype=np.int64)
    cloud_idx = np.broadcast_to(date_cloud_idx[:, None, None], (t, h, w))

    # per evaluated pixel: errors per band, spectral angle, bins
    ti, ri, ci = np.nonzero(evaluated)
    err = (pred[ti, :, ri, ci] - truth[ti, :, ri, ci])  # (n, B)
    ang = _angles(truth[ti, :, ri, ci], pred[ti, :, ri, ci], axis=-1)  # (n,)
    px_gap, px_cloud = gap_idx[ti, ri, ci], cloud_idx[ti, ri, ci]
    un_t, un_r, un_c = np.nonzero(unfilled)
    un_gap, un_cloud = gap_idx[un_t, un_r, un_c], cloud_idx[un_t, un_r, un_c]

    # SSIM per date and band: mean over the date's evaluated pixels, and their number
    ssim_mean = np.full((t, nb), np.nan)
    ssim_n = evaluated.reshape(t, -1).sum(axis=1)
    for d in np.flatnonzero(ssim_n) if min(h, w) >= 3 else []:  # SSIM needs a 3 x 3 window
        for b in range(nb):
            smap, _ = _ssim_map(truth[d, b], pred[d, b], hidden[d], data_range, None)
            ssim_mean[d, b] = smap[evaluated[d]].mean()

    rows = []
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
            n, n_un = int(sel.sum()), int(usel.sum())
            e = err[sel]
            mse_b = (e**2).mean(axis=0) if n else np.full(nb, np.nan)
            mae_b = np.abs(e).mean(axis=0) if n else np.full(nb, np.nan)
            for b, name in enumerate(bands):
                rows.append((name, "mae", g_label, c_label, float(mae_b[b]), n, n_un))
                rows.append((name, "rmse", g_label, c_label, float(np.sqrt(mse_b[b])), n, n_un))
                rows.append((name, "psnr", g_label, c_label, _psnr_from_mse(mse_b[b], data_range), n, n_un))
            pooled_mse = float(mse_b.mean()) if n else float("nan")
            rows.append((ALL, "mae", g_label, c_label, float(mae_b.mean()) if n else float("nan"), n, n_un))
            rows.append((ALL, "rmse", g_label, c_label, float(np.sqrt(pooled_mse)), n, n_un))
            rows.append((ALL, "psnr", g_label, c_label, _psnr_from_mse(pooled_mse, data_range), n, n_un))
            a = ang[sel]
            a = a[np.isfinite(a)]
            rows.append((ALL, "sam", g_label, c_label, float(a.mean()) if a.size else float("nan"), n, n_un))
            if g is None:  # SSIM: whole-image metric, only in the 'all' gap bin
                dates = ssim_n > 0
                if c is not None:
                    dates &= date_cloud_idx == c
                wts = ssim_n[dates].astype(np.float64)
                if wts.sum() > 0:
                    per_band = (ssim_mean[dates] * wts[:, None]).sum(axis=0) / wts.sum()
                else:
                    per_band = np.full(nb, np.nan)
                for b, name in enumerate(bands):
                    rows.append((name, "ssim", g_label, c_label, float(per_band[b]), n, n_un))
                rows.append((ALL, "ssim", g_label, c_label, float(per_band.mean()) if nb else float("nan"),
                             n, n_un))
    df = pd.DataFrame(rows, columns=list(SCORE_COLUMNS))
    order = {m: i for i, m in enumerate(METRICS)}
    band_order = {b: i for i, b in enumerate(bands + [ALL])}
    df = df.sort_values(["metric", "band"], kind="stable",
                        key=lambda col: col.map(order if col.name == "metric" else band_order))
    return df.reset_index(drop=True)
