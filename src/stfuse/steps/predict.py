"""Stage predict: blended tiled inference over one block cube (:func:`stfuse.infer.predict_block`).

The block's cube (core + halo) is memory-mapped copy-on-write: the heldout variant hides the benchmark's
transplanted cells in it (:func:`stfuse.cube.transplanted`, per cell, so a block hides its part of the whole
region's cells) and only the pages it changes are copied. The windows are the whole region's grid cut to the
block, so the stitched cores are the whole-region prediction bit for bit. Outputs are core-sized and written
straight into their ``.npy`` files (the same bytes as ``np.save``) under temporary names, renamed at the end.
A checkpoint with an uncertainty head (:mod:`stfuse.models.uncertainty`) also gives ``std.npy``, the predictive
standard deviation of every filled cell (physical units, 0 where observed).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np

from .. import cube as cubes
from .. import infer
from ..models.uncertainty import NONE
from ..train import load_checkpoint

log = logging.getLogger("stfuse.steps.predict")

#: result key of :func:`stfuse.infer.predict_block` -> file written
OUTPUT_FILES = {"filled": "filled.npy", "prediction": "prediction.npy", "filled_flag": "flags.npy"}
#: the std's file, beside them (checkpoints with an uncertainty head)
STD_FILE = "std.npy"
INFO_FILE = "infer.json"


def predict_block_step(model_path, cube_dir, out_dir, *, holdout_json=None, overlap=None, batch_size=16,
                       device="auto", threads=2, std: bool | None = None) -> dict:
    """Write ``out_dir``/filled.npy, prediction.npy (float32 (T, B, rows, cols)), flags.npy (uint8 (T, rows,
    cols)) for the core of the block cube in ``cube_dir``, and infer.json (returned).

    ``std``: also write std.npy (float32 (T, B, rows, cols)): None = when the checkpoint has an uncertainty
    head; True = it must have one (ValueError naming the checkpoint otherwise: the workflow asks for it when
    config train.uncertainty is not none); False = never.

    ``holdout_json`` (the heldout variant): the benchmark's holdout.json; its ``donors`` give the cells hidden
    before inference. ``threads`` is torch's thread count: results are bit-identical only for the same count.
    """
    t0 = time.perf_counter()
    ckpt = load_checkpoint(model_path)
    head = ckpt.get("uncertainty") or NONE
    if std and head == NONE:
        raise ValueError(f"{model_path} has no uncertainty head (checkpoint entry 'uncertainty' is {head!r}), so "
                         "there is no std to write: retrain it with config key train.uncertainty set "
                         "(laplace, gaussian), or set it to none")
    write_std = head != NONE if std is None else bool(std)
    cube, meta, block = cubes.load_block(cube_dir, mmap_mode="c")
    channels, dates, region = meta["channels"], meta["dates"], meta["region"]
    n_hidden = None
    if holdout_json is not None:
        donors = json.loads(Path(holdout_json).read_text())["donors"]
        hidden = cubes.transplanted(cube, channels, donors)
        n_hidden = int(hidden[:, block.core_row_offset:block.core_row_offset + block.rows,
                              block.core_col_offset:block.core_col_offset + block.cols].sum())
        cubes.hide(cube, channels, hidden, inplace=True)
        del hidden
    n_dates = cube.shape[0]
    n_bands = len(cubes.indices(channels, "optical"))
    shapes = {"filled": ((n_dates, n_bands, block.rows, block.cols), np.float32),
              "prediction": ((n_dates, n_bands, block.rows, block.cols), np.float32),
              "filled_flag": ((n_dates, block.rows, block.cols), np.uint8)}
    files = dict(OUTPUT_FILES)
    if write_std:
        shapes["std"] = ((n_dates, n_bands, block.rows, block.cols), np.float32)
        files["std"] = STD_FILE
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    partial = {key: out_dir / f".{name}.partial" for key, name in files.items()}
    info_partial = out_dir / f".{INFO_FILE}.partial"
    try:
        out = {key: np.lib.format.open_memmap(partial[key], mode="w+", dtype=dtype, shape=shape)
               for key, (shape, dtype) in shapes.items()}
        res = infer.predict_block(ckpt, cube, channels, dates, block, int(region["rows"]),
                                  int(region["cols"]), overlap=overlap, batch_size=batch_size, device=device,
                                  threads=threads, out=out)
        for arr in out.values():
            arr.flush()
        del out  # the memmaps (res holds them too: del res below)
        info = {
            "block": block.id,
            "heldout": holdout_json is not None,
            "hidden_core_cells": n_hidden,
            "tile_size": res["tile_size"],
            "overlap": res["overlap"],
            "batch_size": batch_size,
            "threads": threads,
            "device": device,
            "n_windows": res["n_windows"],
            "windows": res["windows"],
            "bands": res["bands"],
            "uncertainty": head,
            "shapes": {"cube": list(cube.shape), "read_window": [block.read_rows, block.read_cols],
                       "core": [block.rows, block.cols],
                       **{files[k]: list(s) for k, (s, _) in shapes.items()}},
            "seconds": {"predict": res["seconds"], "total": time.perf_counter() - t0},
        }
        del res
        info_partial.write_text(json.dumps(info, indent=1) + "\n")
        for key, name in files.items():
            os.replace(partial[key], out_dir / name)
        os.replace(info_partial, out_dir / INFO_FILE)
    finally:
        for path in list(partial.values()) + [info_partial]:
            if path.exists():
                path.unlink()
    log.info("block %s: %d windows over a %s cube -> %d x %d core cells, %.1f s", block.id, info["n_windows"],
             tuple(cube.shape), block.rows, block.cols, info["seconds"]["total"])
    return info
