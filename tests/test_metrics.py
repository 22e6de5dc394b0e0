"""stfuse.metrics against values worked out by hand."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from skimage.metrics import structural_similarity

from stfuse.metrics import (
    METRICS,
    days_to_nearest_valid,
    mae,
    psnr,
    rmse,
    sam,
    score,
    ssim_hidden,
    transplant_masks,
    valid_mask,
)

T0 = np.datetime64("2021-04-03T10:36:12", "ns")


def dates(days) -> np.ndarray:
    return T0 + (np.asarray(days, dtype=np.float64) * 86_400e9).astype("timedelta64[ns]")


# -------------------------------------------------------------------------------------------
# element-wise metrics
# -------------------------------------------------------------------------------------------

TRUTH = np.array([1.0, 2.0, 3.0, 4.0])
PRED = np.array([1.0, 3.0, 5.0, 4.0])  # errors 0, 1, 2, 0


def test_mae_rmse_psnr_by_hand():
    assert mae(TRUTH, PRED) == pytest.approx(0.75)  # (0 + 1 + 2 + 0) / 4
    assert rmse(TRUTH, PRED) == pytest.approx(np.sqrt(1.25))  # sqrt((0 + 1 + 4 + 0) / 4) = 1.1180
    # 10 log10(10^2 / 1.25) = 10 log10(80) = 19.0309 dB
    assert psnr(TRUTH, PRED, data_range=10.0) == pytest.approx(19.030899869919434)


def test_metrics_use_the_mask_and_skip_nan():
    mask = np.array([False, True, True, False])
    assert mae(TRUTH, PRED, mask) == pytest.approx(1.5)  # (1 + 2) / 2
    assert rmse(TRUTH, PRED, mask) == pytest.approx(np.sqrt(2.5))  # sqrt((1 + 4) / 2)
    pred = PRED.copy()
    pred[2] = np.nan  # left out: only errors 0, 1, 0 remain
    assert mae(TRUTH, pred) == pytest.approx(1 / 3)
    assert np.isnan(mae(TRUTH, PRED, np.zeros(4, bool)))


def test_psnr_of_identical_arrays_is_infinite_and_range_is_required():
    assert psnr(TRUTH, TRUTH, data_range=1.0) == np.inf
    with pytest.raises(ValueError, match="data_range"):
        psnr(TRUTH, PRED, data_range=0.0)


def test_sam_parallel_orthogonal_and_mean():
    assert sam(np.array([1.0, 2.0, 3.0]), np.array([2.0, 4.0, 6.0]), axis=-1) == pytest.approx(0.0, abs=1e-6)
    assert sam(np.array([1.0, 0.0]), np.array([0.0, 3.0]), axis=-1) == pytest.approx(90.0)
    assert sam(np.array([1.0, 0.0]), np.array([1.0, 1.0]), axis=-1) == pytest.approx(45.0)
    # two pixels in a (B, H, W) image: 0 and 90 degrees -> mean 45
    truth = np.array([[[1.0, 1.0]], [[0.0, 0.0]]])  # (2 bands, 1, 2): vectors (1,0), (1,0)
    pred = np.array([[[5.0, 0.0]], [[0.0, 2.0]]])  # (5,0) parallel, (0,2) orthogonal
    assert sam(truth, pred) == pytest.approx(45.0)
    assert sam(truth, pred, mask=np.array([[True, False]])) == pytest.approx(0.0, abs=1e-6)


# -------------------------------------------------------------------------------------------
# SSIM
# -------------------------------------------------------------------------------------------

def texture(seed=0, shape=(32, 32)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.uniform(0.0, 1.0, shape)


def test_ssim_identical_is_one_and_perturbed_is_less():
    img = texture()
    hidden = np.zeros(img.shape, bool)
    hidden[10:16, 12:20] = True
    assert ssim_hidden(img, img, hidden, data_range=1.0) == pytest.approx(1.0)
    noisy = img + 0.2 * np.random.default_rng(1).standard_normal(img.shape)
    assert ssim_hidden(img, noisy, hidden, data_range=1.0) < 0.9


def test_ssim_hidden_is_the_skimage_map_of_the_composite_averaged_on_hidden():
    img, pred = texture(0), texture(1)
    hidden = np.zeros(img.shape, bool)
    hidden[4:9, 20:27] = True
    composite = np.where(hidden, pred, img)
    smap = structural_similarity(img, composite, data_range=2.0, full=True)[1]
    assert ssim_hidden(img, pred, hidden, data_range=2.0) == pytest.approx(smap[hidden].mean())


def test_ssim_hidden_ignores_pixels_far_from_the_hidden_region():
    img, pred = texture(0), texture(1)
    hidden = np.zeros(img.shape, bool)
    hidden[3:8, 3:8] = True
    base = ssim_hidden(img, pred, hidden, data_range=1.0)
    far = np.zeros(img.shape, bool)
    far[20:, 20:] = True  # > 7 pixels away: outside every window that touches a hidden pixel
    pred2 = np.where(far, 0.0, pred)  # prediction outside hidden never matters
    truth2 = np.where(far, np.nan, img)  # truth far away unknown: no influence either
    truth2[25, 25] = 0.5
    assert ssim_hidden(img, pred2, hidden, data_range=1.0) == base
    assert ssim_hidden(truth2, pred, hidden, data_range=1.0) == pytest.approx(base, abs=1e-12)


def test_ssim_hidden_unfilled_pixels_are_not_averaged():
    img = texture()
    hidden = np.zeros(img.shape, bool)
    hidden[10:20, 10:20] = True
    pred = img.copy()
    pred[12, 12] = np.nan
    value = ssim_hidden(img, pred, hidden, data_range=1.0)
    assert np.isfinite(value) and value < 1.0
    assert np.isnan(ssim_hidden(img, img, np.zeros(img.shape, bool), data_range=1.0))


# -------------------------------------------------------------------------------------------
# gaps
# -------------------------------------------------------------------------------------------

def test_days_to_nearest_valid_by_hand():
    times = dates([0, 1, 5, 6, 20])
    valid = np.zeros((5, 1, 3), bool)
    valid[:, 0, 0] = [True, False, False, True, False]
    valid[:, 0, 1] = [False, False, True, False, False]
    # pixel 2 never valid
    out = days_to_nearest_valid(valid, times)
    np.testing.assert_array_equal(out[:, 0, 0], [0, 1, 1, 0, 14])  # day 5 -> day 6; day 20 -> 6
    np.testing.assert_array_equal(out[:, 0, 1], [5, 4, 0, 1, 15])
    assert np.isinf(out[:, 0, 2]).all()


def test_valid_mask_needs_every_band():
    obs = np.ones((2, 3, 1, 2))
    obs[1, 2, 0, 1] = np.nan
    np.testing.assert_array_equal(valid_mask(obs), [[[True, True]], [[True, False]]])


def cloudy_valid(seed=0, t=12, h=16, w=16):
    rng = np.random.default_rng(seed)
    frac = rng.uniform(0.0, 0.9, t)
    return rng.random((t, h, w)) >= frac[:, None, None]


def test_transplant_masks_deterministic_and_never_hides_invalid():
    valid = cloudy_valid()
    eval_dates = [1, 4, 7]
    a = transplant_masks(valid, eval_dates, seed=42)
    b = transplant_masks(valid, eval_dates, seed=42)
    np.testing.assert_array_equal(a, b)
    assert not (a & ~valid).any()
    other = np.setdiff1d(np.arange(valid.shape[0]), eval_dates)
    assert not a[other].any()
    cloud = 1.0 - valid.mean(axis=(1, 2))
    for e in eval_dates:
        assert a[e].any()
        # the hidden pixels are exactly one donor's clouds on the valid pixels of e
        donors = [d for d in range(valid.shape[0]) if d != e and 0.05 <= cloud[d] <= 0.7
                  and np.array_equal(a[e], ~valid[d] & valid[e])]
        assert donors
    seeds = {transplant_masks(valid, eval_dates, seed=s).tobytes() for s in range(10)}
    assert len(seeds) > 1  # the seed matters


def test_transplant_masks_needs_a_donor():
    valid = np.ones((3, 4, 4), bool)  # no clouds anywhere: no donor within [0.05, 0.7]
    with pytest.raises(ValueError, match="donor"):
        transplant_masks(valid, [0], seed=0)


# -------------------------------------------------------------------------------------------
# score table
# -------------------------------------------------------------------------------------------

def scored_case(seed=0):
    rng = np.random.default_rng(seed)
    t, b, h, w = 6, 3, 16, 18
    times = dates(np.cumsum(rng.uniform(2.0, 12.0, t)))
    truth = rng.uniform(0.0, 0.5, (t, b, h, w))
    valid = rng.random((t, h, w)) >= rng.uniform(0.1, 0.8, t)[:, None, None]
    truth = np.where(valid[:, None], truth, np.nan)
    hidden = transplant_masks(valid, [1, 3, 4], seed=7, min_fraction=0.0, max_fraction=1.0)
    pred = truth + rng.normal(0.0, 0.05, truth.shape)
    pred[1, :, 0, 0] = np.nan  # an unfilled pixel (hidden or not)
    hidden[1, 0, 0] = valid[1, 0, 0] = True
    truth[1, :, 0, 0] = 0.2
    gap = days_to_nearest_valid(valid & ~hidden, times)
    cloud = 1.0 - valid.mean(axis=(1, 2))
    return truth, pred, hidden, gap, cloud


def test_score_columns_and_all_rows_equal_the_unbinned_metrics():
    truth, pred, hidden, gap, cloud = scored_case()
    bands = ["B02", "B04", "B08"]
    df = score(truth, pred, hidden, bands, data_range=1.0, gap_days=gap, cloud_fraction=cloud)
    assert list(df.columns) == ["band", "metric", "gap_bin", "cloud_bin", "value", "n_pixels", "n_unfilled"]
    assert set(df.metric) == set(METRICS)
    assert set(df.band) == set(bands) | {"all"}
    assert set(df.gap_bin) == {"all", "[0,5)", "[5,10)", "[10,20)", "[20,40)", "[40,inf]"}
    assert set(df.cloud_bin) == {"all", "[0,0.25)", "[0.25,0.5)", "[0.5,0.75)", "[0.75,1]"}
    assert set(df[df.metric == "sam"].band) == {"all"}
    assert set(df[df.metric == "ssim"].gap_bin) == {"all"}
    assert not df.duplicated(["band", "metric", "gap_bin", "cloud_bin"]).any()

    top = df[(df.gap_bin == "all") & (df.cloud_bin == "all")].set_index(["band", "metric"]).value
    ev = hidden & np.isfinite(truth).all(axis=1) & np.isfinite(pred).all(axis=1)
    ev4 = np.broadcast_to(ev[:, None], truth.shape)
    assert top["all", "mae"] == pytest.approx(mae(truth, pred, ev4))
    assert top["all", "rmse"] == pytest.approx(rmse(truth, pred, ev4))
    assert top["all", "psnr"] == pytest.approx(psnr(truth, pred, 1.0, ev4))
    assert top["all", "sam"] == pytest.approx(sam(truth, pred, ev))
    for b, name in enumerate(bands):
        assert top[name, "mae"] == pytest.approx(mae(truth[:, b], pred[:, b], ev))
        assert top[name, "rmse"] == pytest.approx(rmse(truth[:, b], pred[:, b], ev))
        assert top[name, "psnr"] == pytest.approx(psnr(truth[:, b], pred[:, b], 1.0, ev))
        n = ev.sum(axis=(1, 2))
        per_date = [ssim_hidden(truth[d, b], pred[d, b], hidden[d], 1.0) if n[d] else 0.0
                    for d in range(truth.shape[0])]
        assert top[name, "ssim"] == pytest.approx(np.sum(np.multiply(per_date, n)) / n.sum())
    assert (df[(df.gap_bin == "all") & (df.cloud_bin == "all")].n_pixels == ev.sum()).all()
    assert (df[(df.gap_bin == "all") & (df.cloud_bin == "all")].n_unfilled == 1).all()


def test_score_bins_partition_the_pixels():
    truth, pred, hidden, gap, cloud = scored_case()
    df = score(truth, pred, hidden, ["a", "b", "c"], gap_days=gap, cloud_fraction=cloud)
    mae_all = df[(df.band == "all") & (df.metric == "mae")]
    total = mae_all[(mae_all.gap_bin == "all") & (mae_all.cloud_bin == "all")].n_pixels.item()
    by_gap = mae_all[(mae_all.gap_bin != "all") & (mae_all.cloud_bin == "all")]
    by_cloud = mae_all[(mae_all.gap_bin == "all") & (mae_all.cloud_bin != "all")]
    both = mae_all[(mae_all.gap_bin != "all") & (mae_all.cloud_bin != "all")]
    assert by_gap.n_pixels.sum() == by_cloud.n_pixels.sum() == both.n_pixels.sum() == total
    # the pixel-weighted mean of the per-bin MAEs is the overall MAE
    filled = by_gap[by_gap.n_pixels > 0]
    overall = mae_all[(mae_all.gap_bin == "all") & (mae_all.cloud_bin == "all")].value.item()
    assert np.average(filled.value, weights=filled.n_pixels) == pytest.approx(overall)
    assert by_gap[by_gap.n_pixels == 0].value.isna().all()


def test_score_gap_bins_by_hand():
    # 1 date, 1 band, 1 x 3 pixels, all hidden; gaps 2, 7 and 50 days; errors 0.1, 0.2, 0.4
    truth = np.zeros((1, 1, 1, 3))
    pred = np.array([0.1, 0.2, 0.4]).reshape(1, 1, 1, 3)
    hidden = np.ones((1, 1, 3), bool)
    gap = np.array([2.0, 7.0, 50.0]).reshape(1, 1, 3)
    df = score(truth, pred, hidden, ["B04"], gap_days=gap)
    mae_b = df[(df.band == "B04") & (df.metric == "mae")].set_index("gap_bin")
    assert set(df.cloud_bin) == {"all"}
    assert mae_b.value["[0,5)"] == pytest.approx(0.1)
    assert mae_b.value["[5,10)"] == pytest.approx(0.2)
    assert mae_b.value["[40,inf]"] == pytest.approx(0.4)
    assert mae_b.value["all"] == pytest.approx(0.7 / 3)
    assert mae_b.n_pixels["[10,20)"] == 0


def test_score_without_bins_has_only_all_rows():
    truth, pred, hidden, _, _ = scored_case()
    df = score(truth, pred, hidden, ["a", "b", "c"])
    assert set(df.gap_bin) == {"all"} and set(df.cloud_bin) == {"all"}
    assert isinstance(df, pd.DataFrame)
    # 3 bands x (mae, rmse, psnr, ssim) + all x (mae, rmse, psnr, sam, ssim)
    assert len(df) == 3 * 4 + 5


def test_clear_and_cloud_fractions_count_only_cells_observed_at_least_once():
    from stfuse.metrics import clear_fraction

    # a footprint that covers the left half of the region: the right half is never observed
    valid = np.zeros((3, 4, 8), bool)
    valid[0, :, :4] = True          # fully clear inside the footprint
    valid[1, :2, :4] = True         # half cloudy
    observed = np.zeros((4, 8), bool)
    observed[:, :4] = True
    np.testing.assert_allclose(clear_fraction(valid, observed), [1.0, 0.5, 0.0])
    np.testing.assert_allclose(clear_fraction(valid), [0.5, 0.25, 0.0])  # None: every cell
    np.testing.assert_array_equal(clear_fraction(valid, np.zeros((4, 8), bool)), [0, 0, 0])
    # date 1 is a donor at 50 % cloud over the footprint (it looked 75 % cloudy over the region)
    hidden = transplant_masks(valid, [0], seed=0, min_fraction=0.4, max_fraction=0.6, observed=observed)
    np.testing.assert_array_equal(hidden[0], valid[0] & ~valid[1])
    with pytest.raises(ValueError, match="donor"):
        transplant_masks(valid, [0], seed=0, min_fraction=0.4, max_fraction=0.6)
