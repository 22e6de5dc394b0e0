"""PyTorch dataset over tiles written by :func:`stfuse.tiles.export_tiles`.

One sample is one (tile, target date t). The model sees the optical bands at t with their
unusable pixels zeroed, the clear mask at t, K previous and K next optical dates, the SAR bands
paired with t and the static layers, and learns to predict the optical bands at t.

Input channels, in order (names in :attr:`GapFillDataset.input_channels`):

1. ``<band>@t`` for each optical band (normalised, 0 where not clear), ``<valid>@t`` (1 clear);
2. for j = 1..K the previous date t-j, then for j = 1..K the next date t+j (nearest first):
   ``<band>@t-j`` (normalised, 0 where not clear), ``<valid>@t-j``, ``dt@t-j`` (constant:
   (time of t-j - time of t) in days / 30, signed) and ``present@t-j`` (constant: 1 if the date
   exists, 0 beyond the ends of the series, where every channel of that date is 0);
3. ``<sar band>@sar`` (normalised, NaN -> 0; all 0 when t has no paired SAR, i.e.
   ``sar_gap_days`` is None) and ``dt@sar`` (constant: ``sar_gap_days`` / 30, sign kept; 0 when
   there is no SAR); both left out when the export has no SAR channel;
4. the static layers by name (normalised, NaN -> 0);
5. only when the series holds the temporal prior channels (kind ``prior``, appended by
   :func:`stfuse.tiles.export_tiles` / :func:`stfuse.prior.prior_channels`): ``<band>@prior``
   for each optical band (the leave-one-out linear interpolation in time at t, normalised with
   the statistics of *its optical band*, so it is in the units of the target; NaN -> 0) and
   ``prior_present@t`` (1 where the prior exists, else 0). The prior at t never uses date t,
   so artificial masking (``hide``) leaves it as it is. :attr:`InputAssembler.prior_input_indices`
   and :attr:`InputAssembler.present_input_index` locate them for a residual model
   (:class:`stfuse.models.residual.ResidualOnPrior`).

6. only with ``layout="sequence"`` (the layout of models that treat every date as a token, such as
   :mod:`stfuse.models.tattn`; their registration asks for it, see
   :func:`stfuse.models.input_layout`), per date token -- ``t`` first, then the neighbours in the
   order above: ``<sar band>@sar:<tag>`` for the neighbours (the SAR paired with *that* date,
   normalised; the target's SAR is already in 3.), ``sar_present@<tag>`` (1 when that date has
   paired SAR) and ``doy_sin@<tag>`` / ``doy_cos@<tag>`` (the day of year of the date on the unit
   circle; 0 for an absent neighbour). So the model sees the SAR *series* over the 2K + 1 dates,
   not one paired SAR date, and the season. :meth:`InputAssembler.token_layout` gives the input
   indices per token.

"Clear" means valid == 1 and every optical band finite (:func:`stfuse.tiles.clear_mask`).
Normalisation is ``(x - mean) / std`` with the training statistics in ``stats.json``; mask and
time channels are not normalised.

The assembly itself lives in :class:`InputAssembler` (and the :func:`build_input` shortcut),
which works on any (T, C, h, w) series -- a tile from ``tiles.npy`` here, a window of the
full-region cube in :mod:`stfuse.infer` -- so training and inference build their inputs with
the same code.

The tile array (or, for a tile store, each block's tile array) is read with positioned reads
(:class:`TileFile`), one date of one tile at a time, opened lazily once per process (the
dataset only stores the paths), so the dataset pickles cheaply and works with
``DataLoader(num_workers > 0)`` under both the ``fork`` and ``spawn`` start methods. It is not
memory-mapped: the pages of a memory map that a process has touched count in its resident set,
so a training job's RSS grew with the store (3.6 GB for 2048² cells x 50 dates); read pages
stay in the OS page cache instead, which the kernel gives back under pressure.
"""

from __future__ import annotations

import json
import logging
import numbers
import os
from collections import OrderedDict
from math import prod
from pathlib import Path

import numpy as np
import pandas as pd
from stfuse._optional import require_torch

torch = require_torch(__name__)
from torch.utils.data import Dataset

from stfuse.prior import PRESENT_NAME, PRIOR_KIND, PRIOR_SUFFIX
from stfuse.tiles import (
    CHANNELS_FILE,
    CLEAR_FILE,
    INDEX_FILE,
    STATS_FILE,
    STORE_COLUMNS,
    TILES_FILE,
    channel_indices,
    check_cube_dates,
    clear_mask,
)

__all__ = ["GapFillDataset", "InputAssembler", "TileFile", "build_input", "DT_SCALE_DAYS", "LAYOUTS"]

logger = logging.getLogger("stfuse.dataset")

#: time offsets (optical neighbours and SAR gap) are given to the model in units of 30 days
DT_SCALE_DAYS = 30.0
SPLITS = ("train", "val")
#: input layouts: "stacked" (items 1-5 of the module docstring), "sequence" (adds item 6)
LAYOUTS = ("stacked", "sequence")
#: tiles.npy files a process keeps open at once (a store has one per block; 484 for s2tile)
MAX_OPEN_TILE_FILES = 64


def _day_of_year(start_time) -> int:
    """0-based day of the year of a start time, in UTC (naive times are UTC)."""
    ts = pd.Timestamp(start_time)
    return (ts if ts.tzinfo is None else ts.tz_convert("UTC")).day_of_year - 1


class TileFile:
    """A (N, T, C, s, s) ``.npy`` file read one (tile, date) at a time with ``os.preadv``.

    ``TileFile(path)[i]`` is a lazy tile: ``len()`` is T and ``[d]`` reads date d, (C, s, s), as
    a fresh writable array -- what :meth:`InputAssembler.build` asks of a series. The header is
    read once; the file descriptor is opened on the first read and closed by :meth:`close`.
    """

    def __init__(self, path):
        self.path = str(path)
        with open(self.path, "rb") as fh:
            fmt = np.lib.format
            read = fmt.read_array_header_1_0 if fmt.read_magic(fh) == (1, 0) \
                else fmt.read_array_header_2_0
            shape, fortran, dtype = read(fh)
            self.offset = fh.tell()
        if fortran or len(shape) != 5:
            raise ValueError(f"{self.path}: expected a C-ordered (N, T, C, s, s) array, got shape "
                             f"{shape}{' in Fortran order' if fortran else ''}")
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        self._date_shape = self.shape[2:]
        self._date_bytes = prod(self._date_shape) * self.dtype.itemsize
        self._tile_bytes = self.shape[1] * self._date_bytes
        self._fd = None

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, tile: int) -> "_LazyTile":
        if not 0 <= tile < self.shape[0]:
            raise IndexError(f"tile {tile} out of range for the {self.shape[0]} tiles of {self.path}")
        return _LazyTile(self, int(tile))

    def read(self, tile: int, date: int) -> np.ndarray:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        out = np.empty(self._date_shape, dtype=self.dtype)
        at = self.offset + tile * self._tile_bytes + date * self._date_bytes
        got = os.preadv(self._fd, [memoryview(out).cast("B")], at)
        if got != self._date_bytes:
            raise OSError(f"{self.path}: short read of tile {tile}, date {date} ({got} of "
                          f"{self._date_bytes} bytes): the file is truncated")
        return out

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_fd"] = None  # a descriptor never crosses processes: each opens its own
        return state

    def __del__(self):
        try:
            self.close()
        except OSError:
            pass


class _LazyTile:
    """One tile of a :class:`TileFile`: a (T, C, s, s) series whose dates are read on access."""

    __slots__ = ("file", "tile")

    def __init__(self, file: TileFile, tile: int):
        self.file, self.tile = file, tile

    def __len__(self) -> int:
        return self.file.shape[1]

    def __getitem__(self, date: int) -> np.ndarray:
        date = int(date)
        if not 0 <= date < self.file.shape[1]:
            raise IndexError(f"date {date} out of range for {self.file.shape[1]} dates")
        return self.file.read(self.tile, date)


class InputAssembler:
    """Builds the model input for one target date from a (T, C, h, w) series.

    Parameters
    ----------
    channels
        One dict per channel of the series (``name``, ``kind``), as in ``channels.json``.
    dates
        One dict per date of the series with ``start_time`` and ``sar_gap_days`` (None: no
        paired SAR), in time order; time offsets are computed from ``start_time``. A date with
        ``"query": True`` has no optical acquisition (a date asked for by ``infer.dates``): it
        can be a target, never a neighbour.
    stats
        Normalisation statistics: the ``channels`` list of ``stats.json`` (dicts with
        ``name``, ``mean``, ``std``) or a mapping ``name -> {"mean": .., "std": ..}``; every
        channel but the ``valid`` one and the prior channels needs an entry (a
        ``<band>_prior`` channel is always normalised with its band's entry, and
        ``prior_present`` is a 0/1 flag).
    k_neighbours
        K previous and K next optical dates (>= 0).
    layout
        ``"stacked"`` (default) or ``"sequence"``: the per-date SAR and season channels of item
        6 of the module docstring are added at the end.

    :attr:`input_channels` names the input channels (see the module docstring for the order),
    :attr:`target_channels` the optical bands, i.e. the model outputs.
    """

    def __init__(self, channels, dates, stats, k_neighbours, layout="stacked"):
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        self.layout = layout
        if isinstance(k_neighbours, bool) or not isinstance(k_neighbours, numbers.Integral) \
                or k_neighbours < 0:
            raise ValueError(f"k_neighbours must be an integer >= 0, got {k_neighbours!r}")
        self.k_neighbours = int(k_neighbours)
        self.channels = [dict(ch) for ch in channels]
        names = [str(ch["name"]) for ch in self.channels]
        idx = channel_indices(self.channels)
        if len(idx["valid"]) != 1 or not idx["optical"]:
            raise ValueError("channels must hold exactly one 'valid' and at least one 'optical' "
                             f"channel, got kinds {[ch['kind'] for ch in self.channels]}")
        self._valid = idx["valid"][0]
        self._optical = idx["optical"]
        self._sar = idx["sar"]
        self._static = idx["static"]
        self._prior, self._present = self._prior_layout(names, idx.get(PRIOR_KIND, []))

        if isinstance(stats, dict):
            by_name = {str(k): v for k, v in stats.items()}
        else:
            by_name = {str(c["name"]): c for c in stats}
        derived = {self._valid, *self._prior, *([self._present] if self._prior else [])}
        missing = [n for i, n in enumerate(names) if i not in derived and n not in by_name]
        if missing:
            raise ValueError(f"no normalisation statistics for channel(s) {missing}")
        mean = np.zeros(len(names), dtype=np.float32)
        std = np.ones(len(names), dtype=np.float32)
        for i, n in enumerate(names):
            if i not in derived and n in by_name:
                mean[i], std[i] = by_name[n]["mean"], by_name[n]["std"]
        for band, i in zip(self._optical, self._prior):  # prior and target share units
            mean[i], std[i] = mean[band], std[band]
        self._mean, self._std = mean, std

        dates = check_cube_dates(list(dates), len(dates))
        self.n_dates = len(dates)
        self._offsets = np.array([d["offset_days"] for d in dates], dtype=np.float64)
        # query dates (an "any date" product: no optical acquisition, "query": true) are targets only,
        # never a neighbour: the neighbours of every date are the observed dates around it
        self._observed = np.array([i for i, d in enumerate(dates) if not d.get("query")], dtype=np.int64)
        self._sar_gap = np.array([np.nan if d.get("sar_gap_days") is None
                                  else float(d["sar_gap_days"]) for d in dates])
        doy = np.array([_day_of_year(d["start_time"]) for d in dates], dtype=np.float64)
        angle = 2 * np.pi * doy / 365.25
        self._doy = np.stack([np.sin(angle), np.cos(angle)], axis=1).astype(np.float32)

        opt_names = [names[i] for i in self._optical]
        valid_name = names[self._valid]
        inputs = [f"{n}@t" for n in opt_names] + [f"{valid_name}@t"]
        for tag in self.neighbour_tags():
            inputs += [f"{n}@{tag}" for n in opt_names]
            inputs += [f"{valid_name}@{tag}", f"dt@{tag}", f"present@{tag}"]
        if self._sar:  # no SAR channels at all: no dt@sar either
            inputs += [f"{names[i]}@sar" for i in self._sar] + ["dt@sar"]
        inputs += [names[i] for i in self._static]
        if self._prior:
            self.prior_input_indices: list[int] = list(range(len(inputs),
                                                             len(inputs) + len(opt_names)))
            inputs += [f"{n}@prior" for n in opt_names] + [f"{PRESENT_NAME}@t"]
            self.present_input_index: int | None = len(inputs) - 1
        else:
            self.prior_input_indices, self.present_input_index = [], None
        if layout == "sequence":
            for tag in ["t"] + self.neighbour_tags():
                if tag != "t":
                    inputs += [f"{names[i]}@sar:{tag}" for i in self._sar]
                inputs += [f"sar_present@{tag}", f"doy_sin@{tag}", f"doy_cos@{tag}"]
        self.input_channels: list[str] = inputs
        self.target_channels: list[str] = opt_names

    def _prior_layout(self, names, prior_idx) -> tuple[list[int], int | None]:
        """Channel indices of ``<band>_prior`` in optical band order, and of ``prior_present``."""
        if not prior_idx:
            return [], None
        by_band, present = {}, []
        for i in prior_idx:
            band = self.channels[i].get("band")
            if band is None and names[i] != PRESENT_NAME and names[i].endswith(PRIOR_SUFFIX):
                band = names[i][:-len(PRIOR_SUFFIX)]
            if band is None:
                present.append(i)
            else:
                by_band.setdefault(str(band), []).append(i)
        opt_names = [names[i] for i in self._optical]
        if len(present) != 1 or sorted(by_band) != sorted(opt_names) \
                or any(len(v) != 1 for v in by_band.values()):
            raise ValueError("prior channels must be one '<band>_prior' per optical band "
                             f"{opt_names} and one {PRESENT_NAME!r}, got "
                             f"{[names[i] for i in prior_idx]}")
        return [by_band[n][0] for n in opt_names], present[0]

    # ---------------------------------------------------------------------------------------
    def neighbour_tags(self) -> list[str]:
        k = self.k_neighbours
        return [f"t-{j}" for j in range(1, k + 1)] + [f"t+{j}" for j in range(1, k + 1)]

    def neighbour_offsets(self) -> list[int]:
        k = self.k_neighbours
        return [-j for j in range(1, k + 1)] + [j for j in range(1, k + 1)]

    def neighbour(self, t: int, offset: int) -> int | None:
        """The date index of neighbour ``offset`` (-1 = the previous observed date, +2 = the one after
        the next, ...) of date ``t``, or None beyond the ends of the series. Query dates are skipped,
        so without them this is ``t + offset``."""
        obs = self._observed
        if offset < 0:
            i = int(np.searchsorted(obs, t, side="left")) + offset
        else:
            i = int(np.searchsorted(obs, t, side="right")) + offset - 1
        return int(obs[i]) if 0 <= i < len(obs) else None

    @property
    def n_input_channels(self) -> int:
        return len(self.input_channels)

    def token_layout(self) -> dict:
        """Where a token model finds each date's inputs (``layout="sequence"`` only), plain JSON.

        ``{"tokens": [...], "context": [...], "n_bands": B, "n_sar": S}``: one dict per date token
        (``t`` first, then ``t-1..t-K``, ``t+1..t+K``) with the input indices of its ``bands`` (B),
        ``valid``, ``sar`` (S), ``sar_present``, ``doy`` (2), and -- neighbours only -- ``dt`` and
        ``present`` (the target has dt 0 and is always present); ``context`` lists the per-pixel
        inputs that belong to no date (static layers, the prior and its flag).
        """
        if self.layout != "sequence":
            raise ValueError("token_layout() needs an assembler built with layout='sequence'")
        pos = {name: i for i, name in enumerate(self.input_channels)}
        names = [str(ch["name"]) for ch in self.channels]
        opt = [names[i] for i in self._optical]
        sar = [names[i] for i in self._sar]
        valid = names[self._valid]
        tokens = []
        for tag in ["t"] + self.neighbour_tags():
            sar_tag = "sar" if tag == "t" else f"sar:{tag}"
            tok = {"tag": tag, "bands": [pos[f"{n}@{tag}"] for n in opt],
                   "valid": pos[f"{valid}@{tag}"], "sar": [pos[f"{n}@{sar_tag}"] for n in sar],
                   "sar_present": pos[f"sar_present@{tag}"],
                   "doy": [pos[f"doy_sin@{tag}"], pos[f"doy_cos@{tag}"]]}
            if tag != "t":
                tok["dt"], tok["present"] = pos[f"dt@{tag}"], pos[f"present@{tag}"]
            tokens.append(tok)
        context = [pos[names[i]] for i in self._static] + list(self.prior_input_indices) \
            + ([self.present_input_index] if self.present_input_index is not None else [])
        return {"tokens": tokens, "context": context, "n_bands": len(opt), "n_sar": len(sar)}

    @property
    def optical_indices(self) -> list[int]:
        return list(self._optical)

    @property
    def valid_index(self) -> int:
        return self._valid

    @property
    def has_prior(self) -> bool:
        """Does the series hold the temporal prior (and the input the ``@prior`` channels)?"""
        return bool(self._prior)

    def residual_spec(self) -> dict | None:
        """Where a residual model finds the prior in the input: ``{"prior_indices": [...],
        "present_index": i}`` (target band order), or None without a prior."""
        if not self._prior:
            return None
        return {"prior_indices": list(self.prior_input_indices),
                "present_index": int(self.present_input_index)}

    def target_mean_std(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean and std of the target (optical) bands, float32 (n_optical,)."""
        return self._mean[self._optical].copy(), self._std[self._optical].copy()

    def clear(self, date_block: np.ndarray) -> np.ndarray:
        """Clear mask (h, w) of one date's (C, h, w) block."""
        return clear_mask(date_block, self._valid, self._optical)

    def normalise(self, x: np.ndarray, channels) -> np.ndarray:
        """(len(channels), h, w) -> normalised float32 with NaN -> 0."""
        ch = list(channels)
        out = (x - self._mean[ch, None, None]) / self._std[ch, None, None]
        return np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32, copy=False)

    def _date(self, series, d: int, cache):
        """(block (C, h, w), clear (h, w), normalised optical (n_optical, h, w)) of date d."""
        if cache is not None and d in cache:
            return cache[d]
        block = np.asarray(series[d], dtype=np.float32)
        out = (block, self.clear(block), self.normalise(block[self._optical], self._optical))
        if cache is not None:
            cache[d] = out
        return out

    def build(self, series, t: int, hide=None, cache=None):
        """Input for target date ``t`` of ``series`` (T, C, h, w), T = len(dates).

        Only dates t and t +- 1..K are read, so ``series`` may be a memory map. ``hide`` (h, w)
        bool, optional: pixels to hide at t on top of the unclear ones (artificial masking).
        ``cache``, optional: a dict kept by the caller while it builds several target dates of
        the *same* series; each date is then read and normalised once.

        Returns ``(image, mask, target, target_valid)``: float32 (C_in, h, w); bool (h, w), the
        clear mask at t after hiding; float32 (n_optical, h, w), the normalised optical bands at
        t (NaN -> 0, unclear pixels keep their values); bool (h, w), the clear mask at t.
        """
        n_dates = self.n_dates
        if len(series) != n_dates:
            raise ValueError(f"series has {len(series)} dates, expected {n_dates}")
        t = int(t)
        if not 0 <= t < n_dates:
            raise IndexError(f"date {t} out of range for {n_dates} dates")
        cur, target_valid, target = self._date(series, t, cache)
        h, w = cur.shape[-2:]
        n_opt = len(self._optical)
        image = np.zeros((self.n_input_channels, h, w), dtype=np.float32)

        mask = target_valid.copy()
        if hide is not None:
            mask &= ~np.asarray(hide, dtype=bool)
        image[:n_opt] = np.where(mask, target, 0.0)
        image[n_opt] = mask
        c = n_opt + 1
        for off in self.neighbour_offsets():
            d = self.neighbour(t, off)
            if d is not None:
                _, nb_clear, bands = self._date(series, d, cache)
                image[c:c + n_opt] = np.where(nb_clear, bands, 0.0)
                image[c + n_opt] = nb_clear
                image[c + n_opt + 1] = (self._offsets[d] - self._offsets[t]) / DT_SCALE_DAYS
                image[c + n_opt + 2] = 1.0
            c += n_opt + 3
        n_sar = len(self._sar)
        gap = self._sar_gap[t]
        if n_sar:
            if np.isfinite(gap):
                image[c:c + n_sar] = self.normalise(cur[self._sar], self._sar)
                image[c + n_sar] = gap / DT_SCALE_DAYS
            c += n_sar + 1
        if self._static:
            image[c:c + len(self._static)] = self.normalise(cur[self._static], self._static)
            c += len(self._static)
        if self._prior:  # the prior at t never used date t: artificial masking leaves it alone
            present = np.nan_to_num(cur[self._present], nan=0.0) > 0.5
            image[c:c + n_opt] = np.where(present, self.normalise(cur[self._prior], self._prior),
                                          0.0)
            image[c + n_opt] = present
            c += n_opt + 1
        if self.layout == "sequence":
            c = self._fill_sequence(image, series, t, c, cache)
        assert c == self.n_input_channels
        if cache is not None:  # never hand out the cached arrays themselves
            target, target_valid = target.copy(), target_valid.copy()
        return image, mask, np.ascontiguousarray(target), target_valid


    def _fill_sequence(self, image, series, t: int, c: int, cache) -> int:
        """Item 6 of the module docstring: per-date SAR, SAR presence and season, from channel c."""
        n_sar = len(self._sar)
        for off in [0] + self.neighbour_offsets():
            d = t if off == 0 else self.neighbour(t, off)
            inside = d is not None
            if off:
                if inside and n_sar and np.isfinite(self._sar_gap[d]):
                    block = self._date(series, d, cache)[0]
                    image[c:c + n_sar] = self.normalise(block[self._sar], self._sar)
                c += n_sar
            if inside:
                image[c] = float(n_sar > 0 and np.isfinite(self._sar_gap[d]))
                image[c + 1], image[c + 2] = self._doy[d]
            c += 3
        return c


def build_input(series, t, channels, dates, stats, k_neighbours, hide=None):
    """Shortcut for ``InputAssembler(channels, dates, stats, k_neighbours).build(series, t, hide)``
    (builds the assembler on every call: keep an :class:`InputAssembler` for many calls)."""
    return InputAssembler(channels, dates, stats, k_neighbours).build(series, t, hide)



class GapFillDataset(Dataset):
    """Samples (tile, target date) from an ``export_tiles`` directory.

    Parameters
    ----------
    tiles_dir
        Directory written by :func:`stfuse.tiles.export_tiles`, or a tile store written by
        :func:`stfuse.tiles.merge_tile_store` (its index.csv has a ``store`` column: the tiles
        stay in each block's tiles.npy, read a (tile, date) at a time, never concatenated).
        Both give the same samples for the same tiles.
    split
        ``"train"`` or ``"val"``.
    k_neighbours
        K previous and K next optical dates given to the model (>= 0).
    min_target_valid
        A (tile, t) pair is a sample only if at least this fraction of the tile's pixels is
        clear at t.
    layout
        The model input layout, ``"stacked"`` or ``"sequence"`` (:class:`InputAssembler`).
    extra_mask_seed, extra_mask_fraction
        Artificial masking for self-supervised training: with probability
        ``extra_mask_fraction`` per sample, the pixels that are not clear at another, random
        date of the same tile are also hidden at t (zeroed in the input bands at t and in
        ``valid@t`` / ``mask``). The draw uses ``numpy.random.default_rng([extra_mask_seed,
        index])``, so it is the same for a given sample whatever the worker; with
        ``extra_mask_seed=None`` it is fresh randomness every time. ``target_valid`` always
        keeps the original clear mask, so hidden-but-known pixels are
        ``target_valid & ~mask``.

    A sample is a dict: ``image`` (C_in, s, s) float32, ``mask`` (1, s, s) the clear mask at
    t after artificial masking, ``target`` (n_optical, s, s) normalised optical bands at t
    (NaN -> 0; cloudy pixels keep their values, use ``target_valid``), ``target_valid``
    (1, s, s) the original clear mask at t, and ``metadata``: ``tile`` (row in tiles.npy),
    ``row``, ``col``, ``t``, ``start_time`` (str), ``masked_with`` (the date index whose mask
    was borrowed, -1 if none). The default ``collate_fn`` batches it.
    """

    def __init__(self, tiles_dir, split="train", k_neighbours=2, min_target_valid=0.05,
                 extra_mask_seed=None, extra_mask_fraction=0.0, layout="stacked"):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if isinstance(k_neighbours, bool) or not isinstance(k_neighbours, numbers.Integral) \
                or k_neighbours < 0:
            raise ValueError(f"k_neighbours must be an integer >= 0, got {k_neighbours!r}")
        for name, value in (("min_target_valid", min_target_valid),
                            ("extra_mask_fraction", extra_mask_fraction)):
            if isinstance(value, bool) or not isinstance(value, numbers.Real) \
                    or not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a number within [0, 1], got {value!r}")
        if extra_mask_seed is not None and (isinstance(extra_mask_seed, bool) or not isinstance(
                extra_mask_seed, numbers.Integral) or extra_mask_seed < 0):
            raise ValueError(f"extra_mask_seed must be None or an integer >= 0, "
                             f"got {extra_mask_seed!r}")

        root = Path(tiles_dir)
        for name in (INDEX_FILE, CLEAR_FILE, CHANNELS_FILE, STATS_FILE):
            if not (root / name).is_file():
                raise FileNotFoundError(f"{root / name} is missing; is {root} an export_tiles "
                                        "directory or a tile store?")
        self.root = str(root.resolve())
        self.split = split
        self.k_neighbours = int(k_neighbours)
        self.min_target_valid = float(min_target_valid)
        self.extra_mask_seed = None if extra_mask_seed is None else int(extra_mask_seed)
        self.extra_mask_fraction = float(extra_mask_fraction)

        meta = json.loads((root / CHANNELS_FILE).read_text())
        stats = json.loads((root / STATS_FILE).read_text())
        self.channels = meta["channels"]
        self.dates = meta["dates"]
        self.size = int(meta["size"])
        self.stats = stats
        names = [ch["name"] for ch in self.channels]
        stat_names = [ch["name"] for ch in stats["channels"]]
        if stat_names != names:
            raise ValueError(f"{root}: stats.json channels {stat_names} do not match "
                             f"channels.json {names}")
        self.assembler = InputAssembler(self.channels, self.dates, stats["channels"],
                                        self.k_neighbours, layout)
        self.n_dates = len(self.dates)

        index = pd.read_csv(root / INDEX_FILE, dtype={"tile": np.int64, "row": np.int64,
                                                       "col": np.int64, "split": str})
        clear = np.load(root / CLEAR_FILE)
        if clear.shape != (len(index), self.n_dates):
            raise ValueError(f"{root}: {CLEAR_FILE} has shape {clear.shape}, expected "
                             f"({len(index)}, {self.n_dates})")
        self.is_store = STORE_COLUMNS[0] in index.columns
        self.tiles_path, self._store_paths, store_of, row_in_store = self._locate_tiles(root, index)
        keep = (index["split"] == split).to_numpy()
        self.index = index[keep].reset_index(drop=True)
        tiles = self.index["tile"].to_numpy()
        ok = clear[tiles] >= self.min_target_valid
        rows, ts = np.nonzero(ok)  # row-major: tile by tile, dates in order
        self._items = np.stack([rows, ts], axis=1).astype(np.int64)
        self._tile_ids = tiles
        self._tile_store = store_of[keep]
        self._tile_in_store = row_in_store[keep]
        self._tile_rows = self.index["row"].to_numpy()
        self._tile_cols = self.index["col"].to_numpy()
        if len(self._items) == 0:
            logger.warning("GapFillDataset(%s, split=%r): no sample (no tile in that split, or "
                           "no date with >= %.3f clear pixels)", root, split, min_target_valid)

        self.input_channels: list[str] = list(self.assembler.input_channels)
        self.target_channels: list[str] = list(self.assembler.target_channels)
        self.prior_input_indices: list[int] = list(self.assembler.prior_input_indices)
        self.present_input_index: int | None = self.assembler.present_input_index

        self._files: OrderedDict[int, TileFile] = OrderedDict()  # open tiles.npy, per process
        self._files_pid = None

    # ---------------------------------------------------------------------------------------
    @property
    def n_input_channels(self) -> int:
        return len(self.input_channels)

    def input_spec(self) -> dict:
        """Plain-JSON description of the model inputs, to save with a trained model."""
        return {
            "input_channels": list(self.input_channels),
            "target_channels": list(self.target_channels),
            "k_neighbours": self.k_neighbours,
            "dt_scale_days": DT_SCALE_DAYS,
            "size": self.size,
            "stats": {c["name"]: {"mean": c["mean"], "std": c["std"]}
                      for c in self.stats["channels"]},
            "residual": self.assembler.residual_spec(),
        }

    def __len__(self) -> int:
        return len(self._items)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_files"] = OrderedDict()  # never pickle open files: each process opens its own
        state["_files_pid"] = None
        return state

    @staticmethod
    def _locate_tiles(root: Path, index: pd.DataFrame):
        """(tiles_path or None, the tiles.npy paths, each index row's path number and row in it).

        A plain export: its one tiles.npy. A store (:func:`stfuse.tiles.merge_tile_store`):
        each block's tiles.npy (``store`` column, relative to ``root``), checked against the
        rows that point into it by its header only (no file left open in the main process).
        """
        if STORE_COLUMNS[0] not in index.columns:
            path = root / TILES_FILE
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing; is {root} an export_tiles directory?")
            return (str(path.resolve()), [str(path.resolve())],
                    np.zeros(len(index), dtype=np.int64), index["tile"].to_numpy(np.int64))
        names, store_of = np.unique(index[STORE_COLUMNS[0]].astype(str).to_numpy(),
                                    return_inverse=True)
        row_in_store = index[STORE_COLUMNS[1]].to_numpy(np.int64)
        paths = []
        for k, name in enumerate(names):
            path = (root / name / TILES_FILE).resolve()
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing: the block tiles of store {root} "
                                        f"({name}) are gone")
            with open(path, "rb") as fh:
                fmt = np.lib.format
                read = fmt.read_array_header_1_0 if fmt.read_magic(fh) == (1, 0) \
                    else fmt.read_array_header_2_0
                shape = read(fh)[0]
            rows = row_in_store[store_of == k]
            if rows.min() < 0 or rows.max() >= shape[0]:
                raise ValueError(f"{root}: index.csv points past the {shape[0]} tiles of {path}")
            paths.append(str(path))
        return None, paths, store_of.astype(np.int64).reshape(-1), row_in_store

    def _tiles(self, store: int = 0) -> TileFile:
        """The store's :class:`TileFile`, opened in this process (at most MAX_OPEN_TILE_FILES)."""
        pid = os.getpid()
        if self._files_pid != pid:  # a forked worker: its parent's descriptors are not its own
            self._files, self._files_pid = OrderedDict(), pid
        files = self._files
        if store in files:
            files.move_to_end(store)
        else:
            files[store] = TileFile(self._store_paths[store])
            while len(files) > MAX_OPEN_TILE_FILES:
                files.popitem(last=False)[1].close()
        return files[store]

    # ---------------------------------------------------------------------------------------
    def __getitem__(self, index):
        if isinstance(index, torch.Tensor):
            index = int(index)
        n = len(self._items)
        if not -n <= index < n:
            raise IndexError(f"sample {index} out of range for {n} samples")
        index = int(index) % n
        row, t = (int(v) for v in self._items[index])
        tile_id = int(self._tile_ids[row])
        n_dates = self.n_dates

        # artificial masking: which other date lends its real cloud mask
        other = -1
        if self.extra_mask_fraction > 0 and n_dates > 1:
            seed = None if self.extra_mask_seed is None else [self.extra_mask_seed, index]
            rng = np.random.default_rng(seed)
            if rng.random() < self.extra_mask_fraction:
                other = int(rng.integers(n_dates - 1))
                other += other >= t  # any date but t

        # lazy (T, C, s, s) series: only the dates used are read
        series = self._tiles(int(self._tile_store[row]))[int(self._tile_in_store[row])]
        hide = None
        if other >= 0:
            hide = ~self.assembler.clear(np.asarray(series[other], dtype=np.float32))
        # a cache for this sample: the sequence layout reads each neighbour twice (bands, then SAR)
        image, mask, target, target_valid = self.assembler.build(series, t, hide, cache={})

        metadata = {
            "tile": tile_id,
            "row": int(self._tile_rows[row]),
            "col": int(self._tile_cols[row]),
            "t": t,
            "start_time": str(self.dates[t]["start_time"]),
            "masked_with": other,
        }
        return {
            "image": torch.from_numpy(image),
            "mask": torch.from_numpy(mask[None].astype(np.float32)),
            "target": torch.from_numpy(target),
            "target_valid": torch.from_numpy(target_valid[None].astype(np.float32)),
            "metadata": metadata,
        }

    def __repr__(self) -> str:
        return (f"GapFillDataset({self.root!r}, split={self.split!r}, "
                f"samples={len(self)}, inputs={self.n_input_channels}, k={self.k_neighbours})")
