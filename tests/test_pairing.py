"""Tests for stfuse.pairing on hand-made timelines, plus a brute-force cross-check."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from stfuse.pairing import (
    MODES,
    NEIGHBOUR_COLUMNS,
    PAIR_COLUMNS,
    UNPAIRED_COLUMNS,
    optical_neighbours,
    pair_sensors,
    summarise,
)

T0 = pd.Timestamp("2021-06-01T10:00:00", tz="UTC")
DAY = pd.Timedelta(days=1)


def granules(offsets, ids=None, prefix="g", **extra) -> pd.DataFrame:
    """Granule table with start_time = T0 + offset (offsets in days or Timedeltas)."""
    times = [T0 + (o if isinstance(o, pd.Timedelta) else o * DAY) for o in offsets]
    if ids is None:
        ids = [f"{prefix}{i:03d}" for i in range(len(times))]
    df = pd.DataFrame({"id": ids, "start_time": pd.DatetimeIndex(times, tz="UTC")
                       if times else pd.DatetimeIndex([], tz="UTC")})
    for name, values in extra.items():
        df[name] = values
    return df


def as_tuples(pairs: pd.DataFrame):
    return list(zip(pairs["optical_id"], pairs["sar_id"], pairs["rank"]))


# ---------------------------------------------------------------------------------- ties


def test_equal_gap_on_both_sides_earlier_sar_wins():
    opt = granules([0], prefix="o")
    sar = granules([1, -1], ids=["late", "early"])
    pairs, unpaired = pair_sensors(opt, sar, max_gap_days=3)
    assert unpaired.empty
    assert as_tuples(pairs) == [("o000", "early", 1)]
    assert pairs["gap_days"].tolist() == [-1.0]


def test_same_time_sar_lower_id_wins_in_every_mode():
    opt = granules([0], prefix="o")
    sar = granules([0.5, 0.5, -0.5, -0.5], ids=["b_after", "a_after", "d_before", "c_before"])
    expected = {"nearest": "c_before", "before": "c_before", "after": "a_after"}
    for mode, sar_id in expected.items():
        pairs, _ = pair_sensors(opt, sar, 3, mode=mode)
        assert pairs["sar_id"].tolist() == [sar_id], mode
    pairs, _ = pair_sensors(opt, sar, 3, mode="k_nearest", k=4)
    assert pairs["sar_id"].tolist() == ["c_before", "d_before", "a_after", "b_after"]
    assert pairs["rank"].tolist() == [1, 2, 3, 4]


def test_same_time_ids_compared_lexicographically_not_by_input_order():
    opt = granules([0], prefix="o")
    sar = granules([2, 2, 2], ids=["s10", "s9", "s1"])
    pairs, _ = pair_sensors(opt, sar, 3, mode="k_nearest", k=3)
    assert pairs["sar_id"].tolist() == ["s1", "s10", "s9"]


def test_gap_zero_counts_as_before_and_after():
    opt = granules([0], prefix="o")
    sar = granules([0, -2, 2], ids=["same", "prev", "next"])
    for mode in ("nearest", "before", "after"):
        pairs, unpaired = pair_sensors(opt, sar, 1, mode=mode)
        assert unpaired.empty
        assert pairs["sar_id"].tolist() == ["same"]
        assert pairs["gap_days"].tolist() == [0.0]
    # and in k_nearest it is listed only once
    pairs, _ = pair_sensors(opt, sar, 5, mode="k_nearest", k=5)
    assert pairs["sar_id"].tolist() == ["same", "prev", "next"]


# ------------------------------------------------------------------------- before / after


def test_before_and_after_only():
    opt = granules([0, 10], prefix="o")
    sar = granules([-2, 1, 9.5, 12], ids=["s_m2", "s_p1", "s_9.5", "s_12"])
    pairs, unpaired = pair_sensors(opt, sar, 3, mode="before")
    assert as_tuples(pairs) == [("o000", "s_m2", 1), ("o001", "s_9.5", 1)]
    assert pairs["gap_days"].tolist() == [-2.0, -0.5]
    assert unpaired.empty

    pairs, unpaired = pair_sensors(opt, sar, 3, mode="after")
    assert as_tuples(pairs) == [("o000", "s_p1", 1), ("o001", "s_12", 1)]
    assert pairs["gap_days"].tolist() == [1.0, 2.0]

    pairs, _ = pair_sensors(opt, sar, 3, mode="nearest")
    assert as_tuples(pairs) == [("o000", "s_p1", 1), ("o001", "s_9.5", 1)]


def test_before_only_reports_missing_side():
    opt = granules([0, 10], prefix="o")
    sar = granules([2, 5.5])
    pairs, unpaired = pair_sensors(opt, sar, 3, mode="before")
    assert pairs.empty
    assert unpaired["optical_id"].tolist() == ["o000", "o001"]
    assert unpaired["reason"].tolist() == [
        "no SAR granule at or before the optical time",
        "no SAR granule before within 3 days (nearest before is 4.5 days before)",
    ]
    pairs, unpaired = pair_sensors(opt, sar, 1, mode="after")
    assert unpaired["reason"].tolist() == [
        "no SAR granule after within 1 day (nearest after is 2 days after)",
        "no SAR granule at or after the optical time",
    ]


def test_nearest_reason_names_nearest_granule():
    opt = granules([0], prefix="o")
    sar = granules([-5, 4.2])
    _, unpaired = pair_sensors(opt, sar, 3)
    assert unpaired["reason"].tolist() == ["no SAR granule within 3 days (nearest is 4.2 days after)"]
    _, unpaired = pair_sensors(opt, granules([-4, 4]), 3)
    assert unpaired["reason"].tolist() == ["no SAR granule within 3 days (nearest is 4 days before)"]


# ------------------------------------------------------------------------------ boundary


@pytest.mark.parametrize("mode", MODES)
def test_boundary_is_included(mode):
    opt = granules([0], prefix="o")
    sign = 1 if mode == "after" else -1
    sar = granules([sign * 3])
    pairs, unpaired = pair_sensors(opt, sar, 3, mode=mode)
    assert unpaired.empty and len(pairs) == 1
    assert pairs["gap_days"].tolist() == [sign * 3.0]


@pytest.mark.parametrize("mode", MODES)
def test_boundary_plus_one_second_excluded(mode):
    opt = granules([0], prefix="o")
    sign = 1 if mode == "after" else -1
    sar = granules([sign * (3 * DAY + pd.Timedelta(seconds=1))])
    pairs, unpaired = pair_sensors(opt, sar, 3, mode=mode)
    assert pairs.empty
    assert unpaired["optical_id"].tolist() == ["o000"]
    # the reason must not make the gap look like exactly 3 days
    assert "3.00001 days" in unpaired["reason"].iloc[0]


def test_fractional_max_gap_boundary():
    opt = granules([0], prefix="o")
    pairs, _ = pair_sensors(opt, granules([pd.Timedelta(hours=12)]), 0.5)
    assert len(pairs) == 1
    pairs, _ = pair_sensors(opt, granules([pd.Timedelta(hours=12, seconds=1)]), 0.5)
    assert pairs.empty


# ----------------------------------------------------------------------------- k_nearest


def test_k_nearest_ordering():
    opt = granules([0], prefix="o")
    sar = granules([-3, -1, 0.5, 2, 1, 7], ids=["m3", "m1", "p0.5", "p2", "p1", "p7"])
    pairs, unpaired = pair_sensors(opt, sar, 5, mode="k_nearest", k=4)
    assert unpaired.empty
    # |gaps|: 0.5, 1 (m1 earlier, wins over p1), 1, 2
    assert pairs["sar_id"].tolist() == ["p0.5", "m1", "p1", "p2"]
    assert pairs["rank"].tolist() == [1, 2, 3, 4]
    assert pairs["gap_days"].tolist() == [0.5, -1.0, 1.0, 2.0]


def test_k_larger_than_available():
    opt = granules([0, 20], prefix="o")
    sar = granules([-1, 1, 2, 30], ids=["a", "b", "c", "far"])
    pairs, unpaired = pair_sensors(opt, sar, 3, mode="k_nearest", k=10)
    assert as_tuples(pairs) == [("o000", "a", 1), ("o000", "b", 2), ("o000", "c", 3)]
    assert unpaired["optical_id"].tolist() == ["o001"]
    assert unpaired["reason"].tolist() == ["no SAR granule within 3 days (nearest is 10 days after)"]


def test_pairs_sorted_by_optical_time_then_rank():
    opt = granules([10, 0, 5], ids=["late", "early", "mid"])
    sar = granules([0, 1, 5, 6, 10, 11])
    pairs, _ = pair_sensors(opt, sar, 2, mode="k_nearest", k=2)
    assert pairs["optical_id"].tolist() == ["early"] * 2 + ["mid"] * 2 + ["late"] * 2
    assert pairs["rank"].tolist() == [1, 2] * 3
    assert pairs["optical_time"].is_monotonic_increasing
    assert list(pairs.index) == list(range(6))


# ------------------------------------------------------------------------- empty inputs


def test_empty_sar():
    opt = granules([0, 1], prefix="o")
    sar = granules([])
    for mode in MODES:
        pairs, unpaired = pair_sensors(opt, sar, 3, mode=mode)
        assert list(pairs.columns) == list(PAIR_COLUMNS)
        assert pairs.empty
        assert unpaired["optical_id"].tolist() == ["o000", "o001"]
        assert unpaired["reason"].tolist() == ["SAR dataset is empty"] * 2


def test_empty_optical():
    pairs, unpaired = pair_sensors(granules([]), granules([0, 1]), 3)
    assert list(pairs.columns) == list(PAIR_COLUMNS)
    assert list(unpaired.columns) == list(UNPAIRED_COLUMNS)
    assert pairs.empty and unpaired.empty


def test_empty_untyped_frames():
    empty = pd.DataFrame({"id": [], "start_time": []})
    pairs, unpaired = pair_sensors(empty, empty, 3)
    assert list(pairs.columns) == list(PAIR_COLUMNS)
    assert list(unpaired.columns) == list(UNPAIRED_COLUMNS)
    assert pairs.empty and unpaired.empty
    assert summarise(pairs, unpaired) == "paired 0 of 0 optical granules (mode nearest, max gap 3 d); 0 unpaired"


def test_output_dtypes():
    pairs, unpaired = pair_sensors(granules([0, 50], prefix="o"), granules([1]), 3)
    assert str(pairs["optical_time"].dt.tz) == "UTC"
    assert str(pairs["sar_time"].dt.tz) == "UTC"
    assert pairs["gap_days"].dtype == np.float64
    assert pairs["rank"].dtype == np.int64
    assert str(unpaired["optical_time"].dt.tz) == "UTC"


# ---------------------------------------------------------------------------- validation


def test_naive_timestamps_rejected():
    naive = pd.DataFrame({"id": ["a"], "start_time": [pd.Timestamp("2021-06-01")]})
    aware = granules([0])
    with pytest.raises(ValueError, match="start_time"):
        pair_sensors(naive, aware, 3)
    with pytest.raises(ValueError, match="start_time"):
        pair_sensors(aware, naive, 3)
    obj = pd.DataFrame({"id": ["a"], "start_time": pd.Series([pd.Timestamp("2021-06-01")], dtype=object)})
    with pytest.raises(ValueError, match="start_time"):
        pair_sensors(obj, aware, 3)
    with pytest.raises(ValueError, match="start_time"):
        pair_sensors(pd.DataFrame({"id": ["a"], "start_time": ["yesterday-ish"]}), aware, 3)
    with pytest.raises(ValueError, match="start_time"):
        optical_neighbours(naive.assign(clear_fraction=1.0))


def test_other_time_zones_converted_to_utc():
    cet = pd.DataFrame({"id": ["o"], "start_time": [pd.Timestamp("2021-06-01T12:00", tz="Europe/Rome")]})
    sar = pd.DataFrame({"id": ["s"], "start_time": [pd.Timestamp("2021-06-01T10:00", tz="UTC")]})
    pairs, _ = pair_sensors(cet, sar, 1)
    assert pairs["gap_days"].tolist() == [0.0]
    assert pairs["optical_time"].iloc[0] == pd.Timestamp("2021-06-01T10:00", tz="UTC")
    assert str(pairs["optical_time"].dt.tz) == "UTC"


def test_parameter_validation():
    opt, sar = granules([0]), granules([0])
    for bad in (0, -1, float("nan")):
        with pytest.raises(ValueError, match="max_gap_days"):
            pair_sensors(opt, sar, bad)
    with pytest.raises(ValueError, match="nearest, before, after, k_nearest"):
        pair_sensors(opt, sar, 3, mode="closest")
    with pytest.raises(ValueError, match="k"):
        pair_sensors(opt, sar, 3, mode="nearest", k=2)
    with pytest.raises(ValueError, match="k"):
        pair_sensors(opt, sar, 3, mode="k_nearest", k=0)
    with pytest.raises(ValueError, match="id"):
        pair_sensors(opt.drop(columns="id"), sar, 3)


def test_extra_columns_carried_through():
    opt = granules([0, 50], prefix="o", clear_fraction=[0.2, 0.9])
    sar = granules([1], orbit=["ASC"])
    pairs, unpaired = pair_sensors(opt, sar, 3)
    assert list(pairs.columns) == list(PAIR_COLUMNS) + ["optical_clear_fraction", "sar_orbit"]
    assert pairs["optical_clear_fraction"].tolist() == [0.2]
    assert pairs["sar_orbit"].tolist() == ["ASC"]
    assert list(unpaired.columns) == list(UNPAIRED_COLUMNS) + ["optical_clear_fraction"]
    assert unpaired["optical_clear_fraction"].tolist() == [0.9]


# ---------------------------------------------------------- brute-force reference check


def brute_force(optical, sar, max_gap_days, mode, k):
    """O(N*M) reference: explicit loops over every optical/SAR pair."""
    max_gap = pd.Timedelta(days=max_gap_days)
    rows, unpaired = [], set()
    for o_id, o_t in zip(optical["id"], optical["start_time"]):
        cands = []
        for s_id, s_t in zip(sar["id"], sar["start_time"]):
            gap = s_t - o_t
            if abs(gap) > max_gap:
                continue
            if mode == "before" and gap > pd.Timedelta(0):
                continue
            if mode == "after" and gap < pd.Timedelta(0):
                continue
            cands.append((abs(gap), s_t, s_id))
        cands.sort()
        take = cands[:k] if mode == "k_nearest" else cands[:1]
        if not take:
            unpaired.add(o_id)
        for rank, (_, s_t, s_id) in enumerate(take, start=1):
            rows.append((o_id, s_id, rank, (s_t - o_t) / pd.Timedelta(days=1)))
    return sorted(rows), unpaired


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("mode", MODES)
def test_matches_brute_force_on_random_timeline(seed, mode):
    rng = np.random.default_rng(seed)
    n_opt, n_sar = int(rng.integers(0, 60)), int(rng.integers(0, 80))
    # whole hours over ~4 months so that exact ties (same time, equal |gap|) occur often
    o_hours = rng.integers(0, 24 * 120, n_opt) // 12 * 12
    s_hours = rng.integers(0, 24 * 120, n_sar) // 12 * 12
    optical = pd.DataFrame({"id": [f"o{i}" for i in rng.permutation(n_opt)],
                            "start_time": T0 + pd.to_timedelta(o_hours, unit="h")})
    sar = pd.DataFrame({"id": [f"s{i}" for i in rng.permutation(n_sar)],
                        "start_time": T0 + pd.to_timedelta(s_hours, unit="h")})
    max_gap = float(rng.choice([0.5, 1, 2.5, 4]))
    k = int(rng.integers(1, 5)) if mode == "k_nearest" else 1

    pairs, unpaired = pair_sensors(optical, sar, max_gap, mode=mode, k=k)
    exp_rows, exp_unpaired = brute_force(optical, sar, max_gap, mode, k)

    got_rows = sorted(zip(pairs["optical_id"], pairs["sar_id"], pairs["rank"], pairs["gap_days"]))
    assert got_rows == exp_rows
    assert set(unpaired["optical_id"]) == exp_unpaired
    # every optical granule accounted for exactly once
    paired_ids = set(pairs["optical_id"])
    assert paired_ids.isdisjoint(set(unpaired["optical_id"]))
    assert paired_ids | set(unpaired["optical_id"]) == set(optical["id"])
    assert len(paired_ids) + len(unpaired) == len(optical)
    assert unpaired["reason"].str.len().gt(0).all()
    # sorted by optical time, then rank
    key = list(zip(pairs["optical_time"], pairs["optical_id"], pairs["rank"]))
    assert key == sorted(key)


def test_large_input_completes():
    rng = np.random.default_rng(42)
    n = 10_000
    start = pd.Timestamp("2015-01-01", tz="UTC")
    optical = pd.DataFrame({"id": [f"S2_{i:05d}" for i in range(n)],
                            "start_time": start + pd.to_timedelta(rng.integers(0, 10 * 365 * 86400, n), unit="s")})
    sar = pd.DataFrame({"id": [f"S1_{i:05d}" for i in range(n)],
                        "start_time": start + pd.to_timedelta(rng.integers(0, 10 * 365 * 86400, n), unit="s")})
    for mode, k in (("nearest", 1), ("before", 1), ("after", 1), ("k_nearest", 3)):
        pairs, unpaired = pair_sensors(optical, sar, 0.5, mode=mode, k=k)
        assert (pairs["rank"] == 1).sum() + len(unpaired) == n
    neigh = optical_neighbours(optical.assign(clear_fraction=rng.random(n)), k=2, min_clear=0.5)
    assert len(neigh) > 0


# --------------------------------------------------------------------------- neighbours


def test_neighbours_skip_cloudy_dates():
    opt = granules([0, 5, 10, 15, 20], ids=["a", "b", "c", "d", "e"],
                   clear_fraction=[0.9, 0.1, 0.5, 0.05, 0.8])
    out = optical_neighbours(opt, k=1, min_clear=0.5)
    assert list(out.columns)[: len(NEIGHBOUR_COLUMNS)] == list(NEIGHBOUR_COLUMNS)
    got = list(zip(out["id"], out["direction"], out["rank"], out["neighbour_id"], out["gap_days"]))
    assert got == [
        ("a", "next", 1, "c", 10.0),
        ("b", "prev", 1, "a", -5.0),
        ("b", "next", 1, "c", 5.0),
        ("c", "prev", 1, "a", -10.0),
        ("c", "next", 1, "e", 10.0),
        ("d", "prev", 1, "c", -5.0),
        ("d", "next", 1, "e", 5.0),
        ("e", "prev", 1, "c", -10.0),
    ]
    assert out.loc[out["id"] == "b", "neighbour_clear_fraction"].tolist() == [0.9, 0.5]
    assert out.loc[out["id"] == "b", "clear_fraction"].tolist() == [0.1, 0.1]


def test_neighbours_k_and_series_ends():
    opt = granules([0, 1, 2, 3], ids=["a", "b", "c", "d"], clear_fraction=[1.0] * 4)
    out = optical_neighbours(opt, k=2)
    rows = out[out["id"] == "b"]
    assert list(zip(rows["direction"], rows["rank"], rows["neighbour_id"])) == [
        ("prev", 1, "a"), ("next", 1, "c"), ("next", 2, "d")]
    rows = out[out["id"] == "a"]
    assert list(zip(rows["direction"], rows["rank"], rows["neighbour_id"])) == [
        ("next", 1, "b"), ("next", 2, "c")]
    assert len(out) == 1 + 2 + 2 + 2 + 2 + 1  # a:2 b:3 c:3 d:2 -> 10
    assert str(out["neighbour_time"].dt.tz) == "UTC"


def test_neighbours_identical_times_ordered_by_id():
    opt = granules([0, 0, 0], ids=["y", "x", "z"], clear_fraction=[1.0] * 3)
    out = optical_neighbours(opt, k=2)
    got = list(zip(out["id"], out["direction"], out["rank"], out["neighbour_id"], out["gap_days"]))
    assert got == [
        ("x", "next", 1, "y", 0.0), ("x", "next", 2, "z", 0.0),
        ("y", "prev", 1, "x", 0.0), ("y", "next", 1, "z", 0.0),
        ("z", "prev", 1, "y", 0.0), ("z", "prev", 2, "x", 0.0),
    ]


def test_neighbours_empty_and_validation():
    out = optical_neighbours(granules([], clear_fraction=[]))
    assert list(out.columns) == list(NEIGHBOUR_COLUMNS) + ["clear_fraction"]
    assert out.empty
    opt = granules([0, 1], clear_fraction=[0.5, 0.7])
    with pytest.raises(ValueError, match="clear_fraction"):
        optical_neighbours(opt.drop(columns="clear_fraction"))
    with pytest.raises(ValueError, match="clear_fraction"):
        optical_neighbours(opt.assign(clear_fraction=[0.5, np.nan]))
    with pytest.raises(ValueError, match="min_clear"):
        optical_neighbours(opt, min_clear=1.5)
    with pytest.raises(ValueError, match="k"):
        optical_neighbours(opt, k=0)
    # nothing clear enough: no rows at all
    assert optical_neighbours(opt, min_clear=0.9).empty


# ------------------------------------------------------------------------------- summary


def test_summarise():
    opt = granules([0, 10, 20, 40], prefix="o")
    sar = granules([1, 12.5, 19.5])
    pairs, unpaired = pair_sensors(opt, sar, 3)
    assert summarise(pairs, unpaired) == (
        "paired 3 of 4 optical granules (mode nearest, max gap 3 d, median |gap| 1.0 d); 1 unpaired")
    pairs, unpaired = pair_sensors(opt, sar, 3, mode="k_nearest", k=2)
    assert summarise(pairs, unpaired).startswith("paired 3 of 4 optical granules (mode k_nearest, k 2,")


# ------------------------------------------------------------------- SAR granules without data


def test_sar_granules_without_data_in_the_region_are_never_paired():
    # the empty granule 2 days away loses to the one with data 5 days away
    opt = granules([0, 20], prefix="o")
    sar = granules([-2, 5, 21], ids=["empty", "full", "late"], data_fraction=[0.0, 0.8, 1.0])
    pairs, unpaired = pair_sensors(opt, sar, max_gap_days=6, coverage="data_fraction")
    assert unpaired.empty
    assert as_tuples(pairs) == [("o000", "full", 1), ("o001", "late", 1)]
    assert pairs["sar_data_fraction"].tolist() == [0.8, 1.0]
    # without the coverage column the empty granule wins (the old behaviour)
    pairs, _ = pair_sensors(opt, sar, max_gap_days=6)
    assert pairs["sar_id"].iloc[0] == "empty"
    # k_nearest skips it too
    pairs, _ = pair_sensors(opt, sar, max_gap_days=30, mode="k_nearest", k=2, coverage="data_fraction")
    assert "empty" not in set(pairs["sar_id"])


def test_optical_date_whose_only_candidates_are_empty_is_unpaired_with_that_reason():
    opt = granules([0, 10], prefix="o")
    sar = granules([-2, 1.5, 9], ids=["e1", "e2", "ok"], data_fraction=[0.0, 0.0, 0.5])
    pairs, unpaired = pair_sensors(opt, sar, max_gap_days=3, coverage="data_fraction")
    assert as_tuples(pairs) == [("o001", "ok", 1)]
    assert list(unpaired.columns) == list(UNPAIRED_COLUMNS)
    assert unpaired["optical_id"].tolist() == ["o000"]
    reason = unpaired["reason"].iloc[0]
    assert reason == ("no SAR granule with data in the region within 3 days (nearest is 9 days after); "
                      "e2 (1.5 days after) has no data in the region")
    _, unpaired = pair_sensors(opt, sar, max_gap_days=3, mode="before", coverage="data_fraction")
    assert "e1 (2 days before) has no data in the region" in unpaired["reason"].iloc[0]


def test_sar_series_without_any_data_in_the_region_is_refused():
    from stfuse.pairing import NoSarDataError

    opt = granules([0], prefix="o")
    sar = granules([0, 1], data_fraction=[0.0, 0.0])
    with pytest.raises(NoSarDataError, match="none of the 2 SAR granules has data in the region"):
        pair_sensors(opt, sar, 3, coverage="data_fraction")
    with pytest.raises(ValueError, match="missing values"):
        pair_sensors(opt, sar.assign(data_fraction=[np.nan, 1.0]), 3, coverage="data_fraction")
    with pytest.raises(ValueError, match="missing required column"):
        pair_sensors(opt, sar, 3, coverage="coverage")
