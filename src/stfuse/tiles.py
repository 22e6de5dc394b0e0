"""Cut a (T, C, H, W) time-series cube into overlapping square tiles for training and inference.

Pure NumPy/pandas: nothing here imports GRASS. The caller reads the rasters into a float32
array ``cube`` of shape (T, C, H, W) -- T optical dates in time order, C channels -- and hands
it over together with one dict per channel and one dict per date:

``channels``
    ``{"name": "B04", "sensor": "S2", "kind": "optical" | "valid" | "sar" | "static"}``;
    exactly one ``valid`` channel (1 clear, 0 cloudy/invalid, NaN no data) and at least one
    ``optical`` channel; names are unique.
``dates``
    ``{"start_time": "2021-04-03T10:36:12Z", "optical_id": ..., "sar_id": ... | None,
    "sar_gap_days": float | None, "clear_fraction": float}``, in time order.

NaN means no data everywhere. A (date, pixel) cell is *clear* when its ``valid`` value is 1
and all its optical bands are finite (:func:`clear_mask`).

Temporal prior: :func:`export_tiles` appends, after the caller's channels, the channels of
:func:`stfuse.prior.prior_channels` computed on the *whole* cube before tiling (so tiles near
the borders of the region or of the series see every date): ``<band>_prior`` (kind
``"prior"``, with a ``"band"`` key) for every optical band -- the leave-one-out linear
interpolation in time of that band -- and ``prior_present`` (kind ``"prior"``, 1 where the
prior exists). The caller never passes prior channels itself. ``prior=False`` writes the old
layout without them (exports written before the prior existed load and train as before).

Files written by :func:`export_tiles` (read back with :func:`load_tiles`)
------------------------------------------------------------------------
``tiles.npy``
    float32 (N, T, C, size, size), a plain ``.npy`` written through
    ``numpy.lib.format.open_memmap``; readers memory-map it (``np.load(..., mmap_mode="r")``).
``index.csv``
    one row per tile in ``tiles.npy`` order: ``tile`` (row in ``tiles.npy``), ``row``, ``col``
    (upper-left pixel in the full region), ``split`` (``train`` | ``val``), ``valid_fraction``
    (fraction of clear (date, pixel) cells in the tile).
``clear_fraction.npy``
    float32 (N, T): fraction of clear pixels of each tile at each date (the dataset uses it to
    pick target dates without touching ``tiles.npy``).
``channels.json``
    channels (the caller's, then the prior channels), dates (each with ``offset_days`` from the
    first date), tile size, overlap, the split parameters, ``region`` (passed through from the
    caller), the full-region ``shape`` (its ``channels`` count includes the prior channels)
    and ``prior`` (true when the prior channels are there).
``stats.json``
    per-channel mean/std/count over the *training* tiles (see :func:`channel_stats`); a
    ``<band>_prior`` channel gets the statistics of its optical band (prior and target share
    units) and ``prior_present`` mean 0, std 1.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = [
    "KINDS",
    "FORMAT_VERSION",
    "tile_origins",
    "block_split",
    "clear_mask",
    "channel_stats",
    "prior_stats",
    "export_tiles",
    "load_tiles",
    "reassemble",
]

logger = logging.getLogger("stfuse.tiles")

KINDS = ("optical", "valid", "sar", "static", "prior")
FORMAT_VERSION = 1
STD_FLOOR = 1e-6

TILES_FILE = "tiles.npy"
INDEX_FILE = "index.csv"
CLEAR_FILE = "clear_fraction.npy"
CHANNELS_FILE = "channels.json"
STATS_FILE = "stats.json"
INDEX_COLUMNS = ("tile", "row", "col", "split", "valid_fraction")


# --------------------------------------------------------------------------------------------
# small helpers

def _int_param(value, name: str, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        if isinstance(value, numbers.Real) and float(value).is_integer():
            value = int(value)
        else:
            raise ValueError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _fraction_param(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a number within [0, 1], got {value!r}")
    return float(value)


def _jsonable(value):
    """Plain JSON values: numpy scalars/arrays to Python, NaN/inf to None, paths to str."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return [_jsonable(v) for v in value.tolist()]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, (pd.Timestamp,)):
        return value.isoformat()
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return str(value)


def _axis_starts(n: int, size: int, stride: int) -> list[int]:
    starts = list(range(0, n - size + 1, stride))
    if starts[-1] + size < n:  # shift the last tile back so it ends flush with the border
        starts.append(n - size)
    return starts


# --------------------------------------------------------------------------------------------
# tiling and splitting

def tile_origins(height, width, size, overlap) -> list[tuple[int, int]]:
    """Upper-left (row, col) corners of ``size`` x ``size`` tiles covering the whole region.

    Tiles step by ``stride = size - overlap`` in each direction; the last tile of a row/column
    is shifted back so that it ends exactly on the border (no padding, so the last overlap can
    be larger than ``overlap``). Origins are returned row-major (row, then col).
    """
    height = _int_param(height, "height", 1)
    width = _int_param(width, "width", 1)
    size = _int_param(size, "size", 1)
    overlap = _int_param(overlap, "overlap")
    if size > height or size > width:
        raise ValueError(f"tile size {size} is larger than the region (height {height}, "
                         f"width {width}); use a size <= {min(height, width)}")
    if overlap < 0 or overlap >= size:
        raise ValueError(f"overlap must be >= 0 and < size ({size}), got {overlap}")
    stride = size - overlap
    rows, cols = _axis_starts(height, size, stride), _axis_starts(width, size, stride)
    return [(r, c) for r in rows for c in cols]


def _as_origins(origins) -> np.ndarray:
    arr = np.asarray(origins, dtype=np.int64)
    if arr.size == 0:
        return arr.reshape(0, 2)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"origins must be a sequence of (row, col) pairs, got shape {arr.shape}")
    return arr


def _overlapping(a: np.ndarray, b: np.ndarray, size: int, chunk: int = 2048) -> np.ndarray:
    """For each origin in ``a``: does its footprint share a pixel with any footprint in ``b``?"""
    out = np.zeros(len(a), dtype=bool)
    if len(a) == 0 or len(b) == 0:
        return out
    for lo in range(0, len(a), chunk):
        part = a[lo:lo + chunk]
        dr = np.abs(part[:, None, 0] - b[None, :, 0]) < size
        dc = np.abs(part[:, None, 1] - b[None, :, 1]) < size
        out[lo:lo + chunk] = (dr & dc).any(axis=1)
    return out


def block_split(origins, size, block_size, val_fraction, seed) -> list[str]:
    """Spatially blocked train/val split of tiles; returns ``'train' | 'val' | 'gap'`` per tile.

    Tiles are grouped into square blocks of ``block_size`` pixels by their origin
    (``(row // block_size, col // block_size)``). ``round(val_fraction * n_blocks)`` whole blocks,
    drawn with ``numpy.random.default_rng(seed)``, go to ``val``; with ``val_fraction > 0`` and at
    least two blocks, each split gets at least one block (a single block is all ``train``).
    Finally every train tile whose footprint shares a pixel with a val tile footprint becomes
    ``gap`` (to be dropped), so no pixel is seen by both splits.
    """
    arr = _as_origins(origins)
    size = _int_param(size, "size", 1)
    block_size = _int_param(block_size, "block_size", 1)
    val_fraction = _fraction_param(val_fraction, "val_fraction")
    if len(arr) == 0:
        return []
    blocks = arr // block_size
    keys, inverse = np.unique(blocks, axis=0, return_inverse=True)  # sorted: stable block order
    inverse = inverse.reshape(-1)
    n_blocks = len(keys)
    n_val = int(math.floor(val_fraction * n_blocks + 0.5))
    if val_fraction > 0 and n_blocks >= 2:
        n_val = min(max(n_val, 1), n_blocks - 1)
    elif n_blocks < 2:
        if val_fraction > 0:
            logger.warning("block_split: only one block of %d px; every tile goes to train "
                           "(use a smaller block_size for a validation split)", block_size)
        n_val = 0
    rng = np.random.default_rng(seed)
    val_blocks = np.zeros(n_blocks, dtype=bool)
    val_blocks[rng.permutation(n_blocks)[:n_val]] = True
    is_val = val_blocks[inverse]
    split = np.where(is_val, "val", "train").astype(object)
    train_idx = np.flatnonzero(~is_val)
    gap = _overlapping(arr[train_idx], arr[is_val], size)
    split[train_idx[gap]] = "gap"
    return [str(s) for s in split]


# --------------------------------------------------------------------------------------------
# channel bookkeeping

def _check_channels(channels, n_channels: int) -> list[dict]:
    if not isinstance(channels, (list, tuple)):
        raise ValueError("channels must be a list of dicts")
    if len(channels) != n_channels:
        raise ValueError(f"len(channels) is {len(channels)} but the cube has C={n_channels} "
                         "channels (axis 1)")
    out, names = [], set()
    for i, ch in enumerate(channels):
        if not isinstance(ch, dict) or "name" not in ch or "kind" not in ch:
            raise ValueError(f"channels[{i}] must be a dict with at least 'name' and 'kind', "
                             f"got {ch!r}")
        if ch["kind"] not in KINDS:
            raise ValueError(f"channels[{i}] ({ch['name']!r}): kind must be one of {KINDS}, "
                             f"got {ch['kind']!r}")
        name = str(ch["name"])
        if name in names:
            raise ValueError(f"channels[{i}]: duplicate channel name {name!r}")
        names.add(name)
        out.append(dict(ch, name=name))
    kinds = [ch["kind"] for ch in out]
    if kinds.count("valid") != 1:
        raise ValueError("channels must hold exactly one 'valid' channel, "
                         f"got {kinds.count('valid')}")
    if "optical" not in kinds:
        raise ValueError("channels must hold at least one 'optical' channel")
    if "prior" in kinds:
        _check_prior_channels(out)
    return out


def _check_prior_channels(channels) -> None:
    """Prior channels must be exactly those :func:`stfuse.prior.prior_layout` makes, in order,
    after every other channel."""
    from stfuse.prior import prior_layout  # stfuse.prior imports this module

    base = [ch for ch in channels if ch["kind"] != "prior"]
    got = [(ch["name"], ch.get("band")) for ch in channels[len(base):]]
    want = [(ch["name"], ch.get("band")) for ch in prior_layout(base)]
    if got != want or any(ch["kind"] == "prior" for ch in channels[:len(base)]):
        raise ValueError("prior channels must come last and be exactly "
                         f"{[n for n, _ in want]} (with their 'band' keys), got "
                         f"{[ch['name'] for ch in channels if ch['kind'] == 'prior']}")


def channel_indices(channels) -> dict[str, list[int]]:
    """Positions of each channel kind: ``{"optical": [...], "valid": [i], "sar": [...], ...}``."""
    return {kind: [i for i, ch in enumerate(channels) if ch["kind"] == kind] for kind in KINDS}


def clear_mask(block: np.ndarray, valid_index: int, optical_indices) -> np.ndarray:
    """Clear cells of ``block`` (..., C, h, w): valid == 1 and all optical bands finite.

    Returns a bool array of shape (..., h, w).
    """
    clear = block[..., valid_index, :, :] == 1
    for i in optical_indices:
        clear &= np.isfinite(block[..., i, :, :])
    return clear


def _parse_time(value, i: int) -> pd.Timestamp:
    try:
        ts = pd.Timestamp(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"dates[{i}]['start_time'] is not a timestamp: {value!r}") from exc
    if ts is pd.NaT or pd.isna(ts):
        raise ValueError(f"dates[{i}]['start_time'] is missing")
    return ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")


def _check_dates(dates, n_dates: int) -> list[dict]:
    if not isinstance(dates, (list, tuple)):
        raise ValueError("dates must be a list of dicts")
    if len(dates) != n_dates:
        raise ValueError(f"len(dates) is {len(dates)} but the cube has T={n_dates} dates (axis 0)")
    times = []
    for i, d in enumerate(dates):
        if not isinstance(d, dict) or "start_time" not in d:
            raise ValueError(f"dates[{i}] must be a dict with a 'start_time', got {d!r}")
        times.append(_parse_time(d["start_time"], i))
    for i in range(1, len(times)):
        if times[i] < times[i - 1]:
            raise ValueError(f"dates must be in time order: dates[{i}] ({times[i]}) is before "
                             f"dates[{i - 1}] ({times[i - 1]})")
    out = []
    for d, ts in zip(dates, times):
        row = _jsonable(dict(d))
        row["offset_days"] = (ts - times[0]).total_seconds() / 86400.0
        out.append(row)
    return out


# --------------------------------------------------------------------------------------------
# statistics

def channel_stats(cube: np.ndarray, channels, pixel_mask: np.ndarray) -> list[dict]:
    """Per-channel mean, std (population, floored at 1e-6) and count over masked pixels.

    Only (date, pixel) cells where ``pixel_mask`` (H, W) is true are used, each once; NaN is
    ignored everywhere, and optical bands additionally ignore cells that are not clear
    (:func:`clear_mask`). A channel without any usable cell gets mean 0, std 1 and count 0
    (normalisation is then the identity) and a warning. Accumulated in float64, one date at a
    time, merging per-date moments (Chan et al.), so memory stays at one (H, W) slice.

    Prior channels (kind ``"prior"``) are not measured: ``<band>_prior`` gets the entry of its
    optical band (name and kind its own, plus ``"band"``), ``prior_present`` mean 0, std 1,
    count 0 (see :func:`prior_stats`).
    """
    idx = channel_indices(channels)
    vi, opt = idx["valid"][0], idx["optical"]
    n_dates = cube.shape[0]
    measured = [c for c in range(cube.shape[1]) if channels[c]["kind"] != "prior"]
    out = []
    acc = {c: [0, 0.0, 0.0] for c in measured}  # count, mean, M2
    for t in range(n_dates):
        date = cube[t]
        clear_t = clear_mask(date, vi, opt)[pixel_mask]
        for c in measured:
            x = date[c][pixel_mask]
            keep = np.isfinite(x)
            if channels[c]["kind"] == "optical":
                keep &= clear_t
            x = x[keep].astype(np.float64)
            if x.size == 0:
                continue
            n_b, mean_b = x.size, float(x.mean())
            m2_b = float(((x - mean_b) ** 2).sum())
            n_a, mean_a, m2_a = acc[c]
            n = n_a + n_b
            delta = mean_b - mean_a
            acc[c] = [n, mean_a + delta * n_b / n, m2_a + m2_b + delta * delta * n_a * n_b / n]
    for c in measured:
        ch = channels[c]
        n, mean, m2 = acc[c]
        if n == 0:
            logger.warning("stats: channel %r has no usable training pixel; using mean 0, std 1",
                           ch["name"])
            mean, std = 0.0, 1.0
        else:
            std = max(math.sqrt(m2 / n), STD_FLOOR)
        out.append({"name": ch["name"], "kind": ch["kind"], "mean": float(mean),
                    "std": float(std), "count": int(n)})
    derived = prior_stats(out, [ch for ch in channels if ch["kind"] == "prior"])
    by_name = {e["name"]: e for e in out + derived}
    return [by_name[ch["name"]] for ch in channels]  # channel order


def prior_stats(stats, prior_channels) -> list[dict]:
    """Statistics entries of prior channels, derived from the optical bands' entries in
    ``stats``: ``<band>_prior`` copies its band's mean/std/count, ``prior_present`` gets mean 0,
    std 1, count 0 (a 0/1 flag, not normalised)."""
    by_name = {e["name"]: e for e in stats}
    out = []
    for ch in prior_channels:
        band = ch.get("band")
        if band is None:
            out.append({"name": ch["name"], "kind": ch["kind"], "mean": 0.0, "std": 1.0,
                        "count": 0})
            continue
        if band not in by_name:
            raise ValueError(f"prior channel {ch['name']!r}: no statistics for its band {band!r}")
        src = by_name[band]
        out.append({"name": ch["name"], "kind": ch["kind"], "mean": float(src["mean"]),
                    "std": float(src["std"]), "count": int(src.get("count", 0)), "band": band})
    return out


# --------------------------------------------------------------------------------------------
# export / load / reassemble

def export_tiles(cube, channels, dates, out_dir, *, size, overlap, min_valid_fraction,
                 block_size, val_fraction, seed, region: dict | None = None,
                 prior: bool = True) -> dict:
    """Tile ``cube`` (T, C, H, W), split the tiles spatially and write them to ``out_dir``.

    See the module docstring for the files. Tiles whose split is ``gap`` (train tiles touching
    a val tile) or whose ``valid_fraction`` is below ``min_valid_fraction`` are not written.
    Statistics are computed over the union of the written *train* tile footprints, each
    pixel once. Files are written under temporary names and renamed at the end, so a failed
    export leaves no half-written ``tiles.npy`` behind.

    With ``prior=True`` (default) the temporal prior channels
    (:func:`stfuse.prior.prior_channels`) are computed on the whole ``cube`` and appended to
    every tile: ``tiles.npy`` then has C + B + 1 channels (B optical bands). ``cube`` and
    ``channels`` must not hold prior channels themselves.

    Returns a summary: ``{"n_tiles", "n_train", "n_val", "n_gap", "n_low_valid", "splits",
    "bytes_written", "tiles_shape", "files"}``.
    """
    cube = np.asarray(cube)
    if cube.ndim != 4:
        raise ValueError(f"cube must have 4 dimensions (T, C, H, W), got shape {cube.shape}")
    if cube.dtype != np.float32:
        cube = cube.astype(np.float32)
    n_dates, n_channels, height, width = cube.shape
    if n_dates < 1 or n_channels < 1:
        raise ValueError("cube must have at least one date and one channel, "
                         f"got shape {cube.shape}")
    channels = _check_channels(channels, n_channels)
    dates = _check_dates(dates, n_dates)
    if not isinstance(prior, bool):
        raise ValueError(f"prior must be True or False, got {prior!r}")
    if any(ch["kind"] == "prior" for ch in channels):
        raise ValueError("export_tiles computes the prior channels itself: pass the cube "
                         "without them (optical, valid, SAR, static channels)")
    min_valid_fraction = _fraction_param(min_valid_fraction, "min_valid_fraction")
    if region is not None and not isinstance(region, dict):
        raise ValueError(f"region must be a dict or None, got {type(region).__name__}")
    origins = tile_origins(height, width, size, overlap)
    size, overlap = int(size), int(overlap)
    split = np.asarray(block_split(origins, size, block_size, val_fraction, seed), dtype=object)
    idx = channel_indices(channels)
    vi, opt = idx["valid"][0], idx["optical"]

    # clear (date, pixel) counts per tile, from a per-date clear map
    # (summed-area table per date: four look-ups per tile instead of a slice count)
    orig = np.asarray(origins, dtype=np.int64)
    r0, c0 = orig[:, 0], orig[:, 1]
    r1, c1 = r0 + size, c0 + size
    clear = np.zeros((len(origins), n_dates), dtype=np.int64)
    sat = np.zeros((height + 1, width + 1), dtype=np.int64)
    for t in range(n_dates):
        np.cumsum(clear_mask(cube[t], vi, opt), axis=0, out=sat[1:, 1:])
        np.cumsum(sat[1:, 1:], axis=1, out=sat[1:, 1:])
        clear[:, t] = sat[r1, c1] - sat[r0, c1] - sat[r1, c0] + sat[r0, c0]
    clear_frac = clear / float(size * size)
    valid_fraction = clear_frac.mean(axis=1)

    low = valid_fraction < min_valid_fraction
    keep = (split != "gap") & ~low
    n_gap = int((split == "gap").sum())
    n_low = int(((split != "gap") & low).sum())
    n_train, n_val = int((keep & (split == "train")).sum()), int((keep & (split == "val")).sum())
    if n_train == 0:
        n_train_split = int((split == "train").sum())
        best = float(valid_fraction[split == "train"].max()) if n_train_split else float("nan")
        if n_train_split == 0:
            raise ValueError(
                f"no training tile: all {len(origins)} tiles are 'val' or 'gap' after the "
                f"block split (block_size={block_size}, val_fraction={val_fraction}, "
                f"size={size}, overlap={overlap}); lower val_fraction or use a larger block_size")
        raise ValueError(
            f"no training tile left: all {n_train_split} train tiles have valid_fraction below "
            f"min_valid_fraction={min_valid_fraction} (the clearest has {best:.4f}); lower "
            "min_valid_fraction (or change val_fraction/seed/block_size)")
    if n_val == 0 and float(val_fraction) > 0:
        logger.warning("export_tiles: no validation tile written (val_fraction=%s, block_size=%s, "
                       "min_valid_fraction=%s)", val_fraction, block_size, min_valid_fraction)

    if prior:
        from stfuse.prior import prior_channels, prior_layout  # stfuse.prior imports this module

        extra_channels = prior_layout(channels)
    else:
        extra_channels = []
    n_total = n_channels + len(extra_channels)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    kept = np.flatnonzero(keep)
    kept_origins = [origins[k] for k in kept]
    tmp = {name: out / f".{name}.partial" for name in
           (TILES_FILE, INDEX_FILE, CLEAR_FILE, CHANNELS_FILE, STATS_FILE)}
    try:
        # header (and file size) as open_memmap writes them, then the tiles one by one with plain
        # writes: memory holds one strip of rows (and its prior), not the cube's prior or the
        # written tiles. The prior of a pixel depends only on its own time series, so a strip's
        # prior is that strip of the whole cube's prior, bit for bit (stfuse.prior.temporal_prior).
        mm = np.lib.format.open_memmap(tmp[TILES_FILE], mode="w+", dtype=np.float32,
                                       shape=(len(kept), n_dates, n_total, size, size))
        offset = mm.offset
        del mm
        buf = np.empty((n_dates, n_total, size, size), dtype=np.float32)
        strip_row, strip, extra = None, None, None
        with open(tmp[TILES_FILE], "r+b") as fh:
            fh.seek(offset)
            for r, c in kept_origins:
                if r != strip_row:
                    strip_row = r
                    strip = np.ascontiguousarray(cube[:, :, r:r + size, :])
                    if prior:
                        extra = prior_channels(strip, channels, dates)[0]
                buf[:, :n_channels] = strip[:, :, :, c:c + size]
                if prior:
                    buf[:, n_channels:] = extra[:, :, :, c:c + size]
                fh.write(memoryview(buf).cast("B"))
            del strip, extra

        index = pd.DataFrame({
            "tile": np.arange(len(kept), dtype=np.int64),
            "row": np.array([o[0] for o in kept_origins], dtype=np.int64),
            "col": np.array([o[1] for o in kept_origins], dtype=np.int64),
            "split": split[kept].astype(str),
            "valid_fraction": valid_fraction[kept],
        })
        index.to_csv(tmp[INDEX_FILE], index=False, lineterminator="\n")
        with open(tmp[CLEAR_FILE], "wb") as fh:
            np.save(fh, clear_frac[kept].astype(np.float32))

        meta = {
            "format_version": FORMAT_VERSION,
            "channels": channels + extra_channels,
            "dates": dates,
            "size": size,
            "overlap": overlap,
            "shape": {"dates": n_dates, "channels": n_total, "height": height, "width": width},
            "prior": bool(prior),
            "split": {"block_size": int(block_size), "val_fraction": float(val_fraction),
                      "seed": _jsonable(seed), "min_valid_fraction": min_valid_fraction},
            "n_tiles": {"train": n_train, "val": n_val},
            "region": _jsonable(region) if region is not None else None,
        }
        tmp[CHANNELS_FILE].write_text(json.dumps(meta, indent=2, allow_nan=False) + "\n")

        train_mask = np.zeros((height, width), dtype=bool)
        for k in kept:
            if split[k] == "train":
                r, c = origins[k]
                train_mask[r:r + size, c:c + size] = True
        stats = {
            "format_version": FORMAT_VERSION,
            "computed_on": "train",
            "n_tiles": n_train,
            "n_pixels": int(train_mask.sum()),
            "std_floor": STD_FLOOR,
            "note": ("each pixel of the union of train tile footprints counted once per date; "
                     "NaN ignored; optical bands only where valid == 1 and all bands finite; "
                     "<band>_prior channels: the statistics of their band"),
            "channels": [],
        }
        base_stats = channel_stats(cube, channels, train_mask)
        stats["channels"] = base_stats + prior_stats(base_stats, extra_channels)
        tmp[STATS_FILE].write_text(json.dumps(stats, indent=2, allow_nan=False) + "\n")

        for name, path in tmp.items():
            os.replace(path, out / name)
    finally:
        for path in tmp.values():
            if path.exists():
                path.unlink()

    files = {name: str(out / name) for name in tmp}
    bytes_written = sum((out / name).stat().st_size for name in tmp)
    summary = {
        "n_tiles": int(len(kept)),
        "n_train": n_train,
        "n_val": n_val,
        "n_gap": n_gap,
        "n_low_valid": n_low,
        "splits": {"train": n_train, "val": n_val},
        "bytes_written": int(bytes_written),
        "tiles_shape": [int(len(kept)), n_dates, n_total, size, size],
        "files": files,
    }
    logger.info("export_tiles: %d tiles (%d train, %d val; dropped %d gap, %d below "
                "min_valid_fraction) -> %s, %.1f MB", len(kept), n_train, n_val, n_gap, n_low,
                out, bytes_written / 1e6)
    return summary


def load_tiles(out_dir):
    """Read an export: ``(tiles memmap (read-only), index DataFrame, channels, stats)``.

    ``channels`` and ``stats`` are the parsed ``channels.json`` and ``stats.json`` dicts.
    """
    out = Path(out_dir)
    for name in (TILES_FILE, INDEX_FILE, CHANNELS_FILE, STATS_FILE):
        if not (out / name).is_file():
            raise FileNotFoundError(f"{out / name} is missing; is {out} an export_tiles directory?")
    tiles = np.load(out / TILES_FILE, mmap_mode="r")
    index = pd.read_csv(out / INDEX_FILE, dtype={"tile": np.int64, "row": np.int64,
                                                  "col": np.int64, "split": str,
                                                  "valid_fraction": np.float64})
    channels = json.loads((out / CHANNELS_FILE).read_text())
    stats = json.loads((out / STATS_FILE).read_text())
    if len(index) != tiles.shape[0]:
        raise ValueError(f"{out}: index.csv has {len(index)} rows but tiles.npy holds "
                         f"{tiles.shape[0]} tiles")
    return tiles, index, channels, stats


def reassemble(tiles, origins, height, width, *, weights=None) -> np.ndarray:
    """Put tiles (N, T, C, s, s) back into a float32 (T, C, H, W) array.

    Overlapping tiles are averaged, ignoring NaN (a pixel is NaN only where every tile covering
    it is NaN, or no tile covers it). Sums are taken in float64, so overlaps of identical values
    give back those values exactly. ``weights`` (s, s), optional, gives a weighted average
    (e.g. to feather tile borders at inference).
    """
    if not hasattr(tiles, "shape"):
        tiles = np.asarray(tiles)
    if tiles.ndim != 5 or tiles.shape[-1] != tiles.shape[-2]:
        raise ValueError(f"tiles must have shape (N, T, C, size, size), got {tiles.shape}")
    arr = _as_origins(origins)
    if len(arr) != tiles.shape[0]:
        raise ValueError(f"{len(arr)} origins for {tiles.shape[0]} tiles")
    n, n_dates, n_channels, size, _ = tiles.shape
    height, width = _int_param(height, "height", 1), _int_param(width, "width", 1)
    if len(arr) and (arr.min() < 0 or (arr[:, 0] + size).max() > height
                     or (arr[:, 1] + size).max() > width):
        raise ValueError(f"tile footprints fall outside the {height} x {width} region")
    w = None
    if weights is not None:
        w = np.asarray(weights, dtype=np.float64)
        if w.shape != (size, size):
            raise ValueError(f"weights must have shape ({size}, {size}), got {w.shape}")
    total = np.zeros((n_dates, n_channels, height, width), dtype=np.float64)
    norm = np.zeros((n_dates, n_channels, height, width), dtype=np.float64)
    for i, (r, c) in enumerate(arr):
        tile = np.asarray(tiles[i], dtype=np.float64)
        ok = np.isfinite(tile)
        wt = ok.astype(np.float64) if w is None else ok * w
        total[:, :, r:r + size, c:c + size] += np.where(ok, tile, 0.0) * (1.0 if w is None else w)
        norm[:, :, r:r + size, c:c + size] += wt
    with np.errstate(invalid="ignore", divide="ignore"):
        result = np.where(norm > 0, total / np.where(norm > 0, norm, 1.0), np.nan)
    return result.astype(np.float32)
