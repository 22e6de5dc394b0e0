"""Leakage-free benchmark of the gap-filling model against classical baselines.

Protocol: evaluation dates are optical dates that are (almost) clear. On each, the cloud mask of another
date (seeded) is transplanted: those cells become artificial gaps. Every method gets the series with
these gaps; metrics are computed only on the hidden cells, where the observation is the truth. The
model scored here is trained on the masked series (the `heldout` variant of the workflow), so hidden
cells never reach training as input or target. On the synthetic demo scene, the methods are also scored
under the real clouds against the scene's known cloud-free truth.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd

from . import baselines, metrics
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

    cube, meta = load_cube(cube_dir)
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
                whittaker_lambda: float) -> dict[str, np.ndarray]:
    """Every baseline on the same gappy series, plus the model's filled series when given."""
    out = {}
    for name in baselines.BASELINES:
        params = {"lam": whittaker_lambda} if name == "whittaker" else {}
        t0 = time.perf_counter()
        out[name] = baselines.run_baseline(name, obs, times, sar, **params)
        log.info("baseline %s: %.1f s", name, time.perf_counter() - t0)
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


def benchmark_step(cube_dir, hidden_path, heldout_infer_dir, out_dir, *, data_range: float = 1.0,
                   whittaker_lambda: float = baselines.DEFAULT_WHITTAKER_LAMBDA, quicklook_dates: int = 3,
                   truth_cube: np.ndarray | None = None, main_infer_dir=None) -> pd.DataFrame:
    """Score every method; write scores.csv, summary.md, plots. Returns the long score table."""
    from .bridge import load_cube

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cube, meta = load_cube(cube_dir)
    channels, dates = meta["channels"], meta["dates"]
    bands = [channels[i]["name"] for i in _indices(channels, "optical")]
    sar_idx = _indices(channels, "sar")
    times = pd.to_datetime([d["start_time"] for d in dates]).tz_convert("UTC").tz_localize(None).to_numpy()
    sar = cube[:, sar_idx] if sar_idx else None
    hidden = np.load(hidden_path)

    truth, clear = observed(cube, channels)
    seen = observed_cells(cube, channels)
    gappy, clear_in = observed(hide(cube, channels, hidden), channels)
    model = np.load(Path(heldout_infer_dir) / "filled.npy")
    methods = run_methods(gappy, times, sar, model, whittaker_lambda)
    scores = [score_methods(methods, truth, hidden, clear_in, times, bands, data_range, "transplanted clouds",
                            observed=seen)]

    eval_dates = [int(t) for t in np.flatnonzero(hidden.reshape(len(hidden), -1).any(axis=1))]
    transplanted = scores[0]
    rgb = [bands.index(b) for b in ("B04", "B03", "B02") if b in bands] or [0, 0, 0]
    pick = sorted(eval_dates, key=lambda t: -hidden[t].sum())[:quicklook_dates]
    plot_quicklook(truth, gappy, methods, hidden, dates, sorted(pick), rgb, out_dir / "quicklook.png")

    if truth_cube is not None and main_infer_dir is not None:
        # Real clouds on the synthetic scene: every cloudy cell has a known truth.
        obs, clear = observed(cube, channels)
        real_hidden = ~clear & np.isfinite(truth_cube).all(axis=1)
        main = np.load(Path(main_infer_dir) / "filled.npy")
        real_methods = run_methods(obs, times, sar, main, whittaker_lambda)
        scores.append(score_methods(real_methods, truth_cube, real_hidden, clear, times, bands, data_range,
                                    "real clouds (synthetic truth)", observed=seen))
    table = pd.concat(scores, ignore_index=True)
    table.to_csv(out_dir / "scores.csv", index=False, float_format="%.6g")
    summary = summary_table(table)
    md = (f"Scored on {len(eval_dates)} evaluation date(s) ({', '.join(dates[t]['start_time'][:10] for t in eval_dates)})"
          f": {int(hidden.sum())} clear cells hidden under cloud masks transplanted from other dates.\n\n"
          + to_markdown(summary))
    (out_dir / "summary.md").write_text(md)
    plot_by_gap(transplanted, out_dir / "by_gap.png", "transplanted clouds")
    info = dict(possible=True, eval_dates=[dates[t]["start_time"] for t in eval_dates], hidden_cells=int(hidden.sum()),
                data_range=data_range, whittaker_lambda=whittaker_lambda)
    (out_dir / "benchmark.json").write_text(json.dumps(info, indent=1) + "\n")
    log.info("benchmark on %d dates, %d hidden cells:\n%s", len(eval_dates), int(hidden.sum()), md)
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


def synthetic_truth(truth_manifest, dates: list[dict], bands: list[str], scale: float, offset: float) -> np.ndarray:
    """(T, B, H, W) cloud-free truth of the demo scene, in the same units as the cube."""
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
                out = np.full((len(dates), len(bands)) + arr.shape, np.nan, np.float32)
            valid = arr != nodata if nodata is not None else np.ones(arr.shape, bool)
            out[t, b] = np.where(valid, arr * scale + offset, np.nan)
    return out
