"""The "any date" gap filling (config infer.dates): the query-date plan, tiles without query dates, and a real
Snakemake run of a tiny study whose filled STRDS has the start times of a regular 10-day step."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from stfuse import anydate, config as cfgcheck, cube, tiles

UTC = "UTC"
OPT = ["2021-05-03T10:36:12Z", "2021-05-08T10:40:00Z", "2021-05-15T10:36:12Z", "2021-06-13T10:30:00Z"]


def ts(text):
    return pd.Timestamp(text, tz=UTC) if pd.Timestamp(text).tzinfo is None else pd.Timestamp(text).tz_convert(UTC)


# --- the setting ---------------------------------------------------------------------------------------------

def test_observed_is_the_default_and_answers_every_optical_date_at_its_own_time():
    assert anydate.parse_setting(None) == anydate.parse_setting("observed") == "observed"
    assert anydate.requested_times("observed", OPT) is None
    plan = anydate.plan_dates(OPT, None)
    assert not plan["query"].any() and list(plan.optical) == [0, 1, 2, 3]
    assert [o for outs in plan.outputs for o in outs] == [ts(t) for t in OPT]


def test_a_regular_step_runs_from_the_first_to_the_last_optical_utc_day():
    grid = anydate.requested_times(anydate.parse_setting({"every": "10D"}), OPT)
    assert list(grid) == list(pd.date_range("2021-05-03", "2021-06-12", freq="10D", tz=UTC))
    sms = anydate.requested_times(anydate.parse_setting({"every": "SMS", "start": None, "end": None}), OPT)
    assert list(sms) == [ts("2021-05-15"), ts("2021-06-01")]  # the 1st and 15th, within the optical days
    given = anydate.requested_times(anydate.parse_setting({"every": "SMS", "start": "2021-04-01",
                                                            "end": "2021-07-01T00:00:00Z"}), OPT)
    assert [t.strftime("%m-%d") for t in given] == ["04-01", "04-15", "05-01", "05-15", "06-01", "06-15", "07-01"]


def test_plan_matches_same_day_optical_dates_and_adds_query_dates_in_time_order():
    grid = anydate.requested_times(anydate.parse_setting({"every": "SMS"}), OPT)
    plan = anydate.plan_dates(OPT, grid)
    # 05-15 00:00 falls on the day of the acquisition 2021-05-15T10:36: that date answers it, no query date
    assert list(plan["query"]) == [False, False, False, True, False]
    assert list(plan.start_time) == sorted(plan.start_time)
    assert plan.outputs[2] == [ts("2021-05-15")] and plan.outputs[0] == plan.outputs[1] == plan.outputs[4] == []
    assert plan.start_time[3] == ts("2021-06-01") and plan.outputs[3] == [ts("2021-06-01")]
    assert plan.optical[3] == -1


def test_a_list_of_times_is_sorted_utc_and_two_acquisitions_of_one_day_give_it_to_the_nearest():
    setting = anydate.parse_setting(["2021-05-20", "2021-05-03T12:00:00+02:00"])
    assert setting == [ts("2021-05-03T10:00"), ts("2021-05-20")]  # +02:00 is 10:00 UTC
    times = anydate.requested_times(anydate.parse_setting(["2021-05-03T23:00:00Z", "2021-05-03T01:00:00Z"]),
                                    OPT)
    two = ["2021-05-03T02:00:00Z", "2021-05-03T20:00:00Z"]  # two acquisitions on one UTC day
    plan = anydate.plan_dates(two, times)
    assert not plan["query"].any()
    assert plan.outputs[0] == [ts("2021-05-03T01:00")] and plan.outputs[1] == [ts("2021-05-03T23:00")]


def test_a_list_of_dates_and_its_errors_name_the_key_and_entry():
    assert anydate.parse_setting(["2021-05-20", "2021-05-03T12:00:00+02:00"]) == [
        ts("2021-05-03T10:00"), ts("2021-05-20")]
    for bad, what in ((["2021-05-01", "2021-05-01T00:00:00Z"], r"infer.dates\[1\].*same time as.*infer.dates\[0\]"),
                      (["2021-05-01", "soon"], r"infer.dates\[1\]: 'soon' is not a date"),
                      ([], "list of dates is empty"),
                      ({"every": "5X"}, "infer.dates.every: '5X' is not a pandas offset alias"),
                      ({"every": "0D"}, "does not step forward"),
                      ({"every": "5D", "start": "2021-06-01", "end": "2021-05-01"}, "end .* is before start"),
                      ({"step": "5D"}, "takes keys every"),
                      ("daily", "neither 'observed'")):
        with pytest.raises(ValueError, match=f"config key {what}" if what.startswith("infer") else what):
            cfgcheck.check_dates(bad)
    with pytest.raises(ValueError, match=r"config key infer.dates: every SMS .* gives no date"):
        cfgcheck.check_dates({"every": "SMS", "start": "2021-05-02", "end": "2021-05-10"})


def test_the_config_check_runs_it_when_the_dag_is_built():
    study = {"study": "s", "sensors": {"S2": {"role": "optical", "bands": ["B04"]},
                                        "S1": {"role": "sar", "bands": ["VV"]}},
             "input": {"synthetic": {}}, "infer": {"dates": {"every": "fortnightly"}}}
    with pytest.raises(ValueError, match="config key infer.dates.every: 'fortnightly'"):
        cfgcheck.check(study)
    study["infer"]["dates"] = {"every": "SMS"}
    cfgcheck.check(study)


def test_module_dates_option():
    assert anydate.parse_module_dates("") == anydate.parse_module_dates("observed") == "observed"
    assert anydate.parse_module_dates("5D") == {"every": "5D", "start": None, "end": None}
    assert anydate.parse_module_dates("SMS")["every"] == "SMS"
    assert anydate.parse_module_dates("2021-05-10, 2021-05-01") == [ts("2021-05-01"), ts("2021-05-10")]
    assert anydate.parse_module_dates("2021-05-01") == [ts("2021-05-01")]
    with pytest.raises(ValueError, match="dates=2021-05-01,later"):
        anydate.parse_module_dates("2021-05-01,later")


# --- SAR of the query dates ------------------------------------------------------------------------------------

SAR = pd.DataFrame({"id": ["s_a", "s_b", "s_empty"],
                    "start_time": ["2021-05-01T05:00:00Z", "2021-05-20T17:00:00Z", "2021-06-01T05:00:00Z"],
                    "data_fraction": [1.0, 0.8, 0.0]})


def test_query_dates_pair_with_the_nearest_sar_with_data_within_the_gap_or_none():
    times = [ts("2021-05-01"), ts("2021-05-10"), ts("2021-05-21"), ts("2021-06-01")]
    got = anydate.pair_queries(times, SAR, 3.0, coverage="data_fraction")
    assert list(got.sar_id) == ["s_a", None, "s_b", None]  # 06-01: its only granule has no data here
    assert got.gap_days[0] == pytest.approx(5 / 24) and got.gap_days[1] is None
    assert got.gap_days[2] == pytest.approx(-7 / 24)
    before = anydate.pair_queries(times, SAR, 3.0, mode="before", coverage="data_fraction")
    assert list(before.sar_id) == [None, None, "s_b", None]  # s_a is 5 h after 05-01; s_b 7 h before 05-21
    assert anydate.pair_queries([], SAR, 3.0).empty


def test_output_times_fall_back_to_the_start_times_of_an_old_cube_json():
    old = [{"start_time": "a"}, {"start_time": "b"}]
    assert anydate.output_times(old) == [(0, "a"), (1, "b")]
    new = [{"start_time": "a", "outputs": []}, {"start_time": "q", "query": True, "outputs": ["q"]},
           {"start_time": "b", "outputs": ["b0", "b1"]}]
    assert anydate.output_times(new) == [(1, "q"), (2, "b0"), (2, "b1")]


def test_cube_dates_carry_query_and_outputs_only_when_they_say_something():
    g = lambda t, **kw: dict(start_time=t, optical_id=t, sar_id=None, sar_gap_days=None,  # noqa: E731
                             clear_fraction=0.5, **kw)
    observed = {"groups": [g("a", query=False, outputs=["a"]), g("b", query=False, outputs=["b"])]}
    old = {"groups": [g("a"), g("b")]}
    assert cube.cube_dates(observed) == cube.cube_dates(old) == [{k: v for k, v in x.items()} for x in old["groups"]]
    grid = {"groups": [g("a", query=False, outputs=[]), g("q", query=True, outputs=["q"])]}
    assert [(d["query"], d["outputs"]) for d in cube.cube_dates(grid)] == [(False, []), (True, ["q"])]


# --- tiles never hold a query date ----------------------------------------------------------------------------

def _tiny_cube(seed=0):
    rng = np.random.default_rng(seed)
    channels = [dict(name="B04", sensor="S2", kind="optical"), dict(name="valid", sensor="S2", kind="valid"),
                dict(name="VV", sensor="S1", kind="sar")]
    t, h, w = 5, 32, 32
    arr = rng.random((t, 3, h, w), dtype=np.float32)
    arr[:, 1] = (rng.random((t, h, w)) > 0.3).astype(np.float32)
    dates = [dict(start_time=f"2021-05-{3 + 5 * i:02d}T10:00:00Z", optical_id=f"o{i}", sar_id=None,
                  sar_gap_days=None, clear_fraction=0.7) for i in range(t)]
    return arr, channels, dates


def _hashes(d: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir()) if p.is_file()}


def test_tiles_of_a_cube_with_query_dates_are_those_of_the_observed_cube(tmp_path):
    arr, channels, dates = _tiny_cube()
    params = dict(size=16, overlap=0, min_valid_fraction=0.0, block_size=16, val_fraction=0.25, seed=0)
    tiles.export_tiles(arr, channels, dates, tmp_path / "observed", **params)
    # a query date first (before every optical date), one in the middle; optical dates with outputs keys
    q = np.full((1, 3, 32, 32), np.nan, np.float32)
    q[:, 2] = 0.5
    mixed = np.concatenate([q, arr[:2], q, arr[2:]])
    qd = lambda t: dict(start_time=t, optical_id=None, sar_id=None, sar_gap_days=None,  # noqa: E731
                        clear_fraction=0.0, query=True, outputs=[t])
    mdates = [qd("2021-05-01T00:00:00Z")] + [dict(d, query=False, outputs=[]) for d in dates[:2]] \
        + [qd("2021-05-10T00:00:00Z")] + [dict(d, query=False, outputs=[]) for d in dates[2:]]
    mm = tmp_path / "mixed.npy"
    np.save(mm, mixed)
    tiles.export_tiles(np.load(mm, mmap_mode="r"), channels, mdates, tmp_path / "grid", **params)
    assert _hashes(tmp_path / "grid") == _hashes(tmp_path / "observed")
    with pytest.raises(ValueError, match="every one of the 1 dates is a query date"):
        tiles.export_tiles(q, channels, [qd("2021-05-01T00:00:00Z")], tmp_path / "none", **params)


# --- a real Snakemake run ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The tiny study of test_workflow_full: tiles with infer.dates observed, then (same directory) the whole
    workflow with infer.dates every 10D, register and benchmark included."""
    from _scene import write_config
    from test_workflow_full import FAST, TINY
    from test_workflow_ingest import run_snakemake

    if shutil.which("grass") is None:
        pytest.skip("GRASS GIS is not installed")
    work = tmp_path_factory.mktemp("anydate")
    observed = write_config(work / "observed.yaml", "anyd", TINY, **FAST)
    proc = run_snakemake(work, observed, "tiles")
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = work / "results" / "anyd"
    store = {p.relative_to(res).as_posix(): p.read_bytes() for p in sorted((res / "main").rglob("*"))
             if p.is_file() and "tiles" in p.parts}
    grid = write_config(work / "grid.yaml", "anyd", TINY, **FAST, infer={"dates": {"every": "10D"}})
    proc = run_snakemake(work, grid, "register", "benchmark")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return dict(work=work, res=res, store=store, proc=proc)


def _grass(project: Path, *args) -> str:
    proc = subprocess.run(["grass", str(project / "check"), "--exec", *args], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.workflow
@pytest.mark.grass
@pytest.mark.slow
def test_the_tile_store_is_byte_identical_to_the_observed_runs(runs):
    res = runs["res"]
    now = {p.relative_to(res).as_posix(): p.read_bytes() for p in sorted((res / "main").rglob("*"))
           if p.is_file() and "tiles" in p.parts}
    assert set(now) == set(runs["store"]) and any(k.endswith("tiles.npy") for k in now)
    assert [k for k in now if now[k] != runs["store"][k]] == []
    meta = json.loads(next((res / "blocks").glob("*/cube/cube.json")).read_text())
    assert any(d.get("query") for d in meta["dates"])  # the cube did get query dates
    assert "query date(s) of" in "".join(p.read_text() for p in (runs["work"] / "logs").rglob("tiles.log"))


@pytest.mark.workflow
@pytest.mark.grass
@pytest.mark.slow
def test_the_filled_strds_has_exactly_the_10_day_step(runs):
    res, work = runs["res"], runs["work"]
    optical = pd.read_csv(res / "pairing/optical.csv")
    first = pd.Timestamp(optical.start_time.min()).floor("D")
    last = pd.Timestamp(optical.start_time.max()).floor("D")
    want = pd.date_range(first, last, freq="10D")
    groups = json.loads((res / "groups/groups.json").read_text())["groups"]
    days = {pd.Timestamp(t).floor("D") for t in optical.start_time}
    query_times = [t for t in want if t not in days]
    assert query_times, "the scene's optical days and the 10-day step coincide: nothing to test"
    q = [g for g in groups if g["query"]]
    assert [pd.Timestamp(g["start_time"]) for g in q] == query_times
    assert all(g["group"] is None and g["maps"][:5] == [None] * 5 for g in q)  # 4 bands + valid absent
    assert any(g["sar_id"] for g in q) and all(g["sar_id"] is None or abs(g["sar_gap_days"]) <= 6 for g in q)
    assert sum(len(g["outputs"]) for g in groups) == len(want)

    project = res / "grassdata" / "anyd"
    subprocess.run(["grass", "-e", "-c", str(project / "check")], check=True, capture_output=True)
    _grass(project, "g.mapsets", "mapset=register", "operation=add")
    bands = pd.read_csv(io.StringIO(_grass(project, "t.rast.list", "input=S2_filled@register",
                                           "columns=id,start_time,semantic_label", "format=csv")))
    flags = pd.read_csv(io.StringIO(_grass(project, "t.rast.list", "input=S2_filled_flag@register",
                                           "columns=id,start_time,semantic_label", "format=csv")))
    labels = yaml.safe_load((work / "grid.yaml").read_text())["sensors"]["S2"]["bands"]
    wanted = [t.strftime("%Y-%m-%d %H:%M:%S") for t in want]
    assert sorted(set(bands.start_time)) == wanted and sorted(flags.start_time) == wanted
    assert (bands.groupby("start_time").semantic_label.apply(sorted) == [sorted(labels)] * len(want)).all()
    from stfuse import grass, grassio

    with grass.session(project, "check"):
        values = grassio.read_maps(list(bands.id))
        flag = grassio.read_maps(list(flags.id))
    assert np.isfinite(values).all() and values.min() > -0.5 and values.max() < 1.5
    is_query = np.array([pd.Timestamp(t, tz="UTC") in query_times for t in flags.start_time])
    assert is_query.any() and (flag[is_query] == 1).all()  # every cell of a query date is filled
    assert set(np.unique(flag)) <= {0.0, 1.0}
    filled = json.loads((res / "register/filled.json").read_text())
    assert len(filled["granules"]) == len(want)


@pytest.mark.workflow
@pytest.mark.grass
@pytest.mark.slow
def test_the_benchmark_scores_with_query_dates_in_the_cube(runs):
    res = runs["res"]
    holdout = json.loads((res / "heldout/holdout.json").read_text())
    meta = json.loads(next((res / "blocks").glob("*/cube/cube.json")).read_text())
    query = {d["start_time"] for d in meta["dates"] if d.get("query")}
    assert holdout["possible"] and not query & set(holdout["eval_dates"])
    assert all(not meta["dates"][int(d)].get("query") for d in holdout["donors"].values())
    scores = pd.read_csv(res / "benchmark/scores.csv")
    assert "stfuse_model" in set(scores.method) and np.isfinite(scores.select_dtypes("number").to_numpy()).any()


@pytest.mark.workflow
def test_snakemake_refuses_a_bad_offset_alias_when_the_dag_is_built(tmp_path):
    from _scene import write_config
    from test_workflow_full import TINY
    from test_workflow_ingest import run_snakemake

    cfg = write_config(tmp_path / "bad.yaml", "bad", TINY, infer={"dates": {"every": "5X"}})
    proc = run_snakemake(tmp_path, cfg, extra=["--dry-run"])
    assert proc.returncode != 0 and "config key infer.dates.every: '5X'" in proc.stderr + proc.stdout
    assert not (tmp_path / "results").exists()
    cfg = write_config(tmp_path / "bad.yaml", "bad", TINY, infer={"dates": ["2021-05-01", "2021-05-01T00:00Z"]})
    proc = run_snakemake(tmp_path, cfg, extra=["--dry-run"])
    assert proc.returncode != 0 and "config key infer.dates[1]" in proc.stderr + proc.stdout
    for fine in (["2021-05-01", "2021-05-02T10:00:00Z"], {"every": "SMS"}, {"every": "5D", "start": "2021-05-01"}):
        cfg = write_config(tmp_path / "fine.yaml", "fine", TINY, infer={"dates": fine})
        proc = run_snakemake(tmp_path, cfg, "groups", extra=["--dry-run"])
        assert proc.returncode == 0, (fine, proc.stderr[-2000:])
    cfg = write_config(tmp_path / "bad.yaml", "bad", TINY, infer={"dates": "daily"})
    proc = run_snakemake(tmp_path, cfg, extra=["--dry-run"])
    assert proc.returncode != 0 and "daily" in proc.stderr + proc.stdout  # the schema refuses it


def test_query_dates_are_never_evaluated_or_donors():
    """A query date (no acquisition) counts as all cloud: even with benchmark.max_mask_fraction 1 it lends no
    mask, and it is never an evaluation date."""
    import numpy as np

    from stfuse import benchmark

    frac = np.array([0.95, 0.0, 0.5, 0.97, 0.0])  # dates 1 and 4 are query dates
    dates = [f"2021-05-0{i + 1}" for i in range(5)]
    for seed in range(20):
        evals, donors = benchmark._eval_and_donors(frac, dates, min_clear=0.9, seed=seed, min_fraction=0.0,
                                                   max_fraction=1.0, max_dates=None, query=[1, 4])
        assert evals == [0, 3] and set(donors.values()) <= {0, 2, 3}
    with pytest.raises(benchmark.BenchmarkNotPossible, match="no donor"):
        benchmark._eval_and_donors(np.array([0.95, 0.0]), dates[:2], min_clear=0.9, seed=0, min_fraction=0.5,
                                   max_fraction=1.0, max_dates=None, query=[1])
