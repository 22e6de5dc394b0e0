"""Spatial block plan (stfuse.blocks): partition, halo, stitching, bounds, memory rule, schema."""

import dataclasses
import math
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from stfuse import blocks
from stfuse.blocks import crop_core, cube_bytes, default_size, paste, plan

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("rows, cols, size, halo", [
    (64, 64, 16, 3), (100, 37, 16, 4), (37, 100, 32, 0), (1, 1, 1, 0), (5, 7, 64, 16),
    (129, 65, 64, 16), (50, 50, 50, 10), (17, 23, 3, 2),
])
def test_cores_partition_the_region_exactly(rows, cols, size, halo):
    bs = plan(rows, cols, size, halo)
    assert len(bs) == math.ceil(rows / size) * math.ceil(cols / size)
    count = np.zeros((rows, cols), int)
    for b in bs:
        assert 1 <= b.rows <= size and 1 <= b.cols <= size
        count[b.row0:b.row0 + b.rows, b.col0:b.col0 + b.cols] += 1
        # the read window contains the core and lies inside the region
        assert 0 <= b.read_row0 <= b.row0 and b.row0 + b.rows <= b.read_row0 + b.read_rows <= rows
        assert 0 <= b.read_col0 <= b.col0 and b.col0 + b.cols <= b.read_col0 + b.read_cols <= cols
        assert b.id == f"r{b.brow:04d}c{b.bcol:04d}"
    assert (count == 1).all()
    assert len({b.id for b in bs}) == len(bs)


def test_one_block_when_size_covers_the_region():
    (b,) = plan(5, 7, 64, 16)
    assert (b.row0, b.col0, b.rows, b.cols) == (0, 0, 5, 7)
    assert (b.read_row0, b.read_col0, b.read_rows, b.read_cols) == (0, 0, 5, 7)
    assert (b.core_row_offset, b.core_col_offset) == (0, 0)


def test_halo_is_clipped_at_the_region_edges():
    bs = {b.id: b for b in plan(100, 90, 40, 5)}   # 3 x 3 blocks, last row 20, last column 10
    nw, mid, se = bs["r0000c0000"], bs["r0001c0001"], bs["r0002c0002"]
    assert (nw.read_row0, nw.read_col0, nw.read_rows, nw.read_cols) == (0, 0, 45, 45)
    assert (nw.core_row_offset, nw.core_col_offset) == (0, 0)
    assert (mid.read_row0, mid.read_col0, mid.read_rows, mid.read_cols) == (35, 35, 50, 50)
    assert (mid.core_row_offset, mid.core_col_offset) == (5, 5)
    assert (se.row0, se.col0, se.rows, se.cols) == (80, 80, 20, 10)
    assert (se.read_row0, se.read_col0, se.read_rows, se.read_cols) == (75, 75, 25, 15)
    assert (se.core_row_offset, se.core_col_offset) == (5, 5)


def test_block_is_frozen():
    b = plan(10, 10, 4, 1)[0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        b.rows = 3


@pytest.mark.parametrize("size, halo", [(16, 3), (23, 7), (64, 0)])
def test_crop_core_and_paste_rebuild_the_region(size, halo):
    rng = np.random.default_rng(0)
    region = rng.random((3, 2, 70, 51)).astype(np.float32)
    out = np.full_like(region, np.nan)
    for b in plan(70, 51, size, halo):
        read = region[..., b.read_row0:b.read_row0 + b.read_rows, b.read_col0:b.read_col0 + b.read_cols].copy()
        core = crop_core(read, b)
        assert core.shape[-2:] == (b.rows, b.cols)
        paste(out, core, b)
    np.testing.assert_array_equal(out, region)


def test_paste_into_a_memmap(tmp_path):
    region = np.arange(30 * 20, dtype=np.float32).reshape(30, 20)
    mm = np.lib.format.open_memmap(tmp_path / "out.npy", mode="w+", dtype=np.float32, shape=region.shape)
    for b in plan(30, 20, 8, 2):
        paste(mm, crop_core(region[b.read_row0:b.read_row0 + b.read_rows,
                                   b.read_col0:b.read_col0 + b.read_cols], b), b)
    mm.flush()
    del mm
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), region)


def test_crop_core_and_paste_refuse_wrong_shapes():
    b = plan(30, 20, 8, 2)[5]
    with pytest.raises(ValueError, match=b.id):
        crop_core(np.zeros((b.rows, b.cols)), b)
    with pytest.raises(ValueError, match=b.id):
        paste(np.zeros((30, 20)), np.zeros((b.read_rows, b.read_cols)), b)
    with pytest.raises(ValueError, match="outside"):
        paste(np.zeros((10, 10)), np.zeros((b.rows, b.cols)), b)


REGION = dict(epsg=32632, west=300000.0, east=300000.0 + 51 * 10, south=5000000.0 - 70 * 20,
              north=5000000.0, res_x=10.0, res_y=20.0, cols=51, rows=70)


def test_bounds_in_crs_units_agree_with_the_region():
    bs = plan(REGION["rows"], REGION["cols"], 16, 3)
    for b in bs:
        for halo, (r0, c0, nr, nc) in [(True, (b.read_row0, b.read_col0, b.read_rows, b.read_cols)),
                                       (False, (b.row0, b.col0, b.rows, b.cols))]:
            g = b.bounds(REGION, halo=halo)
            assert g["epsg"] == REGION["epsg"] and (g["res_x"], g["res_y"]) == (10.0, 20.0)
            assert (g["rows"], g["cols"]) == (nr, nc)
            assert g["west"] == pytest.approx(REGION["west"] + c0 * 10.0)
            assert g["north"] == pytest.approx(REGION["north"] - r0 * 20.0)
            assert (g["east"] - g["west"]) / g["res_x"] == pytest.approx(nc)
            assert (g["north"] - g["south"]) / g["res_y"] == pytest.approx(nr)
            assert REGION["west"] <= g["west"] < g["east"] <= REGION["east"]
            assert REGION["south"] <= g["south"] < g["north"] <= REGION["north"]
    # the cores tile the region's extent: corner blocks share its edges exactly
    assert bs[0].bounds(REGION)["west"] == REGION["west"] and bs[0].bounds(REGION)["north"] == REGION["north"]
    assert bs[-1].bounds(REGION)["east"] == REGION["east"] and bs[-1].bounds(REGION)["south"] == REGION["south"]
    whole = plan(70, 51, 100, 3)[0].bounds(REGION)
    assert whole == REGION
    with pytest.raises(ValueError, match="outside the region"):
        plan(71, 51, 16, 3)[-1].bounds(REGION)


def test_full_sentinel2_tile_plans_fast():
    t0 = time.perf_counter()
    bs = plan(10980, 10980, 448, 16)
    assert time.perf_counter() - t0 < 1.0
    assert len(bs) == 25 * 25   # ceil(10980 / 448) = 25
    assert (bs[-1].rows, bs[-1].cols) == (10980 - 24 * 448,) * 2
    assert sum(b.rows * b.cols for b in bs) == 10980 * 10980


def test_default_size_rule():
    size = default_size(100, 10, 2e9, halo=16)
    assert size == 448
    assert size % 64 == 0
    assert cube_bytes(size, 16, 100, 10) <= 1e9 < cube_bytes(size + 64, 16, 100, 10)
    assert cube_bytes(448, 16, 100, 10) == 480 ** 2 * 100 * 10 * 4
    for dates, channels, budget, halo in [(10, 4, 1e9, 0), (365, 12, 16e9, 32), (50, 3, 5e8, 8)]:
        s = default_size(dates, channels, budget, halo=halo)
        assert s % 64 == 0 and cube_bytes(s, halo, dates, channels) <= budget / 2
        assert cube_bytes(s + 64, halo, dates, channels) > budget / 2
    assert default_size(100, 10, 8e9, halo=16) > size   # more memory, bigger blocks
    with pytest.raises(ValueError, match="budget"):
        default_size(1000, 100, 1e6, halo=16)


@pytest.mark.parametrize("size, halo, key", [
    (0, 0, "blocks.size"), (-4, 0, "blocks.size"), (2.5, 0, "blocks.size"), (True, 0, "blocks.size"),
    (16, -1, "blocks.halo"), (16, 16, "blocks.halo"), (16, 20, "blocks.halo"), (16, 1.0, "blocks.halo"),
])
def test_bad_sizes_name_the_key(size, halo, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        plan(100, 100, size, halo)


def test_schema_default_is_default_size():
    schema = yaml.safe_load((ROOT / "workflow/schemas/config.schema.yaml").read_text())
    sec = schema["properties"]["blocks"]
    assert sec["default"] == {} and sec["additionalProperties"] is False
    assert sec["properties"]["halo"]["default"] is None      # null: tiles.size
    tiles_default = schema["properties"]["tiles"]["properties"]["size"]["default"]
    assert sec["properties"]["size"]["default"] == blocks.DEFAULT_SIZE == default_size(100, 10, 2e9, halo=tiles_default)
    assert sec["properties"]["size"]["minimum"] == 16
    assert "own Snakemake job" in sec["description"]
    assert str(blocks.DEFAULT_SIZE) in blocks.__doc__


def test_halo_defaults_to_the_tile_size_and_a_smaller_one_is_refused():
    assert blocks.halo_for({}, 32) == 32 and blocks.halo_for({"halo": None}, 16) == 16
    assert blocks.halo_for({"halo": 40}, 32) == 40
    with pytest.raises(ValueError, match=r"blocks\.halo \(16\) must be at least tiles\.size \(32\)"):
        blocks.halo_for({"halo": 16}, 32)
    p = blocks.study_plan({"rows": 100, "cols": 70}, {"size": 48}, 16)
    assert [b.id for b in p] == ["r0000c0000", "r0000c0001", "r0001c0000", "r0001c0001", "r0002c0000", "r0002c0001"]
    assert p[0].read_rows == 48 + 16 and blocks.find(p, "r0001c0001") == p[3]
    with pytest.raises(ValueError, match="not in the plan"):
        blocks.find(p, "r0009c0000")
    assert blocks.from_dict(blocks.to_dict(p[4])) == p[4]
    assert blocks.id_in_path("results/x/main/blocks/r0002c0001/infer/filled.npy") == "r0002c0001"
    with pytest.raises(ValueError, match="no block id"):
        blocks.id_in_path("results/x/main/infer/filled.npy")


def test_mosaic_reads_any_window_of_the_region_from_core_files(tmp_path):
    from stfuse.cube import Mosaic

    rng = np.random.default_rng(0)
    whole = rng.random((3, 2, 70, 90)).astype(np.float32)
    p = plan(70, 90, 32, 8)
    paths = {}
    for b in p:
        paths[b.id] = tmp_path / f"{b.id}.npy"
        np.save(paths[b.id], np.ascontiguousarray(blocks.crop_core(whole[..., b.read_row0:b.read_row0 + b.read_rows,
                                                                          b.read_col0:b.read_col0 + b.read_cols], b)))
    m = Mosaic(paths, p)
    assert m.shape == whole.shape and len(m) == 3
    np.testing.assert_array_equal(m[...], whole)
    np.testing.assert_array_equal(m[1, 0], whole[1, 0])
    np.testing.assert_array_equal(m[:, :, 29:35, 60:89], whole[:, :, 29:35, 60:89])   # across four blocks
    np.testing.assert_array_equal(m[2, 1, 40, :], whole[2, 1, 40, :])
    with pytest.raises(ValueError, match="no file for block"):
        Mosaic({k: v for k, v in paths.items() if k != "r0001c0001"}, p)
