"""Stages holdout and score, per spatial block: the benchmark on block cubes (:mod:`stfuse.cube`).

No job holds more than one block's read window of the series:

``holdout_step``
    the evaluation dates and their donor dates from the ``counts`` of every block's cube.json (no pixel):
    holdout.json. Each block's hidden cells are ``stfuse.cube.transplanted(cube, channels, donors)``.
``score_stats_block_step`` (one job per block)
    the first pass over the block's core (:func:`stfuse.benchmark.block_stats`): counts, SSIM fill parts,
    ``sar_regression`` sufficient statistics, Whittaker's leave-out error sums per candidate lambda (the
    lambda of ``benchmark.whittaker_lambda: auto`` is chosen on their merge); a small ``.npz``.
``score_block_step`` (one job per block)
    merges every block's first pass (in block order: the same floats in every job), runs the methods on
    the block's :func:`stfuse.benchmark.score_window` and writes its partial score tables (``parts.npz``)
    and quicklook piece (``quicklook.npz``).
``score_step``
    merges the blocks' tables into scores.csv, summary.md, by_gap.png, quicklook.png and benchmark.json,
    as :func:`stfuse.benchmark.benchmark_step` writes them for a whole-region cube (the same table), and
    summary.rst (:func:`write_summary_rst`: the overall tables, shown on the report's landing page).

The model's filled series: the SSIM of a core cell near the core's edge sees the filled values up to
:data:`stfuse.metrics.SSIM_HALO` cells beyond it; those come from the neighbouring blocks' core files (every
block's ``filled.npy`` is an input of every score job, read as a :class:`stfuse.cube.Mosaic`, only the few
rows and columns needed), so each block's SSIM is the whole region's.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd

from .. import baselines, benchmark, blocks, cube, metrics
from ..logs import Progress

log = logging.getLogger("stfuse.steps.score")

PARTS_FILE = "parts.npz"
_TEXT = ("band", "gap_bin", "cloud_bin", "part", "protocol", "method")
QUICK_FILE = "quicklook.npz"
BLOCK_FILE = "block.json"
_SAR_FIELDS = baselines.SarStats._fields


def holdout_step(cube_json_paths, info_path, *, min_clear: float, seed: int, min_mask_fraction: float = 0.05,
                 max_mask_fraction: float = 0.7, max_dates: int | None = None, **_ignored) -> dict:
    """Write holdout.json (:func:`stfuse.benchmark.holdout_decision`) from the cube.json of every block."""
    metas = [json.loads(Path(p).read_text()) for p in cube_json_paths]
    info = benchmark.holdout_decision(metas, min_clear=min_clear, seed=seed, min_mask_fraction=min_mask_fraction,
                                      max_mask_fraction=max_mask_fraction, max_dates=max_dates)
    Path(info_path).parent.mkdir(parents=True, exist_ok=True)
    _write_text(info_path, json.dumps(info, indent=1) + "\n")
    return info


def _write_text(path, text: str) -> None:
    tmp = Path(str(path) + ".partial")
    tmp.write_text(text)
    os.replace(tmp, path)


def _possible_holdout(holdout_json) -> dict:
    info = json.loads(Path(holdout_json).read_text())
    if not info.get("possible"):
        raise ValueError(f"{holdout_json}: the benchmark is not possible ({info.get('reason')}); only score_step "
                         "runs then (it writes outputs that say why)")
    return info


# --- the first pass's file ---------------------------------------------------------------------------------

def save_stats(path, stats: benchmark.BlockStats, block: blocks.Block) -> None:
    """A block's :class:`stfuse.benchmark.BlockStats` as an ``.npz`` (with the block, for the merge order)."""
    arrays = dict(block=np.array(json.dumps(blocks.to_dict(block))), n_seen=np.int64(stats.n_seen),
                  n_clear=stats.n_clear, n_clear_in=stats.n_clear_in, n_hidden=stats.n_hidden, fill=stats.fill)
    if stats.real_fill is not None:
        arrays["real_fill"] = stats.real_fill
    for key in ("sar", "real_sar"):
        value = getattr(stats, key)
        if value is not None:
            arrays.update({f"{key}.{f}": np.asarray(v) for f, v in zip(_SAR_FIELDS, value)})
    for key in ("whittaker", "real_whittaker"):
        value = getattr(stats, key)
        if value is not None:
            arrays.update({f"{key}.sse": np.asarray(value[0], np.float64), f"{key}.n": np.asarray(value[1], np.int64),
                           f"{key}.lambdas": np.asarray(baselines.WHITTAKER_LAMBDA_GRID)})
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(str(path) + ".partial")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)


def load_stats(path) -> tuple[benchmark.BlockStats, blocks.Block]:
    with np.load(path, allow_pickle=False) as z:
        def sar(key):
            return baselines.SarStats(*(z[f"{key}.{f}"] for f in _SAR_FIELDS)) if f"{key}.n" in z else None

        def tuning(key):
            if f"{key}.sse" not in z:
                return None
            if not np.array_equal(z[f"{key}.lambdas"], baselines.WHITTAKER_LAMBDA_GRID):
                raise ValueError(f"{path}: its Whittaker tuning has other candidate lambdas than this stfuse's; "
                                 "rerun the benchmark's first pass (rule score_stats_block)")
            return z[f"{key}.sse"], z[f"{key}.n"]

        stats = benchmark.BlockStats(int(z["n_seen"]), z["n_clear"], z["n_clear_in"], z["n_hidden"], z["fill"],
                                     sar=sar("sar"), real_fill=z["real_fill"] if "real_fill" in z else None,
                                     real_sar=sar("real_sar"), whittaker=tuning("whittaker"),
                                     real_whittaker=tuning("real_whittaker"))
        block = blocks.from_dict(json.loads(str(z["block"])))
    return stats, block


def merged_stats(stats_paths, region: dict) -> benchmark.RegionStats:
    """Every block's first pass merged in block order (row-major: the same in every job), checked to cover
    the ``region`` (its cube.json dict) exactly once."""
    loaded = sorted((load_stats(p) for p in stats_paths), key=lambda sb: (sb[1].brow, sb[1].bcol))
    ids = [b.id for _, b in loaded]
    if len(set(ids)) != len(ids):
        raise ValueError(f"the first passes name a block twice: {sorted(i for i in set(ids) if ids.count(i) > 1)}")
    rows, cols = int(region["rows"]), int(region["cols"])
    covered = sum(b.rows * b.cols for _, b in loaded)
    if covered != rows * cols or any(b.row0 + b.rows > rows or b.col0 + b.cols > cols for _, b in loaded):
        raise ValueError(f"the first passes of {len(loaded)} block(s) cover {covered} cells, the region "
                         f"{rows} x {cols}: every block's first pass is needed, once")
    return benchmark.merge_stats([s for s, _ in loaded], single=len(loaded) == 1)


# --- windows of a block ------------------------------------------------------------------------------------

def _region_shape(meta: dict) -> tuple[int, int]:
    return int(meta["region"]["rows"]), int(meta["region"]["cols"])


def _scored_window(block: blocks.Block, meta: dict) -> blocks.Block:
    """The block's :func:`stfuse.benchmark.score_window`, checked to lie inside its read window."""
    win = benchmark.score_window(block, *_region_shape(meta))
    if (win.read_row0 < block.read_row0 or win.read_col0 < block.read_col0
            or win.read_row0 + win.read_rows > block.read_row0 + block.read_rows
            or win.read_col0 + win.read_cols > block.read_col0 + block.read_cols):
        raise ValueError(f"block {block.id}: scoring needs rows {win.read_row0}:{win.read_row0 + win.read_rows}, "
                         f"cols {win.read_col0}:{win.read_col0 + win.read_cols} (the core plus {metrics.SSIM_HALO} "
                         "cells for SSIM), beyond its read window; config key blocks.halo is too small")
    return win


def _crop(array, block: blocks.Block, win: blocks.Block) -> np.ndarray:
    """``win``'s read window of an array over ``block``'s read window, in memory."""
    r, c = win.read_row0 - block.read_row0, win.read_col0 - block.read_col0
    return np.array(array[..., r:r + win.read_rows, c:c + win.read_cols])


def filled_window(filled_paths, plan: list[blocks.Block], win: blocks.Block) -> np.ndarray:
    """A model's filled series over ``win``'s read window (the block's score window), read from every
    block's core-sized ``filled.npy`` (``filled_paths``, ``.../<block id>/infer/filled.npy``) as one
    whole-region mosaic: the cells around the core that SSIM looks at come from the neighbours' cores, so
    they are the whole region's values, and only those few rows and columns of a neighbour are read."""
    by_id = {blocks.id_in_path(p): p for p in filled_paths}
    m = cube.Mosaic(by_id, plan)
    return m[:, :, win.read_row0:win.read_row0 + win.read_rows, win.read_col0:win.read_col0 + win.read_cols]


def stats_plan(stats_paths) -> list[blocks.Block]:
    """The block plan, from every block's first-pass file (each records its block)."""
    return sorted((load_stats(p)[1] for p in stats_paths), key=lambda b: (b.brow, b.bcol))


def _truth(truth_manifest, optical: dict | None, meta: dict, window) -> np.ndarray:
    optical = optical or {}
    bands = optical.get("bands") or [c["name"] for c in meta["channels"] if c["kind"] == "optical"]
    return benchmark.synthetic_truth(truth_manifest, meta["dates"], bands, optical.get("scale", 1.0),
                                     optical.get("offset", 0.0), window=window)


# --- the steps ---------------------------------------------------------------------------------------------

def score_stats_block_step(cube_dir, holdout_json, out_path, *, truth_manifest=None,
                           optical: dict | None = None) -> benchmark.BlockStats:
    """The first pass over one block's core (:func:`stfuse.benchmark.block_stats`), written to ``out_path``
    (.npz, :func:`save_stats`). ``truth_manifest`` (demo scene): also the synthetic truth's parts, read over
    the core only; ``optical`` the optical sensor's config section (bands, scale, offset). Always includes
    Whittaker's leave-out criterion per candidate lambda (whatever config benchmark.whittaker_lambda says, so
    this pass does not depend on it; the second pass uses it when the setting is ``auto``)."""
    holdout = _possible_holdout(holdout_json)
    arr, meta, block = cube.load_block(cube_dir)
    core = np.array(blocks.crop_core(arr, block))    # this pass's own copy: hidden in place
    del arr
    hidden = cube.transplanted(core, meta["channels"], holdout["donors"])
    truth = (_truth(truth_manifest, optical, meta, (block.row0, block.col0, block.rows, block.cols))
             if truth_manifest is not None else None)
    stats = benchmark.block_stats(core, hidden, meta["channels"], truth, times=benchmark.dates_to_times(meta["dates"]),
                                  origin=(block.row0, block.col0))
    save_stats(out_path, stats, block)
    log.info("block %s: first pass, %d hidden cells", block.id, int(stats.n_hidden.sum()))
    return stats


def score_block_step(cube_dir, holdout_json, stats_paths, heldout_filled, main_filled, out_dir, *,
                     data_range: float, whittaker_lambda, quicklook_dates: int, truth_manifest=None,
                     optical: dict | None = None, heldout_std=None) -> dict:
    """One block's partial score tables (``parts.npz``) and quicklook piece (``quicklook.npz``) in ``out_dir``.

    ``stats_paths``: every block's :func:`score_stats_block_step` file. The methods run on the block's score
    window (core + :data:`stfuse.metrics.SSIM_HALO`, inside its read window); the heldout (and, with
    ``truth_manifest`` and ``main_filled``, the main) model's filled series come from every block's
    ``filled.npy`` (lists of paths, :func:`filled_window`); ``heldout_std``: every block's ``std.npy`` of the
    heldout model (an uncertainty head), read the same way, for the calibration counts of the model's table.
    Returns {(protocol, method): partial table}."""
    holdout = _possible_holdout(holdout_json)
    arr, meta, block = cube.load_block(cube_dir)
    channels = meta["channels"]
    region = merged_stats(stats_paths, meta["region"])
    win = _scored_window(block, meta)
    cb = _crop(arr, block, win)
    del arr
    hb = cube.transplanted(cb, channels, holdout["donors"])
    real = truth_manifest is not None and bool(main_filled)
    plan = stats_plan(stats_paths)
    ctx = benchmark.score_context(channels, meta["dates"], _region_shape(meta), region, data_range=data_range,
                                  whittaker_lambda=whittaker_lambda, quicklook_dates=quicklook_dates)
    window = (win.read_row0, win.read_col0, win.read_rows, win.read_cols)
    parts, piece = benchmark.score_block(
        cb, hb, filled_window(heldout_filled, plan, win), win, ctx,
        truth=_truth(truth_manifest, optical, meta, window) if real else None,
        main=filled_window(main_filled, plan, win) if real else None,
        model_std=filled_window(heldout_std, plan, win) if heldout_std else None)
    _write_block_scores(out_dir, block, parts, piece)
    log.info("block %s: scored %d method/protocol pairs", block.id, len(parts))
    return parts


def _write_block_scores(out_dir, block: blocks.Block, parts: dict, piece: dict | None) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = pd.concat([p.assign(protocol=protocol, method=name) for (protocol, name), p in parts.items()],
                      ignore_index=True)
    columns = {c: table[c].to_numpy(dtype=str) for c in _TEXT}      # exact: no text round trip of floats
    columns.update(date=table["date"].to_numpy(dtype=np.int64), value=table["value"].to_numpy(dtype=np.float64))
    with open(out_dir / f".{PARTS_FILE}.partial", "wb") as f:
        np.savez(f, **columns)
    os.replace(out_dir / f".{PARTS_FILE}.partial", out_dir / PARTS_FILE)
    quick = {} if piece is None else dict(names=np.array(piece["names"]), values=piece["values"],
                                          hidden=piece["hidden"], rows=piece["rows"], cols=piece["cols"])
    with open(out_dir / f".{QUICK_FILE}.partial", "wb") as f:
        np.savez(f, **quick)
    os.replace(out_dir / f".{QUICK_FILE}.partial", out_dir / QUICK_FILE)
    _write_text(out_dir / BLOCK_FILE, json.dumps(blocks.to_dict(block), indent=1) + "\n")


def _read_block_scores(block_dir) -> tuple[dict, dict | None]:
    block_dir = Path(block_dir)
    with np.load(block_dir / PARTS_FILE, allow_pickle=False) as z:
        table = pd.DataFrame({c: [str(v) for v in z[c]] for c in _TEXT} | dict(date=z["date"], value=z["value"]))
    table = table[list(metrics.PART_COLUMNS) + ["protocol", "method"]]
    parts = {key: p.drop(columns=["protocol", "method"]).reset_index(drop=True)
             for key, p in table.groupby(["protocol", "method"], sort=False)}
    with np.load(block_dir / QUICK_FILE, allow_pickle=False) as z:
        piece = None if "names" not in z else dict(names=[str(n) for n in z["names"]], values=z["values"],
                                                   hidden=z["hidden"], rows=z["rows"], cols=z["cols"])
    return parts, piece


def score_step(block_score_dirs, stats_paths, holdout_json, cube_json, out_dir, *, data_range: float,
               whittaker_lambda, quicklook_dates: int, uncertainty: str | None = None) -> pd.DataFrame | None:
    """Merge the blocks' :func:`score_block_step` outputs into scores.csv, summary.md, by_gap.png,
    quicklook.png and benchmark.json in ``out_dir`` (:func:`stfuse.benchmark.write_outputs`), and summary.rst
    (:func:`write_summary_rst`). When holdout.json says the benchmark is not possible, writes the outputs that
    say why (:func:`stfuse.benchmark.not_possible_step`; the other inputs may then be empty) and returns None;
    else the long score table. ``cube_json``: one block's
    cube.json (channels, dates, region). ``uncertainty``: the model's head (config train.uncertainty), which gives
    the nominal coverages of calibration.png when the blocks' tables hold std counts."""
    holdout = json.loads(Path(holdout_json).read_text())
    if not holdout.get("possible"):
        benchmark.not_possible_step(out_dir, holdout)
        write_summary_rst(out_dir, None, reason=holdout.get("reason", "see holdout.json"))
        return None
    meta = json.loads(Path(cube_json).read_text())
    region = merged_stats(stats_paths, meta["region"])
    ctx = benchmark.score_context(meta["channels"], meta["dates"], _region_shape(meta), region,
                                  data_range=data_range, whittaker_lambda=whittaker_lambda,
                                  quicklook_dates=quicklook_dates)
    dirs = sorted(((blocks.from_dict(json.loads((Path(d) / BLOCK_FILE).read_text())), d) for d in block_score_dirs),
                  key=lambda bd: (bd[0].brow, bd[0].bcol))
    if len(dirs) != len(stats_paths):
        raise ValueError(f"{len(dirs)} block score dirs for {len(stats_paths)} first passes: every block is needed")
    merger, quick = benchmark.PartsMerger(), benchmark.Quicklook(ctx)
    progress = Progress(log, "merging block scores", len(dirs), "blocks")
    for _, d in dirs:
        parts, piece = _read_block_scores(d)
        merger.add(parts)
        quick.paste(piece)
        progress.step()
    table = merger.table()
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    benchmark.write_outputs(out_dir, table, quick, ctx, meta["dates"], calibration=merger.calibration(),
                            head=None if uncertainty in (None, "none") else uncertainty)
    write_summary_rst(out_dir, table)
    return table


#: summary.md's overall tables as reStructuredText: the report's landing page includes it (workflow/report/workflow.rst)
SUMMARY_RST = "summary.rst"
_HEADINGS = {"mae": "MAE", "rmse": "RMSE", "psnr": "PSNR (dB)", "sam": "SAM (°)", "ssim": "SSIM"}
_LOWER_BETTER = {"mae", "rmse", "sam"}


def _rst_text(text: str) -> str:
    """``text`` as plain reStructuredText inline text (markup characters escaped)."""
    return re.sub(r"([\\*`_|])", r"\\\1", str(text))


def _csv_row(cells) -> str:
    return ",".join('"' + c.replace('"', '""') + '"' for c in cells)


def summary_rst(table: pd.DataFrame | None, *, reason: str | None = None) -> str:
    """summary.md's overall tables as reStructuredText: per protocol a table of method x MAE, RMSE, PSNR, SAM,
    SSIM over all bands, gap lengths and cloud fractions (:func:`stfuse.benchmark.summary_table` of the long
    score ``table``), the numbers as summary.md shows them, the best per column in bold. With ``table`` None
    (the benchmark could not score): a paragraph that says so and why (``reason``)."""
    if table is None:
        return (f"**The benchmark could not score this study**: {_rst_text(reason or 'see holdout.json')}.\n")
    out = []
    for protocol, part in benchmark.summary_table(table).groupby(level=0, sort=False):
        part = part.droplevel(0)
        best = {m: (part[m].min() if m in _LOWER_BETTER else part[m].max()) for m in part.columns}
        out += [f".. csv-table:: {_rst_text(protocol)} (best per column in bold)", "   :header-rows: 1", "",
                "   " + _csv_row(["method"] + [_HEADINGS.get(m, m) for m in part.columns])]
        for method, row in part.iterrows():
            cells = [_rst_text(method)]
            for m in part.columns:
                text = f"{row[m]:.4f}" if m in ("mae", "rmse") else f"{row[m]:.3f}"
                cells.append(f"**{text}**" if np.isclose(row[m], best[m]) else text)
            out.append("   " + _csv_row(cells))
        out.append("")
    return "\n".join(out)


def write_summary_rst(out_dir, table: pd.DataFrame | None, *, reason: str | None = None) -> Path:
    """:func:`summary_rst` as ``summary.rst`` in ``out_dir``. Every finished score job writes it: the report's
    landing page includes it, and would not render without it."""
    path = Path(out_dir) / SUMMARY_RST
    _write_text(path, summary_rst(table, reason=reason))
    return path
