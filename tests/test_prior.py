"""Tests for stfuse.prior: leave-one-out linear interpolation in time, and its channels."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pytest

from stfuse import baselines
from stfuse.prior import (
    PRESENT_NAME,
    append_prior,
    prior_channels,
    prior_layout,
    temporal_prior,
)

OFFSETS = [0.0, 3.0, 5.5, 12.0, 12.25, 20.0, 33.0, 34.0]  # unequal spacing, in days


def channels_for(n_opt=3, n_sar=1):
    ch = [{"name": f"B{i}", "sensor": "S2", "kind": "optical"} for i in range(n_opt)]
    ch.append({"name": "valid", "sensor": "S2", "kind": "valid"})
    ch += [{"name": f"S{i}", "sensor": "S1", "kind": "sar"} for i in range(n_sar)]
    return ch


def dates_for(offsets):
    t0 = pd.Timestamp("2021-04-03T10:36:12Z")
    return [{"start_time": (t0 + pd.Timedelta(days=o)).isoformat()} for o in offsets]


def random_cube(seed=0, offsets=OFFSETS, h=6, w=7, n_opt=3, cloud=0.5):
    rng = np.random.default_rng(seed)
    t = len(offsets)
    cube = rng.uniform(0.0, 0.5, (t, n_opt + 2, h, w)).astype(np.float32)
    cube[:, n_opt] = (rng.random((t, h, w)) > cloud).astype(np.float32)
    cube[:, n_opt][rng.random((t, h, w)) < 0.05] = np.nan  # no data: not clear
    band_nan = rng.random((t, h, w)) < 0.05  # a clear-flagged cell with a NaN band: not clear
    cube[:, 1][band_nan] = np.nan
    cube[0, n_opt, 0, 0] = 0.0  # pixel (0, 0): only date 0 missing...
    cube[1:, n_opt, 0, 0] = 1.0
    cube[:, 1, 0, 0] = 0.2
    cube[:, n_opt, 0, 1] = 0.0  # pixel (0, 1): never clear
    return cube, channels_for(n_opt), dates_for(offsets)


def brute_force(cube, n_opt, offsets):
    """Reference: a plain loop over dates, pixels and bands."""
    t_n, _, h, w = cube.shape
    valid = cube[:, n_opt]
    prior = np.full((t_n, n_opt, h, w), np.nan)
    present = np.zeros((t_n, h, w), dtype=bool)
    for i in range(h):
        for j in range(w):
            clear = [valid[t, i, j] == 1 and np.isfinite(cube[t, :n_opt, i, j]).all()
                     for t in range(t_n)]
            for t in range(t_n):
                before = [s for s in range(t) if clear[s]]
                after = [s for s in range(t + 1, t_n) if clear[s]]
                if not before and not after:
                    continue
                present[t, i, j] = True
                for b in range(n_opt):
                    if before and after:
                        p, q = before[-1], after[0]
                        x = (offsets[t] - offsets[p]) / (offsets[q] - offsets[p])
                        v = cube[p, b, i, j] + x * (cube[q, b, i, j] - cube[p, b, i, j])
                    else:
                        v = cube[before[-1] if before else after[0], b, i, j]
                    prior[t, b, i, j] = v
    return prior, present


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_brute_force(seed):
    cube, channels, dates = random_cube(seed)
    prior, present = temporal_prior(cube, channels, dates)
    ref, ref_present = brute_force(cube.astype(np.float64), 3, OFFSETS)
    assert prior.dtype == np.float32 and prior.shape == (len(OFFSETS), 3, 6, 7)
    assert present.dtype == bool and present.shape == (len(OFFSETS), 6, 7)
    np.testing.assert_array_equal(present, ref_present)
    np.testing.assert_array_equal(np.isnan(prior), ~np.broadcast_to(present[:, None], prior.shape))
    np.testing.assert_allclose(prior, ref, rtol=1e-6, atol=1e-7)
    assert not present[:, 0, 1].any()  # never clear: no prior at any date
    assert present[:, 0, 0].all()
    np.testing.assert_allclose(prior[0, 1, 0, 0], 0.2)  # date 0: constant extension from date 1


def test_linear_ramp_is_exact():
    """On a per-pixel linear ramp in real time every present prior is the ramp itself."""
    rng = np.random.default_rng(5)
    t_n, h, w = len(OFFSETS), 5, 4
    days = np.asarray(OFFSETS)
    slope = rng.uniform(-0.01, 0.01, (2, h, w))
    icpt = rng.uniform(0.1, 0.3, (2, h, w))
    cube = np.zeros((t_n, 3, h, w), dtype=np.float32)
    cube[:, :2] = icpt[None] + slope[None] * days[:, None, None, None]
    cube[:, 2] = (rng.random((t_n, h, w)) > 0.4).astype(np.float32)
    cube[:, 2, :, 0] = 1.0  # column 0 clear everywhere: interior dates interpolate, ends extend
    ch = channels_for(2, 0)
    prior, present = temporal_prior(cube, ch, dates_for(OFFSETS))
    # interior dates with clear dates on both sides lie on the ramp
    clear = cube[:, 2] == 1
    has_before = np.maximum.accumulate(clear, axis=0)
    has_before = np.concatenate([np.zeros((1, h, w), bool), has_before[:-1]])
    has_after = np.maximum.accumulate(clear[::-1], axis=0)[::-1]
    has_after = np.concatenate([has_after[1:], np.zeros((1, h, w), bool)])
    both = has_before & has_after
    assert both.sum() > 10
    truth = cube[:, :2]
    sel = np.broadcast_to(both[:, None], truth.shape)
    np.testing.assert_allclose(prior[sel], truth[sel], rtol=0, atol=1e-6)
    # column 0 (always clear): first and last dates are the neighbour's value (constant)
    np.testing.assert_array_equal(prior[0, :, :, 0], cube[1, :2, :, 0])
    np.testing.assert_array_equal(prior[-1, :, :, 0], cube[-2, :2, :, 0])


def test_leave_one_out():
    """Changing date t (values or clear flags) never changes the prior at t."""
    cube, channels, dates = random_cube(3)
    prior, present = temporal_prior(cube, channels, dates)
    for t in range(len(OFFSETS)):
        changed = cube.copy()
        changed[t, :3] = np.float32(7.0)
        changed[t, 3] = 1.0 - np.nan_to_num(changed[t, 3])
        p2, pr2 = temporal_prior(changed, channels, dates)
        np.testing.assert_array_equal(p2[t], prior[t])
        np.testing.assert_array_equal(pr2[t], present[t])
        assert not np.array_equal(p2, prior)  # other dates do see it


def test_equals_linear_in_time_on_hidden_cells():
    """Where t is not clear, the prior is exactly what per-pixel linear interpolation gives."""
    cube, channels, dates = random_cube(4)
    cube[:, 1] = np.where(np.isnan(cube[:, 1]), 0.3, cube[:, 1])  # finite bands: same clear rule
    prior, _ = temporal_prior(cube, channels, dates)
    obs = cube[:, :3].astype(np.float64)
    clear = cube[:, 3] == 1
    obs[~np.broadcast_to(clear[:, None], obs.shape)] = np.nan
    lin = baselines.linear_in_time(obs, pd.to_datetime([d["start_time"] for d in dates]))
    gap = np.broadcast_to(~clear[:, None], obs.shape) & np.isfinite(lin)
    np.testing.assert_allclose(prior[gap], lin[gap], rtol=1e-6, atol=1e-7)


def test_same_instant_neighbours_are_averaged_and_edge_cases():
    offsets = [0.0, 4.0, 4.0, 8.0]
    cube = np.zeros((4, 2, 1, 1), dtype=np.float32)
    cube[:, 0, 0, 0] = [1.0, 2.0, 4.0, 8.0]
    cube[:, 1] = 1.0
    prior, present = temporal_prior(cube, channels_for(1, 0), dates_for(offsets))
    assert present.all()
    assert prior[1, 0, 0, 0] == pytest.approx(1.0 + (4.0 - 1.0))  # t=1: dates 0 and 2 -> 4 at day 4
    assert prior[2, 0, 0, 0] == pytest.approx(2.0)  # dates 1 (day 4) and 3 (day 8) at day 4
    assert prior[0, 0, 0, 0] == 2.0 and prior[3, 0, 0, 0] == 4.0
    # one date: nothing before or after
    one, pres1 = temporal_prior(cube[:1], channels_for(1, 0), dates_for([0.0]))
    assert np.isnan(one).all() and not pres1.any()
    # two clear dates at one instant, interpolated from both sides
    cube2 = np.ones((3, 2, 1, 1), dtype=np.float32)
    cube2[:, 0, 0, 0] = [1.0, 5.0, 3.0]
    p2, _ = temporal_prior(cube2, channels_for(1, 0), dates_for([1.0, 1.0, 1.0]))
    assert p2[1, 0, 0, 0] == pytest.approx(2.0)


def test_channels_layout_and_errors():
    cube, channels, dates = random_cube(0)
    extra, layout = prior_channels(cube, channels, dates)
    assert [c["name"] for c in layout] == ["B0_prior", "B1_prior", "B2_prior", PRESENT_NAME]
    assert all(c["kind"] == "prior" for c in layout)
    assert [c.get("band") for c in layout] == ["B0", "B1", "B2", None]
    assert layout == prior_layout(channels)
    prior, present = temporal_prior(cube, channels, dates)
    assert extra.shape == (len(OFFSETS), 4, 6, 7) and extra.dtype == np.float32
    np.testing.assert_array_equal(extra[:, :3], prior)
    np.testing.assert_array_equal(extra[:, 3], present.astype(np.float32))
    full, full_channels = append_prior(cube, channels, dates)
    np.testing.assert_array_equal(full[:, :5], cube)
    np.testing.assert_array_equal(full[:, 5:], extra)
    assert full_channels == channels + layout
    with pytest.raises(ValueError, match="already holds prior"):
        prior_channels(full, full_channels, dates)
    with pytest.raises(ValueError, match="len\\(channels\\)"):
        temporal_prior(cube, channels[:-1], dates)
    with pytest.raises(ValueError, match="time order"):
        temporal_prior(cube, channels, dates[::-1])


@pytest.mark.parametrize("shape", [(118, 13, 64, 64), (40, 7, 256, 256)])
def test_fast(shape):
    t_n, c_n, h, w = shape
    rng = np.random.default_rng(0)
    cube = rng.random(shape, dtype=np.float32)
    n_opt = c_n - 3
    cube[:, n_opt] = rng.random((t_n, h, w)) > 0.6
    channels = channels_for(n_opt, 2)
    dates = dates_for(np.arange(t_n) * 5.0)
    start = time.perf_counter()
    prior, present = temporal_prior(cube, channels, dates)
    seconds = time.perf_counter() - start
    assert prior.shape == (t_n, n_opt, h, w) and present.mean() > 0.9
    assert seconds < 5.0, seconds  # about 0.1-0.3 s on 2 cores
