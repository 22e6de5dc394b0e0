"""Training tiles exported block by block (export_block_tiles + merge_tile_store) are exactly the
whole-region export's: same tiles, bytes, index, split and clear fractions, stats within rounding.

No GRASS: a random cube in memory, cut into block read windows.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pandas as pd
import pytest
import torch

from stfuse import blocks, tiles
from stfuse.blocks import Block
from stfuse.dataset import GapFillDataset

H, W, T = 70, 90, 6
PARAMS = dict(size=16, overlap=4, min_valid_fraction=0.75, block_size=24, val_fraction=0.3, seed=1)
REGION = {"rows": H, "cols": W, "north": 700.0, "south": 0.0, "west": 0.0, "east": 900.0,
          "res_x": 10.0, "res_y": 10.0}


def make_cube(seed=0, n_dates=T, height=H, width=W):
    """3 optical bands, valid, 1 SAR band; clouds as random rectangles, some NaN."""
    rng = np.random.default_rng(seed)
    channels = [{"name": n, "sensor": "S2", "kind": "optical"} for n in ("B02", "B03", "B04")]
    channels += [{"name": "valid", "sensor": "S2", "kind": "valid"},
                 {"name": "VV", "sensor": "S1", "kind": "sar"}]
    cube = np.empty((n_dates, 5, height, width), dtype=np.float32)
    cube[:, :3] = rng.uniform(0.0, 0.5, (n_dates, 3, height, width))
    cube[:, 3] = 1.0
    for t in range(n_dates):
        for _ in range(rng.integers(2, 6)):
            r, c = rng.integers(0, height), rng.integers(0, width)
            h, w = rng.integers(5, 30, 2)
            cube[t, 3, r:r + h, c:c + w] = 0.0
    cube[:, 4] = rng.normal(-12, 3, (n_dates, height, width))
    holes = rng.random((n_dates, height, width)) < 0.02
    cube[:, 3][holes] = np.nan
    cube[:, 1][rng.random((n_dates, height, width)) < 0.01] = np.nan
    cube[:, 4][rng.random((n_dates, height, width)) < 0.02] = np.nan
    t0 = pd.Timestamp("2021-04-03T10:36:12Z")
    dates = [{"start_time": (t0 + pd.Timedelta(days=7 * i)).strftime("%Y-%m-%dT%H:%M:%SZ"),
              "optical_id": f"S2_{i}", "sar_id": f"S1_{i}", "sar_gap_days": 1.0 + i,
              "clear_fraction": 0.5} for i in range(n_dates)]
    return cube, channels, dates


def partition(row_cuts, col_cuts, halo, rows=H, cols=W):
    """Blocks with uneven cores at the given cuts, read with ``halo`` clipped at the edges."""
    out = []
    for br, (r0, r1) in enumerate(zip(row_cuts[:-1], row_cuts[1:])):
        for bc, (c0, c1) in enumerate(zip(col_cuts[:-1], col_cuts[1:])):
            rr0, rr1 = max(0, r0 - halo), min(rows, r1 + halo)
            rc0, rc1 = max(0, c0 - halo), min(cols, c1 + halo)
            out.append(Block(f"r{br:04d}c{bc:04d}", br, bc, r0, c0, r1 - r0, c1 - c0,
                             rr0, rc0, rr1 - rr0, rc1 - rc0))
    return out


LAYOUTS = {
    "one_block": lambda: blocks.plan(H, W, 128, PARAMS["size"]),
    "plan32": lambda: blocks.plan(H, W, 32, PARAMS["size"]),
    "uneven": lambda: partition([0, 5, 23, 41, 70], [0, 17, 50, 51, 90], 20),
    "thin": lambda: partition([0, 1, 12, 70], [0, 90], 16),
}


def export_blocks(cube, channels, dates, layout, root, params=PARAMS, shuffle=False):
    dirs = []
    for b in layout:
        rs, cs = blocks.read_slices(b)
        d = root / "blocks" / b.id
        tiles.export_block_tiles(np.array(cube[:, :, rs, cs]), channels, dates, b, H, W, d,
                                 region=REGION, **params)
        dirs.append(d)
    if shuffle:  # the merge orders blocks itself
        dirs = dirs[::-1]
    store = root / "store"
    tiles.merge_tile_store(dirs, store, region=REGION, **params)
    return store


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    cube, channels, dates = make_cube()
    out = tmp_path_factory.mktemp("whole")
    tiles.export_tiles(cube, channels, dates, out, region=REGION, **PARAMS)
    return cube, channels, dates, out


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def store(request, whole, tmp_path_factory):
    cube, channels, dates, _ = whole
    root = tmp_path_factory.mktemp(request.param)
    return export_blocks(cube, channels, dates, LAYOUTS[request.param](), root,
                         shuffle=request.param == "uneven")


def read_store_tiles(store):
    index = pd.read_csv(store / "index.csv")
    maps = {s: np.load(store / s / "tiles.npy", mmap_mode="r") for s in index["store"].unique()}
    return np.stack([maps[s][i] for s, i in zip(index["store"], index["store_tile"])])


# ------------------------------------------------------------------------------ equality

def test_store_equals_whole_export(whole, store):
    _, _, _, ref = whole
    index = pd.read_csv(store / "index.csv")
    ref_index = pd.read_csv(ref / "index.csv")
    assert list(index.columns) == list(tiles.INDEX_COLUMNS) + list(tiles.STORE_COLUMNS)
    pd.testing.assert_frame_equal(index[list(tiles.INDEX_COLUMNS)], ref_index)
    assert set(ref_index["split"]) == {"train", "val"}
    # the same text, too (valid_fraction written back exactly)
    ref_text = (ref / "index.csv").read_text().splitlines()
    lines = (store / "index.csv").read_text().splitlines()
    got_text = [",".join(line.split(",")[:5]) for line in lines]
    assert got_text == ref_text
    assert np.array_equal(np.load(store / "clear_fraction.npy"),
                          np.load(ref / "clear_fraction.npy"))
    whole_tiles = np.load(ref / "tiles.npy")
    got = read_store_tiles(store)
    assert got.shape == whole_tiles.shape
    assert got.tobytes() == whole_tiles.tobytes()
    meta, ref_meta = (json.loads((d / "channels.json").read_text()) for d in (store, ref))
    assert meta.pop("stores")
    assert meta == ref_meta


def test_store_stats_match(whole, store):
    _, _, _, ref = whole
    stats, ref_stats = (json.loads((d / "stats.json").read_text()) for d in (store, ref))
    assert stats["n_pixels"] == ref_stats["n_pixels"] and stats["n_tiles"] == ref_stats["n_tiles"]
    for a, b in zip(stats["channels"], ref_stats["channels"]):
        assert (a["name"], a["kind"], a["count"], a.get("band")) == \
            (b["name"], b["kind"], b["count"], b.get("band"))
        np.testing.assert_allclose([a["mean"], a["std"]], [b["mean"], b["std"]], rtol=1e-12)


def test_split_counts_match(whole, store, tmp_path):
    """train / val / gap over the whole grid: the blocks' counts add up to export_tiles'."""
    cube, channels, dates, _ = whole
    summary = tiles.export_tiles(cube, channels, dates, tmp_path, region=REGION, **PARAMS)
    docs = [json.loads(p.read_text()) for p in (store.parent / "blocks").glob("*/tiles.json")]
    for key in ("n_train", "n_val", "n_gap", "n_low_valid", "n_tiles"):
        assert sum(d["counts"][key] for d in docs) == summary[key], key
    assert summary["n_gap"] > 0 and summary["n_low_valid"] > 0


def test_block_sha_recorded(store):
    from stfuse.train import _file_digest

    for doc_path in (store.parent / "blocks").glob("*/tiles.json"):
        doc = json.loads(doc_path.read_text())
        assert doc["sha256"] == _file_digest(doc_path.parent / "tiles.npy")
        shape = np.load(doc_path.parent / "tiles.npy", mmap_mode="r").shape
        assert shape == tuple(doc["tiles_shape"])


def _samples(ds):
    return [ds[i] for i in range(len(ds))]


def test_dataset_over_store_same_samples(whole, store):
    """Bit for bit with the whole export's stats.json; within rounding with the store's own."""
    import shutil

    _, _, _, ref = whole
    same_stats = store.parent / "store_ref_stats"  # a sibling: its relative store paths still hold
    same_stats.mkdir(exist_ok=True)
    for name in ("index.csv", "clear_fraction.npy", "channels.json"):
        shutil.copy(store / name, same_stats / name)
    shutil.copy(ref / "stats.json", same_stats / "stats.json")
    kw = dict(k_neighbours=1, extra_mask_seed=3, extra_mask_fraction=0.5)
    for split in ("train", "val"):
        a = GapFillDataset(ref, split, **kw)
        b = GapFillDataset(same_stats, split, **kw)
        c = GapFillDataset(store, split, **kw)
        assert len(a) == len(b) == len(c) > 0
        assert a.input_spec() == b.input_spec()
        assert c.is_store and not a.is_store
        for sa, sb, sc in zip(_samples(a), _samples(b), _samples(c)):
            assert sa["metadata"] == sb["metadata"] == sc["metadata"]
            for key in ("image", "mask", "target", "target_valid"):
                assert torch.equal(sa[key], sb[key]), key
                torch.testing.assert_close(sc[key], sa[key], rtol=1e-5, atol=1e-5)


def test_store_dataset_pickles_and_loads_in_workers(store):
    import pickle

    ds = GapFillDataset(store, "train", k_neighbours=1)
    first = ds[0]
    clone = pickle.loads(pickle.dumps(ds))
    assert not clone._files
    assert torch.equal(clone[0]["image"], first["image"])
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2)
    assert sum(batch["image"].shape[0] for batch in loader) == len(ds)


def test_store_dataset_with_one_open_file_at_a_time(store, monkeypatch):
    """A store has a tiles.npy per block (484 for s2tile): the dataset keeps only a few open."""
    from stfuse import dataset

    want = [s["image"] for s in _samples(GapFillDataset(store, "train", k_neighbours=1))]
    monkeypatch.setattr(dataset, "MAX_OPEN_TILE_FILES", 1)
    ds = GapFillDataset(store, "train", k_neighbours=1)
    got = [s["image"] for s in _samples(ds)]
    assert len(ds._files) == 1  # of len(ds._store_paths) files, evicted in turn
    assert all(torch.equal(a, b) for a, b in zip(want, got))


def test_empty_block_and_no_training_tile(tmp_path):
    cube, channels, dates = make_cube(seed=2)
    empty = LAYOUTS["thin"]()[1]  # core rows 1..11: no tile origin (rows 0, 12, 24, ..)
    rs, cs = blocks.read_slices(empty)
    doc = tiles.export_block_tiles(cube[:, :, rs, cs], channels, dates, empty, H, W, tmp_path / "b",
                                   **PARAMS)
    assert doc["counts"]["n_owned"] == 0 and doc["counts"]["n_pixels"] > 0
    assert np.load(tmp_path / "b" / "tiles.npy").shape == (0, T, 5 + 4, 16, 16)
    assert len(pd.read_csv(tmp_path / "b" / "index.csv")) == 0
    # the whole store without a train tile: export_tiles' errors
    strict = dict(PARAMS, min_valid_fraction=1.0)
    with pytest.raises(ValueError, match="no training tile left"):
        tiles.export_tiles(cube, channels, dates, tmp_path / "w", **strict)
    with pytest.raises(ValueError, match="no training tile left"):
        export_blocks(cube, channels, dates, LAYOUTS["plan32"](), tmp_path / "strict", strict)


def test_merge_refuses_missing_block_and_other_params(whole, tmp_path):
    cube, channels, dates, _ = whole
    layout = LAYOUTS["plan32"]()
    store = export_blocks(cube, channels, dates, layout, tmp_path)
    dirs = sorted((store.parent / "blocks").iterdir())
    with pytest.raises(ValueError, match="do not partition"):
        tiles.merge_tile_store(dirs[:-1], tmp_path / "s2", **PARAMS)
    with pytest.raises(ValueError, match="exported with other"):
        tiles.merge_tile_store(dirs, tmp_path / "s3", **dict(PARAMS, seed=2))


def test_merge_reads_no_tiles_file(whole, tmp_path):
    """The merge needs the blocks' small files only: without any tiles.npy it writes the same."""
    import shutil

    cube, channels, dates, _ = whole
    store = export_blocks(cube, channels, dates, LAYOUTS["uneven"](), tmp_path)
    light = tmp_path / "light"
    for d in (tmp_path / "blocks").iterdir():
        shutil.copytree(d, light / d.name, ignore=shutil.ignore_patterns("tiles.npy"))
    tiles.merge_tile_store(sorted(light.iterdir()), tmp_path / "store2", region=REGION, **PARAMS)
    for name in ("clear_fraction.npy", "stats.json"):
        assert (store / name).read_bytes() == (tmp_path / "store2" / name).read_bytes()


def test_halo_smaller_than_tile_size_raises(tmp_path):
    cube, channels, dates = make_cube()
    layout = blocks.plan(H, W, 32, PARAMS["size"] - 1)
    b = next(b for b in layout if b.read_row0 > 0)
    rs, cs = blocks.read_slices(b)
    with pytest.raises(ValueError, match="blocks.halo"):
        tiles.export_block_tiles(cube[:, :, rs, cs], channels, dates, b, H, W, tmp_path, **PARAMS)
    with pytest.raises(ValueError, match="read window"):
        tiles.export_block_tiles(cube, channels, dates, b, H, W, tmp_path, **PARAMS)


def test_heldout_step(tmp_path):
    """tiles_block_step hides the transplanted cells, as the whole-region export sees them."""
    from stfuse import cube as cube_mod
    from stfuse.steps.tiles import tile_store_step, tiles_block_step

    cube, channels, dates = make_cube(seed=4)
    donors = {"1": 4, "3": 0}
    (tmp_path / "holdout.json").write_text(json.dumps({"donors": donors}))
    hidden = cube_mod.hide(cube, channels, cube_mod.transplanted(cube, channels, donors))
    tiles.export_tiles(hidden, channels, dates, tmp_path / "whole", region=REGION, **PARAMS)
    dirs = []
    for b in blocks.plan(H, W, 32, PARAMS["size"]):
        rs, cs = blocks.read_slices(b)
        d = tmp_path / "cubes" / b.id
        d.mkdir(parents=True)
        np.save(d / cube_mod.CUBE_FILE, cube[:, :, rs, cs])
        cube_mod.write_meta(d, {"channels": channels, "dates": dates, "region": REGION,
                                "block": blocks.to_dict(b)})
        tiles_block_step(d, tmp_path / "tiles" / b.id, holdout_json=tmp_path / "holdout.json",
                         **PARAMS)
        dirs.append(tmp_path / "tiles" / b.id)
    tile_store_step(dirs, tmp_path / "store", **PARAMS)
    assert read_store_tiles(tmp_path / "store").tobytes() == \
        np.load(tmp_path / "whole" / "tiles.npy").tobytes()
    assert np.load(tmp_path / "cubes" / "r0000c0000" / "cube.npy").tobytes() == \
        np.ascontiguousarray(cube[:, :, :48, :48]).tobytes()  # the cube file is left alone


# ------------------------------------------------------------------------------ block_split

@pytest.mark.parametrize("seed", range(12))
def test_block_split_fast_path_equals_general(seed):
    rng = np.random.default_rng(seed)
    h, w = (int(v) for v in rng.integers(10, 400, 2))
    size = int(rng.integers(2, min(h, w) + 1))
    overlap = int(rng.integers(0, size))
    origins = np.asarray(tiles.tile_origins(h, w, size, overlap))
    is_val = rng.random(len(origins)) < rng.uniform(0.05, 0.6)
    fast = tiles._gap_mask(origins, is_val, size)
    assert np.array_equal(fast, tiles._gap_mask(origins, is_val, size, fast=False))
    perm = rng.permutation(len(origins))  # a grid in any order is still a grid
    assert np.array_equal(tiles._gap_mask(origins[perm], is_val[perm], size), fast[perm])
    # block_split itself: same answer on the grid and on the grid with a stray tile (general path)
    split = tiles.block_split(origins, size, int(rng.integers(1, 100)), 0.3, seed)
    assert len(split) == len(origins)
    stray = np.vstack([origins, [[1, 1]]])
    is_val2 = np.r_[is_val, False]
    assert tiles._grid_cells(stray) is None
    assert np.array_equal(tiles._gap_mask(stray, is_val2, size),
                          tiles._gap_mask(stray, is_val2, size, fast=False))


def test_block_split_sentinel2_tile_is_fast():
    origins = tiles.tile_origins(10980, 10980, 64, 16)
    t0 = time.perf_counter()
    split = tiles.block_split(origins, 64, 384, 0.25, 0)
    seconds = time.perf_counter() - t0
    assert len(split) == len(origins) > 50_000
    assert seconds < 1.0, seconds


# ------------------------------------------------------------------------------ training

TRAIN = dict(model="unet", model_params={"base_channels": 4, "depth": 1}, batch_size=4,
             patience=100, threads=1, device="cpu", k_neighbours=1)


@pytest.fixture(scope="module")
def plan_store(whole, tmp_path_factory):
    cube, channels, dates, _ = whole
    return export_blocks(cube, channels, dates, LAYOUTS["plan32"](),
                         tmp_path_factory.mktemp("train"))


def test_store_fingerprint_uses_recorded_digests(plan_store, monkeypatch):
    from stfuse import train as train_mod

    real = train_mod._file_digest
    read = []

    def digest(path):
        read.append(path.name)
        assert path.name != "tiles.npy", "a block's tiles.npy was hashed again"
        return real(path)

    monkeypatch.setattr(train_mod, "_file_digest", digest)
    fp = train_mod.fingerprint(plan_store, {"lr": 0.1, "tiles_dir": "x"})
    stores = json.loads((plan_store / "channels.json").read_text())["stores"]
    assert sorted(read) == sorted(train_mod.STORE_FILES)
    for rel in stores:
        doc = json.loads((plan_store / rel / "tiles.json").read_text())
        assert fp["data"][f"{rel}/tiles.npy"] == doc["sha256"]
    assert fp["config"] == {"lr": 0.1}


def test_train_on_store_equals_whole_export(whole, plan_store, tmp_path):
    """With the whole export's stats (the store's differ in the last bits), training on the
    store gives bit-identical weights: same samples, same order, same masking."""
    import shutil

    from stfuse.train import load_checkpoint, train

    _, _, _, ref = whole
    same = plan_store.parent / "store_same_stats"
    same.mkdir(exist_ok=True)
    for name in ("index.csv", "clear_fraction.npy", "channels.json"):
        shutil.copy(plan_store / name, same / name)
    shutil.copy(ref / "stats.json", same / "stats.json")
    a = train(ref, tmp_path / "a", epochs=1, **TRAIN)
    b = train(same, tmp_path / "b", epochs=1, **TRAIN)
    assert a["train_samples"] == b["train_samples"] and a["best_val_loss"] == b["best_val_loss"]
    wa, wb = (load_checkpoint(tmp_path / d / "model.pt")["state_dict"] for d in ("a", "b"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    c = train(plan_store, tmp_path / "c", epochs=1, **TRAIN)  # the store itself trains too
    assert c["train_samples"] == a["train_samples"]


def test_samples_per_epoch_bounds_and_reproduces(plan_store, tmp_path):
    from stfuse.train import _epoch_samples, _val_samples, load_checkpoint, train

    ds = GapFillDataset(plan_store, "train", k_neighbours=1)
    n = 10
    assert len(ds) > 2 * n
    e1, e2 = (_epoch_samples(ds, n, 0, e).indices for e in (1, 2))
    assert len(e1) == n == len(set(e1)) and e1 != e2
    assert e1 == _epoch_samples(ds, n, 0, 1).indices
    many = _epoch_samples(ds, len(ds) + 3, 0, 1).indices  # more than there are: all, then 3 more
    assert sorted(set(many)) == list(range(len(ds))) and len(many) == len(ds) + 3
    assert _epoch_samples(ds, None, 0, 1) is ds
    val = GapFillDataset(plan_store, "val", k_neighbours=1)
    assert len(_val_samples(val, 3, 0)) == min(3, len(val))
    assert _val_samples(val, 3, 0).indices == _val_samples(val, 3, 0).indices

    r1 = train(plan_store, tmp_path / "a", epochs=2, samples_per_epoch=n, **TRAIN)
    r2 = train(plan_store, tmp_path / "b", epochs=2, samples_per_epoch=n, **TRAIN)
    hist = pd.read_csv(tmp_path / "a" / "history.csv")
    assert list(hist["train_samples"]) == [n, n]
    assert r1["samples_per_epoch"] == n and r1["val_samples_used"] == min(n, r1["val_samples"])
    w1, w2 = (load_checkpoint(tmp_path / d / "last.pt")["state_dict"] for d in ("a", "b"))
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    # resume-relevant: another samples_per_epoch starts afresh
    r3 = train(plan_store, tmp_path / "a", epochs=3, samples_per_epoch=n + 1, **TRAIN)
    assert r3["resumed_from"] is None and "samples_per_epoch" in r3["restart_reason"]
    with pytest.raises(ValueError, match="samples_per_epoch"):
        train(plan_store, tmp_path / "d", epochs=1, samples_per_epoch=0, **TRAIN)
