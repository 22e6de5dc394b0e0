"""The cube contract: what a block's cube is, the one definition of *clear*, hiding cells.

A **cube** is a float32 array (T, C, H, W): T optical dates in time order, C channels in the layout of
:func:`channel_layout` -- optical bands, the ``valid`` band (1 clear, 0 cloudy or invalid, NaN no data),
the SAR bands paired with each date (NaN where a date has no SAR partner), static layers -- over a
window of the study region. NaN means no data everywhere.

Every pixel stage of the workflow works on **block cubes**: the cube of one spatial block's read window
(core + halo, :mod:`stfuse.blocks`), written by the cube step as a directory holding

``cube.npy``
    float32 (T, C, read_rows, read_cols), a plain ``.npy`` (readers memory-map it);
``cube.json``
    ``channels``, ``dates`` (``start_time``, ``optical_id``, ``sar_id``, ``sar_gap_days``,
    ``clear_fraction``; with config infer.dates also ``query`` and ``outputs``, :func:`cube_dates`), ``region``
    (the whole study region), ``block`` (:func:`stfuse.blocks.to_dict`),
    ``shape``, and ``counts`` over the block's *core*: ``seen`` (cells whose ``valid`` is not NaN on some
    date) and ``clear`` (per date, cells with ``valid == 1``). Integer counts add up exactly over
    blocks, so region-wide clear fractions (the benchmark's holdout) never need the pixels again.

A (date, cell) is **clear** when ``valid == 1`` and every optical band is finite (:func:`clear_mask`).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np

from . import blocks, grass, grassio

log = logging.getLogger("stfuse.cube")

CUBE_FILE = "cube.npy"
META_FILE = "cube.json"


def channel_layout(optical_state: dict, sar_state: dict, static: list[dict]) -> list[dict]:
    """Channel order shared by groups, cubes, tiles and the model: optical bands, valid, SAR bands, static."""
    chans = [dict(name=b, sensor=optical_state["sensor"], kind="optical") for b in optical_state["bands"]]
    chans.append(dict(name="valid", sensor=optical_state["sensor"], kind="valid"))
    chans += [dict(name=b, sensor=sar_state["sensor"], kind="sar") for b in sar_state["bands"]]
    chans += [dict(name=s["name"], sensor="static", kind="static") for s in static]
    return chans


def indices(channels: list[dict], kind: str) -> list[int]:
    """Positions of the channels of one kind."""
    return [i for i, c in enumerate(channels) if c["kind"] == kind]


def clear_mask(cube: np.ndarray, valid_index: int, optical_indices) -> np.ndarray:
    """Clear cells of ``cube`` (..., C, h, w): valid == 1 and all optical bands finite; bool (..., h, w)."""
    clear = cube[..., valid_index, :, :] == 1
    for i in optical_indices:
        clear &= np.isfinite(cube[..., i, :, :])
    return clear


def hide(cube: np.ndarray, channels: list[dict], hidden: np.ndarray, *, inplace: bool = False) -> np.ndarray:
    """The cube with ``hidden`` (T, H, W) cells as gaps: optical bands NaN and valid 0 (where valid is not NaN).

    A copy by default; ``inplace=True`` changes ``cube`` itself (and returns it), touching only the optical
    and valid channels of the dates with hidden cells (with a copy-on-write memmap, only those pages are
    copied).
    """
    hidden = np.asarray(hidden, dtype=bool)
    if hidden.shape != (cube.shape[0],) + tuple(cube.shape[2:]):
        raise ValueError(f"hidden must have shape {(cube.shape[0],) + tuple(cube.shape[2:])}, got {hidden.shape}")
    out = cube if inplace else cube.copy()
    opt = indices(channels, "optical")
    valid = indices(channels, "valid")[0]
    for t in range(cube.shape[0]):
        mask = hidden[t]
        if not mask.any():
            continue
        valid_gap = mask & ~np.isnan(out[t, valid])
        for i in opt:
            out[t, i][mask] = np.nan
        out[t, valid][valid_gap] = 0.0
    return out


def transplanted(cube: np.ndarray, channels: list[dict], donors: dict) -> np.ndarray:
    """The benchmark's hidden cells (T, h, w) of ``cube``: on each evaluation date e, the cells clear on e
    (``valid == 1``) and not clear on its donor date d; ``donors`` maps e to d (ints or their strings, as
    holdout.json stores them). Per cell, so a block's hidden cells are the whole region's, cut."""
    valid = cube[:, indices(channels, "valid")[0]]
    hidden = np.zeros((cube.shape[0],) + tuple(cube.shape[2:]), dtype=bool)
    for e, d in donors.items():
        hidden[int(e)] = (valid[int(e)] == 1) & ~(valid[int(d)] == 1)
    return hidden


def core_counts(cube: np.ndarray, channels: list[dict], block: blocks.Block) -> dict:
    """``seen`` and per-date ``clear`` counts over the core of a block cube (see the module docstring)."""
    valid = blocks.crop_core(cube[:, indices(channels, "valid")[0]], block)
    seen = np.zeros(valid.shape[1:], dtype=bool)
    clear = []
    for t in range(valid.shape[0]):
        seen |= np.isfinite(valid[t])
        clear.append(int((valid[t] == 1).sum()))
    return dict(seen=int(seen.sum()), clear=clear)


def load_block(block_dir, *, mmap_mode: str | None = "r") -> tuple[np.ndarray, dict, blocks.Block]:
    """A block cube written by the cube step: (cube, its cube.json, its :class:`stfuse.blocks.Block`).

    ``mmap_mode`` as for ``np.load``: "r" (default) maps it read-only, "c" copy-on-write (hiding cells
    then copies only the pages it changes), None reads it into memory.
    """
    block_dir = Path(block_dir)
    meta = json.loads((block_dir / META_FILE).read_text())
    cube = np.load(block_dir / CUBE_FILE, mmap_mode=mmap_mode)
    block = blocks.from_dict(meta["block"])
    if cube.shape[2:] != (block.read_rows, block.read_cols):
        raise ValueError(f"{block_dir / CUBE_FILE}: {cube.shape[2]} x {cube.shape[3]} cells, but block {block.id}'s "
                         f"read window is {block.read_rows} x {block.read_cols}")
    return cube, meta, block


def region_counts(metas: list[dict]) -> tuple[int, np.ndarray]:
    """Region-wide ``seen`` and per-date ``clear`` counts, summed over the cube.json of every block."""
    seen = sum(int(m["counts"]["seen"]) for m in metas)
    clear = np.sum([np.asarray(m["counts"]["clear"], dtype=np.int64) for m in metas], axis=0)
    return seen, clear


def write_meta(block_dir, meta: dict) -> None:
    Path(block_dir, META_FILE).write_text(json.dumps(meta, indent=1) + "\n")


class Mosaic:
    """Whole-region reads from per-block core arrays (e.g. every block's ``filled.npy``), never whole.

    ``paths`` maps block id -> a .npy file of shape (..., rows, cols) of that block's *core*; ``plan`` is
    the study's block plan. ``mosaic[lead, r0:r1, c0:c1]`` (lead: an index or slice over the leading axes)
    returns that window of the whole region, read from the blocks it overlaps, each memory-mapped only for
    the read, so the pages read leave the process with the result.
    """

    def __init__(self, paths: dict, plan: list[blocks.Block]):
        self.plan = list(plan)
        missing = [b.id for b in self.plan if b.id not in paths]
        if missing:
            raise ValueError(f"no file for block(s) {', '.join(missing[:5])} of the plan")
        self.paths = {b.id: Path(paths[b.id]) for b in self.plan}
        first = np.load(self.paths[self.plan[0].id], mmap_mode="r")
        self.dtype, lead = first.dtype, first.shape[:-2]
        del first
        rows = max(b.row0 + b.rows for b in self.plan)
        cols = max(b.col0 + b.cols for b in self.plan)
        self.shape = tuple(lead) + (rows, cols)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        n_lead = len(self.shape) - 2
        lead = key[:n_lead] + (slice(None),) * max(0, n_lead - len(key))
        rows, cols = (list(key[n_lead:]) + [slice(None), slice(None)])[:2]
        r0, r1, _ = rows.indices(self.shape[-2]) if isinstance(rows, slice) else (rows, rows + 1, 1)
        c0, c1, _ = cols.indices(self.shape[-1]) if isinstance(cols, slice) else (cols, cols + 1, 1)
        out = None
        for b in self.plan:
            rr0, rr1 = max(r0, b.row0), min(r1, b.row0 + b.rows)
            cc0, cc1 = max(c0, b.col0), min(c1, b.col0 + b.cols)
            if rr0 >= rr1 or cc0 >= cc1:
                continue
            m = np.load(self.paths[b.id], mmap_mode="r")
            if m.shape[-2:] != (b.rows, b.cols):
                raise ValueError(f"{self.paths[b.id]}: {m.shape[-2]} x {m.shape[-1]} cells, block {b.id}'s core is "
                                 f"{b.rows} x {b.cols}")
            part = np.asarray(m[lead + (slice(rr0 - b.row0, rr1 - b.row0), slice(cc0 - b.col0, cc1 - b.col0))])
            del m
            if out is None:
                out = np.empty(part.shape[:-2] + (r1 - r0, c1 - c0), dtype=self.dtype)
            out[..., rr0 - r0:rr1 - r0, cc0 - c0:cc1 - c0] = part
        if out is None:
            raise IndexError(f"window rows {r0}:{r1}, cols {c0}:{c1} lies outside the region {self.shape[-2:]}")
        if not isinstance(rows, slice):
            out = out[..., 0, :]
        if not isinstance(cols, slice):
            out = out[..., 0]
        return out


# --- reading cubes from GRASS, and the whole-region cube (one cube of the whole region, for the library API)


#: dates read from GRASS per chunk by `read_cube` (peak memory: one chunk of maps, not the cube twice)
CUBE_CHUNK_DATES = 8


def read_cube(groups_state: dict, out: np.ndarray | None = None, *,
              chunk_dates: int = CUBE_CHUNK_DATES) -> np.ndarray:
    """(T, C, H, W) float32 of every group in the current region; absent channels (no SAR) are NaN.

    Reads `chunk_dates` groups at a time with `grassio.read_maps` and places them, so memory peaks at
    one chunk of maps on top of the result. `out` (e.g. a `numpy.lib.format.open_memmap`) receives the
    cube instead of a new array; it must have the cube's shape and dtype float32.
    """
    groups = groups_state["groups"]
    n_chan = len(groups_state["channels"])
    h, w = grassio.region_shape()
    shape = (len(groups), n_chan, h, w)
    if out is None:
        out = np.empty(shape, dtype=np.float32)
    elif tuple(out.shape) != shape or out.dtype != np.float32:
        raise ValueError(f"out must be float32 {shape}, got {out.dtype} {tuple(out.shape)}")
    chunk_dates = max(1, int(chunk_dates))
    for lo in range(0, len(groups), chunk_dates):
        part = groups[lo:lo + chunk_dates]
        names = [m for g in part for m in g["maps"] if m]
        flat = grassio.read_maps(names) if names else None
        i = 0
        for t, g in enumerate(part, start=lo):
            for c, m in enumerate(g["maps"]):
                if m:
                    out[t, c] = flat[i]
                    i += 1
                else:
                    out[t, c] = np.nan
        del flat
    return out


def cube_dates(groups_state: dict) -> list[dict]:
    """The ``dates`` of cube.json, one per group. ``query`` and ``outputs`` (:mod:`stfuse.anydate`: a date
    without an optical acquisition, the start times each date answers) are carried only when they say more than
    "every date is an optical acquisition answering its own start time", so an observed-mode cube.json (and one
    from a groups.json older than them) is what it always was."""
    keys = ("start_time", "optical_id", "sar_id", "sar_gap_days", "clear_fraction")
    groups = groups_state["groups"]
    any_date = any(g.get("query") or ("outputs" in g and list(g["outputs"]) != [g["start_time"]]) for g in groups)
    extra = ("query", "outputs") if any_date else ()
    return [dict({k: g[k] for k in keys}, **{k: g.get(k, False if k == "query" else [g["start_time"]])
                                             for k in extra}) for g in groups]


def read_cube_step(project_state: dict, groups_state: dict, stage: str, out: np.ndarray | None = None,
                   ) -> np.ndarray:
    reads = [grass.map_mapset(m) for g in groups_state["groups"] for m in g["maps"] if m]
    with grass.stage_session(project_state, stage, reads):
        return read_cube(groups_state, out)


def cube_step(project_state: dict, groups_json, out_dir) -> dict:
    """Read every imagery group once into `cube.npy` (T, C, H, W) + `cube.json` (channels, dates, region).

    Later stages (tiles, inference, benchmark) read this array and never GRASS: np.load from the page
    cache is ~10x faster than decoding GRASS rasters. `cube.npy` is written through
    `numpy.lib.format.open_memmap` (the same bytes as `np.save` of the array) and filled a chunk of
    dates at a time, under a temporary name renamed at the end.
    """
    t0 = time.perf_counter()
    groups_state = json.loads(Path(groups_json).read_text())
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    partial = out_dir / ".cube.npy.partial"
    reads = [grass.map_mapset(m) for g in groups_state["groups"] for m in g["maps"] if m]
    try:
        with grass.stage_session(project_state, "cube", reads):
            shape = (len(groups_state["groups"]), len(groups_state["channels"])) + tuple(grassio.region_shape())
            mm = np.lib.format.open_memmap(partial, mode="w+", dtype=np.float32, shape=shape)
            read_cube(groups_state, mm)
        mm.flush()
        nbytes = mm.nbytes
        del mm
        os.replace(partial, out_dir / "cube.npy")
    finally:
        if partial.exists():
            partial.unlink()
    meta = dict(channels=groups_state["channels"], dates=cube_dates(groups_state), region=project_state["region"],
                shape=list(shape))
    (out_dir / "cube.json").write_text(json.dumps(meta, indent=1) + "\n")
    log.info("read %s cube (%.1f MB) from GRASS in %.1f s", shape, nbytes / 1e6, time.perf_counter() - t0)
    return meta


def load_cube(cube_dir, hidden=None, *, mmap_mode=None) -> tuple[np.ndarray, dict]:
    """The cube and its metadata; with `hidden` (T, H, W) bool, those cells become gaps (valid 0, bands NaN).

    `mmap_mode` is passed to `np.load`: None reads the cube into memory (hidden cells are then set in that
    array, no second copy); "r" maps it read-only (only without `hidden`); "c" maps it copy-on-write, so
    hiding copies only the memory pages it changes (optical and valid channels at dates with hidden cells)
    and the rest stays in the page cache.
    """
    cube_dir = Path(cube_dir)
    if hidden is not None and mmap_mode in ("r", "r+"):
        raise ValueError(f"load_cube: mmap_mode={mmap_mode!r} with hidden cells would change cube.npy or fail; "
                         "use mmap_mode='c' (copy-on-write) or None")
    cube = np.load(cube_dir / "cube.npy", mmap_mode=mmap_mode)
    meta = json.loads((cube_dir / "cube.json").read_text())
    if hidden is not None:
        cube = hide(cube, meta["channels"], hidden, inplace=True)
    return cube, meta


def tiles_step(cube_dir, out_dir, *, hidden=None, **tile_params) -> dict:
    """Export training tiles from the cube (with the benchmark's hidden cells removed when given)."""
    cube, meta = load_cube(cube_dir, hidden, mmap_mode="c")
    from . import tiles  # tiles imports this module (clear_mask)

    summary = tiles.export_tiles(cube, meta["channels"], meta["dates"], out_dir, region=meta["region"],
                                 **tile_params)
    log.info("tiles: %s", {k: v for k, v in summary.items() if k.startswith("n_")})
    return summary
