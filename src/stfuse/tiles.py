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
    "sar_gap_days": float | None, "clear_fraction": float}``, in time order. Query dates
    (``"query": true``, :mod:`stfuse.anydate`) are dropped before anything is tiled or counted
    (:func:`observed_only`).

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
    ``numpy.lib.format.open_memmap``; :func:`load_tiles` memory-maps it, the training dataset
    reads it a (tile, date) at a time (:class:`stfuse.dataset.TileFile`).
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

Block by block (:func:`export_block_tiles`, :func:`merge_tile_store`)
--------------------------------------------------------------------
A region too large for one job is tiled per spatial block (:mod:`stfuse.blocks`): each block
writes the tiles of the *whole region's* grid and split whose origin lies in its core, from its
read window (core + halo; a halo of at least the tile size shows it every tile touching its
core), plus ``moments.npz`` (per date and channel count/mean/M2 over its core's training cells)
and ``tiles.json`` (parameters, counts, the sha256 of its ``tiles.npy``). The merge writes a
*tile store*: ``index.csv`` (the whole-region export's rows, in its order, plus ``store`` and
``store_tile`` locating each tile in a block's ``tiles.npy``), ``clear_fraction.npy``,
``channels.json`` (plus ``stores``) and ``stats.json`` (Chan-merged moments, equal to the
whole-region statistics within float rounding). Tiles, index, split and clear fractions are
exactly the whole-region export's; the tiles are never concatenated
(:class:`stfuse.dataset.GapFillDataset` reads a store as it reads an export).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import numbers
import os
from pathlib import Path

import numpy as np
import pandas as pd

from .cube import clear_mask  # the one definition of a clear cell (re-exported here)

from stfuse.blocks import to_dict as _block_to_dict

__all__ = [
    "KINDS",
    "FORMAT_VERSION",
    "tile_origins",
    "block_split",
    "clear_mask",
    "observed_only",
    "channel_stats",
    "prior_stats",
    "export_tiles",
    "export_block_tiles",
    "merge_tile_store",
    "load_tiles",
    "reassemble",
    "check_cube_channels",
    "check_cube_dates",
    "tile_clear_counts",
    "stats_document",
    "write_json",
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
#: files of one block's tiles (export_block_tiles) besides tiles.npy, index.csv, clear_fraction.npy
MOMENTS_FILE = "moments.npz"
BLOCK_FILE = "tiles.json"
#: columns a store's index.csv adds: the block tile directory (relative), the row in its tiles.npy
STORE_COLUMNS = ("store", "store_tile")


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
    """For each origin in ``a``: does its footprint share a pixel with any footprint in ``b``?

    The general path (any origins): O(len(a) * len(b)), in chunks; :func:`_gap_mask` takes the
    O(n) path for the product grids :func:`tile_origins` makes.
    """
    out = np.zeros(len(a), dtype=bool)
    if len(a) == 0 or len(b) == 0:
        return out
    for lo in range(0, len(a), chunk):
        part = a[lo:lo + chunk]
        dr = np.abs(part[:, None, 0] - b[None, :, 0]) < size
        dc = np.abs(part[:, None, 1] - b[None, :, 1]) < size
        out[lo:lo + chunk] = (dr & dc).any(axis=1)
    return out


def _grid_cells(arr: np.ndarray):
    """``(row starts, col starts, i, j)`` when ``arr`` (N, 2) holds every (row start, col start)
    pair of its unique starts exactly once (a full product grid, in any order), else None."""
    rows, i = np.unique(arr[:, 0], return_inverse=True)
    cols, j = np.unique(arr[:, 1], return_inverse=True)
    if len(rows) * len(cols) != len(arr):
        return None
    if np.bincount(i * len(cols) + j, minlength=len(arr)).min() != 1:
        return None
    return rows, cols, i.reshape(-1), j.reshape(-1)


def _near_range(starts: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """For each of the sorted ``starts``: the range [lo, hi) of starts less than ``size`` away."""
    return (np.searchsorted(starts, starts - size, side="right"),
            np.searchsorted(starts, starts + size, side="left"))


def _gap_mask(arr: np.ndarray, is_val: np.ndarray, size: int, fast: bool = True) -> np.ndarray:
    """Per origin: not val, and its footprint shares a pixel with a val footprint.

    On a product grid (what :func:`tile_origins` makes; ``fast=True``) in O(n): a val count
    matrix over the grid cells, its 2-D prefix sums, and per tile one rectangle query over the
    grid rows and columns less than ``size`` away -- ~52k tiles of a Sentinel-2 tile take
    milliseconds. Other origins take the O(n^2) :func:`_overlapping`; both give the same answer.
    """
    gap = np.zeros(len(arr), dtype=bool)
    train_idx = np.flatnonzero(~is_val)
    grid = _grid_cells(arr) if fast and len(arr) else None
    if grid is None:
        gap[train_idx] = _overlapping(arr[train_idx], arr[is_val], size)
        return gap
    rows, cols, i, j = grid
    counts = np.zeros((len(rows) + 1, len(cols) + 1), dtype=np.int64)
    np.add.at(counts, (i[is_val] + 1, j[is_val] + 1), 1)
    counts = counts.cumsum(axis=0).cumsum(axis=1)
    (rlo, rhi), (clo, chi) = _near_range(rows, size), _near_range(cols, size)
    ti, tj = i[train_idx], j[train_idx]
    r0, r1, c0, c1 = rlo[ti], rhi[ti], clo[tj], chi[tj]
    near = counts[r1, c1] - counts[r0, c1] - counts[r1, c0] + counts[r0, c0]
    gap[train_idx] = near > 0
    return gap


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
    split[_gap_mask(arr, is_val, size)] = "gap"
    return [str(s) for s in split]


# --------------------------------------------------------------------------------------------
# channel bookkeeping

def check_cube_channels(channels, n_channels: int) -> list[dict]:
    """The channel list of a (T, C, H, W) cube with ``n_channels`` channels, checked and copied: a dict with
    ``name`` and a ``kind`` of :data:`KINDS` each, names unique, exactly one ``valid`` channel, at least one
    ``optical``, prior channels last as :func:`stfuse.prior.prior_layout` makes them (ValueError naming the
    entry at fault)."""
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


def _parse_time(value, i: int) -> pd.Timestamp:
    try:
        ts = pd.Timestamp(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"dates[{i}]['start_time'] is not a timestamp: {value!r}") from exc
    if ts is pd.NaT or pd.isna(ts):
        raise ValueError(f"dates[{i}]['start_time'] is missing")
    return ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")


def check_cube_dates(dates, n_dates: int) -> list[dict]:
    """The date list of a cube with ``n_dates`` dates, checked (a dict with a ``start_time`` each, in time order;
    ValueError naming the entry at fault) and copied as JSON with ``offset_days`` from the first date (UTC)."""
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

def _date_moments(date: np.ndarray, channels, measured, pixel_mask: np.ndarray):
    """Count, mean and M2 (float64) of each ``measured`` channel of one date (C, h, w) over
    ``pixel_mask`` (h, w): NaN ignored, optical bands only where clear. Count 0: mean 0, M2 0."""
    idx = channel_indices(channels)
    clear_t = clear_mask(date, idx["valid"][0], idx["optical"])[pixel_mask]
    out = []
    for c in measured:
        x = date[c][pixel_mask]
        keep = np.isfinite(x)
        if channels[c]["kind"] == "optical":
            keep &= clear_t
        x = x[keep].astype(np.float64)
        if x.size == 0:
            out.append((0, 0.0, 0.0))
            continue
        mean_b = float(x.mean())
        out.append((int(x.size), mean_b, float(((x - mean_b) ** 2).sum())))
    return out


def _merge_moments(acc, n_b: int, mean_b: float, m2_b: float):
    """Chan et al.'s merge of (count, mean, M2) ``acc`` with another part's moments."""
    if n_b == 0:
        return acc
    n_a, mean_a, m2_a = acc
    n = n_a + n_b
    delta = mean_b - mean_a
    return [n, mean_a + delta * n_b / n, m2_a + m2_b + delta * delta * n_a * n_b / n]


def _stats_entries(acc: dict, channels) -> list[dict]:
    """Statistics entries, in channel order, from the moments ``acc`` (channel -> [n, mean, M2])
    of the measured channels; prior channels derived (:func:`prior_stats`)."""
    out = []
    for c in sorted(acc):
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
    measured = [c for c in range(cube.shape[1]) if channels[c]["kind"] != "prior"]
    acc = {c: [0, 0.0, 0.0] for c in measured}  # count, mean, M2
    for t in range(cube.shape[0]):
        for c, moments in zip(measured, _date_moments(cube[t], channels, measured, pixel_mask)):
            acc[c] = _merge_moments(acc[c], *moments)
    return _stats_entries(acc, channels)


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

class _ObservedDates:
    """The dates ``keep`` (ascending indices) of a (T, C, H, W) array, read lazily: ``view[t]`` and
    ``view[:, :, rows, cols]`` read those dates from ``base`` only (a memmap stays a memmap), so dropping the
    query dates costs no copy of the cube."""

    def __init__(self, base, keep):
        self.base, self.keep = base, np.asarray(keep, dtype=np.int64)
        self.shape = (len(self.keep),) + tuple(base.shape[1:])
        self.dtype, self.ndim = base.dtype, base.ndim

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        first = key[0]
        if isinstance(first, (int, np.integer)):
            return self.base[(int(self.keep[first]),) + key[1:]]
        return np.asarray(self.base[(self.keep[first],) + key[1:]])

    def __array__(self, dtype=None, copy=None):
        out = np.asarray(self.base[self.keep])
        return out if dtype is None else out.astype(dtype)


def observed_only(cube, dates):
    """``cube`` and ``dates`` without the query dates (``"query": true``: no optical acquisition, a date
    config infer.dates asked for, :mod:`stfuse.anydate`), and every date without its ``query``/``outputs``
    keys: training tiles and statistics are then those of the observed series, whatever infer.dates is.
    Unchanged (the same objects) when no date is a query date and none has those keys."""
    if not isinstance(dates, (list, tuple)) or not any(isinstance(d, dict) and ("query" in d or "outputs" in d)
                                                        for d in dates):
        return cube, dates
    if len(dates) != cube.shape[0]:
        raise ValueError(f"len(dates) is {len(dates)} but the cube has T={cube.shape[0]} dates (axis 0)")
    keep = [t for t, d in enumerate(dates) if not d.get("query")]
    if not keep:
        raise ValueError(f"every one of the {len(dates)} dates is a query date (no optical acquisition): "
                         "there is nothing to train on")
    stripped = [{k: v for k, v in dates[t].items() if k not in ("query", "outputs")} for t in keep]
    return (cube if len(keep) == len(dates) else _ObservedDates(cube, keep)), stripped


def _check_export_args(cube, channels, dates, prior, min_valid_fraction, region):
    """Checked (cube float32 (T, C, H, W), channels, dates with offset_days, min_valid_fraction); query dates
    dropped (:func:`observed_only`)."""
    if not hasattr(cube, "shape") or not hasattr(cube, "dtype"):
        cube = np.asarray(cube)
    if cube.ndim != 4:
        raise ValueError(f"cube must have 4 dimensions (T, C, H, W), got shape {cube.shape}")
    cube, dates = observed_only(cube, dates)
    if cube.dtype != np.float32:
        cube = np.asarray(cube).astype(np.float32)
    n_dates, n_channels = cube.shape[:2]
    if n_dates < 1 or n_channels < 1:
        raise ValueError("cube must have at least one date and one channel, "
                         f"got shape {cube.shape}")
    channels = check_cube_channels(channels, n_channels)
    dates = check_cube_dates(dates, n_dates)
    if not isinstance(prior, bool):
        raise ValueError(f"prior must be True or False, got {prior!r}")
    if any(ch["kind"] == "prior" for ch in channels):
        raise ValueError("export_tiles computes the prior channels itself: pass the cube "
                         "without them (optical, valid, SAR, static channels)")
    min_valid_fraction = _fraction_param(min_valid_fraction, "min_valid_fraction")
    if region is not None and not isinstance(region, dict):
        raise ValueError(f"region must be a dict or None, got {type(region).__name__}")
    return cube, channels, dates, min_valid_fraction


def _extra_channels(channels, prior: bool) -> list[dict]:
    if not prior:
        return []
    from stfuse.prior import prior_layout  # stfuse.prior imports this module

    return prior_layout(channels)


def tile_clear_counts(cube, origins: np.ndarray, size: int, channels) -> np.ndarray:
    """Clear (date, pixel) counts (N, T) int64 of the tiles at ``origins`` (N, 2) of ``cube``.

    A summed-area table per date: four look-ups per tile instead of a slice count.
    """
    idx = channel_indices(channels)
    vi, opt = idx["valid"][0], idx["optical"]
    n_dates, _, height, width = cube.shape
    r0, c0 = origins[:, 0], origins[:, 1]
    r1, c1 = r0 + size, c0 + size
    clear = np.zeros((len(origins), n_dates), dtype=np.int64)
    sat = np.zeros((height + 1, width + 1), dtype=np.int64)
    for t in range(n_dates):
        np.cumsum(clear_mask(cube[t], vi, opt), axis=0, out=sat[1:, 1:])
        np.cumsum(sat[1:, 1:], axis=1, out=sat[1:, 1:])
        clear[:, t] = sat[r1, c1] - sat[r0, c1] - sat[r1, c0] + sat[r0, c0]
    return clear


def _no_train_tile(n_tiles, n_train_split, best, *, block_size, val_fraction, size, overlap,
                   min_valid_fraction) -> ValueError:
    """The error of an export (or store) without a training tile."""
    if n_train_split == 0:
        return ValueError(
            f"no training tile: all {n_tiles} tiles are 'val' or 'gap' after the "
            f"block split (block_size={block_size}, val_fraction={val_fraction}, "
            f"size={size}, overlap={overlap}); lower val_fraction or use a larger block_size")
    return ValueError(
        f"no training tile left: all {n_train_split} train tiles have valid_fraction below "
        f"min_valid_fraction={min_valid_fraction} (the clearest has {best:.4f}); lower "
        "min_valid_fraction (or change val_fraction/seed/block_size)")


def _write_tiles(path, cube, origins, size: int, channels, dates, prior: bool) -> tuple[str, int]:
    """Write the tiles at ``origins`` (row-major, ``cube`` coordinates) as a float32 .npy.

    The header, then the tiles one by one with plain writes: memory holds one strip of rows (only
    the columns its tiles cover) and its prior, not the cube's prior or the written tiles. The
    prior of a pixel depends only on its own time series, so a strip's prior is that strip of the
    whole cube's prior, bit for bit (stfuse.prior.temporal_prior): tile bytes do not depend on
    the window the cube covers. Returns (sha256 hex of the file, computed while writing; bytes).
    """
    n_dates, n_channels = cube.shape[:2]
    n_extra = len(_extra_channels(channels, prior))
    if prior:
        from stfuse.prior import prior_channels  # stfuse.prior imports this module
    shape = (len(origins), n_dates, n_channels + n_extra, size, size)
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, {"descr": np.lib.format.dtype_to_descr(
        np.dtype(np.float32)), "fortran_order": False, "shape": shape})
    digest = hashlib.sha256(head.getvalue())
    buf = np.empty(shape[1:], dtype=np.float32)
    origins = np.asarray(origins, dtype=np.int64).reshape(-1, 2)
    starts = np.flatnonzero(np.r_[True, origins[1:, 0] != origins[:-1, 0]]) if len(origins) else []
    with open(path, "wb") as fh:
        fh.write(head.getvalue())
        for lo, hi in zip(starts, list(starts[1:]) + [len(origins)]):
            r, cmin, cmax = origins[lo, 0], origins[lo:hi, 1].min(), origins[lo:hi, 1].max() + size
            strip = np.ascontiguousarray(cube[:, :, r:r + size, cmin:cmax])
            extra = prior_channels(strip, channels, dates)[0] if prior else None
            for c in origins[lo:hi, 1] - cmin:
                buf[:, :n_channels] = strip[:, :, :, c:c + size]
                if prior:
                    buf[:, n_channels:] = extra[:, :, :, c:c + size]
                data = memoryview(buf).cast("B")
                fh.write(data)
                digest.update(data)
            del strip, extra
    return digest.hexdigest(), len(head.getvalue()) + buf.nbytes * len(origins)


def _index_frame(origins, split, valid_fraction) -> pd.DataFrame:
    origins = np.asarray(origins, dtype=np.int64).reshape(-1, 2)
    return pd.DataFrame({
        "tile": np.arange(len(origins), dtype=np.int64),
        "row": origins[:, 0].copy(), "col": origins[:, 1].copy(),
        "split": np.asarray(split).astype(str),
        "valid_fraction": np.asarray(valid_fraction, dtype=np.float64),
    })


def _export_meta(all_channels, dates, *, size, overlap, height, width, prior, block_size,
                 val_fraction, seed, min_valid_fraction, n_train, n_val, region) -> dict:
    """The ``channels.json`` document (of an export or of a store)."""
    return {
        "format_version": FORMAT_VERSION,
        "channels": list(all_channels),
        "dates": dates,
        "size": int(size),
        "overlap": int(overlap),
        "shape": {"dates": len(dates), "channels": len(all_channels), "height": int(height),
                  "width": int(width)},
        "prior": bool(prior),
        "split": {"block_size": int(block_size), "val_fraction": float(val_fraction),
                  "seed": _jsonable(seed), "min_valid_fraction": float(min_valid_fraction)},
        "n_tiles": {"train": int(n_train), "val": int(n_val)},
        "region": _jsonable(region) if region is not None else None,
    }


def stats_document(n_train: int, n_pixels: int, entries: list[dict]) -> dict:
    """The ``stats.json`` document: per-channel statistics ``entries`` over ``n_pixels`` pixels of ``n_train``
    train tiles, with the format version, the std floor and a note on what was counted."""
    return {
        "format_version": FORMAT_VERSION,
        "computed_on": "train",
        "n_tiles": int(n_train),
        "n_pixels": int(n_pixels),
        "std_floor": STD_FLOOR,
        "note": ("each pixel of the union of train tile footprints counted once per date; "
                 "NaN ignored; optical bands only where valid == 1 and all bands finite; "
                 "<band>_prior channels: the statistics of their band"),
        "channels": entries,
    }


def write_json(path, doc) -> None:
    """``doc`` as a tile store's JSON files are written: indented, and refusing NaN (ValueError: not JSON)."""
    Path(path).write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n")


def _publish(tmp: dict, out: Path) -> None:
    """Move the temporary files into place (after every one of them was written)."""
    for name, path in tmp.items():
        os.replace(path, out / name)


def _cleanup(tmp: dict) -> None:
    for path in tmp.values():
        if path.exists():
            path.unlink()


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
    cube, channels, dates, min_valid_fraction = _check_export_args(
        cube, channels, dates, prior, min_valid_fraction, region)
    n_dates, n_channels, height, width = cube.shape
    origins = np.asarray(tile_origins(height, width, size, overlap), dtype=np.int64)
    size, overlap = int(size), int(overlap)
    split = np.asarray(block_split(origins, size, block_size, val_fraction, seed), dtype=object)
    clear_frac = tile_clear_counts(cube, origins, size, channels) / float(size * size)
    valid_fraction = clear_frac.mean(axis=1)

    low = valid_fraction < min_valid_fraction
    keep = (split != "gap") & ~low
    n_gap = int((split == "gap").sum())
    n_low = int(((split != "gap") & low).sum())
    n_train, n_val = int((keep & (split == "train")).sum()), int((keep & (split == "val")).sum())
    if n_train == 0:
        n_train_split = int((split == "train").sum())
        best = float(valid_fraction[split == "train"].max()) if n_train_split else float("nan")
        raise _no_train_tile(len(origins), n_train_split, best, block_size=block_size,
                             val_fraction=val_fraction, size=size, overlap=overlap,
                             min_valid_fraction=min_valid_fraction)
    if n_val == 0 and float(val_fraction) > 0:
        logger.warning("export_tiles: no validation tile written (val_fraction=%s, block_size=%s, "
                       "min_valid_fraction=%s)", val_fraction, block_size, min_valid_fraction)
    extra_channels = _extra_channels(channels, prior)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    kept = np.flatnonzero(keep)
    tmp = {name: out / f".{name}.partial" for name in
           (TILES_FILE, INDEX_FILE, CLEAR_FILE, CHANNELS_FILE, STATS_FILE)}
    try:
        _write_tiles(tmp[TILES_FILE], cube, origins[kept], size, channels, dates, prior)
        _index_frame(origins[kept], split[kept], valid_fraction[kept]).to_csv(
            tmp[INDEX_FILE], index=False, lineterminator="\n")
        with open(tmp[CLEAR_FILE], "wb") as fh:
            np.save(fh, clear_frac[kept].astype(np.float32))
        write_json(tmp[CHANNELS_FILE], _export_meta(
            channels + extra_channels, dates, size=size, overlap=overlap, height=height,
            width=width, prior=prior, block_size=block_size, val_fraction=val_fraction, seed=seed,
            min_valid_fraction=min_valid_fraction, n_train=n_train, n_val=n_val, region=region))
        train_mask = np.zeros((height, width), dtype=bool)
        for r, c in origins[kept[split[kept] == "train"]]:
            train_mask[r:r + size, c:c + size] = True
        base_stats = channel_stats(cube, channels, train_mask)
        write_json(tmp[STATS_FILE], stats_document(n_train, int(train_mask.sum()), base_stats
                                                + prior_stats(base_stats, extra_channels)))
        _publish(tmp, out)
    finally:
        _cleanup(tmp)

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
        "tiles_shape": [int(len(kept)), n_dates, n_channels + len(extra_channels), size, size],
        "files": files,
    }
    logger.info("export_tiles: %d tiles (%d train, %d val; dropped %d gap, %d below "
                "min_valid_fraction) -> %s, %.1f MB", len(kept), n_train, n_val, n_gap, n_low,
                out, bytes_written / 1e6)
    return summary


# --------------------------------------------------------------------------------------------
# block by block: per-block tile files, merged into a store

def _check_block_window(block, cube_shape, region_rows: int, region_cols: int, size: int) -> None:
    """ValueError unless ``block``'s read window (the cube) holds every tile touching its core.

    That needs a halo of at least ``size`` cells on every side not at the region's edge, the rule
    of :func:`stfuse.blocks.halo_for`.
    """
    if tuple(cube_shape[2:]) != (block.read_rows, block.read_cols):
        raise ValueError(f"block {block.id}: the cube is {cube_shape[2]} x {cube_shape[3]} cells, "
                         f"its read window {block.read_rows} x {block.read_cols}")
    read_r1, read_c1 = block.read_row0 + block.read_rows, block.read_col0 + block.read_cols
    core_r1, core_c1 = block.row0 + block.rows, block.col0 + block.cols
    if min(block.read_row0, block.read_col0) < 0 or read_r1 > region_rows or read_c1 > region_cols \
            or not (block.read_row0 <= block.row0 and block.read_col0 <= block.col0
                    and core_r1 <= read_r1 and core_c1 <= read_c1):
        raise ValueError(f"block {block.id}: its core and read window do not fit the "
                         f"{region_rows} x {region_cols} region")
    margins = {"north": (block.row0 - block.read_row0, block.read_row0 == 0),
               "south": (read_r1 - core_r1, read_r1 == region_rows),
               "west": (block.col0 - block.read_col0, block.read_col0 == 0),
               "east": (read_c1 - core_c1, read_c1 == region_cols)}
    short = {side: m for side, (m, edge) in margins.items() if not edge and m < size}
    if short:
        sides = ", ".join(f"{m} cells {side}" for side, m in short.items())
        raise ValueError(f"block {block.id}: its halo ({sides}) is smaller than the tile size "
                         f"{size}, so it does not see every training tile touching its core; "
                         "config key blocks.halo must be at least tiles.size (leave it null)")


def _core_tiles(origins: np.ndarray, block, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (ascending) of the tiles whose footprint touches ``block``'s core, and which of
    them the block owns (origin in its core)."""
    r, c = origins[:, 0], origins[:, 1]
    r1, c1 = block.row0 + block.rows, block.col0 + block.cols
    touch = np.flatnonzero((r > block.row0 - size) & (r < r1) & (c > block.col0 - size) & (c < c1))
    rt, ct = r[touch], c[touch]
    owned = (rt >= block.row0) & (ct >= block.col0)
    return touch, owned


def _block_moments(cube, channels, block, mask: np.ndarray) -> dict:
    """Per (date, channel) count/mean/M2 over the core cells where ``mask`` (core) is set, as
    :func:`channel_stats` accumulates them (its per-date moments, cut to the block's core)."""
    measured = [c for c in range(cube.shape[1]) if channels[c]["kind"] != "prior"]
    shape = (cube.shape[0], len(measured))
    count, mean, m2 = np.zeros(shape, np.int64), np.zeros(shape), np.zeros(shape)
    rs = slice(block.core_row_offset, block.core_row_offset + block.rows)
    cs = slice(block.core_col_offset, block.core_col_offset + block.cols)
    for t in range(cube.shape[0]):
        date = np.asarray(cube[t, :, rs, cs])
        for k, (n, mu, q) in enumerate(_date_moments(date, channels, measured, mask)):
            count[t, k], mean[t, k], m2[t, k] = n, mu, q
    names = np.array([channels[c]["name"] for c in measured], dtype=str)
    return {"count": count, "mean": mean, "m2": m2, "channels": names}


def _block_counts(owned, keep, split, low, valid_fraction) -> dict:
    """What a block's owned tiles add to the store's counts (and its "no training tile" error)."""
    train_split = owned & (split == "train")
    return {
        "n_owned": int(owned.sum()),
        "n_tiles": int((owned & keep).sum()),
        "n_train": int((owned & keep & (split == "train")).sum()),
        "n_val": int((owned & keep & (split == "val")).sum()),
        "n_gap": int((owned & (split == "gap")).sum()),
        "n_low_valid": int((owned & (split != "gap") & low).sum()),
        "n_train_split": int(train_split.sum()),
        "best_train_valid_fraction": float(valid_fraction[train_split].max())
        if train_split.any() else None,
    }


def export_block_tiles(cube, channels, dates, block, region_rows, region_cols, out_dir, *, size,
                       overlap, min_valid_fraction, block_size, val_fraction, seed,
                       region: dict | None = None, prior: bool = True) -> dict:
    """The training tiles of one spatial block, exactly as :func:`export_tiles` on the whole
    region would write them; :func:`merge_tile_store` joins the blocks into a store.

    ``cube`` is the block's read-window cube (T, C, read_rows, read_cols), hidden cells already
    applied. The grid and split are the whole region's (:func:`tile_origins`,
    :func:`block_split`); the block owns the tiles whose origin lies in its core. Files:
    ``tiles.npy`` (owned kept tiles, row-major, same bytes as export_tiles), ``index.csv``
    (``tile`` = row in this tiles.npy, ``row``/``col`` in region cells), ``clear_fraction.npy``,
    ``moments.npz`` (per date and channel count/mean/M2 over the core cells covered by a kept
    train tile of the whole grid, owned or not) and ``tiles.json`` (parameters, counts, the
    sha256 of tiles.npy). A block may own no tile (an empty tiles.npy). Returns tiles.json's dict.
    """
    cube, channels, dates, min_valid_fraction = _check_export_args(
        cube, channels, dates, prior, min_valid_fraction, region)
    region_rows = _int_param(region_rows, "region_rows", 1)
    region_cols = _int_param(region_cols, "region_cols", 1)
    origins = np.asarray(tile_origins(region_rows, region_cols, size, overlap), dtype=np.int64)
    size, overlap = int(size), int(overlap)
    _check_block_window(block, cube.shape, region_rows, region_cols, size)
    split = np.asarray(block_split(origins, size, block_size, val_fraction, seed), dtype=object)
    touch, owned = _core_tiles(origins, block, size)
    local = origins[touch] - np.array([block.read_row0, block.read_col0])
    if len(local) and (local.min() < 0 or (local[:, 0] + size).max() > block.read_rows
                       or (local[:, 1] + size).max() > block.read_cols):
        raise ValueError(f"block {block.id}: a tile touching its core leaves its read window")
    clear_frac = tile_clear_counts(cube, local, size, channels) / float(size * size)
    valid_fraction = clear_frac.mean(axis=1)
    split, low = split[touch], valid_fraction < min_valid_fraction
    keep = (split != "gap") & ~low
    mask = np.zeros((block.rows, block.cols), dtype=bool)
    for r, c in origins[touch[keep & (split == "train")]] - np.array([block.row0, block.col0]):
        mask[max(r, 0):max(r + size, 0), max(c, 0):max(c + size, 0)] = True
    mine = np.flatnonzero(owned & keep)
    doc = {"format_version": FORMAT_VERSION, "kind": "block_tiles", "block": _block_to_dict(block),
           "region_shape": {"rows": region_rows, "cols": region_cols},
           "channels": channels + _extra_channels(channels, prior),
           "dates": dates, "size": size, "overlap": overlap, "prior": bool(prior),
           "split": _split_params(block_size, val_fraction, seed, min_valid_fraction),
           "region": _jsonable(region) if region is not None else None,
           "counts": dict(_block_counts(owned, keep, split, low, valid_fraction),
                          n_pixels=int(mask.sum()))}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = {name: out / f".{name}.partial" for name in
           (TILES_FILE, INDEX_FILE, CLEAR_FILE, MOMENTS_FILE, BLOCK_FILE)}  # tiles.json last
    try:
        digest, nbytes = _write_tiles(tmp[TILES_FILE], cube, local[mine], size, channels, dates,
                                      prior)
        _index_frame(origins[touch[mine]], split[mine], valid_fraction[mine]).to_csv(
            tmp[INDEX_FILE], index=False, lineterminator="\n")
        with open(tmp[CLEAR_FILE], "wb") as fh:
            np.save(fh, clear_frac[mine].astype(np.float32))
        with open(tmp[MOMENTS_FILE], "wb") as fh:
            np.savez(fh, **_block_moments(cube, channels, block, mask))
        doc.update(sha256=f"sha256:{digest}", bytes=int(nbytes),
                   tiles_shape=[len(mine), len(dates), len(doc["channels"]), size, size])
        write_json(tmp[BLOCK_FILE], doc)
        _publish(tmp, out)
    finally:
        _cleanup(tmp)
    return doc


def _split_params(block_size, val_fraction, seed, min_valid_fraction) -> dict:
    return {"block_size": int(block_size), "val_fraction": float(val_fraction),
            "seed": _jsonable(seed), "min_valid_fraction": float(min_valid_fraction)}


def _read_block_parts(block_tile_dirs) -> list[tuple[Path, dict]]:
    """(directory, tiles.json) of every block, in plan order (core origin, row-major)."""
    parts = []
    for d in block_tile_dirs:
        path = Path(d) / BLOCK_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing; is {d} an export_block_tiles directory?")
        parts.append((Path(d), json.loads(path.read_text())))
    if not parts:
        raise ValueError("merge_tile_store: no block tile directory given")
    ids = [doc["block"]["id"] for _, doc in parts]
    if len(set(ids)) != len(ids):
        raise ValueError(f"merge_tile_store: a block is given twice ({sorted(ids)})")
    return sorted(parts, key=lambda p: (p[1]["block"]["row0"], p[1]["block"]["col0"]))


def _check_parts(parts, want: dict) -> None:
    """ValueError unless every block was exported with the store's parameters and layout."""
    first = parts[0][1]
    ref = dict(want, channels=first["channels"], dates=first["dates"])
    for d, doc in parts:
        diff = [k for k in ref if doc.get(k) != ref[k]]
        if diff:
            shown = {k: (doc.get(k), ref[k]) for k in diff if k not in ("channels", "dates")}
            raise ValueError(f"{d}: block {doc['block']['id']} was exported with other "
                             f"{', '.join(diff)} than the store's (block, store: {shown}); "
                             "export it again")


def _check_cover(parts, rows: int, cols: int, n_grid: int) -> None:
    """ValueError unless the blocks' cores partition the region and own every tile of its grid."""
    b = np.array([[p[1]["block"][k] for k in ("row0", "col0", "rows", "cols")] for p in parts],
                 dtype=np.int64)
    r0, c0, r1, c1 = b[:, 0], b[:, 1], b[:, 0] + b[:, 2], b[:, 1] + b[:, 3]
    area = int((b[:, 2] * b[:, 3]).sum())
    overlap = False
    for lo in range(0, len(b), 512):
        s = slice(lo, lo + 512)
        hit = (r0[s, None] < r1[None]) & (r0[None] < r1[s, None]) \
            & (c0[s, None] < c1[None]) & (c0[None] < c1[s, None])
        hit[np.arange(hit.shape[0]), np.arange(lo, lo + hit.shape[0])] = False
        overlap |= bool(hit.any())
    owned = sum(int(p[1]["counts"]["n_owned"]) for p in parts)
    if overlap or area != rows * cols or owned != n_grid or r0.min() < 0 or c0.min() < 0 \
            or r1.max() > rows or c1.max() > cols:
        raise ValueError(f"merge_tile_store: the {len(parts)} blocks' cores do not partition the "
                         f"{rows} x {cols} region (cores cover {area} cells, own {owned} of its "
                         f"{n_grid} tiles); a block is missing or from another plan")


def _merged_index(parts, out: Path) -> tuple[pd.DataFrame, np.ndarray]:
    """The store's index (global ``tile`` in (row, col) order, ``store``, ``store_tile``) and
    clear fractions, from the blocks' small files."""
    frames, clears = [], []
    for d, doc in parts:
        # valid_fraction kept as its text: written back exactly as the block wrote it
        frame = pd.read_csv(d / INDEX_FILE, dtype={"tile": np.int64, "row": np.int64,
                                                   "col": np.int64, "split": str,
                                                   "valid_fraction": str}, keep_default_na=False)
        clear = np.load(d / CLEAR_FILE)
        if len(frame) != doc["counts"]["n_tiles"] or clear.shape != (len(frame), len(doc["dates"])):
            raise ValueError(f"{d}: index.csv ({len(frame)} rows), clear_fraction.npy "
                             f"{clear.shape} and tiles.json ({doc['counts']['n_tiles']} tiles) "
                             "disagree")
        frame["store"] = os.path.relpath(d, out)
        frame["store_tile"] = frame["tile"]
        frames.append(frame)
        clears.append(clear)
    index = pd.concat(frames, ignore_index=True)
    clear = np.concatenate(clears, axis=0)
    order = np.lexsort((index["col"].to_numpy(), index["row"].to_numpy()))
    index, clear = index.iloc[order].reset_index(drop=True), clear[order]
    if index.duplicated(["row", "col"]).any():
        raise ValueError("merge_tile_store: two blocks hold the same tile (overlapping cores)")
    index["tile"] = np.arange(len(index), dtype=np.int64)
    return index[list(INDEX_COLUMNS) + list(STORE_COLUMNS)], clear


def _merged_moments(parts, channels) -> dict:
    """Chan merge of the blocks' moments in a fixed order: date by date, within a date block by
    block in plan order (so the result does not depend on the order the blocks are given)."""
    measured = [c for c in range(len(channels)) if channels[c]["kind"] != "prior"]
    names = [channels[c]["name"] for c in measured]
    moments = []
    for d, _ in parts:
        with np.load(d / MOMENTS_FILE) as m:
            if list(m["channels"]) != names:
                raise ValueError(f"{d}: moments.npz channels {list(m['channels'])}, "
                                 f"expected {names}")
            moments.append((m["count"], m["mean"], m["m2"]))
    acc = {c: [0, 0.0, 0.0] for c in measured}
    for t in range(len(parts[0][1]["dates"])):
        for count, mean, m2 in moments:
            for k, c in enumerate(measured):
                acc[c] = _merge_moments(acc[c], int(count[t, k]), float(mean[t, k]),
                                        float(m2[t, k]))
    return acc


def merge_tile_store(block_tile_dirs, out_dir, *, size, overlap, min_valid_fraction, block_size,
                     val_fraction, seed, region: dict | None = None, prior: bool = True) -> dict:
    """Join the :func:`export_block_tiles` directories of a region's blocks into a tile store.

    Writes to ``out_dir`` what :func:`export_tiles` on the whole region writes, but for
    ``tiles.npy``: ``index.csv`` (the same rows in the same order, plus ``store``: the block's
    tile directory relative to ``out_dir``, and ``store_tile``: the row in its tiles.npy),
    ``clear_fraction.npy``, ``channels.json`` (plus ``stores``, in plan order) and ``stats.json``
    (from the blocks' moments). The tile parameters must be the blocks' (ValueError otherwise),
    the blocks' cores must partition the region; ``region`` None: the blocks'. Reads only the
    small files, never a tiles.npy. Raises export_tiles' ValueError without any training tile.
    """
    out = Path(out_dir)
    parts = _read_block_parts(block_tile_dirs)
    want = {"size": int(size), "overlap": int(overlap), "prior": bool(prior),
            "split": _split_params(block_size, val_fraction, seed, min_valid_fraction)}
    _check_parts(parts, want)
    first = parts[0][1]
    rows, cols = first["region_shape"]["rows"], first["region_shape"]["cols"]
    n_grid = len(tile_origins(rows, cols, size, overlap))
    _check_cover(parts, rows, cols, n_grid)
    total = {k: sum(p[1]["counts"][k] for p in parts) for k in
             ("n_tiles", "n_train", "n_val", "n_gap", "n_low_valid", "n_train_split", "n_pixels")}
    if total["n_train"] == 0:
        best = max((p[1]["counts"]["best_train_valid_fraction"] for p in parts
                    if p[1]["counts"]["best_train_valid_fraction"] is not None), default=math.nan)
        raise _no_train_tile(n_grid, total["n_train_split"], best, block_size=block_size,
                             val_fraction=val_fraction, size=size, overlap=overlap,
                             min_valid_fraction=min_valid_fraction)
    if total["n_val"] == 0 and float(val_fraction) > 0:
        logger.warning("merge_tile_store: no validation tile (val_fraction=%s, block_size=%s, "
                       "min_valid_fraction=%s)", val_fraction, block_size, min_valid_fraction)
    index, clear = _merged_index(parts, out)
    channels = first["channels"]
    base = [ch for ch in channels if ch["kind"] != "prior"]
    entries = _stats_entries(_merged_moments(parts, channels), base)
    entries += prior_stats(entries, [ch for ch in channels if ch["kind"] == "prior"])
    meta = _export_meta(channels, first["dates"], size=size, overlap=overlap, height=rows,
                        width=cols, prior=prior, block_size=block_size, val_fraction=val_fraction,
                        seed=seed, min_valid_fraction=min_valid_fraction, n_train=total["n_train"],
                        n_val=total["n_val"],
                        region=region if region is not None else first["region"])
    meta["stores"] = [os.path.relpath(d, out) for d, _ in parts]
    out.mkdir(parents=True, exist_ok=True)
    tmp = {name: out / f".{name}.partial" for name in
           (INDEX_FILE, CLEAR_FILE, CHANNELS_FILE, STATS_FILE)}
    try:
        index.to_csv(tmp[INDEX_FILE], index=False, lineterminator="\n")
        with open(tmp[CLEAR_FILE], "wb") as fh:
            np.save(fh, clear.astype(np.float32))
        write_json(tmp[CHANNELS_FILE], meta)
        write_json(tmp[STATS_FILE], stats_document(total["n_train"], total["n_pixels"], entries))
        _publish(tmp, out)
    finally:
        _cleanup(tmp)
    summary = {k: int(total[k]) for k in ("n_tiles", "n_train", "n_val", "n_gap", "n_low_valid")}
    summary.update(splits={"train": summary["n_train"], "val": summary["n_val"]},
                   n_stores=len(parts), tiles_shape=[summary["n_tiles"], len(first["dates"]),
                                                     len(channels), int(size), int(size)],
                   files={name: str(out / name) for name in tmp})
    logger.info("merge_tile_store: %d tiles (%d train, %d val) in %d blocks -> %s",
                summary["n_tiles"], summary["n_train"], summary["n_val"], len(parts), out)
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
