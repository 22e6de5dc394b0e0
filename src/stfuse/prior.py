"""Temporal prior of the optical bands: leave-one-out linear interpolation in time.

For every date t and pixel, :func:`temporal_prior` interpolates each optical band linearly in
time between the nearest *clear* observation strictly before t and the nearest one strictly
after t (clear: ``valid == 1`` and every optical band finite, the rule of
:func:`stfuse.tiles.clear_mask`), with the real time offsets of ``dates[*]["start_time"]``.
With a clear observation on one side only, that side's value is used (constant extension);
with none, the prior is NaN and ``present`` is False. Date t itself is never used, so a pixel
hidden at t (artificial masking, a benchmark hold-out) cannot leak into its own prior, and the
prior at t is the same whether t is clear or not: it is what per-pixel linear interpolation
(:func:`stfuse.baselines.linear_in_time`) predicts for t from the rest of the series.

The model (:mod:`stfuse.dataset`, :class:`stfuse.models.residual.ResidualOnPrior`) gets the
prior as extra inputs and learns a correction on top of it. The prior is computed on the whole
cube, before tiling, so tiles see the whole series; :func:`prior_channels` /
:func:`append_prior` are the one place where the extra channels are made, used both by
:func:`stfuse.tiles.export_tiles` and :func:`stfuse.infer.predict_cube`.

Extra channels, appended after the caller's channels, in this order: ``<band>_prior`` (kind
``"prior"``, key ``"band"`` naming the optical band) for every optical band in cube order, then
``prior_present`` (kind ``"prior"``, 1 where the prior exists, else 0).
"""

from __future__ import annotations

import numpy as np

from stfuse.tiles import channel_indices, check_cube_dates, clear_mask

__all__ = ["temporal_prior", "prior_channels", "append_prior", "has_prior", "prior_layout",
           "PRIOR_KIND", "PRESENT_NAME", "PRIOR_SUFFIX"]

PRIOR_KIND = "prior"
PRIOR_SUFFIX = "_prior"
PRESENT_NAME = "prior_present"


def _index_dtype(n: int):
    return np.int16 if n < np.iinfo(np.int16).max - 1 else np.int32


def _bracketing_dates(clear: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For (T, H, W) ``clear``: index of the last clear date strictly before t (-1: none) and of
    the first clear date strictly after t (T: none), both (T, H, W).

    A forward (backward) fill of "last (next) clear index": a running maximum (minimum) of
    ``where(clear, t, -1)`` (``where(clear, t, T)``) along time, shifted by one date. The running
    extreme is taken one date at a time with ``np.maximum`` / ``np.minimum`` (vectorised over
    pixels): ``np.maximum.accumulate(..., axis=0)`` gives the same result but walks the array
    in a cache-unfriendly order, ~100x slower.
    """
    n = clear.shape[0]
    dtype = _index_dtype(n)
    prev = np.empty(clear.shape, dtype=dtype)
    nxt = np.empty(clear.shape, dtype=dtype)
    if n == 0:
        return prev, nxt
    prev[0] = -1
    for t in range(1, n):  # last clear date <= t-1
        np.maximum(prev[t - 1], np.where(clear[t - 1], dtype(t - 1), dtype(-1)), out=prev[t])
    nxt[n - 1] = n
    for t in range(n - 2, -1, -1):  # first clear date >= t+1
        np.minimum(nxt[t + 1], np.where(clear[t + 1], dtype(t + 1), dtype(n)), out=nxt[t])
    return prev, nxt


def temporal_prior(cube, channels, dates, *, out=None) -> tuple[np.ndarray, np.ndarray]:
    """Leave-one-out linear interpolation in time of the optical bands of ``cube`` (T, C, H, W).

    ``channels`` and ``dates`` as for :func:`stfuse.tiles.export_tiles` (one dict per channel
    with ``name`` and ``kind``; one per date with ``start_time``, in time order). Other channels
    (SAR, static, earlier prior channels) are ignored.

    Returns ``(prior, present)``: float32 (T, B, H, W), the B optical bands in cube order, NaN
    where ``present`` is False; bool (T, H, W), True where at least one clear observation
    exists before or after t. Interpolation weights come from the time offsets in days
    (float64), the interpolation itself is float32; two clear neighbours at the same instant
    are averaged.

    ``out``, optional: a float32 (T, B, H, W) array (or view) that receives ``prior`` instead of a
    new array (:func:`prior_channels` passes its output, so the prior is not made twice).

    Every pixel's prior depends only on that pixel's time series (and the dates), so the prior
    of a spatial window of the cube equals the same window of the whole cube's prior, bit for
    bit: :func:`stfuse.tiles.export_tiles` and :func:`stfuse.infer.predict_cube` compute it one
    strip of rows at a time.
    """
    cube = np.asarray(cube)
    if cube.ndim != 4:
        raise ValueError(f"cube must have 4 dimensions (T, C, H, W), got shape {cube.shape}")
    n_dates, n_channels, height, width = cube.shape
    if len(channels) != n_channels:
        raise ValueError(f"len(channels) is {len(channels)} but the cube has C={n_channels} "
                         "channels (axis 1)")
    idx = channel_indices(channels)
    if len(idx["valid"]) != 1 or not idx["optical"]:
        raise ValueError("channels must hold exactly one 'valid' and at least one 'optical' "
                         "channel")
    vi, opt = idx["valid"][0], idx["optical"]
    days = np.array([d["offset_days"] for d in check_cube_dates(list(dates), n_dates)],
                    dtype=np.float64)

    clear = np.empty((n_dates, height, width), dtype=bool)
    for t in range(n_dates):
        clear[t] = clear_mask(cube[t], vi, opt)
    prev, nxt = _bracketing_dates(clear)
    del clear

    n_bands = len(opt)
    if out is None:
        prior = np.empty((n_dates, n_bands, height, width), dtype=np.float32)
    else:
        if out.shape != (n_dates, n_bands, height, width) or out.dtype != np.float32:
            raise ValueError(f"out must be float32 {(n_dates, n_bands, height, width)}, got "
                             f"{out.dtype} {out.shape}")
        prior = out
    present = np.zeros((n_dates, height, width), dtype=bool)
    n_pix = height * width
    flat = cube.reshape(-1) if cube.flags.c_contiguous else None
    band_series = None if flat is not None else [cube[:, b].reshape(n_dates, n_pix) for b in opt]
    pix = np.arange(n_pix, dtype=np.int64)
    for t in range(n_dates):
        p, q = prev[t].reshape(-1).astype(np.int64), nxt[t].reshape(-1).astype(np.int64)
        has_p, has_q = p >= 0, q < n_dates
        ok = has_p | has_q
        present[t] = ok.reshape(height, width)
        # one side missing: use the other side twice (constant extension, weight 0)
        p = np.where(has_p, p, np.where(has_q, q, 0))
        q = np.where(has_q, q, p)
        d_prev = days[t] - days[p]  # >= 0 where has_p
        span = days[q] - days[p]
        frac = np.zeros(n_pix, dtype=np.float64)
        both = has_p & has_q
        np.divide(d_prev, span, out=frac, where=both & (span > 0))
        frac[both & (span <= 0)] = 0.5  # two clear neighbours at the same instant
        frac = frac.astype(np.float32)
        for k, b in enumerate(opt):
            if flat is not None:
                v_prev = flat.take((p * n_channels + b) * n_pix + pix)
                v_next = flat.take((q * n_channels + b) * n_pix + pix)
            else:
                v_prev, v_next = band_series[k][p, pix], band_series[k][q, pix]
            est = v_prev + frac * (v_next - v_prev)
            est[~ok] = np.nan
            prior[t, k] = est.reshape(height, width)
    return prior, present


def prior_layout(channels) -> list[dict]:
    """The channel dicts :func:`prior_channels` appends for ``channels``."""
    out = []
    for ch in channels:
        if ch["kind"] == "optical":
            out.append({"name": f"{ch['name']}{PRIOR_SUFFIX}", "sensor": ch.get("sensor", "S2"),
                        "kind": PRIOR_KIND, "band": str(ch["name"])})
    out.append({"name": PRESENT_NAME, "sensor": "derived", "kind": PRIOR_KIND})
    return out


def has_prior(channels) -> bool:
    """Does a channel list already hold prior channels?"""
    return any(ch.get("kind") == PRIOR_KIND for ch in channels)


def prior_channels(cube, channels, dates) -> tuple[np.ndarray, list[dict]]:
    """The extra prior channels of ``cube``: float32 (T, B + 1, H, W) and their channel dicts.

    Channels ``<band>_prior`` (:func:`temporal_prior`, NaN where no prior) for every optical band
    in cube order, then ``prior_present`` (1.0 / 0.0). ValueError if ``channels`` already holds
    prior channels: they are always computed here, from the whole cube.
    """
    if has_prior(channels):
        raise ValueError("the cube already holds prior channels "
                         f"{[ch['name'] for ch in channels if ch.get('kind') == PRIOR_KIND]}; "
                         "pass the cube without them (they are computed from the optical bands)")
    shape = np.shape(cube)
    n_bands = sum(ch["kind"] == "optical" for ch in channels)
    if len(shape) != 4:
        raise ValueError(f"cube must have 4 dimensions (T, C, H, W), got shape {shape}")
    extra = np.empty((shape[0], n_bands + 1) + tuple(shape[2:]), dtype=np.float32)
    _, present = temporal_prior(cube, channels, dates, out=extra[:, :n_bands])
    extra[:, n_bands] = present
    return extra, prior_layout(channels)


def append_prior(cube, channels, dates) -> tuple[np.ndarray, list[dict]]:
    """``cube`` (T, C, H, W) with the prior channels appended (a new float32 array) and the
    extended channel list (see :func:`prior_channels`)."""
    extra, layout = prior_channels(cube, channels, dates)
    full = np.concatenate([np.asarray(cube, dtype=np.float32), extra], axis=1)
    return full, [dict(ch) for ch in channels] + layout
