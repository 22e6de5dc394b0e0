"""The benchmark on block cubes (stfuse.steps.score) gives the whole region's holdout and score table.

No GRASS: a whole-region cube is built in memory and cut into block cube dirs as stfuse.cube describes
them (cube.npy over the read window, cube.json with counts over the core); the models' filled series are
cut per block (the core, and the read window as filled_halo.npy); the synthetic truth is written as
GeoTIFFs with a truth manifest, read by window.

Tolerance 1e-12 relative: blocks change only the order of float summation (see test_benchmark_blocks).
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pytest

from stfuse import benchmark, blocks, cube, metrics
from stfuse.steps import score

RTOL = 1e-12
BANDS = ["B02", "B03", "B04", "B08"]
CHANNELS = ([{"name": b, "sensor": "S2", "kind": "optical"} for b in BANDS]
            + [{"name": "valid", "sensor": "S2", "kind": "valid"}]
            + [{"name": p, "sensor": "S1", "kind": "sar"} for p in ("VV", "VH")])
HOLDOUT = dict(min_clear=0.85, seed=0, min_mask_fraction=0.05, max_mask_fraction=0.9, max_dates=None)
SCORE = dict(data_range=1.0, whittaker_lambda=1000.0, quicklook_dates=2)


def region_arrays(seed=0, t=7, h=29, w=34):
    """Whole-region cube (T, C, H, W), its meta, the truth and the two models' filled series."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = 0.25 + 0.1 * np.sin(yy / 4.0) * np.cos(xx / 6.0)
    vv, vh = rng.normal(-12.0, 3.0, (t, h, w)), rng.normal(-19.0, 3.0, (t, h, w))
    truth = np.stack([base + 0.05 * b + 0.004 * vv + 0.003 * vh + 0.01 * rng.standard_normal((t, h, w))
                      for b in range(len(BANDS))], axis=1).astype(np.float32)
    blobs = rng.random((t, h // 4 + 1, w // 4 + 1)) < rng.uniform(0.1, 0.5, t)[:, None, None]
    clear = ~np.repeat(np.repeat(blobs, 4, axis=1), 4, axis=2)[:, :h, :w]
    clear[0] = True                                   # the evaluation dates
    clear[4, :, :-3] = True
    valid = clear.astype(np.float32)
    valid[:, :2, :4] = np.nan                         # outside the footprint
    opt = np.where(clear[:, None], truth, np.nan)
    opt[:, :, :2, :4] = np.nan
    sar = np.stack([vv, vh], axis=1).astype(np.float32)
    sar[3, :, 5:9] = np.nan                           # no SAR paired there
    whole = np.concatenate([opt, valid[:, None], sar], axis=1).astype(np.float32)
    start = np.datetime64("2023-05-01T10:00:00")
    meta = {"channels": CHANNELS, "dates": [{"start_time": str(start + 3 * i * np.timedelta64(1, "D")) + "Z"}
                                            for i in range(t)],
            "region": dict(epsg=32631, west=0.0, east=10.0 * w, south=0.0, north=10.0 * h, res_x=10.0, res_y=10.0,
                           cols=w, rows=h)}
    filled = {}
    for variant in ("heldout", "main"):
        f = truth + 0.02 * rng.standard_normal(truth.shape).astype(np.float32)
        f[rng.random(f.shape) < 0.02] = np.nan        # some cells the model left unfilled
        filled[variant] = f
    truth = truth.copy()
    truth[:, :, :2, :4] = np.nan
    return whole, meta, truth, filled


def write_truth(root, meta, truth):
    """The demo scene's truth as float32 GeoTIFFs (nodata -9999) and its manifest."""
    import rasterio

    rows = []
    (root / "truth").mkdir()
    t, nb, h, w = truth.shape
    transform = rasterio.Affine(10.0, 0.0, 0.0, 0.0, -10.0, 10.0 * h)
    for i, d in enumerate(meta["dates"]):
        for b, band in enumerate(BANDS):
            name = f"truth_{i}_{band}.tif"
            with rasterio.open(root / "truth" / name, "w", driver="GTiff", width=w, height=h, count=1,
                               dtype="float32", crs="EPSG:32631", transform=transform,
                               nodata=-9999.0) as dst:
                dst.write(np.where(np.isfinite(truth[i, b]), truth[i, b], -9999.0).astype(np.float32), 1)
            rows.append(dict(start_time=d["start_time"], semantic_label=band, path=name))
    pd.DataFrame(rows).to_csv(root / "truth" / "manifest.csv", index=False)
    return root / "truth" / "manifest.csv"


def cut_blocks(root, whole, meta, filled, size, halo):
    """Block cube dirs and per-block infer dirs, as the workflow's steps write them: filled.npy over the
    core."""
    h, w = whole.shape[2:]
    plan = blocks.plan(h, w, size, halo)
    for b in plan:
        rs, cs = blocks.read_slices(b)
        d = root / "cubes" / b.id
        d.mkdir(parents=True)
        block_cube = np.ascontiguousarray(whole[:, :, rs, cs])
        np.save(d / cube.CUBE_FILE, block_cube)
        cube.write_meta(d, dict(meta, block=blocks.to_dict(b), shape=list(block_cube.shape),
                                counts=cube.core_counts(block_cube, CHANNELS, b)))
        for variant, f in filled.items():
            inf = root / "infer" / variant / b.id
            inf.mkdir(parents=True)
            np.save(inf / "filled.npy", np.ascontiguousarray(f[(...,) + blocks.core_slices(b)]))
    return plan


def run_blocks(root, plan, manifest, out="blocked"):
    """holdout -> first pass per block -> score per block -> merge."""
    cube_dirs = [root / "cubes" / b.id for b in plan]
    info = score.holdout_step([d / cube.META_FILE for d in cube_dirs], root / out / "holdout.json", **HOLDOUT)
    assert info["possible"], info
    stats = []
    for b, d in zip(plan, cube_dirs):
        stats.append(root / out / "stats" / f"{b.id}.npz")
        score.score_stats_block_step(d, root / out / "holdout.json", stats[-1], truth_manifest=manifest,
                                     optical={"bands": BANDS})
    score_dirs = []
    for b, d in zip(plan[::-1], cube_dirs[::-1]):         # any job order
        score_dirs.append(root / out / "scored" / b.id)
        filled = {v: [root / "infer" / v / p.id / "filled.npy" for p in plan] for v in ("heldout", "main")}
        score.score_block_step(d, root / out / "holdout.json", stats[::-1], filled["heldout"], filled["main"],
                               score_dirs[-1], truth_manifest=manifest,
                               optical={"bands": BANDS}, **SCORE)
    table = score.score_step(score_dirs, stats, root / out / "holdout.json", cube_dirs[0] / cube.META_FILE,
                             root / out / "benchmark", **SCORE)
    return table, info


def run_whole(root, whole, meta, filled, manifest, out="whole"):
    """Today's benchmark_step on the whole-region cube (hidden.npy from choose_holdout), one block."""
    d = root / out
    (d / "cube").mkdir(parents=True)
    np.save(d / "cube" / "cube.npy", whole)
    (d / "cube" / "cube.json").write_text(json.dumps(meta))
    hidden, _ = benchmark.choose_holdout(whole, meta, min_clear=HOLDOUT["min_clear"], seed=HOLDOUT["seed"],
                                         min_fraction=HOLDOUT["min_mask_fraction"],
                                         max_fraction=HOLDOUT["max_mask_fraction"])
    np.save(d / "hidden.npy", hidden)
    for variant, f in filled.items():
        (d / variant).mkdir()
        np.save(d / variant / "filled.npy", f)
    truth = benchmark.synthetic_truth(manifest, meta["dates"], BANDS, 1.0, 0.0)
    return benchmark.benchmark_step(d / "cube", d / "hidden.npy", d / "heldout", d / "benchmark", truth_cube=truth,
                                    main_infer_dir=d / "main", block_size=None, **SCORE)


def assert_same_table(a: pd.DataFrame, b: pd.DataFrame, rtol=RTOL):
    keys = ["protocol", "method", "band", "metric", "gap_bin", "cloud_bin"]
    assert len(a) == len(b)
    pd.testing.assert_frame_equal(a[keys].reset_index(drop=True), b[keys].reset_index(drop=True))
    np.testing.assert_array_equal(a.n_pixels.to_numpy(), b.n_pixels.to_numpy())
    np.testing.assert_array_equal(a.n_unfilled.to_numpy(), b.n_unfilled.to_numpy())
    np.testing.assert_allclose(a.value.to_numpy(), b.value.to_numpy(), rtol=rtol, atol=0, equal_nan=True)


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    root = tmp_path_factory.mktemp("scene")
    whole, meta, truth, filled = region_arrays()
    manifest = write_truth(root, meta, truth)
    return root, whole, meta, filled, manifest, run_whole(root, whole, meta, filled, manifest)


# --- holdout from counts -----------------------------------------------------------------------------------

def metas_of(whole, meta, size, halo):
    h, w = whole.shape[2:]
    out = []
    for b in blocks.plan(h, w, size, halo):
        rs, cs = blocks.read_slices(b)
        out.append(dict(meta, block=blocks.to_dict(b), counts=cube.core_counts(whole[:, :, rs, cs], CHANNELS, b)))
    return out


@pytest.mark.parametrize("max_dates", [None, 1])
@pytest.mark.parametrize("size, halo", [(64, 0), (8, 6), (13, 3)])
def test_holdout_decision_is_choose_holdout(max_dates, size, halo):
    whole, meta, _, _ = region_arrays(seed=4)
    params = dict(HOLDOUT, max_dates=max_dates)
    info = benchmark.holdout_decision(metas_of(whole, meta, size, halo), **params)
    hidden, eval_dates = benchmark.choose_holdout(whole, meta, min_clear=params["min_clear"], seed=params["seed"],
                                                  min_fraction=params["min_mask_fraction"],
                                                  max_fraction=params["max_mask_fraction"], max_dates=max_dates)
    assert info["possible"] and info["reason"] is None
    assert info["eval_dates"] == [meta["dates"][e]["start_time"] for e in eval_dates]
    assert sorted(int(e) for e in info["donors"]) == eval_dates
    assert len(eval_dates) == (1 if max_dates == 1 else 3)
    np.testing.assert_array_equal(cube.transplanted(whole, CHANNELS, info["donors"]), hidden)
    clear = whole[:, 4] == 1
    seen = benchmark.observed_cells(whole, CHANNELS)
    np.testing.assert_array_equal(hidden, metrics.transplant_masks(clear, eval_dates, params["seed"], 0.05, 0.9,
                                                                   observed=seen))
    assert {k: info[k] for k in params} == params
    # every block's hidden cells are the region's, cut
    for m in metas_of(whole, meta, size, halo):
        b = blocks.from_dict(m["block"])
        rs, cs = blocks.read_slices(b)
        np.testing.assert_array_equal(cube.transplanted(whole[:, :, rs, cs], CHANNELS, info["donors"]),
                                      hidden[:, rs, cs])


def cube_of(valid):
    """(T, 2, H, W) cube: one optical band (NaN where not valid), the valid channel (as test_benchmark)."""
    valid = np.asarray(valid, dtype=np.float32)
    chans = [CHANNELS[0], CHANNELS[len(BANDS)]]
    c = np.stack([np.where(valid == 1, 0.3, np.nan).astype(np.float32), valid], axis=1)
    meta = {"channels": chans, "dates": [{"start_time": f"2023-04-{t + 1:02d}T00:00:00Z"} for t in range(len(valid))]}
    return c, meta


@pytest.mark.parametrize("case, params, reason", [
    ("no clear date", dict(min_clear=0.99), "no optical date is clear enough"),
    ("no donor", dict(min_clear=0.9), "no donor cloud mask for evaluation date 2023-04-01"),
    ("all hidden", dict(min_clear=0.9, max_fraction=1.0), "hide every clear cell"),
])
def test_not_possible_reasons_are_choose_holdouts(case, params, reason):
    valid = np.zeros((4, 6, 6))
    valid[0] = 1.0
    if case == "no clear date":
        valid[0, :2] = 0.0
    c, meta = cube_of(valid)
    with pytest.raises(benchmark.BenchmarkNotPossible, match=reason) as err:
        benchmark.choose_holdout(c, meta, seed=0, **params)
    metas = []
    for b in blocks.plan(6, 6, 4, 2):
        rs, cs = blocks.read_slices(b)
        metas.append(dict(meta, block=blocks.to_dict(b), counts=cube.core_counts(c[:, :, rs, cs], meta["channels"], b)))
    kw = dict(min_clear=params["min_clear"], max_mask_fraction=params.get("max_fraction", 0.7))
    info = benchmark.holdout_decision(metas, seed=0, **kw)
    assert info["possible"] is False and info["reason"] == str(err.value)
    assert info["eval_dates"] == [] and info["donors"] == {}


def test_leaves_clear_cells_is_sufficient_and_its_edge():
    # a non-evaluation date with a clear cell: surely possible
    assert benchmark.leaves_clear_cells(10, [10, 1, 0], {0: 2})
    # clear on e and on d outnumber the cells: they overlap
    assert benchmark.leaves_clear_cells(10, [6, 5, 0], {0: 1, 1: 0})
    # every cell of e hidden under a fully cloudy donor: exact
    assert not benchmark.leaves_clear_cells(10, [10, 0, 0], {0: 1})
    # the edge (min_clear <= 0.5): e and d half clear, all else cloudy -- refused from counts even though
    # the pixels might overlap (the exact check of choose_holdout could pass)
    assert not benchmark.leaves_clear_cells(10, [5, 5, 0], {0: 1, 1: 0})


def test_holdout_step_writes_only_holdout_json(tmp_path, scene):
    _, whole, meta, _, _, _ = scene
    paths = []
    for i, m in enumerate(metas_of(whole, meta, 13, 3)):
        paths.append(tmp_path / f"{i}.json")
        paths[-1].write_text(json.dumps(m))
    info = score.holdout_step(paths, tmp_path / "h" / "holdout.json", **HOLDOUT, data_range=1.0)
    assert sorted(p.name for p in (tmp_path / "h").iterdir()) == ["holdout.json"]
    assert json.loads((tmp_path / "h" / "holdout.json").read_text()) == json.loads(json.dumps(info))
    assert "hidden_cells" not in info and info["possible"]


# --- scores per block --------------------------------------------------------------------------------------

def test_one_block_is_todays_benchmark_step(tmp_path, scene):
    root, whole, meta, filled, manifest, ref = scene
    plan = cut_blocks(tmp_path, whole, meta, filled, 64, 32)
    assert len(plan) == 1
    table, _ = run_blocks(tmp_path, plan, manifest)
    assert set(table.protocol) == {benchmark.TRANSPLANTED, benchmark.REAL}
    assert {"sar_regression", benchmark.MODEL} <= set(table.method)
    pd.testing.assert_frame_equal(table, ref, check_exact=True)
    whole_out, out = root / "whole" / "benchmark", tmp_path / "blocked" / "benchmark"
    for name in ("scores.csv", "summary.md", "benchmark.json"):
        assert (out / name).read_text() == (whole_out / name).read_text(), name


@pytest.mark.parametrize("size, halo", [(8, 6), (13, 5), (10, 9)])
def test_blocks_merge_to_the_whole_region_table(tmp_path, scene, size, halo):
    """The model's filled series is core-sized per block: SSIM near a core's edge reads the neighbours'."""
    root, whole, meta, filled, manifest, ref = scene
    plan = cut_blocks(tmp_path, whole, meta, filled, size, halo)
    assert len(plan) > 4 and min(min(b.rows, b.cols) for b in plan) < metrics.SSIM_WIN   # thin last blocks
    table, info = run_blocks(tmp_path, plan, manifest)
    overall = table[(table.band == "all") & (table.gap_bin == "all") & (table.cloud_bin == "all")]
    assert (overall.n_pixels > 0).all() and overall.value.notna().all()
    assert_same_table(table, ref)
    out, whole_out = tmp_path / "blocked" / "benchmark", root / "whole" / "benchmark"
    assert (out / "summary.md").read_text() == (whole_out / "summary.md").read_text()
    info = json.loads((out / "benchmark.json").read_text())
    assert info == json.loads((whole_out / "benchmark.json").read_text())      # the same lambdas chosen, too
    assert info["whittaker_lambda_setting"] == 1000.0 and len(info["whittaker_tuning"]["rmse"]) == 9
    pd.testing.assert_frame_equal(pd.read_csv(out / "scores.csv"), pd.read_csv(whole_out / "scores.csv"), rtol=1e-5)
    for png in ("quicklook.png", "by_gap.png"):
        assert (out / png).stat().st_size > 3000


def test_truth_is_read_by_block_window(tmp_path, scene, monkeypatch):
    _, whole, meta, filled, manifest, _ = scene
    plan = cut_blocks(tmp_path, whole, meta, filled, 10, 6)
    windows = []
    real = benchmark._read_truth

    def spy(path, scale, offset, window):
        windows.append(window)
        return real(path, scale, offset, window)

    monkeypatch.setattr(benchmark, "_read_truth", spy)
    run_blocks(tmp_path, plan, manifest)
    assert windows and all(w is not None for w in windows)
    assert max(max(w[2:]) for w in windows) <= 10 + 2 * metrics.SSIM_HALO


def test_halo_too_small_for_the_ssim_window_is_refused(tmp_path, scene):
    _, whole, meta, filled, manifest, _ = scene
    plan = cut_blocks(tmp_path, whole, meta, filled, 8, 3)     # thin last column needs widening beyond it
    cube_dirs = [tmp_path / "cubes" / b.id for b in plan]
    score.holdout_step([d / cube.META_FILE for d in cube_dirs], tmp_path / "holdout.json", **HOLDOUT)
    stats = [tmp_path / "stats" / f"{b.id}.npz" for b in plan]
    for d, s in zip(cube_dirs, stats):
        score.score_stats_block_step(d, tmp_path / "holdout.json", s)
    thin = next(b for b in plan if b.cols < 4)
    with pytest.raises(ValueError, match="blocks.halo"):
        score.score_block_step(tmp_path / "cubes" / thin.id, tmp_path / "holdout.json", stats,
                               [tmp_path / "infer" / "heldout" / b.id / "filled.npy" for b in plan], None,
                               tmp_path / "s", **SCORE)


def test_missing_first_pass_is_refused(tmp_path, scene):
    _, whole, meta, filled, manifest, _ = scene
    plan = cut_blocks(tmp_path, whole, meta, filled, 13, 5)
    cube_dirs = [tmp_path / "cubes" / b.id for b in plan]
    score.holdout_step([d / cube.META_FILE for d in cube_dirs], tmp_path / "holdout.json", **HOLDOUT)
    stats = [tmp_path / "stats" / f"{b.id}.npz" for b in plan]
    for d, s in zip(cube_dirs, stats):
        score.score_stats_block_step(d, tmp_path / "holdout.json", s)
    with pytest.raises(ValueError, match="every block's first pass"):
        score.score_block_step(cube_dirs[0], tmp_path / "holdout.json", stats[1:],
                               tmp_path / "infer" / "heldout" / plan[0].id, None, tmp_path / "s", **SCORE)


def test_not_possible_score_step_says_why(tmp_path):
    (tmp_path / "holdout.json").write_text(json.dumps({"possible": False, "reason": "no donor cloud mask for X"}))
    assert score.score_step([], [], tmp_path / "holdout.json", None, tmp_path / "out", **SCORE) is None
    assert (tmp_path / "out" / "summary.md").read_text().startswith("**The benchmark could not score")
    with pytest.raises(ValueError, match="not possible"):
        score.score_stats_block_step(tmp_path, tmp_path / "holdout.json", tmp_path / "s.npz")
