"""Block-wise scoring (stfuse.metrics.partial_scores / merge_scores) equals the whole-region score."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from stfuse.metrics import (
    SSIM_HALO,
    clear_fraction,
    days_to_nearest_valid,
    ScoreSums,
    merge_scores,
    partial_scores,
    score,
    ssim_fill,
    ssim_fill_parts,
    ssim_win_size,
    transplant_masks,
)

T0 = np.datetime64("2021-04-03T10:36:12", "ns")
BANDS = ["B02", "B04", "B08"]
RTOL = 1e-9


def scene(seed=0, t=6, nb=3, h=40, w=52):
    """Truth with real cloud gaps, transplanted hidden cells, a smooth-ish filled series with
    some unfilled hidden cells; gap_days and cloud fractions as benchmark.score_methods."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = 0.3 + 0.2 * np.sin(yy / 5.0)[None, None] * np.cos(xx / 7.0)[None, None]
    truth = base + 0.05 * rng.standard_normal((t, nb, h, w))
    frac = rng.uniform(0.1, 0.5, t)
    blobs = rng.random((t, h // 4 + 1, w // 4 + 1)) < frac[:, None, None]
    clear = ~np.repeat(np.repeat(blobs, 4, axis=1), 4, axis=2)[:, :h, :w]
    seen = np.ones((h, w), bool)
    seen[:2, :5] = False  # never observed
    clear &= seen
    truth[np.broadcast_to(~clear[:, None], truth.shape)] = np.nan
    hidden = transplant_masks(clear, [1, 3, 4], seed=seed, min_fraction=0.05, max_fraction=0.9,
                              observed=seen)
    clear_in = clear & ~hidden
    times = T0 + (np.array([0, 5, 11, 20, 33, 60]) * 86_400e9).astype("timedelta64[ns]")
    gap_days = days_to_nearest_valid(clear_in, times)
    cloud = 1.0 - clear_fraction(clear_in, seen)
    filled = np.where(np.isfinite(truth), truth, 0.3) + 0.03 * rng.standard_normal(truth.shape)
    unfilled = rng.random((t, h, w)) < 0.05
    filled[np.broadcast_to(unfilled[:, None], filled.shape)] = np.nan
    return truth, filled, hidden, gap_days, cloud


def edges(n, k):
    """k uneven cuts of range(n)."""
    cuts = np.unique(np.round(np.linspace(0, n, k + 1) ** 1.1 / n ** 0.1).astype(int))
    return list(zip(cuts[:-1], cuts[1:]))


def blockwise(truth, filled, hidden, gap_days, cloud, rows, cols, halo=SSIM_HALO):
    return merge_scores(block_parts(truth, filled, hidden, gap_days, cloud, rows, cols, halo))


def block_parts(truth, filled, hidden, gap_days, cloud, rows, cols, halo=SSIM_HALO):
    """Each block's partial_scores, as the workflow's score_block jobs make them."""
    h, w = truth.shape[2:]
    blocks = []
    for r0, r1 in rows:
        for c0, c1 in cols:
            a0, a1 = max(r0 - halo, 0), min(r1 + halo, h)
            b0, b1 = max(c0 - halo, 0), min(c1 + halo, w)
            core = (r0 - a0, c0 - b0, r1 - r0, c1 - c0)
            blocks.append(((slice(a0, a1), slice(b0, b1)), core))
    fill = ssim_fill([ssim_fill_parts(truth[:, :, rs, cs], core) for (rs, cs), core in blocks])
    parts = [partial_scores(truth[:, :, rs, cs], filled[:, :, rs, cs], hidden[:, rs, cs], BANDS,
                            data_range=1.0, gap_days=gap_days[:, rs, cs], cloud_fraction=cloud,
                            core=core, win_size=ssim_win_size((h, w)), ssim_fill=fill)
             for (rs, cs), core in blocks]
    return parts


def assert_same(a: pd.DataFrame, b: pd.DataFrame, rtol=RTOL):
    pd.testing.assert_frame_equal(a.drop(columns="value"), b.drop(columns="value"))
    np.testing.assert_allclose(a.value.to_numpy(), b.value.to_numpy(), rtol=rtol, atol=0)


LAYOUTS = {"1 block": (1, 1), "2x2": (2, 2), "3x4 uneven": (3, 4), "5x7 uneven": (5, 7)}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_blocks_merge_to_the_whole_region_score(layout):
    truth, filled, hidden, gap, cloud = scene()
    whole = score(truth, filled, hidden, BANDS, data_range=1.0, gap_days=gap, cloud_fraction=cloud)
    assert (whole.n_pixels > 0).any() and (whole.n_unfilled > 0).any()
    assert whole.value.notna().sum() > 50
    nr, nc = LAYOUTS[layout]
    merged = blockwise(truth, filled, hidden, gap, cloud, edges(40, nr), edges(52, nc))
    assert_same(merged, whole)


def test_layouts_are_uneven_and_cover_the_region():
    for n, k in [(40, 3), (52, 4), (52, 7)]:
        cuts = edges(n, k)
        assert cuts[0][0] == 0 and cuts[-1][1] == n and len(cuts) == k
        assert len({b - a for a, b in cuts}) > 1


def test_single_part_of_the_region_is_score_bitwise():
    truth, filled, hidden, gap, cloud = scene(seed=3)
    whole = score(truth, filled, hidden, BANDS, data_range=1.0, gap_days=gap, cloud_fraction=cloud)
    one = merge_scores([partial_scores(truth, filled, hidden, BANDS, data_range=1.0, gap_days=gap,
                                       cloud_fraction=cloud)])
    pd.testing.assert_frame_equal(one, whole, check_exact=True)


def test_merge_does_not_depend_on_block_order():
    truth, filled, hidden, gap, cloud = scene(seed=1)
    h, w = truth.shape[2:]
    parts = []
    for r0, r1 in edges(h, 2):
        for c0, c1 in edges(w, 3):
            a0, a1, b0, b1 = max(r0 - 3, 0), min(r1 + 3, h), max(c0 - 3, 0), min(c1 + 3, w)
            parts.append(partial_scores(truth[:, :, a0:a1, b0:b1], filled[:, :, a0:a1, b0:b1],
                                        hidden[:, a0:a1, b0:b1], BANDS, gap_days=gap[:, a0:a1, b0:b1],
                                        cloud_fraction=cloud, core=(r0 - a0, c0 - b0, r1 - r0, c1 - c0),
                                        win_size=7))
    pd.testing.assert_frame_equal(merge_scores(parts), merge_scores(parts[::-1]), check_exact=True)


def test_running_sums_keep_floats_not_tables():
    """The merge of a whole tile's blocks holds one id and one value per non-zero row of each part
    (all rows of the first): its memory does not hold the parts' tables."""
    truth, filled, hidden, gap, cloud = scene(seed=2)
    parts = block_parts(truth, filled, hidden, gap, cloud, edges(40, 3), edges(52, 4))
    sums = ScoreSums()
    for part in parts:
        sums.add(part)
    kept = sum(len(v) for v in sums._values)
    ranges = [(p.part == "data_range").sum() for p in parts]
    nonzero = [((p.value != 0) & (p.part != "data_range")).sum() for p in parts]
    assert kept == len(parts[0]) - ranges[0] + sum(nonzero[1:]) < sum(len(p) for p in parts)
    whole = score(truth, filled, hidden, BANDS, data_range=1.0, gap_days=gap, cloud_fraction=cloud)
    assert_same(sums.table(), whole)
    pd.testing.assert_frame_equal(sums.table(), merge_scores(parts[::-1]), check_exact=True)


def test_a_halo_smaller_than_ssim_halo_changes_ssim_only():
    assert SSIM_HALO == 3
    truth, filled, hidden, gap, cloud = scene()
    whole = score(truth, filled, hidden, BANDS, data_range=1.0, gap_days=gap, cloud_fraction=cloud)
    short = blockwise(truth, filled, hidden, gap, cloud, edges(40, 3), edges(52, 4), halo=SSIM_HALO - 1)
    is_ssim = (whole.metric == "ssim").to_numpy()
    assert_same(short[~is_ssim].reset_index(drop=True), whole[~is_ssim].reset_index(drop=True))
    with pytest.raises(AssertionError):
        assert_same(short[is_ssim].reset_index(drop=True), whole[is_ssim].reset_index(drop=True))


def test_ssim_needs_the_region_fill_and_window():
    """Blocks must be given the region's NaN fill and window, not their own."""
    truth, filled, hidden, gap, cloud = scene()
    whole = score(truth, filled, hidden, BANDS, data_range=1.0, gap_days=gap, cloud_fraction=cloud)
    ssim = (whole.metric == "ssim").to_numpy()
    h, w = truth.shape[2:]
    parts = []
    for r0, r1 in edges(h, 3):
        for c0, c1 in edges(w, 4):
            a0, a1, b0, b1 = max(r0 - 3, 0), min(r1 + 3, h), max(c0 - 3, 0), min(c1 + 3, w)
            parts.append(partial_scores(truth[:, :, a0:a1, b0:b1], filled[:, :, a0:a1, b0:b1],
                                        hidden[:, a0:a1, b0:b1], BANDS, gap_days=gap[:, a0:a1, b0:b1],
                                        cloud_fraction=cloud, core=(r0 - a0, c0 - b0, r1 - r0, c1 - c0)))
    own_fill = merge_scores(parts)  # each block's own mean replaces NaN truth
    assert not np.allclose(own_fill.value[ssim], whole.value[ssim], rtol=RTOL, atol=0, equal_nan=True)


def test_partial_scores_checks_core_and_block_size():
    truth, filled, hidden, gap, cloud = scene()
    with pytest.raises(ValueError, match="core"):
        partial_scores(truth, filled, hidden, BANDS, core=(30, 0, 20, 10))
    with pytest.raises(ValueError, match="SSIM window"):  # a 5-wide block of a 7-window region
        partial_scores(truth[:, :, :, :5], filled[:, :, :, :5], hidden[:, :, :5], BANDS,
                       core=(0, 0, 40, 2), win_size=7)
    with pytest.raises(ValueError, match="data_range"):
        a = partial_scores(truth, filled, hidden, BANDS, data_range=1.0)
        merge_scores([a, partial_scores(truth, filled, hidden, BANDS, data_range=2.0)])
    with pytest.raises(ValueError, match="at least one"):
        merge_scores([])
