"""Tests for the built-in synthetic demo scene (no GRASS needed)."""

import hashlib
import json
import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import rasterio

from stfuse.synthetic import make_scene

CLOUDY = (8, 9, 10)
CLEAR = (4, 5, 6)
ISO_Z = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")
SMALL = dict(width=32, height=32, start="2021-05-01", end="2021-06-15")


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    """The default scene, written once for the whole module."""
    out = tmp_path_factory.mktemp("scene")
    manifest = make_scene(out)
    return out, manifest


def read(path):
    with rasterio.open(path) as ds:
        return ds.read(1)


def by_date(manifest_path):
    """{start_time: {label: absolute path}} for one manifest."""
    m = pd.read_csv(manifest_path)
    out = {}
    for row in m.itertuples():
        out.setdefault(row.start_time, {})[row.semantic_label] = manifest_path.parent / row.path
    return out


def hashes(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(root).rglob("*")) if p.is_file()}


def test_manifest_format(scene):
    out, manifest = scene
    assert manifest == out / "manifest.csv"
    m = pd.read_csv(manifest)
    assert list(m.columns) == ["path", "sensor", "semantic_label", "start_time"]
    assert set(m.sensor) == {"S1", "S2"}
    assert set(m[m.sensor == "S2"].semantic_label) == {"B02", "B03", "B04", "B08", "SCL"}
    assert set(m[m.sensor == "S1"].semantic_label) == {"VV", "VH"}
    assert all(ISO_Z.match(t) for t in m.start_time)
    times = pd.to_datetime(m.start_time, utc=True)
    assert str(times.dt.tz) == "UTC" and times.notna().all()
    for row in m.itertuples():
        assert (out / row.path).is_file(), row.path
        # the file name carries the same instant as the manifest row
        stamp = pd.Timestamp(row.start_time).strftime("%Y%m%dT%H%M%S")
        assert Path(row.path).name == f"{row.sensor}_{row.semantic_label}_{stamp}.tif"
    key = list(zip(m.sensor, times, m.semantic_label))
    assert key == sorted(key)
    counts = m.groupby(["sensor", "start_time"]).size()
    assert (counts.loc["S2"] == 5).all() and (counts.loc["S1"] == 2).all()

    truth = pd.read_csv(out / "truth" / "manifest.csv")
    assert list(truth.columns) == ["path", "sensor", "semantic_label", "start_time"]
    assert set(truth.sensor) == {"S2"} and "SCL" not in set(truth.semantic_label)
    assert all((out / "truth" / p).is_file() for p in truth.path)
    s2 = m[(m.sensor == "S2") & (m.semantic_label != "SCL")]
    assert sorted(zip(truth.semantic_label, truth.start_time)) == sorted(zip(s2.semantic_label, s2.start_time))


def test_deterministic(tmp_path):
    a = hashes(make_scene(tmp_path / "a", seed=3, **SMALL).parent)
    b = hashes(make_scene(tmp_path / "b", seed=3, **SMALL).parent)
    c = hashes(make_scene(tmp_path / "c", seed=4, **SMALL).parent)
    assert len(a) > 20 and a == b
    # another seed moves the acquisition times (file names) and changes the pixels
    assert set(a) != set(c)
    first_a = read(tmp_path / "a" / sorted(k for k in a if k.startswith("S2/S2_B08"))[0])
    first_c = read(tmp_path / "c" / sorted(k for k in c if k.startswith("S2/S2_B08"))[0])
    assert not np.array_equal(first_a, first_c)


def test_optical_and_sar_never_coincide(scene):
    m = pd.read_csv(scene[1])
    t = pd.to_datetime(m.start_time, utc=True)
    optical, sar = set(t[m.sensor == "S2"]), set(t[m.sensor == "S1"])
    assert len(optical) >= 25 and len(sar) >= 20
    assert not optical & sar
    assert min(abs(o - s) for o in optical for s in sar) > pd.Timedelta(hours=1)
    # revisits are roughly as asked
    assert 3.5 < pd.Series(sorted(optical)).diff().dt.days.mean() < 6.5


def test_grids_and_dtypes(scene):
    out, manifest = scene
    m = pd.read_csv(manifest)
    s2 = out / m[m.semantic_label == "B04"].path.iloc[0]
    s1 = out / m[m.semantic_label == "VH"].path.iloc[0]
    with rasterio.open(s2) as a, rasterio.open(s1) as b:
        assert a.crs.to_epsg() == b.crs.to_epsg() == 32631
        assert a.res == (10.0, 10.0) and b.res == (20.0, 20.0)
        assert (a.height, a.width) == (64, 64) and (b.height, b.width) == (32, 32)
        assert (a.transform.c, a.transform.f) == (b.transform.c, b.transform.f) == (500000.0, 5650000.0)
        assert a.bounds == b.bounds
        assert a.dtypes[0] == "uint16" and a.nodata == 0
        assert b.dtypes[0] == "float32" and np.isnan(b.nodata)
    for row in m[m.sensor == "S1"].itertuples():
        db = read(out / row.path)
        assert np.isfinite(db).all() and -45 < db.min() and db.max() < 5


def test_s2_values_and_scl_codes(scene):
    out, manifest = scene
    for labels in by_date(manifest).values():
        if "SCL" not in labels:
            continue
        with rasterio.open(labels["SCL"]) as ds:
            assert ds.dtypes[0] == "uint8" and ds.nodata == 0
            scl = ds.read(1)
        assert set(np.unique(scl)) <= {3, 4, 5, 6, 8, 9, 10}
        for band in ("B02", "B03", "B04", "B08"):
            dn = read(labels[band])
            assert dn.dtype == np.uint16
            assert dn.min() >= 1 and dn.max() <= 6000  # reflectance 0..0.6, 0 reserved for nodata


def test_fully_cloudy_and_clear_dates(scene):
    out, manifest = scene
    info = json.loads((out / "scene.json").read_text())
    fractions = {}
    for t, labels in by_date(manifest).items():
        if "SCL" in labels:
            fractions[t] = np.isin(read(labels["SCL"]), CLOUDY).mean()
    full = sorted(t for t, f in fractions.items() if f >= 0.99)
    clear = [t for t, f in fractions.items() if f == 0]
    assert len(full) >= 1 and len(clear) >= 2
    assert full == sorted(info["fully_cloudy_dates"])
    assert 0.25 < np.mean(list(fractions.values())) < 0.55  # default cloud_cover 0.4
    listed = {d["start_time"]: d["cloud_fraction"] for d in info["optical_dates"]}
    assert listed.keys() == fractions.keys()
    assert all(abs(listed[t] - fractions[t]) < 1e-3 for t in listed)
    assert info["parameters"]["seed"] == 0 and info["parameters"]["cloud_cover"] == 0.4


def test_truth_matches_clear_pixels_and_differs_under_clouds(scene):
    out, manifest = scene
    observed, truth = by_date(manifest), by_date(out / "truth" / "manifest.csv")
    n_cloud = n_shadow = 0
    for t, tr in truth.items():
        scl = read(observed[t]["SCL"])
        obs = np.stack([read(observed[t][b]) for b in ("B02", "B03", "B04", "B08")]).astype(int)
        ref = np.stack([read(tr[b]) for b in ("B02", "B03", "B04", "B08")]).astype(int)
        clear, cloud, shadow = np.isin(scl, CLEAR), np.isin(scl, CLOUDY), scl == 3
        assert (obs[:, clear] == ref[:, clear]).all()
        assert (obs[:, cloud | shadow] != ref[:, cloud | shadow]).any(axis=0).all()
        thick = scl == 9
        if thick.any():  # clouds are bright, shadows dark, as in real data
            assert obs[0, thick].mean() > ref[0, thick].mean() + 1000
        if shadow.any():
            assert obs[3, shadow].mean() < ref[3, shadow].mean()
        n_cloud, n_shadow = n_cloud + cloud.sum(), n_shadow + shadow.sum()
    assert n_cloud > 0 and n_shadow > 0


def test_vh_follows_ndvi_of_truth(scene):
    out, manifest = scene
    truth = by_date(out / "truth" / "manifest.csv")
    opt_times = pd.to_datetime(pd.Series(sorted(truth)), utc=True)
    sar = {t: v for t, v in by_date(manifest).items() if "VH" in v}
    vh_all, ndvi_all, per_date = [], [], []
    for t, labels in sar.items():
        nearest = opt_times.iloc[(opt_times - pd.Timestamp(t)).abs().argmin()].strftime("%Y-%m-%dT%H:%M:%SZ")
        red = read(truth[nearest]["B04"]).astype(float)
        nir = read(truth[nearest]["B08"]).astype(float)
        ndvi = (nir - red) / (nir + red)
        ndvi20 = ndvi.reshape(ndvi.shape[0] // 2, 2, ndvi.shape[1] // 2, 2).mean(axis=(1, 3))
        vh = read(labels["VH"])
        assert vh.shape == ndvi20.shape
        per_date.append(np.corrcoef(vh.ravel(), ndvi20.ravel())[0, 1])
        vh_all.append(vh.ravel())
        ndvi_all.append(ndvi20.ravel())
    pooled = np.corrcoef(np.concatenate(vh_all), np.concatenate(ndvi_all))[0, 1]
    assert pooled > 0.5
    assert np.median(per_date) > 0.4 and np.mean(np.asarray(per_date) > 0) > 0.9


def test_cloud_free_scene_and_logging(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="stfuse.synthetic"):
        manifest = make_scene(tmp_path / "clear", cloud_cover=0.0, **SMALL)
    assert any(r.name == "stfuse.synthetic" for r in caplog.records)
    for labels in by_date(manifest).values():
        if "SCL" in labels:
            assert not np.isin(read(labels["SCL"]), CLOUDY + (3,)).any()


@pytest.mark.parametrize("kwargs, name", [
    (dict(start="2021-06-01", end="2021-05-01"), "end"),
    (dict(cloud_cover=1.5), "cloud_cover"),
    (dict(cloud_cover=-0.1), "cloud_cover"),
    (dict(fully_cloudy_fraction=2.0), "fully_cloudy_fraction"),
    (dict(width=33), "width"),
    (dict(height=8), "height"),
    (dict(optical_revisit_days=0), "optical_revisit_days"),
    (dict(n_fields=0), "n_fields"),
])
def test_invalid_arguments(tmp_path, kwargs, name):
    with pytest.raises(ValueError, match=name):
        make_scene(tmp_path / "bad", **kwargs)
    assert not (tmp_path / "bad").exists()
