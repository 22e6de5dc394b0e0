"""Leakage-free benchmark of the gap-filling model against classical baselines.

Protocol: evaluation dates are optical dates that are (almost) clear. On each, the cloud mask of another
date (seeded) is transplanted: those cells become artificial gaps. Every method gets the series with
these gaps; metrics are computed only on the hidden cells, where the observation is the truth. The
model scored here is trained on the masked series (the `heldout` variant of the workflow), so hidden
cells never reach training as input or target. On the synthetic demo scene, the methods are also scored
under the real clouds against the scene's known cloud-free truth.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd

from . import baselines, blocks, metrics
from .bridge import hide

log = logging.getLogger("stfuse.benchmark")

MODEL = "stfuse_model"


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
    """Optical bands (T, B, H, W) with NaN wherever the cell is not clear, and the clear mask (T, H, W)."""
    opt, valid = _indices(channels, "optical"), _indices(channels, "valid")[0]
    clear = cube[:, valid] == 1
    obs = cube[:, opt].copy()
    obs[~np.broadcast_to(clear[:, None], obs.shape)] = np.nan
    return obs, clear


def choose_holdout(cube: np.ndarray, meta: dict, *, min_clear: float, seed: int, min_fraction: float = 0.05,
                   max_fraction: float = 0.7, max_dates: int | None = None) -> tuple[np.ndarray, list[int]]:
    """Evaluation dates (clear fraction >= min_clear) and the hidden cells transplanted onto them.

    Clear and cloud fractions are over the cells observed at least once (:func:`stfuse.metrics.clear_fraction`),
    so cells outside the optical footprint count neither as clear nor as cloud. Raises
    :class:`BenchmarkNotPossible` when the data cannot support the benchmark: no date is clear enough, an
    evaluation date has no donor date whose cloud fraction lies within [min_fraction, max_fraction], or the
    hidden cells would leave no clear cell on any date to train the heldout model on.
    """
    _, clear = observed(cube, meta["channels"])
    seen = observed_cells(cube, meta["channels"])
    frac = metrics.clear_fraction(clear, seen)
    dates = [d["start_time"] for d in meta["dates"]]
    eval_dates = [int(t) for t in np.flatnonzero(frac >= min_clear)]
    if max_dates is not None and len(eval_dates) > max_dates:
        rng = np.random.default_rng(seed)
        eval_dates = sorted(int(t) for t in rng.choice(eval_dates, size=max_dates, replace=False))
    if not eval_dates:
        best = f"{frac.max():.2f}" if len(frac) else "none: no optical date"
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
    hidden = metrics.transplant_masks(clear, eval_dates, seed, min_fraction=min_fraction,
                                      max_fraction=max_fraction, observed=seen)
    if not (clear & ~hidden).any():
        raise BenchmarkNotPossible(
            f"the cloud masks transplanted onto the {len(eval_dates)} evaluation date(s) hide every clear cell "
            "of the series, so the heldout model would have nothing to train on; lower config key "
            f"benchmark.max_mask_fraction (now {max_fraction})"
        )
    log.info("evaluation dates: %d (clear fraction >= %.2f); hidden cells: %d", len(eval_dates), min_clear,
             int(hidden.sum()))
    return hidden, eval_dates


def holdout_step(cube_dir, hidden_path, info_path, *, min_clear: float, seed: int, min_mask_fraction: float = 0.05,
                 max_mask_fraction: float = 0.7, max_dates: int | None = None, **_ignored) -> dict:
    """Decide whether the benchmark is possible; write the hidden cells (.npy) and the decision (JSON).

    The decision, ``{"possible": bool, "reason": str | None, "eval_dates": [...], "hidden_cells": int}``,
    is what the workflow reads to request the heldout variant only when it will be scored. When not
    possible, ``hidden`` is all False (nothing hidden) and ``reason`` says why.
    """
    from .bridge import load_cube

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


def score_plan(rows: int, cols: int, block_size: int | None) -> tuple[list[blocks.Block], int]:
    """The blocks :func:`benchmark_step` scores, and their halo.

    ``block_size`` None (or at least the region's longer side): one block, the whole region, no halo.
    Otherwise cores of ``block_size`` with a halo of :data:`stfuse.metrics.SSIM_HALO` (what SSIM
    needs; the baselines are per cell in time and need none)."""
    if block_size is None or block_size >= max(rows, cols):
        return blocks.plan(rows, cols, max(rows, cols), 0), 0
    plan = blocks.plan(rows, cols, block_size, metrics.SSIM_HALO)
    # a thin last block (core + clipped halo) may be narrower than the SSIM window: widen its read
    # window inwards to the window's size (more context than the halo leaves the core's SSIM unchanged)
    win = metrics.ssim_win_size((rows, cols))
    return [_widen(b, win, rows, cols) for b in plan], metrics.SSIM_HALO


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


class _Region:
    """Region-wide quantities gathered block by block (first pass): what is not per cell."""

    def __init__(self, t: int):
        self.n_seen = 0
        self.n_clear = np.zeros(t, np.int64)      # clear & seen, per date
        self.n_clear_in = np.zeros(t, np.int64)   # clear after hiding & seen
        self.n_hidden = np.zeros(t, np.int64)
        self.fill_parts, self.real_fill_parts = [], []
        self.sar_parts, self.real_sar_parts = [], []

    @staticmethod
    def fraction(count: np.ndarray, n: int) -> np.ndarray:
        # as metrics.clear_fraction: integer counts, so the same whatever the blocks
        return count / n if n else np.zeros(count.shape)


def _first_pass(cube, hidden, truth_cube, channels, plan, sar_idx) -> _Region:
    region = _Region(cube.shape[0])
    for block in plan:
        cb, hb = _window(cube, block, core=True), _window(hidden, block, core=True)
        seen = observed_cells(cb, channels)
        truth, clear = observed(cb, channels)
        gappy, clear_in = observed(hide(cb, channels, hb, inplace=True), channels)  # cb: this pass's own copy
        region.n_seen += int(seen.sum())
        region.n_clear += (clear & seen).reshape(len(cb), -1).sum(axis=1)
        region.n_clear_in += (clear_in & seen).reshape(len(cb), -1).sum(axis=1)
        region.n_hidden += hb.reshape(len(hb), -1).sum(axis=1)
        region.fill_parts.append(metrics.ssim_fill_parts(truth))
        if sar_idx:
            sar = cb[:, sar_idx]
            region.sar_parts.append(baselines.sar_regression_stats(gappy, sar))
            if truth_cube is not None:
                region.real_sar_parts.append(baselines.sar_regression_stats(truth, sar))
        if truth_cube is not None:
            region.real_fill_parts.append(metrics.ssim_fill_parts(_window(truth_cube, block, core=True)))
    return region


def _quicklook_index(block: blocks.Block, stride: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Rows and columns of the core (inside the core) kept by the quicklook, and where they go."""
    rows = np.arange(block.row0, block.row0 + block.rows)
    cols = np.arange(block.col0, block.col0 + block.cols)
    rows, cols = rows[rows % stride == 0], cols[cols % stride == 0]
    return rows - block.row0, cols - block.col0, rows // stride, cols // stride


def benchmark_step(cube_dir, hidden_path, heldout_infer_dir, out_dir, *, data_range: float = 1.0,
                   whittaker_lambda: float = baselines.DEFAULT_WHITTAKER_LAMBDA, quicklook_dates: int = 3,
                   truth_cube: np.ndarray | None = None, main_infer_dir=None,
                   block_size: int | None = DEFAULT_BLOCK_SIZE) -> pd.DataFrame:
    """Score every method; write scores.csv, summary.md, plots. Returns the long score table.

    Bounded memory: the cube, the hidden cells and the filled series are read memory-mapped, block by
    block, and scored in
    spatial blocks (:func:`score_plan`: cores of ``block_size`` cells, config key ``blocks.size``, plus
    the halo SSIM needs; None = the whole region at once). A first pass gathers what is region-wide
    -- cloud fractions per date, the SSIM fill values, the pooled ``sar_regression`` coefficients
    (from mergeable sufficient statistics) --; the second runs the methods on each block's read window
    and keeps the additive parts of the metrics over its core (:func:`stfuse.metrics.partial_scores`),
    merged at the end (:func:`stfuse.metrics.merge_scores`). The table equals the whole region's up to
    float summation order (relative ~1e-15); with one block it is bit for bit the whole region's.
    ``truth_cube`` (T, B, H, W), the synthetic scene's truth, may be a memmap: it is read per block too.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cube_dir = Path(cube_dir)
    meta = json.loads((cube_dir / "cube.json").read_text())
    cube = _Npy(cube_dir / "cube.npy")
    channels, dates = meta["channels"], meta["dates"]
    bands = [channels[i]["name"] for i in _indices(channels, "optical")]
    sar_idx = _indices(channels, "sar")
    times = pd.to_datetime([d["start_time"] for d in dates]).tz_convert("UTC").tz_localize(None).to_numpy()
    hidden = _Npy(hidden_path)
    model = _Npy(Path(heldout_infer_dir) / "filled.npy")
    real = truth_cube is not None and main_infer_dir is not None
    main = _Npy(Path(main_infer_dir) / "filled.npy") if real else None
    if real and isinstance(truth_cube, np.memmap) and str(truth_cube.filename or "").endswith(".npy"):
        whole = np.load(truth_cube.filename, mmap_mode="r")   # the whole file, not a view into it?
        if whole.shape == truth_cube.shape and whole.offset == truth_cube.offset:
            truth_cube = _Npy(truth_cube.filename)
        del whole
    t, _, h, w = cube.shape
    plan, halo = score_plan(h, w, block_size)
    single = len(plan) == 1
    win_size = metrics.ssim_win_size((h, w))
    log.info("scoring %d x %d cells in %d block(s) of %s cells (halo %d)", h, w, len(plan),
             block_size if not single else "the whole region", halo)

    region = _first_pass(cube, hidden, truth_cube if real else None, channels, plan, sar_idx)
    cloud_in = 1.0 - region.fraction(region.n_clear_in, region.n_seen)
    cloud = 1.0 - region.fraction(region.n_clear, region.n_seen)
    # one block: the region's own defaults (mean of the finite truth), as metrics.score
    fill = None if single else metrics.ssim_fill(region.fill_parts)
    real_fill = None if single or not real else metrics.ssim_fill(region.real_fill_parts)
    coef = baselines.solve_sar_regression(baselines.merge_sar_stats(region.sar_parts)) if sar_idx else None
    real_coef = (baselines.solve_sar_regression(baselines.merge_sar_stats(region.real_sar_parts))
                 if sar_idx and real else None)

    eval_dates = [int(d) for d in np.flatnonzero(region.n_hidden)]
    n_hidden = int(region.n_hidden.sum())
    rgb = [bands.index(b) for b in ("B04", "B03", "B02") if b in bands] or [0, 0, 0]
    pick = sorted(sorted(eval_dates, key=lambda d: -region.n_hidden[d])[:quicklook_dates])
    stride = max(1, -(-max(h, w) // QUICKLOOK_MAX_CELLS))
    qshape = (len(pick), len(rgb), -(-h // stride), -(-w // stride))
    quick = {"input (gaps)": np.full(qshape, np.nan, np.float32), "truth": np.full(qshape, np.nan, np.float32)}
    quick_hidden = np.zeros((len(pick),) + qshape[2:], bool)

    parts: dict[tuple[str, str], list[pd.DataFrame]] = {}

    def keep(protocol, name, part):
        got = parts.setdefault((protocol, name), [])
        # zero sums add nothing to merge_scores' exact sums: only the first part needs every row
        got.append(part if not got else part[part.value != 0])

    for block in plan:
        cb, hb = _window(cube, block), _window(hidden, block)
        core = _core_of(block)
        sar = cb[:, sar_idx] if sar_idx else None
        truth, clear = observed(cb, channels)
        gappy, clear_in = observed(hide(cb, channels, hb), channels)
        methods = run_methods(gappy, times, sar, _window(model, block), whittaker_lambda, sar_coef=coef)
        gap_days = metrics.days_to_nearest_valid(clear_in, times)
        for name, filled in methods.items():
            keep("transplanted clouds", name, metrics.partial_scores(
                truth, filled, hb, bands, data_range=data_range, gap_days=gap_days, cloud_fraction=cloud_in,
                core=core, win_size=win_size, ssim_fill=fill))
        if pick:
            qr, qc, dr, dc = _quicklook_index(block, stride)
            r0, c0 = block.core_row_offset, block.core_col_offset
            sel = np.ix_(range(len(pick)), range(len(rgb)), dr, dc)
            src = np.ix_(pick, rgb, r0 + qr, c0 + qc)
            quick["input (gaps)"][sel] = gappy[src]
            quick["truth"][sel] = truth[src]
            for name, filled in methods.items():
                quick.setdefault(name, np.full(qshape, np.nan, np.float32))[sel] = filled[src]
            quick_hidden[np.ix_(range(len(pick)), dr, dc)] = hb[np.ix_(pick, r0 + qr, c0 + qc)]
        del methods, gappy
        if real:
            # real clouds on the synthetic scene: every cloudy cell has a known truth
            tb = _window(truth_cube, block).astype(np.float32, copy=False)
            real_hidden = ~clear & np.isfinite(tb).all(axis=1)
            real_methods = run_methods(truth, times, sar, _window(main, block), whittaker_lambda,
                                       sar_coef=real_coef)
            gap_days = metrics.days_to_nearest_valid(clear, times)
            for name, filled in real_methods.items():
                keep("real clouds (synthetic truth)", name, metrics.partial_scores(
                    tb, filled, real_hidden, bands, data_range=data_range, gap_days=gap_days,
                    cloud_fraction=cloud, core=core, win_size=win_size, ssim_fill=real_fill))
            del real_methods

    table = pd.concat([metrics.merge_scores(p).assign(method=name, protocol=protocol)
                       for (protocol, name), p in parts.items()], ignore_index=True)
    transplanted = table[table.protocol == "transplanted clouds"]
    truth_q, gappy_q = quick.pop("truth"), quick.pop("input (gaps)")
    plot_quicklook(truth_q, gappy_q, quick, quick_hidden, [dates[d] for d in pick], list(range(len(pick))),
                   list(range(len(rgb))), out_dir / "quicklook.png")
    table.to_csv(out_dir / "scores.csv", index=False, float_format="%.6g")
    summary = summary_table(table)
    md = (f"Scored on {len(eval_dates)} evaluation date(s) ({', '.join(dates[t]['start_time'][:10] for t in eval_dates)})"
          f": {n_hidden} clear cells hidden under cloud masks transplanted from other dates.\n\n"
          + to_markdown(summary))
    (out_dir / "summary.md").write_text(md)
    plot_by_gap(transplanted, out_dir / "by_gap.png", "transplanted clouds")
    info = dict(possible=True, eval_dates=[dates[t]["start_time"] for t in eval_dates], hidden_cells=n_hidden,
                data_range=data_range, whittaker_lambda=whittaker_lambda)
    (out_dir / "benchmark.json").write_text(json.dumps(info, indent=1) + "\n")
    log.info("benchmark on %d dates, %d hidden cells:\n%s", len(eval_dates), n_hidden, md)
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
    """Outputs of a benchmark that could not score: summary.md saying why, scores.csv with only its header,
    both plots showing the reason, benchmark.json. Returns the summary text."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    reason = holdout_info["reason"]
    md = (f"**The benchmark could not score this study**: {reason}.\n\n"
          "Ingest, training, inference and registration of the filled series ran as usual; only the benchmark "
          "(and the training of its heldout model) was skipped.\n")
    (out_dir / "summary.md").write_text(md)
    pd.DataFrame(columns=list(SCORES_COLUMNS)).to_csv(out_dir / "scores.csv", index=False)
    for name in ("by_gap.png", "quicklook.png"):
        message_figure(out_dir / name, "The benchmark could not score this study", reason)
    (out_dir / "benchmark.json").write_text(json.dumps(dict(possible=False, reason=reason), indent=1) + "\n")
    log.warning("benchmark not scored: %s", reason)
    return md


def synthetic_truth(truth_manifest, dates: list[dict], bands: list[str], scale: float, offset: float,
                    path=None) -> np.ndarray:
    """(T, B, H, W) cloud-free truth of the demo scene, in the same units as the cube.

    ``path``: write it to this .npy file instead of memory, read one band of one date at a time, and
    return it memory-mapped (read-only), for :func:`benchmark_step` to read block by block."""
    import rasterio

    m = pd.read_csv(truth_manifest)
    m["start_time"] = pd.to_datetime(m.start_time, utc=True)
    base = Path(truth_manifest).parent
    out = None
    for t, d in enumerate(dates):
        when = pd.Timestamp(d["start_time"])
        rows = m[m.start_time == when].set_index("semantic_label")
        for b, band in enumerate(bands):
            with rasterio.open(base / rows.loc[band, "path"]) as src:
                arr = src.read(1).astype(np.float32)
                nodata = src.nodata
            if out is None:
                shape = (len(dates), len(bands)) + arr.shape
                if path is None:
                    out = np.full(shape, np.nan, np.float32)
                else:
                    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)
            valid = arr != nodata if nodata is not None else np.ones(arr.shape, bool)
            out[t, b] = np.where(valid, arr * scale + offset, np.nan)
    if path is not None and out is not None:
        out.flush()
        del out
        return np.load(path, mmap_mode="r")
    return out
