"""Whittaker's lambda tuned by the benchmark (benchmark.whittaker_lambda: auto) on observed values only.

The tuning is a leave-out on the series given to the methods, summed in the first pass (BlockStats) and
chosen on the region's merge: it never reads a hidden cell or the truth, and every block layout picks the
same lambda. No GRASS: the test region of test_score_blocks.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from stfuse import baselines, benchmark, blocks
from stfuse.steps import score

from _scene import ROOT
from test_benchmark_blocks import run, study
from test_score_blocks import CHANNELS, HOLDOUT, region_arrays

GRID = baselines.WHITTAKER_LAMBDA_GRID


@pytest.fixture(scope="module")
def region():
    whole, meta, truth, _ = region_arrays()
    hidden, _ = benchmark.choose_holdout(whole, meta, min_clear=HOLDOUT["min_clear"], seed=0,
                                         max_fraction=HOLDOUT["max_mask_fraction"])
    return whole, meta, truth, hidden


def tuned(whole, meta, truth, hidden, size=None, halo=0):
    """The region's merged tuning ({"lambda", "rmse", ...}) of both protocols, from blocks of ``size``."""
    h, w = whole.shape[2:]
    plan = blocks.plan(h, w, size or max(h, w), halo)
    times = benchmark.dates_to_times(meta["dates"])
    parts = []
    for b in plan:
        rs, cs = blocks.core_slices(b)
        parts.append(benchmark.block_stats(whole[:, :, rs, cs].copy(), hidden[:, rs, cs], CHANNELS,
                                           truth[:, :, rs, cs], times=times, origin=(b.row0, b.col0)))
    region = benchmark.merge_stats(parts, single=len(plan) == 1)
    return region.whittaker, region.real_whittaker


def test_tuning_never_reads_hidden_cells_nor_the_truth(region):
    whole, meta, truth, hidden = region
    ref, ref_real = tuned(whole, meta, truth, hidden)
    assert ref["lambda"] in GRID and min(ref["held_out"]) > 100
    rng = np.random.default_rng(7)
    opt = slice(0, 4)
    # anything under the transplanted (hidden) cells: the methods never see it, nor does the tuning
    changed = whole.copy()
    under = np.broadcast_to(hidden[:, None], changed[:, opt].shape)
    changed[:, opt][under] = rng.uniform(-5.0, 5.0, int(under.sum()))
    assert tuned(changed, meta, truth, hidden)[0] == ref
    # anything under the real clouds, and any truth: neither protocol's tuning reads them
    cloudy = np.broadcast_to((whole[:, 4] != 1)[:, None], changed[:, opt].shape)
    changed = whole.copy()
    changed[:, opt][cloudy] = rng.uniform(-5.0, 5.0, int(cloudy.sum()))
    other_truth = rng.uniform(-5.0, 5.0, truth.shape).astype(np.float32)
    assert tuned(changed, meta, other_truth, hidden) == (ref, ref_real)


def test_observed_values_do_change_the_lambda(region):
    whole, meta, truth, hidden = region
    ref, _ = tuned(whole, meta, truth, hidden)
    days = baselines.days_since_start(benchmark.dates_to_times(meta["dates"]))
    curved = whole.copy()                                # strong curvature in time: little smoothing wins
    curved[:, :4] = np.where(np.isfinite(whole[:, :4]), (0.3 + 0.4 * ((days - 9) / 9) ** 2)[:, None, None, None],
                             np.nan)
    got, _ = tuned(curved, meta, truth, hidden)
    assert ref["lambda"] >= 1000 and got["lambda"] == GRID[0]
    assert got["held_out"] == ref["held_out"]            # the same cells held out: only their values differ


@pytest.mark.parametrize("size, halo", [(8, 6), (13, 3)])
def test_every_block_layout_picks_the_same_lambda(region, size, halo):
    whole, meta, truth, hidden = region
    one = tuned(whole, meta, truth, hidden)
    many = tuned(whole, meta, truth, hidden, size, halo)
    for a, b in zip(one, many):
        assert a["lambda"] == b["lambda"] and a["held_out"] == b["held_out"]
        np.testing.assert_allclose(a["rmse"], b["rmse"], rtol=1e-12)


def test_auto_uses_and_records_the_chosen_lambda(tmp_path):
    root = study(tmp_path)
    run(root, "auto", 8)
    info = json.loads((root / "auto" / "benchmark.json").read_text())
    tuning = info["whittaker_tuning"]
    assert info["whittaker_lambda_setting"] == "auto" and info["whittaker_lambda"] == tuning["chosen"]
    assert tuning["lambdas"] == list(GRID) and len(tuning["rmse"]) == len(GRID) and min(tuning["held_out"]) > 0
    best = int(np.argmin(tuning["rmse"]))
    assert tuning["chosen"] == GRID[best]
    assert info["real_whittaker_lambda"] == info["real_whittaker_tuning"]["chosen"]
    intro = (root / "auto" / "summary.md").read_text().split("\n")[0]
    assert "Whittaker's lambda, chosen by leave-out on the observed values: transplanted clouds: " in intro
    assert f"{GRID[best]:.0f}: {tuning['rmse'][best]:.4f}" in intro and "real clouds (synthetic truth): " in intro
    # the Whittaker row of the table is the chosen lambda's: a fixed run with it gives the same scores
    auto = run(root, "auto1", None)
    fixed = run(root, "fixed", None, whittaker_lambda=info["whittaker_lambda"])
    rows = (auto.method == "whittaker") & (auto.protocol == benchmark.TRANSPLANTED)
    np.testing.assert_array_equal(auto[rows].value.to_numpy(), fixed[rows].value.to_numpy())
    fixed_info = json.loads((root / "fixed" / "benchmark.json").read_text())
    assert fixed_info["whittaker_lambda_setting"] == fixed_info["whittaker_lambda"] == info["whittaker_lambda"]
    assert "fixed by config benchmark.whittaker_lambda" in (root / "fixed" / "summary.md").read_text()


@pytest.mark.parametrize("bad", ["automatic", "Auto", 0, -3.0, None, float("nan")])
def test_bad_setting_fails_naming_the_key_before_writing(tmp_path, bad):
    root = study(tmp_path, h=12, w=12)
    with pytest.raises(ValueError, match="benchmark.whittaker_lambda"):
        run(root, "bad", None, whittaker_lambda=bad)
    assert not (root / "bad").exists()


def test_first_pass_files_keep_the_tuning_and_old_ones_are_refused_for_auto(tmp_path, region):
    whole, meta, truth, hidden = region
    plan = blocks.plan(*whole.shape[2:], 64, 0)
    stats = benchmark.block_stats(whole.copy(), hidden, CHANNELS, truth, times=benchmark.dates_to_times(meta["dates"]))
    score.save_stats(tmp_path / "s.npz", stats, plan[0])
    back, _ = score.load_stats(tmp_path / "s.npz")
    for key in ("whittaker", "real_whittaker"):
        np.testing.assert_array_equal(back.__dict__[key][0], stats.__dict__[key][0])
        np.testing.assert_array_equal(back.__dict__[key][1], stats.__dict__[key][1])
    stats.whittaker = stats.real_whittaker = None            # a first pass written before the tuning existed
    score.save_stats(tmp_path / "old.npz", stats, plan[0])
    old = score.merged_stats([tmp_path / "old.npz"], meta["region"])
    with pytest.raises(ValueError, match="rerun the benchmark's first pass"):
        benchmark.score_context(CHANNELS, meta["dates"], whole.shape[2:], old, data_range=1.0,
                                whittaker_lambda="auto", quicklook_dates=1)
    ctx = benchmark.score_context(CHANNELS, meta["dates"], whole.shape[2:], old, data_range=1.0,
                                  whittaker_lambda=300, quicklook_dates=1)
    assert ctx.whittaker_lambda == ctx.real_whittaker_lambda == 300.0


def test_schema_describes_auto():
    import jsonschema

    schema = yaml.safe_load((ROOT / "workflow/schemas/config.schema.yaml").read_text())
    key = schema["properties"]["benchmark"]["properties"]["whittaker_lambda"]
    assert key["default"] == "auto" and "auto" in key["description"]
    for ok in ("auto", 1000, 0.5):
        jsonschema.validate(ok, key)
    for bad in ("Auto", 0, -1, "x"):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, key)


def test_workflow_steps_in_blocks_choose_what_the_whole_region_chooses(tmp_path, monkeypatch):
    """score_stats_block -> score_block -> score with auto, in 8-cell blocks, against benchmark_step at once."""
    import test_score_blocks as tsb

    monkeypatch.setitem(tsb.SCORE, "whittaker_lambda", "auto")
    whole, meta, truth, filled = region_arrays()
    manifest = tsb.write_truth(tmp_path, meta, truth)
    ref = tsb.run_whole(tmp_path, whole, meta, filled, manifest)
    plan = tsb.cut_blocks(tmp_path, whole, meta, filled, 8, 6)
    table, _ = tsb.run_blocks(tmp_path, plan, manifest)
    tsb.assert_same_table(table, ref)
    got = json.loads((tmp_path / "blocked" / "benchmark" / "benchmark.json").read_text())
    want = json.loads((tmp_path / "whole" / "benchmark" / "benchmark.json").read_text())
    assert got == want and got["whittaker_lambda_setting"] == "auto"
    assert (tmp_path / "blocked" / "benchmark" / "summary.md").read_text() == \
        (tmp_path / "whole" / "benchmark" / "summary.md").read_text()
