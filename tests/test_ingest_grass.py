"""Ingest into real GRASS on throwaway projects: STRDS content, values, validity, and existing-project input."""

import hashlib
import json

import numpy as np
import pandas as pd
import pytest
import rasterio

from stfuse import existing, grass, ingest, manifest

from _scene import ingest_tiny, sensors

pytestmark = pytest.mark.grass


@pytest.fixture(scope="module")
def ingested(tmp_path_factory):
    """A tiny scene ingested into a fresh project; returns (manifest path, project state, sensor states)."""
    return ingest_tiny(tmp_path_factory.mktemp("ingest"))


def _stamp(map_id):
    """S2_B04_20210501T102030@mapset -> 20210501T102030"""
    return map_id.split("@")[0].rsplit("_", 1)[1]


def _read(project, mapset, name):
    with grass.session(project, mapset) as gs:
        from grass.script import array as garray

        return np.asarray(garray.array(mapname=name, null=np.nan), dtype=np.float64)


def _strds_rows(project, mapset, strds):
    with grass.session(project, mapset) as gs:
        out = gs.read_command("t.rast.list", input=strds, columns="name,start_time,semantic_label", format="csv")
    return pd.read_csv(pd.io.common.StringIO(out))


def test_one_strds_per_sensor_with_utc_times_and_labels(ingested):
    scene, project, states = ingested
    df = pd.read_csv(scene)
    for sensor, spec in sensors().items():
        state = states[sensor]
        assert state["strds"] == f"{sensor}@ingest_{sensor}"
        rows = _strds_rows(project["project"], state["mapset"], state["strds"])
        want = df[(df.sensor == sensor) & df.semantic_label.isin(spec["bands"] + ["SCL"])]
        assert len(rows) == len(want)
        assert set(rows.semantic_label) == set(want.semantic_label)
        got_times = sorted(set(pd.to_datetime(rows.start_time).dt.strftime("%Y-%m-%dT%H:%M:%SZ")))
        assert got_times == sorted(set(want.start_time))
        assert [g["start_time"] for g in state["granules"]] == got_times


def test_optical_values_scaled_with_nodata_as_null(ingested):
    scene, project, states = ingested
    g = states["S2"]["granules"][2]
    path = scene.parent / "S2" / f"S2_B04_{_stamp(g['maps']['B04'])}.tif"
    with rasterio.open(path) as src:
        dn = src.read(1).astype(np.float64)
    got = _read(project["project"], "ingest_S2", g["maps"]["B04"])
    want = np.where(dn == 0, np.nan, dn * 0.0001)
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_sar_resampled_from_20m_onto_region(ingested):
    scene, project, states = ingested
    g = states["S1"]["granules"][0]
    stamp = _stamp(g["maps"]["VH"])
    with rasterio.open(scene.parent / "S1" / f"S1_VH_{stamp}.tif") as src:
        coarse = src.read(1).astype(np.float64)
    got = _read(project["project"], "ingest_S1", g["maps"]["VH"])
    assert got.shape == (32, 32)
    np.testing.assert_allclose(got, np.kron(coarse, np.ones((2, 2))), rtol=1e-6)


def test_validity_mask_from_scene_classification(ingested):
    scene, project, states = ingested
    info = json.loads((scene.parent / "scene.json").read_text())
    for g in states["S2"]["granules"][:4]:
        stamp = _stamp(g["valid"])
        with rasterio.open(scene.parent / "S2" / f"S2_SCL_{stamp}.tif") as src:
            scl = src.read(1)
        want = np.isin(scl, [4, 5, 6, 7, 11]).astype(float)
        got = _read(project["project"], "ingest_S2", g["valid"])
        np.testing.assert_array_equal(got, want)
    assert any(d["cloud_fraction"] > 0 for d in info["optical_dates"])


def test_rerun_replaces_own_mapset_and_survives_stale_lock(ingested, tmp_path):
    scene, project, states = ingested
    lock = grass.Path(project["project"]) / "ingest_S1" / ".gislock"
    lock.write_text("999999999")  # a killed job's lock: the pid is gone
    again = ingest.ingest_sensor(project, grass.Path(project["project"]).parents[1] / "checked.csv", "S1", sensors()["S1"])
    assert again["granules"] == states["S1"]["granules"]


def _tree_hash(path):
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def user_project(tmp_path_factory):
    """A user's own project: PERMANENT plus a mapset 'field' holding the STRDS (no stfuse markers)."""
    _, project, _ = ingest_tiny(tmp_path_factory.mktemp("user"), seed=5)
    path = grass.Path(project["project"])
    # Make it look like any user's project: one user mapset with both STRDS, no stfuse markers.
    (path / ingest.PROJECT_MARKER).unlink()
    for s in sensors():
        (path / f"ingest_{s}" / grass.OWN_MAPSET_MARKER).unlink()
    return path


def test_existing_project_is_read_without_writing_user_mapsets(user_project):
    before = {m.name: _tree_hash(m) for m in user_project.iterdir() if m.is_dir()}
    strds = {"S2": "S2@ingest_S2", "S1": "S1@ingest_S1"}
    state = existing.prepare_project(user_project, "stfuse", strds, sensors(), {})
    s2 = existing.ingest_sensor(state, "S2", sensors()["S2"])
    s1 = existing.ingest_sensor(state, "S1", sensors()["S1"])
    after = {m.name: _tree_hash(m) for m in user_project.iterdir() if m.is_dir() and m.name in before}
    assert after == before, "a user mapset was modified"
    assert s2["granules"][0]["maps"]["B04"].endswith("@ingest_S2")
    assert s2["valid_strds"] == "S2_valid@stfuse_S2"
    assert len(s1["granules"]) == len(_strds_rows(user_project, "ingest_S1", "S1")) // 2
    valid = _read(user_project, "stfuse_S2", s2["granules"][0]["valid"])
    assert set(np.unique(valid[~np.isnan(valid)])) <= {0.0, 1.0}


def test_existing_project_refuses_users_mapset_name(user_project):
    with pytest.raises(grass.GrassError, match="was not made by stfuse"):
        existing.prepare_project(user_project, "ingest_S2", {"S2": "S2@ingest_S2", "S1": "S1@ingest_S1"}, sensors(), {})


def test_existing_project_with_too_few_optical_dates_for_k_is_refused(user_project):
    strds = {"S2": "S2@ingest_S2", "S1": "S1@ingest_S1"}
    with grass.session(user_project, "ingest_S2", lock=False):
        import grass.temporal as tgis

        tgis.init()
        n_dates = len(existing.check_strds(tgis, strds["S2"], "S2", sensors()["S2"]))
    with pytest.raises(existing.InputError, match=rf"STRDS S2@ingest_S2 \(sensor S2\) has {n_dates} optical date.*pairing.neighbours"):
        existing.prepare_project(user_project, "stfuse_k", strds, sensors(), {}, neighbours=n_dates)
    existing.prepare_project(user_project, "stfuse_k", strds, sensors(), {}, neighbours=n_dates - 1)


def test_existing_project_missing_label_and_relative_time(user_project):
    cfg = sensors()
    cfg["S2"]["bands"].append("B12")
    with pytest.raises(existing.InputError, match=r"STRDS S2@ingest_S2 has no maps with semantic label B12.*\(sensor S2\)"):
        existing.prepare_project(user_project, "stfuse", {"S2": "S2@ingest_S2", "S1": "S1@ingest_S1"}, cfg, {})
    grass.own_mapset(user_project, "stfuse_rel")
    with grass.session(user_project, "stfuse_rel") as gs:
        gs.run_command("t.create", output="rel", type="strds", temporaltype="relative", title="r", description="r")
        gs.run_command("t.create", output="empty", type="strds", temporaltype="absolute", title="e", description="e")
    with pytest.raises(existing.InputError, match="STRDS rel@stfuse_rel has relative time"):
        existing.prepare_project(user_project, "stfuse", {"S2": "rel@stfuse_rel", "S1": "S1@ingest_S1"}, sensors(), {})
    with pytest.raises(existing.InputError, match="STRDS empty@stfuse_rel is empty"):
        existing.prepare_project(user_project, "stfuse", {"S2": "empty@stfuse_rel", "S1": "S1@ingest_S1"}, sensors(), {})


def test_optical_sensor_without_mask_band_is_valid_where_every_band_has_data(tmp_path):
    """mask: null (or no mask key): nodata is the only mask; the validity STRDS still exists."""
    from _scene import tiny_scene

    scene = tiny_scene(tmp_path / "scene")
    m = pd.read_csv(scene)
    m = m[m.semantic_label != "SCL"]
    m.to_csv(scene, index=False)
    first = sorted(m[m.sensor == "S2"].start_time.unique())[0]
    rows = m[(m.sensor == "S2") & (m.start_time == first)]
    for band, path in zip(rows.semantic_label, rows.path):
        with rasterio.open(scene.parent / path, "r+") as ds:
            dn = ds.read(1)
            dn[28:] = 0  # no band has data: null validity
            if band == "B02":
                dn[:4] = 0  # one band lacks data: validity 0
            ds.write(dn, 1)
    spec = sensors()
    spec["S2"]["mask"] = None
    checked = tmp_path / "checked.csv"
    project = ingest.prepare_project(scene, spec, {}, tmp_path / "grassdata" / "nomask", checked)
    for variant in ("null", "absent"):
        if variant == "absent":
            del spec["S2"]["mask"]
        state = ingest.ingest_sensor(project, checked, "S2", spec["S2"])
        assert state["valid_strds"] == "S2_valid@ingest_S2" and state["mask_band"] is None
        g = state["granules"][0]
        assert "mask_band" not in g and g["valid"].startswith("S2_valid_")
        got = _read(project["project"], "ingest_S2", g["valid"])
        want = np.ones((32, 32))
        want[:4] = 0.0
        want[28:] = np.nan
        np.testing.assert_array_equal(got, want)
        rows = _strds_rows(project["project"], "ingest_S2", state["valid_strds"])
        assert len(rows) == len(state["granules"])
