"""Training tiles block by block: each block's tiles (:func:`tiles_block_step`), then the store
that joins them (:func:`tile_store_step`), exactly what the whole-region export would write."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from stfuse import cube as cube_mod
from stfuse import tiles

log = logging.getLogger("stfuse.steps.tiles")


def tiles_block_step(cube_dir, out_dir, *, holdout_json=None, **tile_params) -> dict:
    """Export the training tiles one block owns from its block cube.

    ``holdout_json`` (the heldout variant): the benchmark's transplanted cells are hidden first
    (``donors``: evaluation date index -> donor date index), in a copy-on-write map of the cube,
    so the cube file is never changed and only the pages of hidden dates are copied. Query dates (config
    infer.dates, no optical acquisition) are dropped after hiding (the donors index the cube's dates), so the
    tiles are those of the observed series whatever infer.dates asks for.
    """
    cube, meta, block = cube_mod.load_block(cube_dir, mmap_mode="c")
    if holdout_json is not None:
        donors = json.loads(Path(holdout_json).read_text())["donors"]
        cube_mod.hide(cube, meta["channels"], cube_mod.transplanted(cube, meta["channels"], donors),
                      inplace=True)
    region = meta["region"]
    n_query = sum(1 for d in meta["dates"] if d.get("query"))
    if n_query:  # dates asked for by config infer.dates with no optical acquisition: never trained on
        log.info("block %s: %d query date(s) of %d left out of the training tiles (tiles.observed_only)",
                 block.id, n_query, len(meta["dates"]))
    doc = tiles.export_block_tiles(cube, meta["channels"], meta["dates"], block,
                                   int(region["rows"]), int(region["cols"]), out_dir,
                                   region=region, **tile_params)
    log.info("tiles of block %s: %s", block.id, {k: v for k, v in doc["counts"].items()})
    return doc


def tile_store_step(block_tile_dirs, out_dir, **tile_params) -> dict:
    """Join the blocks' tiles into the tile store training reads (small files only)."""
    summary = tiles.merge_tile_store(list(block_tile_dirs), out_dir, **tile_params)
    log.info("tile store: %s", {k: v for k, v in summary.items() if k.startswith("n_")})
    return summary
