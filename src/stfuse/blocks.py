"""Spatial block plan: cut the computational region into blocks processed one at a time.

A *block* is a rectangle of region cells (its **core**) plus a **halo**: a margin of up to
``halo`` cells on every side, clipped at the region's edges. A later step runs each block as its
own job -- read core + halo from GRASS, build its cube, export tiles, infer, score -- and keeps
only the core of what it computes. The cores are an exact partition of the region (every cell in
exactly one core; the last row and column of blocks may be smaller), so stitching the cores
(:func:`crop_core`, :func:`paste`) gives one whole-region result.

Why a halo: a result must not depend on the block layout. Anything that looks at neighbours needs
them present at a core's edge -- SSIM's 7-cell window needs ``halo >= 3``, inference windows
are blended over their overlap and need that much context -- so the halo must cover the widest
such neighbourhood. Cells at the region's own edge have no neighbours in any layout, which is why
the halo is clipped there and not padded.

The plan is derived from the region size alone (no pixel is read); planning a whole Sentinel-2
tile (10980 x 10980 cells) takes milliseconds.

Memory rule (:func:`default_size`): a block's cube holds ``(size + 2 halo)^2 x dates x channels``
float32 values; a step may hold a copy or two of it, so the cube is allowed half the memory
budget. The default block edge is the largest multiple of 64 (a size multiple of every U-Net depth
up to 6) that fits -- 384 cells for 100 dates x 10 channels, 2 GB and a 32-cell halo (the default
tiles.size: the halo is the tile size, :func:`halo_for`).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass

import numpy as np

#: Block edges are multiples of this (a tile-size multiple for U-Nets up to depth 6).
SIZE_MULTIPLE = 64

#: config key blocks.size when not given: default_size(100 dates, 10 channels, 2 GB, halo 32 = tiles.size)
DEFAULT_SIZE = 384


@dataclass(frozen=True)
class Block:
    """One block of a plan. Windows are in cells of the region (row 0 = north, col 0 = west)."""

    id: str            # "r0003c0012": block row 3, block column 12
    brow: int          # block row index
    bcol: int          # block column index
    row0: int          # core window
    col0: int
    rows: int
    cols: int
    read_row0: int     # read window = core + halo, clipped to the region
    read_col0: int
    read_rows: int
    read_cols: int

    @property
    def core_row_offset(self) -> int:
        """Row of the core's first cell inside the read window."""
        return self.row0 - self.read_row0

    @property
    def core_col_offset(self) -> int:
        """Column of the core's first cell inside the read window."""
        return self.col0 - self.read_col0

    def bounds(self, region: dict, *, halo: bool = True) -> dict:
        """The block's window in CRS units, as a region dict (keys of ``stfuse.ingest.grid_dict``).

        ``halo=True`` (default): the read window, what ``g.region`` is set to for reading the block;
        ``halo=False``: the core. ``region`` is the whole computational region. Other keys of
        ``region`` (e.g. ``epsg``) are kept.
        """
        if self.read_row0 + self.read_rows > region["rows"] or self.read_col0 + self.read_cols > region["cols"]:
            raise ValueError(f"block {self.id} lies outside the region ({region['rows']} x {region['cols']} cells)")
        if halo:
            r0, c0, nr, nc = self.read_row0, self.read_col0, self.read_rows, self.read_cols
        else:
            r0, c0, nr, nc = self.row0, self.col0, self.rows, self.cols
        rx, ry = float(region["res_x"]), float(region["res_y"])
        out = dict(region)
        out.update(west=region["west"] + c0 * rx, east=region["west"] + (c0 + nc) * rx,
                   north=region["north"] - r0 * ry, south=region["north"] - (r0 + nr) * ry,
                   res_x=region["res_x"], res_y=region["res_y"], cols=nc, rows=nr)
        # the region's own edges exactly (no rounding drift from the cell arithmetic)
        if c0 + nc == region["cols"]:
            out["east"] = region["east"]
        if r0 + nr == region["rows"]:
            out["south"] = region["south"]
        return out


def _int(value, key: str, minimum: int) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise ValueError(f"config key {key} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"config key {key} must be >= {minimum}, got {value}")
    return int(value)


def plan(rows: int, cols: int, size: int, halo: int) -> list[Block]:
    """Blocks of edge ``size`` (cores) with a ``halo`` clipped to a ``rows`` x ``cols`` region.

    Row-major order (north to south, west to east). Raises ValueError naming ``blocks.size`` /
    ``blocks.halo`` when ``size < 1``, ``halo < 0`` or ``halo >= size``.
    """
    rows = _int(rows, "region rows", 1)
    cols = _int(cols, "region cols", 1)
    size = _int(size, "blocks.size", 1)
    halo = _int(halo, "blocks.halo", 0)
    if halo >= size:
        raise ValueError(f"config key blocks.halo ({halo}) must be smaller than blocks.size ({size})")
    out = []
    for br in range(math.ceil(rows / size)):
        r0 = br * size
        nr = min(size, rows - r0)
        rr0 = max(0, r0 - halo)
        rr1 = min(rows, r0 + nr + halo)
        for bc in range(math.ceil(cols / size)):
            c0 = bc * size
            nc = min(size, cols - c0)
            rc0 = max(0, c0 - halo)
            rc1 = min(cols, c0 + nc + halo)
            out.append(Block(f"r{br:04d}c{bc:04d}", br, bc, r0, c0, nr, nc, rr0, rc0, rr1 - rr0, rc1 - rc0))
    return out


def cube_bytes(size: int, halo: int, dates: int, channels: int) -> int:
    """Bytes of one block's float32 cube: (size + 2 halo)^2 x dates x channels x 4."""
    return (size + 2 * halo) ** 2 * dates * channels * 4


def default_size(dates: int = 100, channels: int = 10, budget_bytes: float = 2e9, halo: int = 16) -> int:
    """Largest multiple of 64 whose cube (:func:`cube_bytes`) fits in half of ``budget_bytes``.

    Half, because a step holds a copy or two of the cube (input, prediction). Raises ValueError
    when not even a 64-cell block fits.
    """
    dates = _int(dates, "dates", 1)
    channels = _int(channels, "channels", 1)
    halo = _int(halo, "blocks.halo", 0)
    allowed = budget_bytes / 2
    edge = math.isqrt(int(allowed // (dates * channels * 4)))   # largest read edge that fits
    size = (edge - 2 * halo) // SIZE_MULTIPLE * SIZE_MULTIPLE
    while size > 0 and cube_bytes(size, halo, dates, channels) > allowed:   # guard float rounding
        size -= SIZE_MULTIPLE
    if size < SIZE_MULTIPLE:
        raise ValueError(f"a {SIZE_MULTIPLE}-cell block with a {halo}-cell halo, {dates} dates and {channels} "
                         f"channels needs {cube_bytes(SIZE_MULTIPLE, halo, dates, channels) * 2:.3g} bytes, "
                         f"more than the budget of {budget_bytes:.3g}")
    return size


def crop_core(array, block: Block):
    """The core of ``array`` read over ``block``'s read window (last two axes H, W)."""
    h, w = array.shape[-2:]
    if (h, w) != (block.read_rows, block.read_cols):
        raise ValueError(f"block {block.id}: array is {h} x {w} cells, its read window "
                         f"{block.read_rows} x {block.read_cols}")
    r, c = block.core_row_offset, block.core_col_offset
    return array[..., r:r + block.rows, c:c + block.cols]


def paste(out, core_array, block: Block):
    """Write ``core_array`` (last two axes = the core) into the whole-region ``out`` (array or memmap).

    Leading axes broadcast as numpy assignment does. Returns ``out``.
    """
    h, w = np.shape(core_array)[-2:]
    if (h, w) != (block.rows, block.cols):
        raise ValueError(f"block {block.id}: core array is {h} x {w} cells, its core {block.rows} x {block.cols}")
    if block.row0 + block.rows > out.shape[-2] or block.col0 + block.cols > out.shape[-1]:
        raise ValueError(f"block {block.id} lies outside the output ({out.shape[-2]} x {out.shape[-1]} cells)")
    out[..., block.row0:block.row0 + block.rows, block.col0:block.col0 + block.cols] = core_array
    return out


def halo_for(blocks_config: dict | None, tile_size: int) -> int:
    """The halo a study's blocks are read with: config key ``blocks.halo``, null = ``tile_size``.

    Why the tile size: an inference window or a training tile that touches a core may start up to
    ``tile_size - 1`` cells before it and end as far after it; with that much halo a block sees every
    window and tile of the whole region's grid that touches its core, so each block's core comes out
    exactly as it does when the whole region is one block. A smaller halo would make results depend
    on the block layout, and is refused (ValueError naming ``blocks.halo``).
    """
    tile_size = _int(tile_size, "tiles.size", 1)
    halo = (blocks_config or {}).get("halo")
    if halo is None:
        return tile_size
    halo = _int(halo, "blocks.halo", 0)
    if halo < tile_size:
        raise ValueError(f"config key blocks.halo ({halo}) must be at least tiles.size ({tile_size}) -- "
                         "a block must see every inference window and training tile that touches its core, "
                         "or its results would depend on the block layout; leave it null (= tiles.size)")
    return halo


def study_plan(region: dict, blocks_config: dict | None, tile_size: int) -> list[Block]:
    """The block plan of a study: its region's rows and columns, ``blocks.size`` and :func:`halo_for`."""
    size = (blocks_config or {}).get("size", DEFAULT_SIZE)
    return plan(int(region["rows"]), int(region["cols"]), size, halo_for(blocks_config, tile_size))


def find(blocks: list[Block], block_id: str) -> Block:
    """The block ``block_id`` of a plan; ValueError (naming the plan's extent) when it has none."""
    for b in blocks:
        if b.id == block_id:
            return b
    last = blocks[-1].id if blocks else "none"
    raise ValueError(f"block {block_id!r} is not in the plan ({len(blocks)} blocks, r0000c0000 .. {last}); "
                     "the region or config key blocks changed since the job was planned")


def to_dict(block: Block) -> dict:
    """A block as plain JSON values (see :func:`from_dict`)."""
    return dataclasses.asdict(block)


def from_dict(data: dict) -> Block:
    return Block(**{f.name: data[f.name] for f in dataclasses.fields(Block)})


def read_slices(block: Block) -> tuple[slice, slice]:
    """Rows and columns of ``block``'s read window in a whole-region (..., H, W) array."""
    return (slice(block.read_row0, block.read_row0 + block.read_rows),
            slice(block.read_col0, block.read_col0 + block.read_cols))


def core_slices(block: Block) -> tuple[slice, slice]:
    """Rows and columns of ``block``'s core in a whole-region (..., H, W) array."""
    return slice(block.row0, block.row0 + block.rows), slice(block.col0, block.col0 + block.cols)


def id_in_path(path) -> str:
    """The block id a per-block file's path names (its last ``r####c####`` component)."""
    import re
    from pathlib import Path

    ids = [p for p in Path(path).parts if re.fullmatch(r"r\d{4}c\d{4}", p)]
    if not ids:
        raise ValueError(f"{path}: no block id (r0000c0000) in the path")
    return ids[-1]
