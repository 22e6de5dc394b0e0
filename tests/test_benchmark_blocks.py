"""benchmark_step scored in spatial blocks (bounded memory) gives the table of the whole region at once.

Tolerance: 1e-9 relative. The blocks change only the order of float summation -- partial_scores' sums
inside each block (merged exactly with math.fsum), skimage's running-sum SSIM filter that starts at each
block's edge, the region's SSIM fill value and the pooled sar_regression fit merged from per-block
statistics -- relative differences of order 1e-15 here, and up to ~1e-12 on 50 dates x 512^2 (the sums of
squared errors over millions of cells, accumulated naively along the pixel axis); the baselines themselves are per cell in time,
so their filled values are the same bit for bit (the sar_regression coefficients differ by ~1e-16, far
below a float32 rounding step). 1e-9 leaves room for that and still catches any cell scored twice,
missed, or seen without its true neighbours.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from stfuse import benchmark, metrics

from test_score_blocks import BANDS, CHANNELS, region_arrays  # one generator of the test region

RTOL = 1e-9


def study(tmp_path, seed=0, t=7, h=29, w=34):
    """A cube dir, hidden.npy, heldout and main filled.npy (written like the workflow's), and the truth."""
    cube, meta, truth, filled = region_arrays(seed=seed, t=t, h=h, w=w)
    (tmp_path / "cube").mkdir()
    np.save(tmp_path / "cube" / "cube.npy", cube)
    (tmp_path / "cube" / "cube.json").write_text(json.dumps(meta))
    hidden, _ = benchmark.choose_holdout(cube, meta, min_clear=0.85, seed=seed, max_fraction=0.9)
    np.save(tmp_path / "hidden.npy", hidden)
    for variant in ("heldout", "main"):
        (tmp_path / variant).mkdir()
        np.save(tmp_path / variant / "filled.npy", filled[variant])
    np.save(tmp_path / "truth.npy", truth)
    return tmp_path


def run(root, out, block_size, **kw):
    truth = np.load(root / "truth.npy", mmap_mode="r")
    return benchmark.benchmark_step(root / "cube", root / "hidden.npy", root / "heldout", root / out,
                                    truth_cube=truth, main_infer_dir=root / "main", block_size=block_size,
                                    quicklook_dates=2, **kw)


def assert_same_table(a: pd.DataFrame, b: pd.DataFrame):
    keys = ["protocol", "method", "band", "metric", "gap_bin", "cloud_bin"]
    assert len(a) == len(b)
    pd.testing.assert_frame_equal(a[keys].reset_index(drop=True), b[keys].reset_index(drop=True))
    np.testing.assert_array_equal(a.n_pixels.to_numpy(), b.n_pixels.to_numpy())
    np.testing.assert_array_equal(a.n_unfilled.to_numpy(), b.n_unfilled.to_numpy())
    np.testing.assert_allclose(a.value.to_numpy(), b.value.to_numpy(), rtol=RTOL, atol=0, equal_nan=True)


@pytest.mark.parametrize("block_size", [8, 13])
def test_blocks_give_the_whole_region_table(tmp_path, block_size):
    root = study(tmp_path)
    whole = run(root, "whole", None)
    blocked = run(root, f"b{block_size}", block_size)
    assert len(benchmark.score_plan(29, 34, block_size)[0]) > 4
    assert set(whole.protocol) == {"transplanted clouds", "real clouds (synthetic truth)"}
    assert {"sar_regression", benchmark.MODEL} <= set(whole.method)
    overall = whole[(whole.band == "all") & (whole.gap_bin == "all") & (whole.cloud_bin == "all")]
    assert (overall.n_pixels > 0).all() and overall.value.notna().all()
    assert_same_table(whole, blocked)
    # what the workflow reads: the csv written (6 significant digits) and the summary agree too
    a, b = pd.read_csv(root / "whole" / "scores.csv"), pd.read_csv(root / f"b{block_size}" / "scores.csv")
    pd.testing.assert_frame_equal(a, b, rtol=1e-5)
    assert (root / "whole" / "summary.md").read_text() == (root / f"b{block_size}" / "summary.md").read_text()
    for png in ("quicklook.png", "by_gap.png"):
        assert (root / f"b{block_size}" / png).stat().st_size > 3000


def test_one_block_is_the_whole_region_scored_at_once(tmp_path):
    """A block covering the region is bit for bit the whole-region computation (metrics.score on it)."""
    root = study(tmp_path, seed=1, h=15, w=18)
    from stfuse.bridge import hide

    table = run(root, "one", 64)
    cube = np.load(root / "cube" / "cube.npy")
    meta = json.loads((root / "cube" / "cube.json").read_text())
    hidden = np.load(root / "hidden.npy")
    times = pd.to_datetime([d["start_time"] for d in meta["dates"]]).tz_convert("UTC").tz_localize(None).to_numpy()
    truth, _ = benchmark.observed(cube, CHANNELS)
    gappy, clear_in = benchmark.observed(hide(cube, CHANNELS, hidden), CHANNELS)
    lam = json.loads((root / "one" / "benchmark.json").read_text())["whittaker_lambda"]   # auto: the tuned one
    methods = benchmark.run_methods(gappy, times, cube[:, 5:7], np.load(root / "heldout" / "filled.npy"), lam)
    ref = benchmark.score_methods(methods, truth, hidden, clear_in, times, BANDS, 1.0, "transplanted clouds",
                                  observed=benchmark.observed_cells(cube, CHANNELS))
    got = table[table.protocol == "transplanted clouds"].reset_index(drop=True)
    pd.testing.assert_frame_equal(got, ref, check_exact=True)


def test_the_block_loop_never_sees_a_whole_region_array(tmp_path, monkeypatch):
    root = study(tmp_path, seed=2, h=31, w=27)
    size, halo = 10, metrics.SSIM_HALO
    seen_shapes, loads = [], []

    def spy(func):
        def wrapped(*args, **kwargs):
            for a in list(args) + list(kwargs.values()):
                if isinstance(a, np.ndarray) and a.ndim >= 2:
                    seen_shapes.append((func.__name__, a.shape))
                elif isinstance(a, dict):
                    seen_shapes.extend((func.__name__, v.shape) for v in a.values() if isinstance(v, np.ndarray))
            out = func(*args, **kwargs)
            if isinstance(out, dict):
                seen_shapes.extend((func.__name__, v.shape) for v in out.values())
            return out
        wrapped.__name__ = func.__name__
        return wrapped

    real_load = np.load

    def load(path, *args, **kwargs):
        loads.append((str(path), kwargs.get("mmap_mode")))
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(benchmark, "run_methods", spy(benchmark.run_methods))
    monkeypatch.setattr(benchmark.metrics, "partial_scores", spy(metrics.partial_scores))
    monkeypatch.setattr(benchmark.metrics, "days_to_nearest_valid", spy(metrics.days_to_nearest_valid))
    monkeypatch.setattr(benchmark.baselines, "sar_regression_stats",
                        spy(benchmark.baselines.sar_regression_stats))
    monkeypatch.setattr(benchmark, "hide", spy(benchmark.hide))
    monkeypatch.setattr(benchmark.np, "load", load)
    run(root, "spy", size)
    names = {n for n, _ in seen_shapes}
    assert {"run_methods", "partial_scores", "days_to_nearest_valid", "sar_regression_stats", "hide"} <= names
    assert seen_shapes and max(max(s[-2:]) for _, s in seen_shapes) <= size + 2 * halo
    npy = [(p, m) for p, m in loads if p.endswith(".npy")]
    assert len(npy) >= 4 and all(m == "r" for _, m in npy), npy


def test_block_size_must_exceed_the_ssim_halo(tmp_path):
    root = study(tmp_path, seed=3, h=12, w=12)
    with pytest.raises(ValueError, match="blocks.size"):
        run(root, "bad", metrics.SSIM_HALO)
