"""Stage cube: read one spatial block (core + halo) of every imagery group from GRASS into a block cube.

Each block is its own job, in a mapset of its own (``cube_<block id>``: parallel jobs never share a
mapset's region), with the computational region set to the block's read window. Later stages read the
block cube (:mod:`stfuse.cube`) and never GRASS.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np

from .. import blocks, cube, grass, grassio
from ..ingest import grid_from_project, set_region
from ..manifest import Grid

log = logging.getLogger("stfuse.steps.cube")


def block_grid(project_state: dict, block: blocks.Block) -> Grid:
    """The GRASS grid of ``block``'s read window (the study grid's cells, cut)."""
    g = grid_from_project(project_state)
    return Grid(g.epsg, g.crs_wkt, g.west + block.read_col0 * g.res_x, g.north - block.read_row0 * g.res_y,
                g.res_x, g.res_y, block.read_cols, block.read_rows)


def cube_block_step(project_state: dict, groups_json, block_id: str, out_dir, *, blocks_config: dict,
                    tile_size: int) -> dict:
    """Write ``out_dir``/cube.npy (T, C, read_rows, read_cols) and cube.json for block ``block_id``.

    The plan comes from the project's region and config keys blocks/tiles.size (:func:`stfuse.blocks.study_plan`),
    so a job planned for another region or layout fails instead of reading the wrong window.
    """
    t0 = time.perf_counter()
    groups_state = json.loads(Path(groups_json).read_text())
    region = project_state["region"]
    block = blocks.find(blocks.study_plan(region, blocks_config, tile_size), block_id)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    partial = out_dir / f".{cube.CUBE_FILE}.partial"
    reads = [grass.map_mapset(m) for g in groups_state["groups"] for m in g["maps"] if m]
    channels = groups_state["channels"]
    try:
        with grass.stage_session(project_state, f"cube_{block.id}", reads) as gs:
            set_region(gs, block_grid(project_state, block))
            shape = (len(groups_state["groups"]), len(channels)) + tuple(grassio.region_shape())
            if shape[2:] != (block.read_rows, block.read_cols):
                raise RuntimeError(f"block {block.id}: GRASS region is {shape[2]} x {shape[3]} cells, its read window "
                                   f"{block.read_rows} x {block.read_cols}")
            mm = np.lib.format.open_memmap(partial, mode="w+", dtype=np.float32, shape=shape)
            cube.read_cube(groups_state, mm)
        mm.flush()
        counts = cube.core_counts(mm, channels, block)
        nbytes = mm.nbytes
        del mm
        os.replace(partial, out_dir / cube.CUBE_FILE)
    finally:
        if partial.exists():
            partial.unlink()
    meta = dict(channels=channels, dates=cube.cube_dates(groups_state), region=region, block=blocks.to_dict(block),
                shape=list(shape), counts=counts)
    cube.write_meta(out_dir, meta)
    log.info("block %s: read %s cube (%.1f MB) from GRASS in %.1f s", block.id, shape, nbytes / 1e6,
             time.perf_counter() - t0)
    return meta
