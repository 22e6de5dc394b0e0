"""Tests for stfuse.tiles: tiling, the blocked split, export/load/reassemble and statistics."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from stfuse.prior import append_prior, prior_layout
from stfuse.tiles import (
    block_split,
    clear_mask,
    export_tiles,
    load_tiles,
    reassemble,
    tile_origins,
)

OPTICAL = ("B02", "B03", "B04", "B08")
SAR = ("VV", "VH")


def make_channels(optical=OPTICAL, sar=SAR, static=("dem",)):
    chans = [{"name": n, "sensor": "S2", "kind": "optical"} for n in optical]
    chans.append({"name": "valid", "sensor": "S2", "kind": "valid"})
    chans += [{"name": n, "sensor": "S1", "kind": "sar"} for n in sar]
    chans += [{"name": n, "sensor": "static", "kind": "static"} for n in static]
    return chans


def make_dates(n, step_days=5, missing_sar=()):
    t0 = pd.Timestamp("2021-04-03T10:36:12Z")
    out = []
    for i in range(n):
        ts = t0 + pd.Timedelta(days=step_days * i, hours=(i % 3) * 0.25)
        has_sar = i not in missing_sar
        out.append({
            "start_time": ts.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "optical_id": f"S2_{i:03d}",
            "sar_id": f"S1_{i:03d}" if has_sar else None,
            "sar_gap_days": (1.5 if i % 2 else -2.0) if has_sar else None,
            "clear_fraction": 0.5,
        })
    return out


def make_cube(n_dates=6, height=80, width=96, seed=0, cloud=0.3, nan=0.02):
    """Random cube with clouds (valid 0), no-data (NaN) holes and a constant DEM."""
    rng = np.random.default_rng(seed)
    channels = make_channels()
    n_opt, n_sar = len(OPTICAL), len(SAR)
    cube = np.empty((n_dates, len(channels), height, width), dtype=np.float32)
    cube[:, :n_opt] = rng.uniform(0.0, 0.5, (n_dates, n_opt, height, width))
    cube[:, n_opt] = (rng.random((n_dates, height, width)) > cloud).astype(np.float32)
    cube[:, n_opt + 1:n_opt + 1 + n_sar] = rng.normal(-12, 3, (n_dates, n_sar, height, width))
    cube[:, -1] = rng.uniform(100, 300, (height, width))[None]
    holes = rng.random((n_dates, height, width)) < nan
    cube[:, n_opt][holes] = np.nan
    cube[:, 0][holes] = np.nan
    cube[:, n_opt + 1][rng.random((n_dates, height, width)) < nan] = np.nan
    return cube, channels, make_dates(n_dates)


EXPORT = dict(size=32, overlap=8, min_valid_fraction=0.0, block_size=48, val_fraction=0.3, seed=3)


def paint(origins, size, height, width):
    canvas = np.zeros((height, width), dtype=np.int32)
    for r, c in origins:
        canvas[r:r + size, c:c + size] += 1
    return canvas


# ------------------------------------------------------------------------------ tile_origins

@pytest.mark.parametrize("height,width,size,overlap", [
    (64, 64, 64, 0), (100, 70, 32, 8), (256, 256, 64, 16), (97, 131, 20, 19), (50, 33, 33, 0),
])
def test_tile_origins_cover_every_pixel_flush_with_border(height, width, size, overlap):
    origins = tile_origins(height, width, size, overlap)
    assert (paint(origins, size, height, width) >= 1).all()
    rows = sorted({r for r, _ in origins})
    cols = sorted({c for _, c in origins})
    assert len(origins) == len(rows) * len(cols)  # a full grid, row-major
    assert origins == sorted(origins)
    assert rows[0] == 0 and cols[0] == 0
    assert rows[-1] + size == height and cols[-1] + size == width  # no padding
    stride = size - overlap
    assert all(b - a == stride for a, b in zip(rows[:-2], rows[1:-1]))
    assert all(0 < b - a <= stride for a, b in zip(rows, rows[1:]))
    assert all(0 < b - a <= stride for a, b in zip(cols, cols[1:]))


def test_tile_origins_exact_fit():
    assert tile_origins(112, 64, 64, 16) == [(0, 0), (48, 0)]
    assert tile_origins(64, 64, 64, 10) == [(0, 0)]


@pytest.mark.parametrize("args,words", [
    ((50, 100, 64, 0), ("size", "height")),
    ((100, 50, 64, 0), ("size", "width")),
    ((100, 100, 32, 32), ("overlap",)),
    ((100, 100, 32, -1), ("overlap",)),
    ((100, 100, 0, 0), ("size",)),
])
def test_tile_origins_errors(args, words):
    with pytest.raises(ValueError) as err:
        tile_origins(*args)
    for word in words:
        assert word in str(err.value)


# ------------------------------------------------------------------------------- block_split

def test_block_split_no_pixel_shared_between_splits():
    height = width = 640
    size = 32
    origins = tile_origins(height, width, size, 8)
    split = block_split(origins, size, block_size=96, val_fraction=0.25, seed=7)
    assert len(split) == len(origins) and set(split) == {"train", "val", "gap"}
    train = [o for o, s in zip(origins, split) if s == "train"]
    val = [o for o, s in zip(origins, split) if s == "val"]
    overlap = (paint(train, size, height, width) > 0) & (paint(val, size, height, width) > 0)
    assert not overlap.any()
    # whole blocks: all tiles of a block share the split (ignoring gap tiles)
    by_block = {}
    for (r, c), s in zip(origins, split):
        by_block.setdefault((r // 96, c // 96), set()).add("val" if s == "val" else "train")
    assert all(len(v) == 1 for v in by_block.values())
    n_val_blocks = sum(v == {"val"} for v in by_block.values())
    assert n_val_blocks == round(0.25 * len(by_block))
    # gap tiles are exactly the train-block tiles touching a val footprint
    val_canvas = paint(val, size, height, width) > 0
    for (r, c), s in zip(origins, split):
        if s != "val":
            touches = val_canvas[r:r + size, c:c + size].any()
            assert (s == "gap") == touches


def test_block_split_seeded():
    origins = tile_origins(640, 640, 32, 8)
    a = block_split(origins, 32, 96, 0.3, seed=1)
    assert a == block_split(origins, 32, 96, 0.3, seed=1)
    assert a != block_split(origins, 32, 96, 0.3, seed=2)


def test_block_split_edge_cases():
    origins = tile_origins(128, 128, 32, 0)  # 4 x 4 tiles
    assert set(block_split(origins, 32, 64, 0.0, 0)) == {"train"}
    assert set(block_split(origins, 32, 1000, 0.5, 0)) == {"train"}  # one block
    # >= 2 blocks: at least one block in each split (tiles do not overlap: no gap tiles)
    split = block_split(origins, 32, 64, 0.01, 0)
    assert split.count("val") == 4 and split.count("train") == 12
    split = block_split(origins, 32, 64, 0.99, 0)
    assert split.count("val") == 12 and split.count("train") == 4
    assert block_split([], 32, 64, 0.5, 0) == []
    with pytest.raises(ValueError, match="val_fraction"):
        block_split(origins, 32, 64, 1.5, 0)


# -------------------------------------------------------------------- export / load / reassemble

def test_export_load_reassemble_roundtrip(tmp_path):
    cube, channels, dates = make_cube()
    summary = export_tiles(cube, channels, dates, tmp_path, **EXPORT)
    tiles, index, meta, stats = load_tiles(tmp_path)
    # the prior channels are appended, computed on the whole cube (not tile by tile)
    full_cube, full_channels = append_prior(cube, channels, dates)
    assert len(full_channels) == len(channels) + 5  # 4 band priors + prior_present
    assert isinstance(tiles, np.memmap) and tiles.dtype == np.float32
    assert tiles.shape == (len(index), 6, len(full_channels), 32, 32)
    assert summary["tiles_shape"] == list(tiles.shape)
    assert list(index.columns) == ["tile", "row", "col", "split", "valid_fraction"]
    assert index["tile"].tolist() == list(range(len(index)))
    assert set(index["split"]) <= {"train", "val"}
    assert summary["n_train"] == (index["split"] == "train").sum() > 0
    assert summary["n_val"] == (index["split"] == "val").sum() > 0
    assert summary["n_tiles"] == len(index)
    assert summary["bytes_written"] >= tiles.nbytes
    origins = list(zip(index["row"], index["col"]))
    for i, (r, c) in enumerate(origins):
        np.testing.assert_array_equal(tiles[i], full_cube[:, :, r:r + 32, c:c + 32])
        clear = clear_mask(cube[:, :, r:r + 32, c:c + 32], 4, range(4))
        assert index["valid_fraction"][i] == pytest.approx(clear.mean(), abs=1e-12)
    # with val_fraction=0 nothing is dropped, so reassembling gives back the cube exactly
    out = tmp_path / "all"
    export_tiles(cube, channels, dates, out, **dict(EXPORT, val_fraction=0.0))
    tiles, index, _, _ = load_tiles(out)
    assert len(index) == len(tile_origins(80, 96, 32, 8))
    full = reassemble(tiles, list(zip(index["row"], index["col"])), 80, 96)
    assert full.dtype == np.float32 and full.shape == full_cube.shape
    np.testing.assert_array_equal(full, full_cube)  # NaN in the same places
    assert np.isnan(full).sum() == np.isnan(full_cube).sum() > 0
    np.testing.assert_array_equal(full[:, :len(channels)], cube)


def test_reassemble_with_split_leaves_uncovered_nan(tmp_path):
    cube, channels, dates = make_cube()
    export_tiles(cube, channels, dates, tmp_path, **EXPORT)
    tiles, index, _, _ = load_tiles(tmp_path)
    origins = list(zip(index["row"], index["col"]))
    full = reassemble(tiles, origins, 80, 96)
    covered = paint(origins, 32, 80, 96) > 0
    cube = append_prior(cube, channels, dates)[0]
    np.testing.assert_array_equal(full[..., covered], cube[..., covered])
    assert np.isnan(full[..., ~covered]).all()


def test_reassemble_averages_overlaps_ignoring_nan():
    tiles = np.zeros((2, 1, 1, 4, 4), dtype=np.float32)
    tiles[0] = 1.0
    tiles[1] = 3.0
    tiles[1, 0, 0, 0, 0] = np.nan  # at (0, 2): only tile 0 has data
    full = reassemble(tiles, [(0, 0), (0, 2)], 4, 6)
    np.testing.assert_array_equal(full[0, 0, :, :2], 1.0)
    np.testing.assert_array_equal(full[0, 0, 1:, 2:4], 2.0)
    assert full[0, 0, 0, 2] == 1.0
    np.testing.assert_array_equal(full[0, 0, :, 4:], 3.0)
    weighted = reassemble(tiles, [(0, 0), (0, 2)], 4, 6, weights=np.full((4, 4), 2.0))
    np.testing.assert_array_equal(weighted, full)
    with pytest.raises(ValueError, match="outside"):
        reassemble(tiles, [(0, 0), (0, 4)], 4, 6)


def test_min_valid_fraction_filters_and_errors(tmp_path):
    cube, channels, dates = make_cube(cloud=0.0, nan=0.0)
    cube[:, 4, :40, :] = 0.0  # top half always cloudy
    cube[:, 4, 78, :] = 0.0  # and one more row: no tile is fully clear
    summary = export_tiles(cube, channels, dates, tmp_path / "a",
                           **dict(EXPORT, val_fraction=0.0, min_valid_fraction=0.5))
    _, index, _, _ = load_tiles(tmp_path / "a")
    assert (index["valid_fraction"] >= 0.5).all()
    assert summary["n_low_valid"] > 0
    assert (index["row"] >= 24).all()  # row 0 tiles are fully cloudy, row 24 half
    with pytest.raises(ValueError, match="min_valid_fraction"):
        export_tiles(cube, channels, dates, tmp_path / "b",
                     **dict(EXPORT, val_fraction=0.0, min_valid_fraction=0.99))
    assert not (tmp_path / "b" / "tiles.npy").exists()


def test_export_validation(tmp_path):
    cube, channels, dates = make_cube(n_dates=3)
    with pytest.raises(ValueError, match="len\\(channels\\)"):
        export_tiles(cube, channels[:-1], dates, tmp_path, **EXPORT)
    with pytest.raises(ValueError, match="len\\(dates\\)"):
        export_tiles(cube, channels, dates[:-1], tmp_path, **EXPORT)
    with pytest.raises(ValueError, match="4 dimensions"):
        export_tiles(cube[0], channels, dates, tmp_path, **EXPORT)
    with pytest.raises(ValueError, match="size"):
        export_tiles(cube, channels, dates, tmp_path, **dict(EXPORT, size=200))
    with pytest.raises(ValueError, match="time order"):
        export_tiles(cube, channels, dates[::-1], tmp_path, **EXPORT)
    bad = [dict(ch, kind="optical") if ch["kind"] == "valid" else ch for ch in channels]
    with pytest.raises(ValueError, match="valid"):
        export_tiles(cube, bad, dates, tmp_path, **EXPORT)


# -------------------------------------------------------------------------------- metadata

def test_channels_json(tmp_path):
    cube, channels, dates = make_cube()
    region = {"bounds": {"n": 5.0e6, "s": 4.99e6, "e": 6.1e5, "w": 6.0e5},
              "resolution": 10.0, "epsg": 32633}
    export_tiles(cube, channels, dates, tmp_path, region=region, **EXPORT)
    meta = json.loads((tmp_path / "channels.json").read_text())
    assert meta["channels"] == channels + prior_layout(channels)
    assert [c["name"] for c in meta["channels"][len(channels):]] == \
        ["B02_prior", "B03_prior", "B04_prior", "B08_prior", "prior_present"]
    assert {c["kind"] for c in meta["channels"][len(channels):]} == {"prior"}
    assert meta["prior"] is True
    assert meta["size"] == 32 and meta["overlap"] == 8
    assert meta["region"] == region
    assert meta["shape"] == {"dates": 6, "channels": len(channels) + 5, "height": 80, "width": 96}
    assert len(meta["dates"]) == 6
    for given, stored in zip(dates, meta["dates"]):
        assert {k: stored[k] for k in given} == given
    offsets = [d["offset_days"] for d in meta["dates"]]
    assert offsets[0] == 0.0
    assert offsets[1] == pytest.approx(5 + 0.25 / 24)
    assert offsets[3] == pytest.approx(15.0)
    assert meta["split"] == {"block_size": 48, "val_fraction": 0.3, "seed": 3,
                             "min_valid_fraction": 0.0}
    # without a region it is stored as null
    export_tiles(cube, channels, dates, tmp_path / "noregion", **EXPORT)
    assert json.loads((tmp_path / "noregion" / "channels.json").read_text())["region"] is None


# ----------------------------------------------------------------------------------- stats

def _train_mask(index, size, height, width):
    train = index[index["split"] == "train"]
    return paint(zip(train["row"], train["col"]), size, height, width) > 0


def test_stats_on_train_only(tmp_path):
    cube, channels, dates = make_cube()
    export_tiles(cube, channels, dates, tmp_path / "a", **EXPORT)
    _, index, _, stats = load_tiles(tmp_path / "a")
    assert stats["computed_on"] == "train"
    names = [c["name"] for c in channels]
    assert [c["name"] for c in stats["channels"]] == \
        names + [f"{n}_prior" for n in OPTICAL] + ["prior_present"]
    train = _train_mask(index, 32, 80, 96)
    assert 0 < train.sum() < train.size
    # prior channels: the statistics of their band (same units as the target); flag: identity
    by_name = {c["name"]: c for c in stats["channels"]}
    for band in OPTICAL:
        prior_entry = by_name[f"{band}_prior"]
        assert prior_entry["kind"] == "prior" and prior_entry["band"] == band
        for key in ("mean", "std", "count"):
            assert prior_entry[key] == by_name[band][key]
    assert {k: by_name["prior_present"][k] for k in ("mean", "std")} == {"mean": 0.0, "std": 1.0}
    # reference: train pixels once each; NaN ignored; optical only where clear
    clear = clear_mask(cube, 4, range(4))
    for i, entry in enumerate(stats["channels"][:len(channels)]):
        x = cube[:, i][:, train]
        keep = np.isfinite(x)
        if channels[i]["kind"] == "optical":
            keep &= clear[:, train]
        x = x[keep].astype(np.float64)
        assert entry["count"] == x.size
        assert entry["mean"] == pytest.approx(x.mean(), rel=1e-9, abs=1e-12)
        assert entry["std"] == pytest.approx(max(x.std(), 1e-6), rel=1e-7)
    # change every non-train pixel drastically (validity untouched, so the split is the same)
    changed = cube.copy()
    changed[:, :4, ~train] = 1000.0
    changed[:, 5:, ~train] = -5000.0
    export_tiles(changed, channels, dates, tmp_path / "b", **EXPORT)
    _, index_b, _, stats_b = load_tiles(tmp_path / "b")
    pd.testing.assert_frame_equal(index, index_b)
    assert stats_b["channels"] == stats["channels"]


def test_stats_std_floor_and_empty_channel(tmp_path):
    cube, channels, dates = make_cube()
    cube[:, -1] = 42.0  # constant DEM
    cube[:, 5] = np.nan  # no VV at all
    export_tiles(cube, channels, dates, tmp_path, **EXPORT)
    _, _, _, stats = load_tiles(tmp_path)
    by_name = {c["name"]: c for c in stats["channels"]}
    assert by_name["dem"]["std"] == 1e-6 and by_name["dem"]["mean"] == pytest.approx(42.0)
    assert by_name["VV"] == {"name": "VV", "kind": "sar", "mean": 0.0, "std": 1.0, "count": 0}


# ----------------------------------------------------------------------------------- prior

def test_export_without_prior_keeps_the_old_layout(tmp_path):
    cube, channels, dates = make_cube()
    summary = export_tiles(cube, channels, dates, tmp_path, prior=False, **EXPORT)
    tiles, index, meta, stats = load_tiles(tmp_path)
    assert tiles.shape[2] == len(channels) and summary["tiles_shape"][2] == len(channels)
    assert meta["channels"] == channels and meta["prior"] is False
    assert [c["name"] for c in stats["channels"]] == [c["name"] for c in channels]
    for i, (r, c) in enumerate(zip(index["row"], index["col"])):
        np.testing.assert_array_equal(tiles[i], cube[:, :, r:r + 32, c:c + 32])


def test_prior_interpolates_across_a_cloudy_date(tmp_path):
    """A fully cloudy date gets its prior from the clear dates on both sides, the first date
    from the next one (constant extension)."""
    cube, channels, dates = make_cube(cloud=0.0, nan=0.0)
    cube[2, 4] = 0.0  # date 2 fully cloudy
    export_tiles(cube, channels, dates, tmp_path, **dict(EXPORT, val_fraction=0.0))
    tiles, index, meta, _ = load_tiles(tmp_path)
    names = [c["name"] for c in meta["channels"]]
    b04, b04p, pres = names.index("B04"), names.index("B04_prior"), names.index("prior_present")
    t = tiles[0]
    np.testing.assert_array_equal(t[2, pres], 1.0)
    days = [d["offset_days"] for d in meta["dates"]]
    w = (days[2] - days[1]) / (days[3] - days[1])
    expected = t[1, b04] + w * (t[3, b04] - t[1, b04])
    np.testing.assert_allclose(t[2, b04p], expected, rtol=1e-6)
    # first date of a clear series: constant extension from date 1
    np.testing.assert_array_equal(t[0, b04p], t[1, b04])


def test_export_rejects_prior_channels_from_the_caller(tmp_path):
    cube, channels, dates = make_cube(n_dates=3)
    full, full_channels = append_prior(cube, channels, dates)
    with pytest.raises(ValueError, match="prior channels itself"):
        export_tiles(full, full_channels, dates, tmp_path, **EXPORT)
    with pytest.raises(ValueError, match="prior must be True or False"):
        export_tiles(cube, channels, dates, tmp_path, prior="yes", **EXPORT)
    bad = full_channels[:-1] + [dict(full_channels[-1], name="flag")]
    with pytest.raises(ValueError, match="prior channels must come last"):
        export_tiles(full, bad, dates, tmp_path, **EXPORT)
