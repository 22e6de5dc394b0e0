"""Pairing, imagery groups and tiles on a real GRASS project built from a tiny synthetic scene."""

import json

import numpy as np
import pandas as pd
import pytest

from stfuse import bridge, grass, temporal, tiles

from _scene import ingest_tiny

pytestmark = pytest.mark.grass


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("bridge")
    scene, state, states = ingest_tiny(root)
    return root, scene, state, states


@pytest.fixture(scope="module")
def paired(project):
    root, scene, state, states = project
    summary = bridge.pairing_step(state, states["S2"], states["S1"], root / "pairing", max_gap_days=1.5)
    return root / "pairing", summary


def test_pairs_follow_tgis_times_and_max_gap(project, paired):
    root, scene, state, states = project
    out, summary = paired
    m = pd.read_csv(scene)
    opt_times = sorted(pd.to_datetime(m[m.sensor == "S2"].start_time.unique()))
    sar_times = np.array(sorted(pd.to_datetime(m[m.sensor == "S1"].start_time.unique())))
    pairs, unpaired = pd.read_csv(out / "pairs.csv"), pd.read_csv(out / "unpaired.csv")
    assert len(pairs) + len(unpaired) == len(opt_times) == summary["optical"]
    assert len(unpaired) > 0, "max gap 1.5 d should leave some optical dates without SAR"
    for t in opt_times:
        gaps = np.array([(s - t).total_seconds() / 86400 for s in sar_times])
        best = np.min(np.abs(gaps))
        key = f"S2_{temporal.stamp(t)}"
        if best <= 1.5:
            row = pairs[pairs.optical_id == key].iloc[0]
            assert abs(abs(row.gap_days) - best) < 1e-6
            assert row.sar_VV.startswith("S1_VV_") and row.sar_VV.endswith("@ingest_S1")
        else:
            reason = unpaired[unpaired.optical_id == key].reason.iloc[0]
            assert "within 1.5 days" in reason


def test_clear_fraction_from_validity_maps(project, paired):
    root, scene, state, states = project
    out, _ = paired
    info = json.loads((scene.parent / "scene.json").read_text())
    opt = pd.read_csv(out / "optical.csv")
    # The synthetic scene knows its cloud (and shadow) share per date; clear = the rest.
    for d, got in zip(info["optical_dates"], opt.clear_fraction):
        hidden = d["cloud_fraction"] + d.get("shadow_fraction", 0.0)
        assert got == pytest.approx(1 - hidden, abs=0.02)


def test_groups_keep_channel_order_and_lack_sar_when_unpaired(project, paired):
    root, scene, state, states = project
    out, _ = paired
    groups = bridge.groups_step(state, states["S2"], states["S1"], out, root / "groups.json")
    names = [c["name"] for c in groups["channels"]]
    assert names == ["B02", "B03", "B04", "B08", "valid", "VV", "VH"]
    unpaired = set(pd.read_csv(out / "unpaired.csv").optical_id)
    with grass.session(state["project"], "groups") as gs:
        for g in groups["groups"][:6]:
            listed = gs.read_command("i.group", group=g["group"], flags="g").split()
            if g["optical_id"] in unpaired:
                assert g["sar_id"] is None and len(listed) == 5
            else:
                assert listed == g["maps"]


def test_tiles_reassemble_to_the_grass_cube(project, paired):
    root, scene, state, states = project
    groups_json = root / "groups.json"
    if not groups_json.exists():
        bridge.groups_step(state, states["S2"], states["S1"], paired[0], groups_json)
    meta = bridge.cube_step(state, groups_json, root / "cube")
    assert meta["shape"] == [len(meta["dates"]), 7, 32, 32]
    summary = bridge.tiles_step(root / "cube", root / "tiles", size=8, overlap=0, min_valid_fraction=0.0,
                                block_size=16, val_fraction=0.25, seed=1)
    assert summary["n_train"] > 0 and summary["n_val"] > 0
    cube = bridge.read_cube_step(state, json.loads(groups_json.read_text()), "check")
    np.testing.assert_array_equal(np.load(root / "cube" / "cube.npy"), cube)
    arr, index, channels, stats = tiles.load_tiles(root / "tiles")
    origins = list(zip(index.row, index.col))
    # tiles hold the cube's channels first (derived channels such as the temporal prior may follow)
    back = tiles.reassemble(np.asarray(arr), origins, 32, 32)[:, : cube.shape[1]]
    assert len(index) == 16  # 4 x 4 tiles of 8, no overlap: none dropped as a gap
    np.testing.assert_array_equal(np.isnan(back), np.isnan(cube))
    np.testing.assert_array_equal(back[~np.isnan(back)], cube[~np.isnan(cube)])
    assert channels["region"]["cols"] == 32


def test_hidden_cells_become_gaps(project, paired):
    root, scene, state, states = project
    groups_json = root / "groups.json"
    if not (root / "cube").exists():
        bridge.groups_step(state, states["S2"], states["S1"], paired[0], groups_json)
        bridge.cube_step(state, groups_json, root / "cube")
    cube, meta = bridge.load_cube(root / "cube")
    hidden = np.zeros((cube.shape[0], 32, 32), bool)
    hidden[0, :4, :4] = True
    masked, _ = bridge.load_cube(root / "cube", hidden)
    assert np.isnan(masked[0, :4, :4, :4]).all() and (masked[0, 4, :4, :4] == 0).all()
    np.testing.assert_array_equal(masked[1:], cube[1:])
    np.testing.assert_array_equal(masked[0, :, 4:], cube[0, :, 4:])


def test_tile_size_larger_than_region(project, paired):
    root, scene, state, states = project
    groups_json = root / "groups.json"
    if not groups_json.exists():
        bridge.groups_step(state, states["S2"], states["S1"], paired[0], groups_json)
    if not (root / "cube").exists():
        bridge.cube_step(state, groups_json, root / "cube")
    with pytest.raises(ValueError, match="size"):
        bridge.tiles_step(root / "cube", root / "tiles_big", size=64, overlap=0, min_valid_fraction=0.0,
                          block_size=16, val_fraction=0.25, seed=1)


def test_missing_and_empty_and_relative_strds(project):
    root, scene, state, states = project
    grass.own_mapset(state["project"], "odd")
    with grass.session(state["project"], "odd") as gs:
        import grass.temporal as tgis

        gs.run_command("t.create", output="rel", type="strds", temporaltype="relative", title="r", description="r")
        gs.run_command("t.create", output="empty", type="strds", temporaltype="absolute", title="e", description="e")
        tgis.init()
        with pytest.raises(temporal.DatasetError, match="rel@odd has relative time"):
            temporal.registered_maps(tgis, "rel@odd")
        with pytest.raises(temporal.DatasetError, match="empty@odd is empty"):
            temporal.registered_maps(tgis, "empty@odd")


def _shift_out_of_region(tif, metres=10_000.0):
    """Move a raster's georeference `metres` east: it then lies wholly outside the optical region."""
    import rasterio
    from rasterio.transform import Affine

    with rasterio.open(tif, "r+") as ds:
        t = ds.transform
        ds.transform = Affine(t.a, t.b, t.c + metres, t.d, t.e, t.f)


def _ingest_with_sar_moved(root, moved):
    """A tiny scene whose SAR granules at the times `moved(times)` picks lie outside the region, ingested."""
    from stfuse import ingest

    from _scene import sensors, tiny_scene

    scene = tiny_scene(root / "scene")
    m = pd.read_csv(scene)
    s1 = m[m.sensor == "S1"]
    times = sorted(s1.start_time.unique())
    for path in s1[s1.start_time.isin(moved(times))].path:
        _shift_out_of_region(scene.parent / path)
    checked = root / "checked.csv"
    state = ingest.prepare_project(scene, sensors(), {}, root / "grassdata" / "tiny", checked)
    states = {s: ingest.ingest_sensor(state, checked, s, spec) for s, spec in sensors().items()}
    return scene, state, states


def test_pairing_skips_sar_granules_without_data_in_the_region(tmp_path):
    m_times = {}

    def nearest_to_first_optical(times):
        m_times["all"] = times
        return [times[0]]  # the first SAR granule (the nearest one of the first optical date)

    scene, state, states = _ingest_with_sar_moved(tmp_path, nearest_to_first_optical)
    empty_id = f"S1_{temporal.stamp(pd.Timestamp(m_times['all'][0]))}"
    summary = bridge.pairing_step(state, states["S2"], states["S1"], tmp_path / "pairing", max_gap_days=40)
    sar = pd.read_csv(tmp_path / "pairing" / "sar.csv").set_index("id")
    assert sar.loc[empty_id, "data_fraction"] == 0.0
    assert (sar.drop(index=empty_id).data_fraction == 1.0).all()
    pairs = pd.read_csv(tmp_path / "pairing" / "pairs.csv")
    assert empty_id not in set(pairs.sar_id)
    # the first optical date (0.28 d before the empty granule) pairs with the next one, 6.3 d later
    assert pairs.gap_days.iloc[0] == pytest.approx(6.28, abs=0.01)
    assert summary["paired"] == summary["optical"] and summary["sar_without_data"] == 1
    # a max gap that only the empty granule meets: the first optical date is unpaired, saying why
    opt = pd.read_csv(tmp_path / "pairing" / "optical.csv")
    first = pd.Timestamp(opt.start_time.iloc[0])
    gap = abs((pd.Timestamp(m_times["all"][0]) - first).total_seconds()) / 86400
    bridge.pairing_step(state, states["S2"], states["S1"], tmp_path / "tight", max_gap_days=gap + 0.01)
    unpaired = pd.read_csv(tmp_path / "tight" / "unpaired.csv").set_index("optical_id")
    reason = unpaired.loc[opt.id.iloc[0], "reason"]  # the next SAR granule is 6 days later
    assert reason.startswith("no SAR granule with data in the region within")
    assert reason.endswith(f"{empty_id} (0.28 days after) has no data in the region")


def test_sar_series_wholly_outside_the_region_is_refused(tmp_path):
    scene, state, states = _ingest_with_sar_moved(tmp_path, lambda times: times)
    with pytest.raises(temporal.DatasetError) as err:
        bridge.pairing_step(state, states["S2"], states["S1"], tmp_path / "pairing", max_gap_days=6)
    text = str(err.value)
    assert "STRDS S1@ingest_S1 has no data in the study region" in text
    r = state["region"]
    assert f"W {r['west']:g}, E {r['east']:g}" in text


def test_clear_fraction_counts_only_cells_observed_at_least_once(project):
    root, scene, state, states = project
    grass.own_mapset(state["project"], "footprint")
    with grass.session(state["project"], "footprint") as gs:
        # left half never observed (null on every date); right half clear on date a, half clear on date b
        gs.run_command("r.mapcalc", expression="va = if(col() <= 16, null(), 1)", quiet=True)
        gs.run_command("r.mapcalc", expression="vb = if(col() <= 16, null(), if(row() <= 16, 1, 0))", quiet=True)
        got = bridge.clear_fractions(["va@footprint", "vb@footprint"])
    np.testing.assert_allclose(got, [1.0, 0.5])
