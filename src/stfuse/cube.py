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
    ``clear_fraction``), ``region`` (the whole study region), ``block`` (:func:`stfuse.blocks.to_dict`),
    ``shape``, and ``counts`` over the block's *core*: ``seen`` (cells whose ``valid`` is not NaN on some
    date) and ``clear`` (per date, cells with ``valid == 1``). Integer counts add up exactly over
    blocks, so region-wide clear fractions (the benchmark's holdout) never need the pixels again.

A (date, cell) is **clear** when ``valid == 1`` and every optical band is finite (:func:`clear_mask`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from . import blocks

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
