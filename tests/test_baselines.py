"""stfuse.baselines on tiny series with answers worked out by hand."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pytest

from stfuse import baselines as bl
from stfuse.baselines import (
    BASELINES,
    days_since_start,
    fit_sar_regression,
    harmonic,
    linear_in_time,
    nearest_in_time,
    run_baseline,
    sar_regression,
    whittaker,
    whittaker_smooth,
    whittaker_tuning,
)

T0 = np.datetime64("2021-04-03T10:36:12", "ns")
NAN = np.nan


def dates(days) -> np.ndarray:
    """datetime64[ns] at T0 + the given (possibly fractional) days."""
    return T0 + (np.asarray(days, dtype=np.float64) * 86_400e9).astype("timedelta64[ns]")


def cube(*series) -> np.ndarray:
    """(T, 1, 1, N) float32 from N series of length T (one band, one row, N pixels)."""
    return np.stack([np.asarray(s, dtype=np.float32) for s in series], axis=-1)[:, None, None, :]


def random_case(seed=0, t=9, b=2, h=5, w=6, gap_rate=0.4):
    rng = np.random.default_rng(seed)
    days = np.cumsum(rng.uniform(1.0, 12.0, t))
    obs = rng.uniform(0.0, 0.5, (t, b, h, w)).astype(np.float32)
    obs[rng.random(obs.shape) < gap_rate] = np.nan
    obs[:, :, 0, 0] = np.nan  # one pixel never observed
    sar = rng.normal(-15.0, 3.0, (t, 2, h, w)).astype(np.float32)
    sar[2] = np.nan  # one date without SAR
    return obs, dates(days), sar


# -------------------------------------------------------------------------------------------
# times
# -------------------------------------------------------------------------------------------

def test_days_since_start_accepts_numpy_and_tz_aware_pandas():
    d = days_since_start(dates([0, 1.5, 10]))
    np.testing.assert_allclose(d, [0, 1.5, 10])
    idx = pd.DatetimeIndex(["2021-01-01T00:00Z", "2021-01-03T12:00Z", "2021-01-04T00:00Z"])
    np.testing.assert_allclose(days_since_start(idx), [0, 2.5, 3])
    np.testing.assert_allclose(days_since_start(idx.tz_convert("Europe/Berlin")), [0, 2.5, 3])


@pytest.mark.parametrize("bad", [dates([0, 2, 2]), dates([0, 3, 1])])
def test_times_must_increase(bad):
    obs = np.zeros((3, 1, 1, 1), np.float32)
    with pytest.raises(ValueError, match="increasing"):
        linear_in_time(obs, bad)


def test_times_length_must_match():
    with pytest.raises(ValueError, match="dates"):
        linear_in_time(np.zeros((3, 1, 1, 1), np.float32), dates([0, 1]))


# -------------------------------------------------------------------------------------------
# nearest
# -------------------------------------------------------------------------------------------

def test_nearest_picks_the_nearer_date_in_real_time():
    times = dates([0, 2, 3, 9, 10])
    # valid on days 0, 3, 10: day 2 is 2 d from day 0 and 1 d from day 3 -> 30;
    # day 9 is 6 d from day 3 and 1 d from day 10 -> 50
    obs = cube([10, NAN, 30, NAN, 50])
    out = nearest_in_time(obs, times)
    np.testing.assert_array_equal(out[:, 0, 0, 0], [10, 30, 30, 50, 50])


def test_nearest_takes_the_earlier_date_on_ties_and_extends_the_ends():
    times = dates([0, 4, 8, 9, 14])
    # day 4: 4 d to day 0 and 4 d to day 8 -> the earlier (1); day 14: only day 9 before (3)
    a = [1, NAN, 2, 3, NAN]
    # leading gaps take the first valid value
    b = [NAN, NAN, 7, NAN, NAN]
    out = nearest_in_time(cube(a, b), times)
    np.testing.assert_array_equal(out[:, 0, 0, 0], [1, 1, 2, 3, 3])
    np.testing.assert_array_equal(out[:, 0, 0, 1], [7, 7, 7, 7, 7])


# -------------------------------------------------------------------------------------------
# linear
# -------------------------------------------------------------------------------------------

def test_linear_fills_a_ramp_exactly_with_irregular_steps():
    days = np.array([0.0, 1.0, 3.5, 4.0, 11.0, 12.5, 20.0])
    ramp = 0.25 + 0.125 * days  # exact in binary floating point
    obs = cube(np.where([1, 0, 0, 1, 0, 1, 1], ramp, np.nan))
    out = linear_in_time(obs, dates(days))
    np.testing.assert_allclose(out[:, 0, 0, 0], ramp, rtol=0, atol=1e-6)


def test_linear_hand_example_and_constant_extension():
    times = dates([0, 1, 4, 5, 6])
    # interior gap on day 1 between day 0 (0) and day 4 (8): 0 + 8 * 1/4 = 2;
    # gap after the last valid date (day 5, 10): constant 10; gap before the first: constant
    out = linear_in_time(cube([0, NAN, 8, 10, NAN], [NAN, NAN, 4, 6, 6]), times)
    np.testing.assert_array_equal(out[:, 0, 0, 0], [0, 2, 8, 10, 10])
    np.testing.assert_array_equal(out[:, 0, 0, 1], [4, 4, 4, 6, 6])


def test_never_observed_pixel_stays_nan_and_single_value_is_carried():
    times = dates([0, 1, 2])
    obs = cube([NAN, NAN, NAN], [NAN, 5, NAN])
    for name in ("nearest", "linear", "whittaker", "harmonic"):
        out = run_baseline(name, obs, times)
        assert np.isnan(out[:, 0, 0, 0]).all(), name
        np.testing.assert_array_equal(out[:, 0, 0, 1], [5, 5, 5], err_msg=name)


# -------------------------------------------------------------------------------------------
# Whittaker
# -------------------------------------------------------------------------------------------

def test_whittaker_penalty_is_classic_second_differences_on_a_daily_grid():
    p0, p1, p2 = bl._penalty_diagonals(np.arange(8.0))
    d = np.diff(np.eye(8), 2, axis=0)
    classic = d.T @ d
    np.testing.assert_allclose(p0, np.diagonal(classic))
    np.testing.assert_allclose(p1[:-1], np.diagonal(classic, 1))
    np.testing.assert_allclose(p2[:-2], np.diagonal(classic, 2))


def test_whittaker_matches_a_dense_solve():
    rng = np.random.default_rng(3)
    days = np.cumsum(rng.uniform(0.5, 15.0, 25))
    y = rng.normal(size=(25, 6))
    y[rng.random(y.shape) < 0.4] = np.nan
    lam = 37.0
    z = whittaker_smooth(y, days, lam=lam)
    p0, p1, p2 = bl._penalty_diagonals(days)
    p = np.diag(p0) + np.diag(p1[:-1], 1) + np.diag(p1[:-1], -1) + np.diag(p2[:-2], 2) + np.diag(p2[:-2], -2)
    for j in range(y.shape[1]):
        wj = np.isfinite(y[:, j]).astype(float)
        expect = np.linalg.solve(np.diag(wj) + lam * p, wj * np.nan_to_num(y[:, j]))
        np.testing.assert_allclose(z[:, j], expect, rtol=1e-10, atol=1e-10)


def test_whittaker_huge_lambda_returns_a_ramp_with_irregular_steps():
    days = np.array([0.0, 2.0, 3.0, 9.0, 10.0, 17.0, 30.0])
    ramp = 1.0 - 0.02 * days
    holes = np.array([0, 1, 0, 1, 0, 0, 1], bool)  # incl. a gap at the end (extrapolation)
    obs = cube(np.where(holes, np.nan, ramp))
    out = whittaker(obs, dates(days), lam=1e6)
    np.testing.assert_allclose(out[:, 0, 0, 0], ramp, atol=1e-6)
    # the smoother itself (not only the gaps) reproduces the ramp: linear is in the null space
    z = whittaker_smooth(np.where(holes, np.nan, ramp), days, lam=1e6)
    np.testing.assert_allclose(z, ramp, atol=1e-9)


def test_whittaker_huge_lambda_flattens_to_the_least_squares_line():
    days = np.array([0.0, 1.0, 2.0, 3.0])
    y = np.array([0.0, 1.0, 0.0, 1.0])  # least-squares line: 0.2 + 0.2 t
    z = whittaker_smooth(y, days, lam=1e9)
    np.testing.assert_allclose(z, 0.2 + 0.2 * days, atol=1e-6)


def test_whittaker_tiny_lambda_interpolates():
    rng = np.random.default_rng(5)
    days = np.cumsum(rng.uniform(1.0, 10.0, 12))
    y = rng.normal(size=12)
    np.testing.assert_allclose(whittaker_smooth(y, days, lam=1e-9), y, atol=1e-6)


def test_whittaker_tiny_lambda_fills_a_quadratic_exactly_on_a_daily_grid():
    # y = t^2 on days 0..4, day 2 missing. With lam -> 0 the data are kept and z2 minimises
    # (z2 - 2)^2 + (10 - 2 z2)^2 + (z2 - 2)^2 -> 4 (z2 - 2) - 4 (10 - 2 z2) = 0 -> z2 = 4 = 2^2.
    y = np.array([0.0, 1.0, NAN, 9.0, 16.0])
    z = whittaker_smooth(y, np.arange(5.0), lam=1e-8)
    np.testing.assert_allclose(z, [0, 1, 4, 9, 16], atol=1e-5)


def test_whittaker_tiny_lambda_fills_a_quadratic_exactly_with_irregular_steps():
    # Second divided differences of a quadratic are constant; with the 2 (h1 + h2) weights
    # the derivative of the penalty w.r.t. a single interior gap value vanishes there,
    # whatever the spacing, so the gap gets the quadratic's value: 3^2 = 9 on day 3.
    days = np.array([0.0, 1.0, 3.0, 4.0, 7.0, 8.0])
    y = days**2
    obs = cube(np.where(days == 3.0, np.nan, y))
    out = whittaker(obs, dates(days), lam=1e-8)
    np.testing.assert_allclose(out[:, 0, 0, 0], y, atol=1e-4)


def test_whittaker_rejects_negative_lambda():
    with pytest.raises(ValueError, match="lam"):
        whittaker(np.zeros((3, 1, 1, 1), np.float32), dates([0, 1, 2]), lam=-1.0)


# -------------------------------------------------------------------------------------------
# SAR regression
# -------------------------------------------------------------------------------------------

A, B_VV, C_VH = 0.31, 0.012, -0.0075  # optical = a + b VV + c VH


def sar_case(seed=1, t=8, h=6, w=7):
    rng = np.random.default_rng(seed)
    vv = rng.uniform(-20.0, -5.0, (t, h, w))
    vh = rng.uniform(-28.0, -12.0, (t, h, w))
    sar = np.stack([vv, vh], axis=1).astype(np.float32)  # band order: VV, VH
    s64 = sar.astype(np.float64)
    truth = A + B_VV * s64[:, 0] + C_VH * s64[:, 1]
    obs = np.stack([truth, 2 * truth], axis=1).astype(np.float32)  # band 1: coefficients x 2
    gaps = rng.random((t, h, w)) < 0.3
    obs[np.broadcast_to(gaps[:, None], obs.shape)] = np.nan
    return obs, sar, truth, gaps


def test_fit_sar_regression_recovers_the_coefficients():
    obs, sar, _, _ = sar_case()
    coef = fit_sar_regression(obs, sar)
    np.testing.assert_allclose(coef[0], [A, B_VV, C_VH], atol=1e-6)
    np.testing.assert_allclose(coef[1], [2 * A, 2 * B_VV, 2 * C_VH], atol=1e-6)


def test_sar_regression_fills_gaps_with_the_model_and_falls_back_to_linear():
    obs, sar, truth, gaps = sar_case()
    t = obs.shape[0]
    no_sar = 3
    sar[no_sar] = np.nan
    sar[5, 1, 2, 2] = np.nan  # only VH missing at one pixel: no SAR there either
    times = dates(np.arange(t) * 6.0)
    out = sar_regression(obs, times, sar)
    linear = linear_in_time(obs, times)
    has_sar = np.isfinite(sar).all(axis=1)
    fill_sar = gaps & has_sar
    np.testing.assert_allclose(out[:, 0][fill_sar], truth[fill_sar], atol=2e-6)
    np.testing.assert_allclose(out[:, 1][fill_sar], 2 * truth[fill_sar], atol=4e-6)
    fall = gaps & ~has_sar
    assert fall[no_sar].any() and fall.any()
    np.testing.assert_array_equal(out[:, :, :, :][np.broadcast_to(fall[:, None], out.shape)],
                                  linear[np.broadcast_to(fall[:, None], out.shape)])


def test_sar_regression_per_pixel_recovers_pixel_coefficients():
    rng = np.random.default_rng(2)
    t, h, w = 30, 4, 5
    sar = rng.normal(-15.0, 4.0, (t, 2, h, w)).astype(np.float32)
    a = rng.uniform(0.1, 0.4, (h, w))  # intercept differs per pixel
    truth = a + B_VV * sar[:, 0].astype(np.float64) + C_VH * sar[:, 1].astype(np.float64)
    obs = truth[:, None].astype(np.float32)
    gaps = rng.random((t, h, w)) < 0.25
    gaps[:, 0, 0] = np.arange(t) >= 5  # 5 samples: too few for its own fit -> pooled fit
    obs[:, 0][gaps] = np.nan
    times = dates(np.arange(t) * 5.0)
    out = sar_regression(obs, times, sar, per_pixel=True, min_samples=10)
    own = gaps.copy()
    own[:, 0, 0] = False
    np.testing.assert_allclose(out[:, 0][own], truth[own], atol=1e-5)
    pooled = sar_regression(obs, times, sar)
    np.testing.assert_array_equal(out[:, 0, 0, 0], pooled[:, 0, 0, 0])
    assert np.abs(pooled[:, 0][own] - truth[own]).max() > 1e-3  # the pooled fit cannot be exact


def test_sar_regression_fit_merges_from_block_statistics():
    """The pooled fit from per-block sufficient statistics (merged) equals the whole-region fit up to float
    rounding (relative 1e-12: the merge is exact algebra, only the summation order differs), and a block
    filled with the region's coefficients equals the same cells of the region filled at once."""
    obs, sar, _, _ = sar_case(seed=4, t=9, h=13, w=11)
    obs[:, 0] += np.float32(0.01) * np.random.default_rng(5).standard_normal(obs[:, 0].shape).astype(np.float32)
    whole = fit_sar_regression(obs, sar)
    cuts = [(0, 5), (5, 6), (6, 13)], [(0, 4), (4, 11)]
    parts = [bl.sar_regression_stats(obs[..., r0:r1, c0:c1], sar[..., r0:r1, c0:c1])
             for r0, r1 in cuts[0] for c0, c1 in cuts[1]]
    parts.insert(2, bl.sar_regression_stats(obs[..., :0, :], sar[..., :0, :]))  # an empty block
    merged = bl.merge_sar_stats(parts)
    np.testing.assert_array_equal(merged.n, bl.sar_regression_stats(obs, sar).n)
    coef = bl.solve_sar_regression(merged)
    np.testing.assert_allclose(coef, whole, rtol=1e-12, atol=0)
    np.testing.assert_array_equal(bl.solve_sar_regression(bl.merge_sar_stats([bl.sar_regression_stats(obs, sar)])),
                                  whole)  # one part: bit for bit
    times = dates(np.arange(obs.shape[0]) * 6.0)
    full = sar_regression(obs, times, sar)
    np.testing.assert_array_equal(sar_regression(obs, times, sar, coef=whole), full)
    block = sar_regression(obs[..., 6:13, 4:11], times, sar[..., 6:13, 4:11], coef=whole)
    np.testing.assert_array_equal(block, full[..., 6:13, 4:11])
    with pytest.raises(ValueError, match="coef"):
        sar_regression(obs, times, sar, coef=whole[:, :2])


def test_sar_regression_needs_sar():
    obs, times, _ = random_case()
    with pytest.raises(ValueError, match="sar"):
        sar_regression(obs, times, None)
    with pytest.raises(ValueError, match="sar"):
        sar_regression(obs, times, np.zeros((2, 2, 1, 1), np.float32))


# -------------------------------------------------------------------------------------------
# harmonic (HANTS)
# -------------------------------------------------------------------------------------------

def seasonal(days, phase=0.3):
    """Mean + yearly + half-yearly harmonic: what harmonic() with n = 2 fits exactly."""
    w = 2 * np.pi * np.asarray(days) / 365.25
    return 0.3 + 0.1 * np.cos(w + phase) + 0.04 * np.sin(2 * w) - 0.02 * np.cos(2 * w)


def seasonal_case(seed=0, t=40, n_px=6, span=600.0, gap_rate=0.5):
    rng = np.random.default_rng(seed)
    days = np.concatenate([[0.0], np.sort(rng.uniform(1.0, span, t - 1))])
    truth = np.stack([seasonal(days, phase=0.5 * p) for p in range(n_px)], axis=-1)[:, None, None, :]
    gaps = rng.random(truth.shape) < gap_rate
    return days, truth, gaps


def test_harmonic_recovers_a_pure_harmonic_signal_with_gaps():
    days, truth, gaps = seasonal_case()
    out = harmonic(np.where(gaps, np.nan, truth), dates(days))
    assert gaps.sum() > 50
    assert np.abs(out - truth)[gaps].mean() < 1e-6
    # a signal with a third harmonic is not recovered by n = 2, but is by n = 3
    third = truth + 0.03 * np.cos(6 * np.pi * days / 365.25)[:, None, None, None]
    obs = np.where(gaps, np.nan, third)
    assert np.abs(harmonic(obs, dates(days)) - third)[gaps].mean() > 1e-3
    assert np.abs(harmonic(obs, dates(days), n_harmonics=3) - third)[gaps].mean() < 1e-6


@pytest.mark.parametrize("reject, shift", [("low", -0.25), ("high", 0.25), ("both", 0.25), ("both", -0.25)])
def test_harmonic_rejects_outliers_on_its_side(reject, shift):
    days, truth, gaps = seasonal_case(seed=1, t=50)
    rng = np.random.default_rng(2)
    outliers = ~gaps & (rng.random(truth.shape) < 0.12)          # undetected clouds / shadows
    assert outliers.sum() >= 10
    obs = np.where(gaps, np.nan, truth + np.where(outliers, shift, 0.0))
    out = harmonic(obs, dates(days), reject=reject)
    assert np.abs(out - truth)[gaps].max() < 1e-6
    np.testing.assert_array_equal(out[~gaps], obs[~gaps])       # observed values kept, outliers too
    kept = harmonic(obs, dates(days), reject="none")
    assert np.abs(kept - truth)[gaps].mean() > 5e-3            # without rejection the fit is pulled
    wrong = {"low": "high", "high": "low"}.get(reject)
    if wrong:                                                 # rejecting on the other side does not help
        assert np.abs(harmonic(obs, dates(days), reject=wrong) - truth)[gaps].mean() > 5e-3


def test_harmonic_rejection_keeps_at_least_2n_plus_2_values():
    days = np.arange(0.0, 360.0, 30.0)                       # 12 dates
    y = seasonal(days)
    y[[1, 3, 5, 7, 9, 11]] -= 0.3                             # half the series is "cloud": cannot all go
    out = harmonic(cube(np.where(np.arange(12) == 6, np.nan, y)), dates(days))
    assert np.isfinite(out).all()


def test_harmonic_falls_back_with_too_few_observations():
    days = np.array([0.0, 20.0, 45.0, 80.0, 130.0, 200.0, 290.0])
    full = seasonal(days)
    five = np.where([1, 1, 0, 1, 1, 0, 1], full, np.nan)        # 5 < 2 n + 2 = 6: linear in time
    one = np.where([0, 0, 0, 1, 0, 0, 0], full, np.nan)
    obs = cube(five, one, np.full(7, np.nan))
    out = harmonic(obs, dates(days))
    np.testing.assert_array_equal(out[:, 0, 0, 0], linear_in_time(obs, dates(days))[:, 0, 0, 0])
    np.testing.assert_array_equal(out[:, 0, 0, 1], np.full(7, np.float32(full[3])))
    assert np.isnan(out[:, 0, 0, 2]).all()
    six = np.where([1, 1, 0, 1, 1, 1, 1], full, np.nan)        # 6 = 2 n + 2: the harmonic fit
    assert abs(harmonic(cube(six), dates(days))[2, 0, 0, 0] - full[2]) < 1e-6


def test_harmonic_ill_posed_fit_falls_back_to_linear():
    days = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 200.0])  # observed on 7 days within 3: no yearly cycle
    y = np.where(np.arange(8) < 7, 0.2 + 0.01 * np.arange(8), np.nan)
    out = harmonic(cube(y), dates(days))
    np.testing.assert_array_equal(out, linear_in_time(cube(y), dates(days)))


def test_harmonic_rejects_bad_parameters():
    obs, times, _ = random_case()
    with pytest.raises(ValueError, match="reject"):
        harmonic(obs, times, reject="upper")
    with pytest.raises(ValueError, match="period"):
        harmonic(obs, times, period=0.0)


# -------------------------------------------------------------------------------------------
# Whittaker's lambda by leave-out
# -------------------------------------------------------------------------------------------

def test_tuning_prefers_small_lambda_for_fast_signals_and_large_for_noise():
    rng = np.random.default_rng(0)
    days = np.arange(0.0, 300.0, 5.0)
    fast = 0.3 + 0.1 * np.sin(2 * np.pi * days / 40.0)          # a 40-day cycle: little smoothing
    noise = 0.3 + 0.02 * rng.standard_normal((days.size, 1, 12, 12))   # flat + noise: all the smoothing
    grid = bl.WHITTAKER_LAMBDA_GRID
    lam_fast, mse = bl.choose_whittaker_lambda(*whittaker_tuning(
        np.broadcast_to(fast[:, None, None, None], (days.size, 1, 12, 12)).copy(), dates(days)))
    lam_noise, _ = bl.choose_whittaker_lambda(*whittaker_tuning(noise, dates(days)))
    assert lam_fast == grid[0] and lam_noise == grid[-1]
    assert mse.shape == (len(grid),) and mse[0] < mse[4] < mse[-1]


def test_tuning_reads_only_finite_values_and_depends_on_the_cell_position():
    obs, times, _ = random_case(seed=3, t=20, h=16, w=16, gap_rate=0.3)
    sse, n = whittaker_tuning(obs, times)
    assert (n > 0).all() and (n == n[0]).all() and np.isfinite(sse).all()
    # the window of a larger region at its origin gives the region's sums for those cells
    top, bottom = whittaker_tuning(obs[:, :, :7], times), whittaker_tuning(obs[:, :, 7:], times, origin=(7, 0))
    np.testing.assert_array_equal(top[1] + bottom[1], n)
    np.testing.assert_allclose(top[0] + bottom[0], sse, rtol=1e-12)
    assert not np.array_equal(whittaker_tuning(obs[:, :, 7:], times)[1], bottom[1]) or \
        not np.allclose(whittaker_tuning(obs[:, :, 7:], times)[0], bottom[0])


def test_choose_whittaker_lambda_ties_go_to_the_smaller():
    grid = (10.0, 100.0, 1000.0)
    assert bl.choose_whittaker_lambda([3.0, 2.0, 2.0], [1, 1, 1], grid)[0] == 100.0
    assert bl.choose_whittaker_lambda([3.0, 2.0 * (1 + 1e-13), 2.0], [1, 1, 1], grid)[0] == 100.0
    assert bl.choose_whittaker_lambda([3.0, 2.0, 1.0], [1, 1, 1], grid)[0] == 1000.0
    lam, mse = bl.choose_whittaker_lambda([0.0, 0.0, 0.0], [0, 0, 0], grid)
    assert lam == bl.DEFAULT_WHITTAKER_LAMBDA and np.isnan(mse).all()


# -------------------------------------------------------------------------------------------
# common contract
# -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(BASELINES))
def test_valid_pixels_unchanged_and_gaps_filled(name):
    obs, times, sar = random_case()
    out = run_baseline(name, obs, times, sar)
    assert out.shape == obs.shape and out.dtype == obs.dtype
    valid = np.isfinite(obs)
    np.testing.assert_array_equal(out[valid], obs[valid])  # bit for bit
    never = ~valid.any(axis=0)  # (B, H, W) series with no valid value
    nothing = np.broadcast_to(never, obs.shape)
    if name == "sar_regression":  # such a pixel still gets the regression on dates with SAR
        nothing = nothing & ~np.isfinite(sar).all(axis=1)[:, None]
    assert nothing.any()
    assert np.isnan(out[nothing]).all()
    assert np.isfinite(out[~nothing]).all()


def test_registry_and_unknown_name():
    assert set(BASELINES) == {"nearest", "linear", "whittaker", "sar_regression", "harmonic"}
    obs, times, _ = random_case()
    np.testing.assert_array_equal(run_baseline("whittaker", obs, times, lam=5.0),
                                  whittaker(obs, times, lam=5.0))
    with pytest.raises(ValueError, match="unknown baseline"):
        run_baseline("kriging", obs, times)


def test_inputs_are_not_modified():
    obs, times, sar = random_case()
    before, sar_before = obs.copy(), sar.copy()
    for name in BASELINES:
        run_baseline(name, obs, times, sar)
    np.testing.assert_array_equal(obs, before)
    np.testing.assert_array_equal(sar, sar_before)


def test_vectorised_on_200x200x60(capsys):
    """Each baseline on 60 dates x 1 band x 200 x 200 (timings printed; no assertion on them)."""
    rng = np.random.default_rng(0)
    t, h, w = 60, 200, 200
    days = np.cumsum(rng.choice([2.0, 3.0, 5.0], t))
    truth = (0.2 + 0.1 * np.sin(days / 30.0))[:, None, None, None] + np.zeros((1, 1, h, w))
    cloudy = rng.random((t, 1, h, w)) < rng.uniform(0.0, 0.9, (t, 1, 1, 1))
    obs = np.where(cloudy, np.nan, truth).astype(np.float32)
    sar = rng.normal(-15.0, 3.0, (t, 2, h, w)).astype(np.float32)
    times = dates(days)
    lines = []
    for name in BASELINES:
        start = time.perf_counter()
        out = run_baseline(name, obs, times, sar)
        lines.append(f"{name}: {time.perf_counter() - start:.2f} s")
        assert np.isfinite(out).all()
    with capsys.disabled():
        print("\n200x200x60 timings: " + ", ".join(lines))
