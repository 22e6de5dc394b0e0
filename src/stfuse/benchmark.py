"""Leakage-free benchmark of the gap-filling model against classical baselines.

Protocol: evaluation dates are optical dates that are (almost) clear. On each, the cloud mask of another
date (seeded) is transplanted: those cells become artificial gaps. Every method gets the series with
these gaps; metrics are computed only on the hidden cells, where the observation is the truth. The
model scored here is trained on the masked series (the `heldout` variant of the workflow), so hidden
cells never reach training as input or target. On the synthetic demo scene, the methods are also scored
under the real clouds against the scene's known cloud-free truth. Whittaker's lambda (config
benchmark.whittaker_lambda: auto) is tuned per protocol by leave-out on the observed values of the series the
methods get, in the first pass: never on a scored cell, and the same lambda whatever the block layout.
When the model has an uncertainty head, its standard deviation is checked on the same hidden cells: the share
of cells whose truth lies within +-k std of the prediction (:func:`stfuse.metrics.calibration_parts`, integer
counts merged exactly over the blocks), in benchmark.json, summary.md and calibration.png.
"""

from __future__ import annotations

import dataclasses
import html
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd

from . import baselines, blocks, metrics
from .cube import clear_mask, hide, region_counts

log = logging.getLogger("stfuse.benchmark")

MODEL = "stfuse_model"
#: config benchmark.whittaker_lambda's default: chosen per run by leave-out on the observed values
AUTO = "auto"


def _indices(channels: list[dict], kind: str) -> list[int]:
    return [i for i, c in enumerate(channels) if c["kind"] == kind]


class BenchmarkNotPossible(ValueError):
    """The study's data cannot support the benchmark; the message says why (and which config key helps)."""


def observed_cells(cube: np.ndarray, channels: list[dict]) -> np.ndarray:
    """(H, W) cells observed at least once: the ``valid`` channel is not NaN on some date (the footprint)."""
    return np.isfinite(cube[:, _indices(channels, "valid")[0]]).any(axis=0)


def _fractions_text(frac: np.ndarray) -> str:
    if len(frac) <= 24:
        return ", ".join(f"{f:.2f}" for f in frac)
    return f"min {frac.min():.2f}, median {np.median(frac):.2f}, max {frac.max():.2f} over {len(frac)} dates"


def observed(cube: np.ndarray, channels: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Optical bands (T, B, H, W) with NaN wherever the cell is not clear, and the clear mask (T, H, W): "clear"
    as everywhere in stfuse (:func:`stfuse.cube.clear_mask`: valid == 1 and every optical band finite)."""
    opt, valid = _indices(channels, "optical"), _indices(channels, "valid")[0]
    clear = clear_mask(cube, valid, opt)
    obs = cube[:, opt].copy()
    obs[~np.broadcast_to(clear[:, None], obs.shape)] = np.nan
    return obs, clear


def _fraction(count: np.ndarray, n: int) -> np.ndarray:
    # as metrics.clear_fraction: integer counts, so the same whatever the blocks
    return count / n if n else np.zeros(count.shape)


def query_dates(dates: list[dict]) -> list[int]:
    """Indices of the query dates (``"query": true``, from ``infer.dates``) among a cube's dates."""
    return [i for i, d in enumerate(dates) if d.get("query")]


def _eval_and_donors(frac: np.ndarray, dates: list[str], *, min_clear: float, seed: int, min_fraction: float,
                     max_fraction: float, max_dates: int | None, query=()) -> tuple[list[int], dict[int, int]]:
    """Evaluation dates and their donor dates from the dates' clear fractions alone (no pixel).

    ``query``: indices of query dates (``infer.dates``: no optical acquisition), never an evaluation date or a
    donor (their "cloud mask" would be the whole region). Raises :class:`BenchmarkNotPossible` when no date is
    clear enough or an evaluation date has no donor."""
    frac = np.asarray(frac, dtype=np.float64).copy()
    frac[list(query)] = np.nan  # NaN is neither >= min_clear nor within the donors' cloud fractions
    eval_dates = [int(t) for t in np.flatnonzero(frac >= min_clear)]
    if max_dates is not None and len(eval_dates) > max_dates:
        rng = np.random.default_rng(seed)
        eval_dates = sorted(int(t) for t in rng.choice(eval_dates, size=max_dates, replace=False))
    if not eval_dates:
        best = f"{np.nanmax(frac):.2f}" if np.isfinite(frac).any() else "none: no optical date"
        raise BenchmarkNotPossible(
            f"no optical date is clear enough to evaluate on (best clear fraction {best} < "
            f"benchmark.min_clear {min_clear}); lower config key benchmark.min_clear"
        )
    cloud = 1.0 - frac
    donors = (cloud >= min_fraction) & (cloud <= max_fraction)
    for e in eval_dates:
        if not np.delete(donors, e).any():
            raise BenchmarkNotPossible(
                f"no donor cloud mask for evaluation date {dates[e]}: no other date has a cloud fraction within "
                f"[{min_fraction}, {max_fraction}] (config keys benchmark.min_mask_fraction and "
                f"benchmark.max_mask_fraction; the dates' cloud fractions: {_fractions_text(cloud)})"
            )
    # the draws of metrics.transplant_masks, in the same order: the same donors
    return eval_dates, metrics.transplant_donors(cloud, eval_dates, seed, min_fraction, max_fraction)


def _all_hidden(n_eval: int, max_fraction: float) -> BenchmarkNotPossible:
    return BenchmarkNotPossible(
        f"the cloud masks transplanted onto the {n_eval} evaluation date(s) hide every clear cell "
        "of the series, so the heldout model would have nothing to train on; lower config key "
        f"benchmark.max_mask_fraction (now {max_fraction})"
    )


def choose_holdout(cube: np.ndarray, meta: dict, *, min_clear: float, seed: int, min_fraction: float = 0.05,
                   max_fraction: float = 0.7, max_dates: int | None = None) -> tuple[np.ndarray, list[int]]:
    """Evaluation dates (clear fraction >= min_clear) and the hidden cells transplanted onto them.

    Clear and cloud fractions are over the cells observed at least once (:func:`stfuse.metrics.clear_fraction`),
    so cells outside the optical footprint count neither as clear nor as cloud. Raises
    :class:`BenchmarkNotPossible` when the data cannot support the benchmark: no date is clear enough, an
    evaluation date has no donor date whose cloud fraction lies within [min_fraction, max_fraction], or the
    hidden cells would leave no clear cell on any date to train the heldout model on.

    The whole-cube form of :func:`holdout_decision` (which decides from the blocks' counts, no pixel): the
    same evaluation dates and donors, so ``stfuse.cube.transplanted`` of every block gives these hidden cells.
    """
    _, clear = observed(cube, meta["channels"])
    seen = observed_cells(cube, meta["channels"])
    frac = metrics.clear_fraction(clear, seen)
    eval_dates, donors = _eval_and_donors(frac, [d["start_time"] for d in meta["dates"]], min_clear=min_clear,
                                          seed=seed, min_fraction=min_fraction, max_fraction=max_fraction,
                                          max_dates=max_dates, query=query_dates(meta["dates"]))
    hidden = metrics.apply_donors(clear, donors)
    if not (clear & ~hidden).any():
        raise _all_hidden(len(eval_dates), max_fraction)
    log.info("evaluation dates: %d (clear fraction >= %.2f); hidden cells: %d", len(eval_dates), min_clear,
             int(hidden.sum()))
    return hidden, eval_dates


def leaves_clear_cells(seen: int, clear, donors: dict) -> bool:
    """Whether some clear cell surely stays clear after hiding, from the region's counts alone.

    ``seen``: cells observed at least once; ``clear`` (T,): clear cells per date; ``donors`` {e: d}. True
    when a date that is not an evaluation date has a clear cell (nothing is hidden on it), or when on some
    evaluation date e the clear cells of e and of its donor d outnumber the observed cells (then some cell
    is clear on both, and a cell clear on its donor date is not hidden). A sufficient condition: the exact
    check (:func:`choose_holdout`) also passes when every clear cell lies on an evaluation date and, for
    every one, clear(e) + clear(d) <= seen but the two dates' clear cells overlap anyway. That needs every
    other date fully cloudy and every donor an evaluation date, so clear fractions of at most one half on
    both: only with benchmark.min_clear <= 0.5."""
    clear = np.asarray(clear, dtype=np.int64)
    keys = {int(e) for e in donors}
    if any(clear[t] > 0 for t in range(len(clear)) if t not in keys):
        return True
    return any(int(clear[int(e)]) + int(clear[int(d)]) > int(seen) for e, d in donors.items())


def holdout_decision(metas: list[dict], *, min_clear: float, seed: int, min_mask_fraction: float = 0.05,
                     max_mask_fraction: float = 0.7, max_dates: int | None = None) -> dict:
    """The benchmark's holdout from the ``counts`` of every block's cube.json (:mod:`stfuse.cube`), no pixel.

    Region-wide clear fractions from :func:`stfuse.cube.region_counts` (integer counts: exactly
    :func:`stfuse.metrics.clear_fraction` of the whole region), then the evaluation dates and donor dates
    of :func:`choose_holdout` (the same rng draws in the same order). Returns the holdout.json dict:
    ``possible``, ``reason`` (None, or why not: the reasons of :func:`choose_holdout`), ``eval_dates``
    (start_time strings), ``donors`` {str(evaluation date index): donor date index} -- the hidden cells of
    any window are ``stfuse.cube.transplanted(window, channels, donors)`` --, and the parameters. The check
    that some clear cell is left to train on is :func:`leaves_clear_cells` (sufficient, from counts). The
    number of hidden cells is not known here: the score step counts them (benchmark.json ``hidden_cells``).
    """
    if not metas:
        raise ValueError("holdout_decision needs the cube.json of at least one block")
    dates = [d["start_time"] for d in metas[0]["dates"]]
    for m in metas[1:]:
        if [d["start_time"] for d in m["dates"]] != dates:
            raise ValueError(f"block {m.get('block', {}).get('id')}: its dates differ from block "
                             f"{metas[0].get('block', {}).get('id')}'s; the block cubes are of different runs")
    params = dict(min_clear=min_clear, seed=seed, min_mask_fraction=min_mask_fraction,
                  max_mask_fraction=max_mask_fraction, max_dates=max_dates)
    seen, clear = region_counts(metas)
    try:
        eval_dates, donors = _eval_and_donors(_fraction(clear, seen), dates, min_clear=min_clear, seed=seed,
                                              min_fraction=min_mask_fraction, max_fraction=max_mask_fraction,
                                              max_dates=max_dates, query=query_dates(metas[0]["dates"]))
        if not leaves_clear_cells(seen, clear, donors):
            raise _all_hidden(len(eval_dates), max_mask_fraction)
    except BenchmarkNotPossible as err:
        log.warning("the benchmark cannot score this study: %s", err)
        return dict(possible=False, reason=str(err), eval_dates=[], donors={}, **params)
    log.info("evaluation dates: %d (clear fraction >= %.2f), over %d block(s)", len(eval_dates), min_clear,
             len(metas))
    return dict(possible=True, reason=None, eval_dates=[dates[e] for e in eval_dates],
                donors={str(e): int(d) for e, d in donors.items()}, **params)


def holdout_step(cube_dir, hidden_path, info_path, *, min_clear: float, seed: int, min_mask_fraction: float = 0.05,
                 max_mask_fraction: float = 0.7, max_dates: int | None = None, **_ignored) -> dict:
    """Decide whether the benchmark is possible; write the hidden cells (.npy) and the decision (JSON).

    The whole-cube form (library API, :func:`benchmark_step`); the workflow's holdout, on block cubes,
    is :func:`stfuse.steps.score.holdout_step` (holdout.json only, decided from counts).

    The decision, ``{"possible": bool, "reason": str | None, "eval_dates": [...], "hidden_cells": int}``,
    is what the workflow reads to request the heldout variant only when it will be scored. When not
    possible, ``hidden`` is all False (nothing hidden) and ``reason`` says why.
    """
    from .cube import load_cube

    cube, meta = load_cube(cube_dir, mmap_mode="r")  # only read: the page cache, not a copy
    try:
        hidden, eval_dates = choose_holdout(cube, meta, min_clear=min_clear, seed=seed, min_fraction=min_mask_fraction,
                                            max_fraction=max_mask_fraction, max_dates=max_dates)
        info = dict(possible=True, reason=None, eval_dates=[meta["dates"][t]["start_time"] for t in eval_dates],
                    hidden_cells=int(hidden.sum()))
    except BenchmarkNotPossible as err:
        hidden = np.zeros((cube.shape[0],) + cube.shape[2:], dtype=bool)
        info = dict(possible=False, reason=str(err), eval_dates=[], hidden_cells=0)
        log.warning("the benchmark cannot score this study: %s", err)
    info.update(min_clear=min_clear, seed=seed, min_mask_fraction=min_mask_fraction,
                max_mask_fraction=max_mask_fraction, max_dates=max_dates)
    Path(hidden_path).parent.mkdir(parents=True, exist_ok=True)
    np.save(hidden_path, hidden)
    Path(info_path).write_text(json.dumps(info, indent=1) + "\n")
    return info


def run_methods(obs: np.ndarray, times, sar: np.ndarray | None, model_filled: np.ndarray | None,
                whittaker_lambda: float, sar_coef: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Every baseline on the same gappy series, plus the model's filled series when given.

    ``sar_coef``: the pooled ``sar_regression`` coefficients (B, 1 + S) when ``obs`` is a block of a
    larger region (fitted over the region); None fits them on ``obs``."""
    out = {}
    for name in baselines.BASELINES:
        params = {"lam": whittaker_lambda} if name == "whittaker" else {}
        if name == "sar_regression" and sar_coef is not None:
            params["coef"] = sar_coef
        t0 = time.perf_counter()
        out[name] = baselines.run_baseline(name, obs, times, sar, **params)
        log.debug("baseline %s: %.1f s", name, time.perf_counter() - t0)
    if model_filled is not None:
        out[MODEL] = model_filled
    return out


def score_methods(methods: dict, truth: np.ndarray, hidden: np.ndarray, clear_input: np.ndarray, times,
                  bands: list[str], data_range: float, protocol: str, observed=None) -> pd.DataFrame:
    """Score table of every method; dates are binned by cloud fraction over the `observed` (H, W) cells."""
    gap_days = metrics.days_to_nearest_valid(clear_input, times)
    cloud = 1.0 - metrics.clear_fraction(clear_input, observed)
    frames = []
    for name, filled in methods.items():
        table = metrics.score(truth, filled, hidden, bands, data_range=data_range, gap_days=gap_days,
                              cloud_fraction=cloud)
        frames.append(table.assign(method=name, protocol=protocol))
    return pd.concat(frames, ignore_index=True)


def summary_table(scores: pd.DataFrame) -> pd.DataFrame:
    """method x metric over all bands, gap lengths and cloud fractions, per protocol."""
    overall = scores[(scores.band == "all") & (scores.gap_bin == "all") & (scores.cloud_bin == "all")]
    table = overall.pivot_table(index=["protocol", "method"], columns="metric", values="value", sort=False)
    return table[[m for m in metrics.METRICS if m in table.columns]]


def to_markdown(table: pd.DataFrame) -> str:
    lower_better = {"mae", "rmse", "sam"}
    lines = []
    for protocol, part in table.groupby(level=0, sort=False):
        part = part.droplevel(0)
        lines.append(f"\n**{protocol}** (best per column in bold)\n")
        lines.append("| method | " + " | ".join(part.columns) + " |")
        lines.append("| --- |" + " --- |" * len(part.columns))
        best = {m: (part[m].min() if m in lower_better else part[m].max()) for m in part.columns}
        for method, row in part.iterrows():
            cells = []
            for m in part.columns:
                text = f"{row[m]:.4f}" if m in ("mae", "rmse") else f"{row[m]:.3f}"
                cells.append(f"**{text}**" if np.isclose(row[m], best[m]) else text)
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines).lstrip("\n") + "\n"


def gap_table(scores: pd.DataFrame, metric: str = "mae") -> pd.DataFrame:
    """``metric`` of each method per gap-length bin (days to the nearest clear observation of the cell), over
    all bands and cloud fractions, per protocol; a ``share`` column gives each bin's share of the hidden cells."""
    part = scores[(scores.band == "all") & (scores.cloud_bin == "all") & (scores.gap_bin != "all")
                  & (scores.metric == metric)]
    table = part.pivot_table(index=["protocol", "gap_bin"], columns="method", values="value", sort=False)
    cells = part.groupby(["protocol", "gap_bin"], sort=False)["n_pixels"].max()
    totals = cells.groupby(level=0, sort=False).transform("sum")
    table.insert(0, "share", (cells / totals).reindex(table.index))
    return table


def gap_markdown(table: pd.DataFrame, metric: str = "mae") -> str:
    """:func:`gap_table` as Markdown, the best method per bin in bold."""
    lines = []
    for protocol, part in table.groupby(level=0, sort=False):
        part = part.droplevel(0)
        methods = [c for c in part.columns if c != "share"]
        lines.append(f"\n**{protocol}: {metric.upper()} by gap length** (days to the nearest clear observation; "
                     "share of the hidden cells; best per row in bold)\n")
        lines.append("| gap (days) | share | " + " | ".join(methods) + " |")
        lines.append("| --- | --- |" + " --- |" * len(methods))
        for gap, row in part.iterrows():
            best = np.nanmin(row[methods].to_numpy(dtype=float))
            cells = [f"**{row[m]:.4f}**" if np.isclose(row[m], best) else f"{row[m]:.4f}" for m in methods]
            share = f"{row['share']:.1%}" if row["share"] >= 0.001 else "<0.1%"
            lines.append(f"| {gap} | {share} | " + " | ".join(cells) + " |")
    return "\n".join(lines).lstrip("\n") + "\n"


def _page(body: str) -> str:
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>stfuse benchmark</title>"
            "<style>td, th {padding: 2px 8px; text-align: right} th {text-align: left}</style></head>\n"
            f"<body>\n{body}\n</body></html>\n")


def to_html(table: pd.DataFrame, intro: str) -> str:
    """summary.md's tables as one HTML page (Snakemake's report shows HTML, not Markdown): the intro line, then a
    table per protocol with the best value per column in bold, the numbers as in summary.md."""
    lower_better = {"mae", "rmse", "sam"}
    parts = [f"<p>{html.escape(intro)}</p>"]
    for protocol, part in table.groupby(level=0, sort=False):
        part = part.droplevel(0)
        best = {m: (part[m].min() if m in lower_better else part[m].max()) for m in part.columns}
        styled = part.style.format({m: "{:.4f}" if m in ("mae", "rmse") else "{:.3f}" for m in part.columns})
        styled = styled.apply(lambda col: ["font-weight: bold" if np.isclose(v, best[col.name]) else "" for v in col])
        parts.append(f"<h3>{html.escape(str(protocol))} (best per column in bold)</h3>\n{styled.to_html()}")
    return _page("\n".join(parts))


def plot_by_gap(scores: pd.DataFrame, path, protocol: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    part = scores[(scores.protocol == protocol) & (scores.band == "all") & (scores.cloud_bin == "all")
                  & (scores.gap_bin != "all")]
    shown = [m for m in ("mae", "rmse", "psnr", "sam") if m in set(part.metric)]
    fig, axes = plt.subplots(1, len(shown), figsize=(4 * len(shown), 3.4), squeeze=False)
    bins = list(dict.fromkeys(part.gap_bin))
    for ax, metric in zip(axes[0], shown):
        for method, rows in part[part.metric == metric].groupby("method", sort=False):
            rows = rows.set_index("gap_bin").reindex(bins)
            ax.plot(range(len(bins)), rows.value, marker="o", label=method)
        ax.set_xticks(range(len(bins)), [b.replace("inf", "∞") for b in bins], rotation=30, fontsize=8)
        ax.set_xlabel("days to nearest clear observation")
        ax.set_title(metric.upper())
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"Reconstruction error against gap length ({protocol})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_quicklook(truth, gappy, methods: dict, hidden, dates: list[dict], t_list: list[int], rgb: list[int],
                   path) -> None:
    """Rows: dates; columns: input with gaps, truth, each method. RGB composite with a shared stretch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = ["input (gaps)", "truth"] + list(methods)
    fig, axes = plt.subplots(len(t_list), len(cols), figsize=(2.2 * len(cols), 2.3 * len(t_list)), squeeze=False)
    hi = np.nanpercentile(truth[t_list][:, rgb], 98) or 1.0

    def rgb_image(arr, t):
        img = np.moveaxis(arr[t, rgb], 0, -1) / hi
        return np.clip(np.nan_to_num(img, nan=0.0), 0, 1)

    for r, t in enumerate(t_list):
        images = [rgb_image(gappy, t), rgb_image(truth, t)] + [rgb_image(m, t) for m in methods.values()]
        for c, (img, title) in enumerate(zip(images, cols)):
            ax = axes[r][c]
            ax.imshow(img, interpolation="nearest")
            if c != 1:
                ax.contour(hidden[t], levels=[0.5], colors="yellow", linewidths=0.4)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=8)
        axes[r][0].set_ylabel(dates[t]["start_time"][:10], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


#: the quicklook shows at most this many cells along a side (every k-th row and column beyond)
QUICKLOOK_MAX_CELLS = 1024
#: default edge (cells) of the blocks :func:`benchmark_step` scores one at a time
DEFAULT_BLOCK_SIZE = 256
TRANSPLANTED, REAL = "transplanted clouds", "real clouds (synthetic truth)"


def ssim_ring(block: blocks.Block, rows: int, cols: int) -> blocks.Block:
    """``block`` with its read window replaced by its core plus :data:`stfuse.metrics.SSIM_HALO` cells, clipped
    to the ``rows`` x ``cols`` region: the cells whose values the SSIM of its core cells depends on."""
    h = metrics.SSIM_HALO
    r0, c0 = max(0, block.row0 - h), max(0, block.col0 - h)
    r1, c1 = min(rows, block.row0 + block.rows + h), min(cols, block.col0 + block.cols + h)
    return dataclasses.replace(block, read_row0=r0, read_col0=c0, read_rows=r1 - r0, read_cols=c1 - c0)


def score_window(block: blocks.Block, rows: int, cols: int) -> blocks.Block:
    """``block`` with its read window replaced by the window it is scored on: its :func:`ssim_ring` (what SSIM
    needs; the baselines are per cell in time and need no halo), widened inwards to the region's SSIM window
    where a thin last block is narrower (more context than the halo leaves the core's SSIM unchanged; the
    values of the cells added do not matter)."""
    return _widen(ssim_ring(block, rows, cols), metrics.ssim_win_size((rows, cols)), rows, cols)


def score_plan(rows: int, cols: int, block_size: int | None) -> tuple[list[blocks.Block], int]:
    """The blocks :func:`benchmark_step` scores, and their halo.

    ``block_size`` None (or at least the region's longer side): one block, the whole region, no halo.
    Otherwise cores of ``block_size`` read over their :func:`score_window` (halo
    :data:`stfuse.metrics.SSIM_HALO`)."""
    if block_size is None or block_size >= max(rows, cols):
        return blocks.plan(rows, cols, max(rows, cols), 0), 0
    plan = blocks.plan(rows, cols, block_size, metrics.SSIM_HALO)
    return [score_window(b, rows, cols) for b in plan], metrics.SSIM_HALO


def _widen(block: blocks.Block, win: int, rows: int, cols: int) -> blocks.Block:
    def grow(start, size, total):
        if size >= win:
            return start, size
        stop = max(start + size, min(total, start + win))
        return max(0, stop - win), stop - max(0, stop - win)

    r0, nr = grow(block.read_row0, block.read_rows, rows)
    c0, nc = grow(block.read_col0, block.read_cols, cols)
    return dataclasses.replace(block, read_row0=r0, read_rows=nr, read_col0=c0, read_cols=nc)


class _Npy:
    """A .npy file read window by window, memory-mapped anew for each read: the pages read for one
    block leave the process's resident memory with it (one long-lived memmap would keep them all)."""

    def __init__(self, path):
        self.path = Path(path)
        m = np.load(self.path, mmap_mode="r")
        self.shape, self.dtype = m.shape, m.dtype
        del m

    def __getitem__(self, key) -> np.ndarray:
        m = np.load(self.path, mmap_mode="r")
        out = np.array(m[key])
        del m
        return out

    def __len__(self) -> int:
        return self.shape[0]


def _window(array, block: blocks.Block, *, core: bool = False) -> np.ndarray:
    """A block's read window (or core) of a (..., H, W) array, memmap or :class:`_Npy`, in memory."""
    if core:
        r0, c0, nr, nc = block.row0, block.col0, block.rows, block.cols
    else:
        r0, c0, nr, nc = block.read_row0, block.read_col0, block.read_rows, block.read_cols
    win = array[..., r0:r0 + nr, c0:c0 + nc]
    return win if isinstance(array, _Npy) else np.array(win)


def _core_of(block: blocks.Block) -> tuple[int, int, int, int]:
    return block.core_row_offset, block.core_col_offset, block.rows, block.cols


# --- first pass: what is region-wide, from each block's core ------------------------------------------------

@dataclasses.dataclass
class BlockStats:
    """First pass over one block's core: the additive parts of what is region-wide in the scoring."""

    n_seen: int                               # cells observed at least once
    n_clear: np.ndarray                       # (T,) clear cells per date
    n_clear_in: np.ndarray                    # (T,) clear cells left after hiding
    n_hidden: np.ndarray                      # (T,) hidden cells
    fill: np.ndarray                          # (2, T, B) metrics.ssim_fill_parts of the clear observations
    sar: baselines.SarStats | None = None     # sar_regression statistics of the series with gaps
    real_fill: np.ndarray | None = None       # (2, T, B) of the synthetic truth
    real_sar: baselines.SarStats | None = None  # of the clear observations (real clouds, synthetic truth)
    whittaker: tuple | None = None            # (sse (L,), n (L,)) baselines.whittaker_tuning of the series with gaps
    real_whittaker: tuple | None = None       # of the clear observations (real clouds)


def block_stats(core_cube: np.ndarray, hidden: np.ndarray, channels: list[dict],
                truth: np.ndarray | None = None, *, times=None, origin=(0, 0)) -> BlockStats:
    """:class:`BlockStats` of a block's core: ``core_cube`` (T, C, h, w), changed (the ``hidden`` (T, h, w)
    cells are hidden in it: pass the pass's own copy); ``truth`` (T, B, h, w) the synthetic truth or None.

    ``times`` (the dates, :func:`dates_to_times`): also Whittaker's leave-out criterion per candidate lambda
    (:func:`stfuse.baselines.whittaker_tuning`) on the series the methods get -- after hiding, so never on a
    hidden cell -- and, with ``truth``, on the clear observations the real-cloud protocol gives them.
    ``origin``: the core's first row and column in the region (which cells the tuning holds out)."""
    seen = observed_cells(core_cube, channels)
    obs, clear = observed(core_cube, channels)
    gappy, clear_in = observed(hide(core_cube, channels, hidden, inplace=True), channels)
    t = len(core_cube)
    stats = BlockStats(int(seen.sum()), (clear & seen).reshape(t, -1).sum(axis=1),
                       (clear_in & seen).reshape(t, -1).sum(axis=1),
                       np.asarray(hidden).reshape(t, -1).sum(axis=1), metrics.ssim_fill_parts(obs))
    sar_idx = _indices(channels, "sar")
    if sar_idx:
        sar = core_cube[:, sar_idx]
        stats.sar = baselines.sar_regression_stats(gappy, sar)
        if truth is not None:
            stats.real_sar = baselines.sar_regression_stats(obs, sar)
    if truth is not None:
        stats.real_fill = metrics.ssim_fill_parts(truth)
    if times is not None:
        stats.whittaker = baselines.whittaker_tuning(gappy, times, origin=origin)
        if truth is not None:
            stats.real_whittaker = baselines.whittaker_tuning(obs, times, origin=origin)
    return stats


def dates_to_times(dates: list[dict]) -> np.ndarray:
    """The cube.json dates' start times as naive UTC datetime64."""
    return pd.to_datetime([d["start_time"] for d in dates]).tz_convert("UTC").tz_localize(None).to_numpy()


@dataclasses.dataclass
class RegionStats:
    """What every block's second pass needs of the whole region (:func:`merge_stats`)."""

    cloud: np.ndarray          # (T,) cloud fraction of the series (real clouds)
    cloud_in: np.ndarray       # (T,) cloud fraction of the series given to the methods (after hiding)
    n_hidden: np.ndarray       # (T,)
    fill: np.ndarray | None    # (T, B) SSIM fill values; None: one block, the region's own default
    real_fill: np.ndarray | None
    coef: np.ndarray | None    # pooled sar_regression coefficients (B, 1 + S); None without SAR
    real_coef: np.ndarray | None
    whittaker: dict | None = None       # merge_whittaker_tuning of the blocks' leave-out sums; None: not run
    real_whittaker: dict | None = None


def merge_whittaker_tuning(parts) -> dict | None:
    """The blocks' (sse, n) of :func:`stfuse.baselines.whittaker_tuning` summed (``math.fsum`` per candidate)
    and the lambda chosen on them (:func:`stfuse.baselines.choose_whittaker_lambda`): ``lambda``, ``lambdas``,
    ``rmse`` (per candidate), ``held_out`` (values per candidate). None when a part has no tuning."""
    parts = list(parts)
    if not parts or any(p is None for p in parts):
        return None
    grid = baselines.WHITTAKER_LAMBDA_GRID
    if any(len(p[0]) != len(grid) for p in parts):
        raise ValueError(f"the first passes' Whittaker tuning has other candidates than the {len(grid)} of this "
                         "stfuse; rerun the benchmark's first pass (score_stats_block)")
    sse = np.array([math.fsum(float(p[0][i]) for p in parts) for i in range(len(grid))])
    n = np.sum([np.asarray(p[1], dtype=np.int64) for p in parts], axis=0)
    lam, mse = baselines.choose_whittaker_lambda(sse, n, grid)
    return {"lambda": lam, "lambdas": list(grid), "rmse": [float(v) for v in np.sqrt(mse)],
            "held_out": [int(v) for v in n]}


def merge_stats(parts: list[BlockStats], *, single: bool = False) -> RegionStats:
    """The region's :class:`RegionStats` from the :class:`BlockStats` of all its blocks, in the given order
    (the float merges of the SSIM fill values and SAR statistics depend on it: give it the same everywhere).
    ``single``: the one part is the whole region (fill values None: the region's own, as metrics.score)."""
    n_seen = sum(p.n_seen for p in parts)

    def total(key):
        return np.sum([getattr(p, key) for p in parts], axis=0)

    def coef(key):
        stats = [getattr(p, key) for p in parts]
        return None if stats[0] is None else baselines.solve_sar_regression(baselines.merge_sar_stats(stats))

    real = parts[0].real_fill is not None
    return RegionStats(
        cloud=1.0 - _fraction(total("n_clear"), n_seen), cloud_in=1.0 - _fraction(total("n_clear_in"), n_seen),
        n_hidden=total("n_hidden"), fill=None if single else metrics.ssim_fill([p.fill for p in parts]),
        real_fill=None if single or not real else metrics.ssim_fill([p.real_fill for p in parts]),
        coef=coef("sar"), real_coef=coef("real_sar"), whittaker=merge_whittaker_tuning(p.whittaker for p in parts),
        real_whittaker=merge_whittaker_tuning(p.real_whittaker for p in parts) if real else None)


# --- second pass: each block's partial scores -------------------------------------------------------------

@dataclasses.dataclass
class ScoreContext:
    """What the second pass of every block shares (:func:`score_context`)."""

    channels: list[dict]
    bands: list[str]
    sar_idx: list[int]
    times: np.ndarray
    shape: tuple[int, int]       # the region's rows, cols
    win_size: int
    data_range: float
    whittaker_lambda: float      # the lambda used (transplanted clouds)
    region: RegionStats
    eval_dates: list[int]        # dates with hidden cells
    pick: list[int]              # the quicklook's dates
    rgb: list[int]
    stride: int
    real_whittaker_lambda: float = baselines.DEFAULT_WHITTAKER_LAMBDA   # the lambda used (real clouds)
    whittaker_setting: float | str = AUTO                               # config benchmark.whittaker_lambda


def check_whittaker_lambda(value) -> float | str:
    """Config benchmark.whittaker_lambda checked: ``"auto"`` or a number > 0 (as float)."""
    if value == AUTO:
        return AUTO
    try:
        lam = float(value)
    except (TypeError, ValueError):
        lam = math.nan
    if isinstance(value, bool) or not lam > 0 or not math.isfinite(lam):
        raise ValueError(f"config key benchmark.whittaker_lambda must be 'auto' or a number > 0, got {value!r}")
    return lam


def _whittaker_lambda(setting, tuning: dict | None, protocol: str) -> float:
    """The lambda a protocol's Whittaker baseline uses: the fixed one, or the one its tuning chose."""
    if setting != AUTO:
        return setting
    if tuning is None:
        raise ValueError(f"benchmark.whittaker_lambda is 'auto' but the first pass has no Whittaker tuning for the "
                         f"{protocol} protocol (first-pass files of an older stfuse?); rerun the benchmark's first "
                         "pass (rule score_stats_block: delete its stats.npz files)")
    return float(tuning["lambda"])


def score_context(channels: list[dict], dates: list[dict], shape, region: RegionStats, *, data_range: float,
                  whittaker_lambda, quicklook_dates: int) -> ScoreContext:
    """What every block's second pass shares. ``whittaker_lambda``: a number, or ``"auto"``: each protocol's
    lambda as the first pass's tuning chose it (:attr:`RegionStats.whittaker`, ``real_whittaker``)."""
    setting = check_whittaker_lambda(whittaker_lambda)
    lam = _whittaker_lambda(setting, region.whittaker, TRANSPLANTED)
    # the real-cloud protocol's own tuning, where it is scored (the first pass tunes on its series then)
    real_lam = _whittaker_lambda(setting, region.real_whittaker, REAL) if region.real_whittaker is not None else lam
    bands = [channels[i]["name"] for i in _indices(channels, "optical")]
    h, w = (int(v) for v in shape)
    eval_dates = [int(d) for d in np.flatnonzero(region.n_hidden)]
    pick = sorted(sorted(eval_dates, key=lambda d: -region.n_hidden[d])[:quicklook_dates])
    return ScoreContext(channels, bands, _indices(channels, "sar"), dates_to_times(dates), (h, w),
                        metrics.ssim_win_size((h, w)), data_range, lam, region, eval_dates, pick,
                        [bands.index(b) for b in ("B04", "B03", "B02") if b in bands] or [0, 0, 0],
                        max(1, -(-max(h, w) // QUICKLOOK_MAX_CELLS)), real_lam, setting)


def score_block(cb: np.ndarray, hb: np.ndarray, model: np.ndarray | None, block: blocks.Block, ctx: ScoreContext,
                *, truth: np.ndarray | None = None, main: np.ndarray | None = None,
                model_std: np.ndarray | None = None) -> tuple[dict, dict | None]:
    """Partial score tables of one block, and its quicklook piece.

    ``cb`` (T, C, h, w) the cube over ``block``'s read window (:func:`score_window`), ``hb`` (T, h, w) its
    hidden cells, ``model`` (T, B, h, w) the heldout model's filled series on it; ``truth`` (T, B, h, w) the
    synthetic truth and ``main`` the main model's filled series, for the real-cloud protocol; ``model_std``
    (T, B, h, w) the heldout model's predictive std: its calibration counts
    (:func:`stfuse.metrics.calibration_parts`) join the model's table. Returns
    {(protocol, method): :func:`stfuse.metrics.partial_scores` over the core} and :func:`_quick_piece`."""
    core = _core_of(block)
    sar = cb[:, ctx.sar_idx] if ctx.sar_idx else None
    obs, clear = observed(cb, ctx.channels)
    gappy, clear_in = observed(hide(cb, ctx.channels, hb), ctx.channels)
    methods = run_methods(gappy, ctx.times, sar, model, ctx.whittaker_lambda, sar_coef=ctx.region.coef)
    gap_days = metrics.days_to_nearest_valid(clear_in, ctx.times)
    parts = {}
    for name, filled in methods.items():
        parts[(TRANSPLANTED, name)] = metrics.partial_scores(
            obs, filled, hb, ctx.bands, data_range=ctx.data_range, gap_days=gap_days,
            cloud_fraction=ctx.region.cloud_in, core=core, win_size=ctx.win_size, ssim_fill=ctx.region.fill)
    if model is not None and model_std is not None:
        parts[(TRANSPLANTED, MODEL)] = pd.concat(
            [parts[(TRANSPLANTED, MODEL)], metrics.calibration_parts(obs, model, model_std, hb, ctx.bands, core=core)],
            ignore_index=True)
    piece = _quick_piece(block, ctx, [gappy, obs] + list(methods.values()), ["input (gaps)", "truth"] + list(methods),
                         hb)
    del methods, gappy
    if truth is not None:
        # real clouds on the synthetic scene: every cloudy cell has a known truth
        tb = truth.astype(np.float32, copy=False)
        real_hidden = ~clear & np.isfinite(tb).all(axis=1)
        real_methods = run_methods(obs, ctx.times, sar, main, ctx.real_whittaker_lambda,
                                   sar_coef=ctx.region.real_coef)
        gap_days = metrics.days_to_nearest_valid(clear, ctx.times)
        for name, filled in real_methods.items():
            parts[(REAL, name)] = metrics.partial_scores(
                tb, filled, real_hidden, ctx.bands, data_range=ctx.data_range, gap_days=gap_days,
                cloud_fraction=ctx.region.cloud, core=core, win_size=ctx.win_size, ssim_fill=ctx.region.real_fill)
    return parts, piece


def _quicklook_index(block: blocks.Block, stride: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Rows and columns of the core (inside the core) kept by the quicklook, and where they go."""
    rows = np.arange(block.row0, block.row0 + block.rows)
    cols = np.arange(block.col0, block.col0 + block.cols)
    rows, cols = rows[rows % stride == 0], cols[cols % stride == 0]
    return rows - block.row0, cols - block.col0, rows // stride, cols // stride


def _quick_piece(block, ctx: ScoreContext, arrays: list, names: list[str], hb) -> dict | None:
    """The quicklook's cells of a block's core: ``names``, ``values`` (names, dates, rgb, rows, cols) float32,
    ``hidden`` (dates, rows, cols), and ``rows``, ``cols``: where they go in the quicklook."""
    if not ctx.pick:
        return None
    qr, qc, dr, dc = _quicklook_index(block, ctx.stride)
    r0, c0 = block.core_row_offset, block.core_col_offset
    src = np.ix_(ctx.pick, ctx.rgb, r0 + qr, c0 + qc)
    values = np.stack([np.asarray(a[src], dtype=np.float32) for a in arrays])
    return dict(names=list(names), values=values, hidden=np.asarray(hb[np.ix_(ctx.pick, r0 + qr, c0 + qc)]),
                rows=dr, cols=dc)


class Quicklook:
    """The quicklook's subsampled RGB images, pasted together from the blocks' pieces."""

    def __init__(self, ctx: ScoreContext):
        h, w = ctx.shape
        self.pick, self.n_rgb = ctx.pick, len(ctx.rgb)
        self.qshape = (len(ctx.pick), len(ctx.rgb), -(-h // ctx.stride), -(-w // ctx.stride))
        self.images = {n: np.full(self.qshape, np.nan, np.float32) for n in ("input (gaps)", "truth")}
        self.hidden = np.zeros((len(ctx.pick),) + self.qshape[2:], bool)

    def paste(self, piece: dict | None) -> None:
        if piece is None:
            return
        rows, cols = np.asarray(piece["rows"], dtype=np.int64), np.asarray(piece["cols"], dtype=np.int64)
        sel = np.ix_(range(self.qshape[0]), range(self.n_rgb), rows, cols)
        for name, values in zip(piece["names"], piece["values"]):
            self.images.setdefault(str(name), np.full(self.qshape, np.nan, np.float32))[sel] = values
        self.hidden[np.ix_(range(self.qshape[0]), rows, cols)] = piece["hidden"]

    def plot(self, dates: list[dict], path) -> None:
        images = dict(self.images)
        truth, gappy = images.pop("truth"), images.pop("input (gaps)")
        plot_quicklook(truth, gappy, images, self.hidden, [dates[d] for d in self.pick], list(range(len(self.pick))),
                       list(range(self.n_rgb)), path)


class PartsMerger:
    """The blocks' partial score tables folded, per (protocol, method) in first-seen order, into running exact
    sums (:class:`stfuse.metrics.ScoreSums`): memory for one block's tables at a time, whatever the blocks."""

    def __init__(self):
        self.sums: dict[tuple[str, str], metrics.ScoreSums] = {}

    def add(self, parts: dict) -> None:
        for key, part in parts.items():
            self.sums.setdefault(key, metrics.ScoreSums()).add(part)

    def table(self) -> pd.DataFrame:
        return pd.concat([s.table().assign(method=name, protocol=protocol)
                          for (protocol, name), s in self.sums.items()], ignore_index=True)

    def calibration(self) -> dict | None:
        """The model's calibration (:func:`stfuse.metrics.calibration_from_totals`) under transplanted clouds,
        or None when its parts hold no std counts (no uncertainty head, or no model)."""
        sums = self.sums.get((TRANSPLANTED, MODEL))
        return None if sums is None else metrics.calibration_from_totals(sums.totals())


def _pct(v: float) -> str:
    return f"{100.0 * v:.1f} %" if math.isfinite(v) else "n/a"


def calibration_report(cal: dict, head: str | None) -> tuple[str, str, dict]:
    """summary.md's calibration paragraph and table, its HTML twin and benchmark.json's ``calibration``: per
    band and overall, the share of hidden cells whose truth lies within +-1 and +-2 std of the prediction,
    next to what a Gaussian (68.3 % / 95.4 %) and the head's own distribution would give."""
    from .models.uncertainty import nominal_coverage

    ks = cal["multiples"]
    at = {k: ks.index(k) for k in (1.0, 2.0) if k in ks}
    gauss = nominal_coverage("gaussian", [1.0, 2.0])
    own = nominal_coverage(head, [1.0, 2.0])
    head_text = f"the {head} head's own" if head else "the head's"
    text = (f"**Calibration of the model's standard deviation** ({cal['n']} hidden cells, transplanted clouds): "
            f"share of cells whose truth lies within +-1 / +-2 std of the prediction (a Gaussian holds "
            f"{_pct(gauss[0])} / {_pct(gauss[1])}, {head_text} distribution {_pct(own[0])} / {_pct(own[1])}).\n")
    rows = [b for b in cal["bands"]] + ["all"]
    lines = [text, "| band | +-1 std | +-2 std |", "| --- | --- | --- |"]
    cells_html = []
    for b in rows:
        obs = cal["observed"][b]
        one = obs[at[1.0]] if 1.0 in at else float("nan")
        two = obs[at[2.0]] if 2.0 in at else float("nan")
        lines.append(f"| {b} | {_pct(one)} | {_pct(two)} |")
        cells_html.append(f"<tr><th>{html.escape(b)}</th><td>{_pct(one)}</td><td>{_pct(two)}</td></tr>")
    md = "\n".join(lines) + "\n"
    page = (f"<h3>Calibration of the model's standard deviation</h3>\n<p>{html.escape(text.replace('**', ''))}</p>\n"
            "<table><tr><th>band</th><th>+-1 std</th><th>+-2 std</th></tr>" + "".join(cells_html) + "</table>")
    info = dict(head=head, hidden_cells=cal["n"], multiples=ks,
                nominal=[float(v) for v in nominal_coverage(head, ks)],
                nominal_gaussian=[float(v) for v in nominal_coverage("gaussian", ks)],
                observed={b: [_g6(v) for v in cal["observed"][b]] for b in rows},
                within_1_std={b: _g6(cal["observed"][b][at[1.0]]) for b in rows} if 1.0 in at else None,
                within_2_std={b: _g6(cal["observed"][b][at[2.0]]) for b in rows} if 2.0 in at else None)
    return md, page, info


def plot_calibration(cal: dict | None, head: str | None, path) -> None:
    """Reliability plot: for each std multiple k, the coverage of the central interval prediction +- k std
    under the head's distribution (x, nominal) against the share of hidden cells whose truth lies inside it
    (y, observed), per band and pooled; the diagonal is perfect calibration. Without a std (no uncertainty
    head), a figure that says so."""
    if cal is None:
        message_figure(path, "No calibration", "The model has no uncertainty head (config key train.uncertainty: "
                       "none), so there is no standard deviation to calibrate.")
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .models.uncertainty import nominal_coverage

    ks = cal["multiples"]
    nominal = nominal_coverage(head, ks)
    fig, ax = plt.subplots(figsize=(4.6, 4.4))
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfect calibration")
    for b in cal["bands"]:
        ax.plot(nominal, cal["observed"][b], marker=".", linewidth=0.8, alpha=0.6, label=b)
    ax.plot(nominal, cal["observed"]["all"], marker="o", color="black", linewidth=1.8, label="all bands")
    for k in (1.0, 2.0):
        if k in ks:
            i = ks.index(k)
            ax.annotate(f"±{k:g} std", (nominal[i], cal["observed"]["all"][i]), textcoords="offset points",
                        xytext=(6, -12), fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel(f"nominal coverage of prediction ± k std ({head or 'gaussian'})")
    ax.set_ylabel("observed share of hidden cells inside")
    ax.set_title(f"Calibration of the model's std ({cal['n']} hidden cells)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _lambda_text(lam: float) -> str:
    return f"{lam:.0f}" if lam >= 1 else f"{lam:.3g}"


def _g6(value: float) -> float | None:
    # 6 significant digits, as scores.csv: the same text whatever the blocks' float summation order
    return float(f"{value:.6g}") if math.isfinite(value) else None


def whittaker_report(ctx: ScoreContext, real: bool) -> tuple[str, dict]:
    """The intro sentence on Whittaker's lambda and benchmark.json's entries: the lambda each protocol used,
    the setting, and the leave-out criterion (RMSE on the held-out observed values) of every candidate."""
    how = ("chosen by leave-out on the observed values" if ctx.whittaker_setting == AUTO
           else "fixed by config benchmark.whittaker_lambda")
    info = dict(whittaker_lambda=ctx.whittaker_lambda, whittaker_lambda_setting=ctx.whittaker_setting)
    sentences = []
    protocols = [(TRANSPLANTED, ctx.region.whittaker, ctx.whittaker_lambda, "")]
    if real:
        protocols.append((REAL, ctx.region.real_whittaker, ctx.real_whittaker_lambda, "real_"))
    for protocol, tuning, lam, prefix in protocols:
        if prefix:
            info["real_whittaker_lambda"] = lam
        text = f"{protocol}: {_lambda_text(lam)}"
        if tuning is not None:
            info[f"{prefix}whittaker_tuning"] = dict(
                lambdas=tuning["lambdas"], rmse=[_g6(v) for v in tuning["rmse"]], held_out=tuning["held_out"],
                chosen=tuning["lambda"])
            text += " (leave-out RMSE " + ", ".join(
                f"{_lambda_text(c)}: {v:.4f}" for c, v in zip(tuning["lambdas"], tuning["rmse"])) + ")"
        sentences.append(text)
    return f" Whittaker's lambda, {how}: " + "; ".join(sentences) + ".", info


def write_outputs(out_dir, table: pd.DataFrame, quick: Quicklook, ctx: ScoreContext, dates: list[dict], *,
                  calibration: dict | None = None, head: str | None = None) -> None:
    """scores.csv, summary.md (and .html), by_gap.png, quicklook.png, calibration.png and benchmark.json of a
    scored benchmark. ``calibration`` (:meth:`PartsMerger.calibration`) and ``head`` (the model's uncertainty
    head, for the nominal coverages): the std's calibration, in all but scores.csv; None: calibration.png says
    there is none."""
    out_dir = Path(out_dir)
    eval_dates, n_hidden = ctx.eval_dates, int(ctx.region.n_hidden.sum())
    quick.plot(dates, out_dir / "quicklook.png")
    table.to_csv(out_dir / "scores.csv", index=False, float_format="%.6g")
    days = ", ".join(dates[t]["start_time"][:10] for t in eval_dates)
    lam_text, lam_info = whittaker_report(ctx, REAL in set(table.protocol))
    intro = (f"Scored on {len(eval_dates)} evaluation date(s) ({days})"
             f": {n_hidden} clear cells hidden under cloud masks transplanted from other dates." + lam_text)
    gaps = gap_markdown(gap_table(table))
    md = intro + "\n\n" + to_markdown(summary_table(table)) + "\n" + gaps
    page = to_html(summary_table(table), intro)
    page = page.replace("\n</body>", "\n<pre>" + html.escape(gaps) + "</pre>\n</body>")
    cal_info = None
    if calibration is not None:
        cal_md, cal_html, cal_info = calibration_report(calibration, head)
        md += "\n" + cal_md
        page = page.replace("\n</body>", "\n" + cal_html + "\n</body>")
    plot_calibration(calibration, head, out_dir / "calibration.png")
    (out_dir / "summary.md").write_text(md)
    (out_dir / "summary.html").write_text(page)
    plot_by_gap(table[table.protocol == TRANSPLANTED], out_dir / "by_gap.png", TRANSPLANTED)
    info = dict(possible=True, eval_dates=[dates[t]["start_time"] for t in eval_dates], hidden_cells=n_hidden,
                data_range=ctx.data_range, **lam_info)
    if cal_info is not None:
        info["calibration"] = cal_info
    (out_dir / "benchmark.json").write_text(json.dumps(info, indent=1) + "\n")
    log.info("benchmark on %d dates, %d hidden cells:\n%s", len(eval_dates), n_hidden, md)


def _as_npy(truth_cube):
    """A whole-file .npy memmap as :class:`_Npy` (read per block), anything else as it is."""
    if isinstance(truth_cube, np.memmap) and str(truth_cube.filename or "").endswith(".npy"):
        whole = np.load(truth_cube.filename, mmap_mode="r")   # the whole file, not a view into it?
        same = whole.shape == truth_cube.shape and whole.offset == truth_cube.offset
        del whole
        if same:
            return _Npy(truth_cube.filename)
    return truth_cube


def benchmark_step(cube_dir, hidden_path, heldout_infer_dir, out_dir, *, data_range: float = 1.0,
                   whittaker_lambda: float | str = AUTO, quicklook_dates: int = 3,
                   truth_cube: np.ndarray | None = None, main_infer_dir=None,
                   block_size: int | None = DEFAULT_BLOCK_SIZE) -> pd.DataFrame:
    """Score every method on a whole-region cube; write scores.csv, summary.md, plots. Returns the long table.

    The library form of the workflow's per-block scoring (:mod:`stfuse.steps.score`), built on the same
    parts. Bounded memory: the cube, the hidden cells and the filled series are read memory-mapped, block
    by block, and scored in spatial blocks (:func:`score_plan`: cores of ``block_size`` cells plus the halo
    SSIM needs; None = the whole region at once). A first pass gathers what is region-wide
    (:func:`block_stats`, :func:`merge_stats`: cloud fractions per date, the SSIM fill values, the pooled
    ``sar_regression`` coefficients); the second runs the methods on each block's read window and keeps the
    additive parts of the metrics over its core (:func:`score_block`), merged at the end
    (:func:`stfuse.metrics.merge_scores`). The table equals the whole region's up to float summation order
    (relative ~1e-15); with one block it is bit for bit the whole region's. ``truth_cube`` (T, B, H, W),
    the synthetic scene's truth, may be a memmap: it is read per block too.

    A ``std.npy`` beside the heldout model's ``filled.npy`` (a model with an uncertainty head; its
    ``infer.json`` names the head) is scored for calibration too (:meth:`PartsMerger.calibration`).

    ``whittaker_lambda``: a number > 0, or ``"auto"``: the first pass also sums, per candidate of
    :data:`stfuse.baselines.WHITTAKER_LAMBDA_GRID`, the leave-out errors on the observed values of the series
    given to the methods (:func:`stfuse.baselines.whittaker_tuning`; never a hidden cell), and every block
    uses the lambda chosen on the region's sums (each protocol its own): the same lambda whatever the blocks.
    """
    check_whittaker_lambda(whittaker_lambda)                 # a bad value fails before anything is written
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = json.loads((Path(cube_dir) / "cube.json").read_text())
    cube = _Npy(Path(cube_dir) / "cube.npy")
    channels, dates = meta["channels"], meta["dates"]
    hidden = _Npy(hidden_path)
    model = _Npy(Path(heldout_infer_dir) / "filled.npy")
    std_path, info_path = Path(heldout_infer_dir) / "std.npy", Path(heldout_infer_dir) / "infer.json"
    model_std = _Npy(std_path) if std_path.is_file() else None   # a model with an uncertainty head
    head = json.loads(info_path.read_text()).get("uncertainty") if info_path.is_file() else None
    real = truth_cube is not None and main_infer_dir is not None
    main = _Npy(Path(main_infer_dir) / "filled.npy") if real else None
    truth_cube = _as_npy(truth_cube) if real else None
    _, _, h, w = cube.shape
    plan, halo = score_plan(h, w, block_size)
    log.info("scoring %d x %d cells in %d block(s) of %s cells (halo %d)", h, w, len(plan),
             block_size if len(plan) > 1 else "the whole region", halo)
    times = dates_to_times(dates)
    region = merge_stats([block_stats(_window(cube, b, core=True), _window(hidden, b, core=True), channels,
                                      _window(truth_cube, b, core=True) if real else None, times=times,
                                      origin=(b.row0, b.col0)) for b in plan],
                         single=len(plan) == 1)
    ctx = score_context(channels, dates, (h, w), region, data_range=data_range, whittaker_lambda=whittaker_lambda,
                        quicklook_dates=quicklook_dates)
    merger, quick = PartsMerger(), Quicklook(ctx)
    for block in plan:
        parts, piece = score_block(_window(cube, block), _window(hidden, block), _window(model, block), block, ctx,
                                   truth=_window(truth_cube, block) if real else None,
                                   main=_window(main, block) if real else None,
                                   model_std=_window(model_std, block) if model_std is not None else None)
        merger.add(parts)
        quick.paste(piece)
        del parts, piece
    table = merger.table()
    write_outputs(out_dir, table, quick, ctx, dates, calibration=merger.calibration(), head=head)
    return table


SCORES_COLUMNS = tuple(metrics.SCORE_COLUMNS) + ("method", "protocol")


def message_figure(path, title: str, text: str) -> None:
    """A figure that only says something (the plots of a benchmark that could not score)."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(7, 3))
    fig.text(0.5, 0.8, title, ha="center", va="center", fontsize=12, weight="bold")
    fig.text(0.5, 0.42, textwrap.fill(text, 90), ha="center", va="center", fontsize=8, wrap=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def not_possible_step(out_dir, holdout_info: dict) -> str:
    """Outputs of a benchmark that could not score: summary.md (and .html) saying why, scores.csv with only its header,
    both plots showing the reason, benchmark.json. Returns the summary text."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    reason = holdout_info["reason"]
    md = (f"**The benchmark could not score this study**: {reason}.\n\n"
          "Ingest, training, inference and registration of the filled series ran as usual; only the benchmark "
          "(and the training of its heldout model) was skipped.\n")
    (out_dir / "summary.md").write_text(md)
    (out_dir / "summary.html").write_text(_page(
        f"<p><b>The benchmark could not score this study</b>: {html.escape(reason)}.</p>\n<p>Ingest, training, "
        "inference and registration of the filled series ran as usual; only the benchmark (and the training of its "
        "heldout model) was skipped.</p>"))
    pd.DataFrame(columns=list(SCORES_COLUMNS)).to_csv(out_dir / "scores.csv", index=False)
    for name in ("by_gap.png", "quicklook.png", "calibration.png"):
        message_figure(out_dir / name, "The benchmark could not score this study", reason)
    (out_dir / "benchmark.json").write_text(json.dumps(dict(possible=False, reason=reason), indent=1) + "\n")
    log.warning("benchmark not scored: %s", reason)
    return md


def _truth_paths(truth_manifest, dates: list[dict], bands: list[str]) -> list[list[Path]]:
    """The truth GeoTIFF of each date (rows) and band (columns) in the demo scene's truth manifest."""
    m = pd.read_csv(truth_manifest)
    m["start_time"] = pd.to_datetime(m.start_time, utc=True)
    base = Path(truth_manifest).parent
    out = []
    for d in dates:
        if d.get("query"):  # a date config infer.dates asked for, no acquisition: no truth (NaN, never scored)
            out.append([])
            continue
        rows = m[m.start_time == pd.Timestamp(d["start_time"])].set_index("semantic_label")
        out.append([base / rows.loc[band, "path"] for band in bands])
    return out


def _read_truth(path, scale: float, offset: float, window) -> np.ndarray:
    import rasterio
    from rasterio.windows import Window

    with rasterio.open(path) as src:
        if window is None:
            arr = src.read(1).astype(np.float32)
        else:
            r0, c0, nr, nc = (int(v) for v in window)
            if r0 < 0 or c0 < 0 or r0 + nr > src.height or c0 + nc > src.width:
                raise ValueError(f"{path}: window rows {r0}:{r0 + nr}, cols {c0}:{c0 + nc} lies outside its "
                                 f"{src.height} x {src.width} cells (the truth must be on the region's grid)")
            arr = src.read(1, window=Window(c0, r0, nc, nr)).astype(np.float32)
        nodata = src.nodata
    valid = arr != nodata if nodata is not None else np.ones(arr.shape, bool)
    return np.where(valid, arr * scale + offset, np.nan)


def synthetic_truth(truth_manifest, dates: list[dict], bands: list[str], scale: float, offset: float,
                    path=None, *, window=None) -> np.ndarray:
    """(T, B, H, W) cloud-free truth of the demo scene, in the same units as the cube.

    ``window``: (row0, col0, rows, cols) of the scene's grid (= the region's) to read, by rasterio window
    reads (a block's core or read window; the whole scene is never read); None = the whole scene.
    ``path``: write it to this .npy file instead of memory, read one band of one date at a time, and
    return it memory-mapped (read-only), for :func:`benchmark_step` to read block by block."""
    out = None
    for t, files in enumerate(_truth_paths(truth_manifest, dates, bands)):
        for b, f in enumerate(files):
            arr = _read_truth(f, scale, offset, window)
            if out is None:
                shape = (len(dates), len(bands)) + arr.shape
                if path is None:
                    out = np.full(shape, np.nan, np.float32)
                else:
                    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)
                    out[:] = np.nan  # query dates (no truth file) stay NaN
            out[t, b] = arr
    if path is not None and out is not None:
        out.flush()
        del out
        return np.load(path, mmap_mode="r")
    return out
