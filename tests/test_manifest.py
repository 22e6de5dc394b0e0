"""Manifest checks: every bad input gets one clear error naming the line/file/key, before GRASS is touched."""

import shutil

import numpy as np
import pandas as pd
import pytest
import rasterio

from stfuse import ingest, manifest
from stfuse.manifest import ManifestError

from _scene import sensors, tiny_scene


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    return tiny_scene(tmp_path_factory.mktemp("scene") / "scene")


@pytest.fixture
def copy_scene(scene, tmp_path):
    """A writable copy of the scene; returns (manifest path, DataFrame of its rows)."""
    dst = tmp_path / "scene"
    shutil.copytree(scene.parent, dst)
    path = dst / "manifest.csv"
    return path, pd.read_csv(path, dtype=str)


def save(df, path):
    df.to_csv(path, index=False)
    return path


def test_good_manifest_loads_with_utc_times_and_grid(scene):
    df, grid = manifest.load(scene, sensors())
    assert set(df.sensor) == {"S1", "S2"}
    assert str(df.start_time.dt.tz) == "UTC"
    assert (grid.width, grid.height, grid.res_x, grid.epsg) == (32, 32, 10.0, 32631)
    # S1 at 20 m is covered, so the finest resolution decides
    assert df[df.sensor == "S1"].res_x.iloc[0] == 20.0


def test_missing_file_names_line_and_path(copy_scene):
    path, df = copy_scene
    df.loc[5, "path"] = "S2/nope.tif"
    with pytest.raises(ManifestError, match=r"manifest.csv:7: file .*nope.tif does not exist"):
        manifest.load(save(df, path), sensors())


def test_corrupt_file_is_named(copy_scene):
    path, df = copy_scene
    victim = path.parent / df.loc[3, "path"]
    victim.write_bytes(b"II*\x00 this is not a tiff")
    with pytest.raises(ManifestError, match=rf"manifest.csv:5: file .*{victim.name} is unreadable or corrupt"):
        manifest.load(path, sensors())


def test_unparseable_timestamp(copy_scene):
    path, df = copy_scene
    df.loc[2, "start_time"] = "yesterday at noon"
    with pytest.raises(ManifestError, match=r"manifest.csv:4: start_time 'yesterday at noon' is not an ISO 8601"):
        manifest.load(save(df, path), sensors())


def test_duplicate_timestamp_names_both_lines(copy_scene):
    path, df = copy_scene
    dup = pd.concat([df, df.iloc[[0]]], ignore_index=True)
    with pytest.raises(ManifestError, match=rf"manifest.csv:{len(dup) + 1}: duplicate timestamp 2021-05-01T17.* \(already on line 2\)"):
        manifest.load(save(dup, path), sensors())


def test_offset_is_converted_to_utc(copy_scene):
    path, df = copy_scene
    original = pd.Timestamp(df.loc[0, "start_time"])
    local = original.tz_convert("Europe/Brussels").isoformat()  # +02:00 in May
    assert local.endswith("+02:00")
    df.loc[0, "start_time"] = local
    df.loc[1, "start_time"] = local if df.loc[1, "start_time"] == df.loc[0, "start_time"] else df.loc[1, "start_time"]
    rows = manifest.read_manifest(save(df, path))
    assert rows.start_time.iloc[0] == original
    assert str(rows.start_time.dt.tz) == "UTC"


def test_time_without_zone_is_refused(copy_scene):
    path, df = copy_scene
    df.loc[0, "start_time"] = df.loc[0, "start_time"].rstrip("Z")
    with pytest.raises(ManifestError, match=r"manifest.csv:2: start_time .* has no time zone"):
        manifest.load(save(df, path), sensors())


def test_crs_differing_between_files(copy_scene):
    path, df = copy_scene
    victim = path.parent / df.loc[4, "path"]
    with rasterio.open(victim) as src:
        data, profile = src.read(), src.profile
    profile.update(crs="EPSG:32632")
    with rasterio.open(victim, "w", **profile) as dst:
        dst.write(data)
    with pytest.raises(ManifestError, match=r"manifest.csv:6: .* is in EPSG:32632, but line 2 is in EPSG:32631"):
        manifest.load(path, sensors())


def test_unknown_sensor(copy_scene):
    path, df = copy_scene
    df.loc[10, "sensor"] = "L8"
    with pytest.raises(ManifestError, match=r"manifest.csv:12: unknown sensor 'L8'; the config names S2, S1"):
        manifest.load(save(df, path), sensors())


def test_band_missing_on_some_dates(copy_scene):
    path, df = copy_scene
    s2_b04 = df[(df.sensor == "S2") & (df.semantic_label == "B04")]
    dropped = s2_b04.index[1]
    when = df.loc[dropped, "start_time"]
    with pytest.raises(ManifestError, match=rf"S2 acquisition {when[:10]}.* lacks band\(s\) B04"):
        manifest.load(save(df.drop(index=dropped), path), sensors())


def test_band_missing_everywhere_names_config_key(copy_scene):
    path, df = copy_scene
    cfg = sensors()
    cfg["S2"]["bands"].append("B12")
    with pytest.raises(ManifestError, match=r"no band 'B12' \(config key sensors.S2.bands\)"):
        manifest.load(path, cfg)


def test_empty_manifest(tmp_path):
    path = tmp_path / "manifest.csv"
    path.write_text("path,sensor,semantic_label,start_time\n")
    with pytest.raises(ManifestError, match=r"manifest.csv lists no rasters"):
        manifest.load(path, sensors())


def test_missing_column(tmp_path):
    path = tmp_path / "manifest.csv"
    path.write_text("path,sensor,start_time\na.tif,S2,2021-01-01T00:00:00Z\n")
    with pytest.raises(ManifestError, match=r"lacks column\(s\) semantic_label"):
        manifest.load(path, sensors())


def test_explicit_region_outside_data(scene):
    region = {"from": "explicit", "resolution": 10, "bounds": {"west": 0, "east": 100, "south": 0, "north": 100}}
    with pytest.raises(ManifestError, match="does not overlap the data"):
        manifest.load(scene, sensors(), region)


def test_bad_input_writes_nothing(copy_scene, tmp_path):
    """The project folder is not even created when a check fails."""
    path, df = copy_scene
    df.loc[2, "start_time"] = "2021-13-45T00:00:00Z"
    project = tmp_path / "grassdata" / "study"
    with pytest.raises(ManifestError):
        ingest.prepare_project(save(df, path), sensors(), {}, project, tmp_path / "checked.csv")
    assert not project.exists() and not (tmp_path / "grassdata").exists()
    assert not (tmp_path / "checked.csv").exists()


def test_vrt_places_coarse_source_on_fine_grid(scene):
    """A 20 m source covers 2 x 2 cells of the 10 m grid, scaled and with nodata mapped."""
    df, grid = manifest.load(scene, sensors())
    rows = df[(df.sensor == "S1") & (df.semantic_label == "VV")].iloc[:1]
    xml = ingest.build_vrt(rows, grid, scale=2.0, offset=1.0)
    with rasterio.open(xml) as vrt, rasterio.open(rows.path.iloc[0]) as src:
        fine, coarse = vrt.read(1), src.read(1)
    assert fine.shape == (grid.height, grid.width)
    np.testing.assert_allclose(fine[::2, ::2], coarse * 2.0 + 1.0, rtol=1e-6)
    np.testing.assert_allclose(fine[1::2, 1::2], coarse * 2.0 + 1.0, rtol=1e-6)


# --- late errors made early (issue 9) ---


def _truncate(path, fraction=0.6):
    """Rewrite a GeoTIFF uncompressed (same grid and values), then cut it to `fraction` of its bytes."""
    with rasterio.open(path) as src:
        data, profile = src.read(), src.profile
    profile.update(compress=None, tiled=False)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * fraction)])


def test_truncated_file_is_named_before_grass(copy_scene, tmp_path):
    path, df = copy_scene
    line = int(df.index[(df.sensor == "S2") & (df.semantic_label == "B08")][1]) + 2
    victim = path.parent / df.loc[line - 2, "path"]
    _truncate(victim)
    with rasterio.open(victim) as ds:  # the header survived: only reading pixels fails
        assert ds.width == 32
    project = tmp_path / "grassdata" / "study"
    with pytest.raises(ManifestError, match=rf"manifest.csv:{line}: file .*{victim.name} has a valid header but its "
                                            r"pixels cannot be read \(truncated or corrupt"):
        ingest.prepare_project(path, sensors(), {}, project, tmp_path / "checked.csv")
    assert not (tmp_path / "grassdata").exists() and not (tmp_path / "checked.csv").exists()


def test_acquisitions_less_than_a_second_apart_name_both_lines(copy_scene):
    path, df = copy_scene
    s2_times = sorted(df[df.sensor == "S2"].start_time.unique())
    first, second = s2_times[0], s2_times[1]
    close = (pd.Timestamp(first) + pd.Timedelta(milliseconds=400)).isoformat().replace("+00:00", "Z")
    df.loc[df.start_time == second, "start_time"] = close
    a = int(df.index[df.start_time == first].min()) + 2
    b = int(df.index[df.start_time == close].min()) + 2
    lo, hi = sorted((a, b))
    with pytest.raises(ManifestError, match=rf"manifest.csv:{hi}: S2 acquisition .* is only 0.4 s after the one on "
                                            rf"line {lo} .*one-second resolution"):
        manifest.load(save(df, path), sensors())


def test_one_band_a_fraction_of_a_second_off_is_named(copy_scene):
    path, df = copy_scene
    row = int(df.index[(df.sensor == "S2") & (df.semantic_label == "B04")][0])
    df.loc[row, "start_time"] = df.loc[row, "start_time"].replace("Z", ".300Z")
    with pytest.raises(ManifestError, match=rf"manifest.csv:{row + 2}: S2 acquisition .* is only 0.3 s after"):
        manifest.load(save(df, path), sensors())


def test_scale_overflowing_float32_for_the_file_dtype_names_line_and_key(scene):
    cfg = sensors()
    cfg["S2"]["scale"] = 1e35  # fine as a number, but uint16 65535 * 1e35 > float32 max
    with pytest.raises(ManifestError, match=r"manifest.csv:\d+: file .* is uint16; its range times config key "
                                            r"sensors.S2.scale \(1e\+35\).* beyond float32"):
        manifest.load(scene, cfg)
    # the mask band is imported unscaled, and float files (S1 here) are not judged by their dtype range
    cfg = sensors()
    cfg["S1"]["scale"] = 1e30
    manifest.load(scene, cfg)


def test_tile_size_larger_than_the_data_region(copy_scene, tmp_path):
    path, _ = copy_scene
    with pytest.raises(ManifestError, match=r"config key tiles.size \(64\) is larger than the region from the data "
                                            r"\(32 x 32 cells\); use a size <= 32"):
        manifest.load(path, sensors(), tile_size=64)
    manifest.load(path, sensors(), tile_size=32)
    with pytest.raises(ManifestError, match="tiles.size"):
        ingest.prepare_project(path, sensors(), {}, tmp_path / "grassdata" / "s", tmp_path / "c.csv", tile_size=40)
    assert not (tmp_path / "grassdata").exists()


class _Proc:
    def __init__(self, rc):
        self.rc, self.waited = rc, False

    def wait(self):
        self.waited = True
        return self.rc


def test_failed_band_import_is_reported_with_its_own_band(scene, monkeypatch):
    """r.in.gdal of B08 fails: the error names B08 (it used to name the band started after it)."""
    import sys
    import types

    fake_grass = types.ModuleType("grass")
    fake_grass.temporal = types.SimpleNamespace(init=lambda: None)
    monkeypatch.setitem(sys.modules, "grass", fake_grass)
    monkeypatch.setitem(sys.modules, "grass.temporal", fake_grass.temporal)
    procs = []

    class GS:
        def gisenv(self):
            return {"MAPSET": "m"}

        def run_command(self, *a, **kw):
            if a[0] != "g.region":
                raise AssertionError(f"{a[0]} ran after a failed import")

        def start_command(self, module, input, **kw):
            procs.append(_Proc(1 if input.endswith("B08.vrt") else 0))
            return procs[-1]

    df, grid = manifest.load(scene, sensors())
    with pytest.raises(RuntimeError, match=r"importing S2 band B08 \("):
        ingest.import_sensor(GS(), df[df.sensor == "S2"], grid, "S2", sensors()["S2"])
    assert all(p.waited for p in procs)  # nothing left running behind the error
