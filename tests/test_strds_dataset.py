"""StrdsDataset on a real GRASS project: the samples of exported tiles, read straight from the STRDS."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pandas as pd
import pytest

torch = pytest.importorskip("torch")
from torch.utils.data import DataLoader, Subset  # noqa: E402

from stfuse import bridge, grass, strds, temporal  # noqa: E402
from stfuse.dataset import GapFillDataset  # noqa: E402

from _scene import ingest_tiny  # noqa: E402

pytestmark = pytest.mark.grass

S2, S1 = "S2@ingest_S2", "S1@ingest_S1"
BANDS, SAR_BANDS = ["B02", "B03", "B04", "B08"], ["VV", "VH"]
MAX_GAP = 1.5  # leaves some optical dates without SAR (NaN SAR channels, dt@sar 0)
TILE = dict(size=8, overlap=4, min_valid_fraction=0.0, block_size=16, val_fraction=0.25, seed=1)
K, MIN_VALID, MASK_SEED = 2, 0.05, 7


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    """The tiny scene ingested, paired, grouped, read into a cube and exported the workflow's way,
    with and without the prior; a mapset of the test's own to read from."""
    root = tmp_path_factory.mktemp("strds")
    _, state, states = ingest_tiny(root)
    bridge.pairing_step(state, states["S2"], states["S1"], root / "pairing", max_gap_days=MAX_GAP)
    groups = bridge.groups_step(state, states["S2"], states["S1"], root / "pairing", root / "groups.json")
    bridge.cube_step(state, root / "groups.json", root / "cube")
    for prior in (True, False):
        bridge.tiles_step(root / "cube", root / f"tiles_{prior}", prior=prior, **TILE)
    grass.own_mapset(state["project"], "strds_test")
    with grass.session(state["project"], "strds_test") as gs:  # TGIS sees the mapsets of the search path
        gs.run_command("g.mapsets", mapset="ingest_S2,ingest_S1", operation="add", quiet=True)
    return root, state, groups


@pytest.fixture
def gs(scene):
    _, state, _ = scene
    with grass.session(state["project"], "strds_test") as gs:
        yield gs


@pytest.fixture(scope="module")
def series(scene):
    _, state, _ = scene
    with grass.session(state["project"], "strds_test"):
        return strds.open_series(S2, BANDS, S1, SAR_BANDS, max_gap_days=MAX_GAP)


def _pair(scene, series, prior, split="train", cache_tiles=8, **kw):
    """(GapFillDataset over the export, StrdsDataset over the STRDS) for the same tiles and stats."""
    root = scene[0]
    tiles_dir = root / f"tiles_{prior}"
    ref = GapFillDataset(tiles_dir, split, k_neighbours=K, min_target_valid=MIN_VALID, **kw)
    ds = strds.StrdsDataset(series, stats=tiles_dir / "stats.json", size=TILE["size"], overlap=TILE["overlap"],
                            k_neighbours=K, prior=prior, origins=list(zip(ref.index.row, ref.index.col)),
                            min_target_valid=MIN_VALID, cache_tiles=cache_tiles, **kw)
    return ref, ds


def _assert_same(a, b):
    for key in ("image", "mask", "target", "target_valid"):
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        np.testing.assert_array_equal(a[key].numpy(), b[key].numpy(), err_msg=key)


def test_series_maps_and_dates_are_the_workflow_groups(scene, series):
    _, _, groups = scene
    assert series.channels == groups["channels"]
    assert series.maps == [g["maps"] for g in groups["groups"]]
    for d, g in zip(series.dates, groups["groups"]):
        assert (d["start_time"], d["optical_id"], d["sar_id"]) == (g["start_time"], g["optical_id"], g["sar_id"])
        assert d["sar_gap_days"] == g["sar_gap_days"]
    assert any(d["sar_id"] is None for d in series.dates) and any(d["sar_id"] for d in series.dates)
    assert set(series.unpaired) == {d["optical_id"] for d in series.dates if d["sar_id"] is None}
    assert len(pickle.dumps(series)) < 20_000


@pytest.mark.parametrize("prior", [True, False])
def test_samples_equal_the_exported_tiles(scene, series, prior):
    ref, ds = _pair(scene, series, prior, extra_mask_seed=MASK_SEED, extra_mask_fraction=0.5)
    assert len(ds) == len(ref) > 0
    assert ds.input_channels == ref.input_channels and ds.target_channels == ref.target_channels
    assert ds.input_spec() == ref.input_spec()
    np.testing.assert_array_equal(ds.clear_fraction, np.load(scene[0] / f"tiles_{prior}" / "clear_fraction.npy")[
        ref.index.tile.to_numpy()])
    masked = 0
    for i in range(len(ds)):
        a, b = ref[i], ds[i]
        assert (b["metadata"]["row"], b["metadata"]["col"], b["metadata"]["t"], b["metadata"]["masked_with"]) == (
            a["metadata"]["row"], a["metadata"]["col"], a["metadata"]["t"], a["metadata"]["masked_with"])
        masked += a["metadata"]["masked_with"] >= 0
        _assert_same(a, b)
    assert 0 < masked < len(ds)  # artificial masking was exercised, and not on every sample


def test_every_tile_and_date_without_selection(scene, series):
    """Default grid and no clear-fraction scan: every (tile, date), each equal to the export's tile."""
    ref, _ = _pair(scene, series, True)
    ds = strds.StrdsDataset(series, stats=scene[0] / "tiles_True" / "stats.json", size=8, overlap=4, k_neighbours=K)
    assert ds.clear_fraction is None and len(ds) == len(ds.origins) * len(series.dates) == 49 * len(series.dates)
    for i in range(0, len(ref), 5):
        a = ref[i]
        m = a["metadata"]
        _assert_same(a, ds[ds.index_of(m["row"], m["col"], m["t"])])


def test_shuffled_reads_through_a_one_tile_cache(scene, series):
    """Jumping between tiles evicts and refills the cache; every sample is still the export's."""
    for prior in (True, False):
        ref, ds = _pair(scene, series, prior, cache_tiles=1)
        for i in np.random.default_rng(0).permutation(len(ds))[:12]:
            _assert_same(ref[int(i)], ds[int(i)])
        assert len(ds._cache) == 1


def test_metadata(scene, series):
    ref, ds = _pair(scene, series, True)
    region = scene[1]["region"]
    a, b = ref[3], ds[3]
    r, c = b["metadata"]["row"], b["metadata"]["col"]
    west, north = region["west"] + 10.0 * c, region["north"] - 10.0 * r
    assert b["bounds"] == (west, north - 80.0, west + 80.0, north)
    assert b["transform"] == (west, 10.0, 0.0, north, 0.0, -10.0)
    assert b["crs"] == f"EPSG:{region['epsg']}" == series.crs
    assert "UTM zone" in series.crs_wkt
    assert b["start_time"] == b["metadata"]["start_time"] == a["metadata"]["start_time"]
    assert b["start_time"].endswith("Z") and pd.Timestamp(b["start_time"]).tzname() == "UTC"
    assert list(b["labels"]) == ref.input_channels and "VV@sar" in b["labels"] and "B04@prior" in b["labels"]
    assert list(b["target_labels"]) == BANDS
    date = series.dates[b["metadata"]["t"]]
    assert b["metadata"]["optical_id"] == date["optical_id"] and b["metadata"]["sar_id"] == (date["sar_id"] or "")
    batch = strds.stack_samples([ds[0], ds[1]])
    assert batch["image"].shape == (2,) + tuple(b["image"].shape) and batch["crs"] == [b["crs"]] * 2
    assert batch["metadata"]["t"] == [ds[0]["metadata"]["t"], ds[1]["metadata"]["t"]]


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_dataloader_workers(scene, series, method):
    """Two workers, each reading with its own gisrc and reader, with no GRASS session open any more."""
    ref, ds = _pair(scene, series, True)
    assert len(pickle.dumps(ds)) < 100_000
    pick = list(range(0, len(ds), max(1, len(ds) // 8)))[:8]
    loader = DataLoader(Subset(ds, pick), batch_size=4, num_workers=2, multiprocessing_context=method)
    want = DataLoader(Subset(ref, pick), batch_size=4, num_workers=0)
    n = 0
    for got, exp in zip(loader, want):
        _assert_same(exp, got)
        assert got["metadata"]["t"].tolist() == exp["metadata"]["t"].tolist()
        assert got["crs"] == [series.crs] * len(got["crs"])
        n += len(got["image"])
    assert n == len(pick)


def test_compute_stats_matches_the_export_over_its_training_cells(scene, series, tmp_path):
    root = scene[0]
    exported = json.loads((root / "tiles_True" / "stats.json").read_text())
    index = pd.read_csv(root / "tiles_True" / "index.csv")
    mask = np.zeros((32, 32), bool)
    for r, c in zip(index[index.split == "train"].row, index[index.split == "train"].col):
        mask[r:r + 8, c:c + 8] = True
    doc = strds.compute_stats(series, pixel_mask=mask, path=tmp_path / "stats.json")
    assert json.loads((tmp_path / "stats.json").read_text()) == doc
    assert [c["name"] for c in doc["channels"]] == [c["name"] for c in exported["channels"]]
    for got, want in zip(doc["channels"], exported["channels"]):
        assert got["count"] == want["count"]
        assert got["mean"] == pytest.approx(want["mean"], rel=1e-9) and got["std"] == pytest.approx(want["std"], rel=1e-9)
    whole = strds.compute_stats(series, prior=False)
    assert whole["computed_on"] == "region" and len(whole["channels"]) == len(series.channels)
    ds = strds.StrdsDataset(series, stats=whole, size=8, prior=False, k_neighbours=1)
    assert np.isfinite(ds[0]["image"].numpy()).all()


def test_errors_name_what_is_at_fault(scene, series, gs):
    import grass.temporal as tgis

    stats = scene[0] / "tiles_True" / "stats.json"
    with pytest.raises(temporal.DatasetError, match="STRDS nope@ingest_S2 not found"):
        strds.StrdsDataset("nope@ingest_S2", BANDS, S1, SAR_BANDS, stats=stats, size=8)
    with pytest.raises(temporal.DatasetError, match="S2@ingest_S2 has no maps with semantic label B05"):
        strds.open_series(S2, ["B02", "B05"], S1, SAR_BANDS)
    with pytest.raises(temporal.DatasetError, match="S1@ingest_S1 has no maps with semantic label HH"):
        strds.open_series(S2, BANDS, S1, ["HH"])
    with pytest.raises(temporal.DatasetError, match="STRDS S2_valid@strds_test not found"):
        strds.open_series(S2, BANDS, valid="S2_valid@strds_test")
    gs.run_command("t.create", output="empty", type="strds", temporaltype="absolute", title="e", description="e")
    tgis.init()
    with pytest.raises(temporal.DatasetError, match="empty@strds_test is empty"):
        strds.open_series(S2, BANDS, "empty@strds_test", SAR_BANDS)
    with pytest.raises(grass.GrassError, match=r"static map <dem> \(channel 'dem'\) not found"):
        strds.open_series(S2, BANDS, static=["dem"])
    with pytest.raises(ValueError, match=r"stats.json: statistics for channels .*prior off"):
        strds.StrdsDataset(series, stats=stats, size=8, prior=False)
    with pytest.raises(ValueError, match="tile size 64 is larger than the region"):
        strds.StrdsDataset(series, stats=stats, size=64)
    with pytest.raises(ValueError, match="the tile at row 30, col 0"):
        strds.StrdsDataset(series, stats=stats, size=8, origins=[(30, 0)])
    with pytest.raises(FileNotFoundError, match="nothing.json does not exist"):
        strds.StrdsDataset(series, stats=scene[0] / "nothing.json", size=8)


def test_mapset_off_the_search_path(scene):
    project = scene[1]["project"]
    grass.own_mapset(project, "strds_bare")
    with grass.session(project, "strds_bare"):
        with pytest.raises(grass.GrassError, match="STRDS S1@ingest_S1: mapset ingest_S1 is not on the search "
                                                   "path of mapset strds_bare"):
            strds.open_series("S1@ingest_S1", ["VV"])


def test_outside_a_session(series, monkeypatch):
    monkeypatch.delenv("GISRC", raising=False)
    with pytest.raises(grass.GrassError, match="need an active GRASS session"):
        strds.open_series(S2, BANDS)
