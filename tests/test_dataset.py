"""Tests for stfuse.dataset.GapFillDataset on a cube whose values tell which date they come from."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

from stfuse.dataset import DT_SCALE_DAYS, GapFillDataset, InputAssembler, TileFile
from stfuse.prior import temporal_prior
from stfuse.tiles import TILES_FILE, export_tiles

OFFSETS = [0.0, 5.0, 10.0, 20.0, 25.0, 35.0, 40.5]  # days after the first date
T = len(OFFSETS)
H = W = 64
SIZE = 32
NO_SAR_DATE = 4
CLOUDY_DATE = 5  # no clear pixel at all
NAN_PIXEL = (2, 1, 1)  # (date, row, col): B04 is NaN there, so that pixel is not clear
NAMES = ["B04", "B08", "valid", "VV", "VH", "dem"]
KINDS = ["optical", "optical", "valid", "sar", "sar", "static"]


def band_value(band: int, d: int) -> float:
    return 10.0 * band + d  # B04 = d, B08 = 10 + d


def build_cube():
    cube = np.zeros((T, len(NAMES), H, W), dtype=np.float32)
    cols = np.arange(W)
    for d in range(T):
        cube[d, 0] = band_value(0, d)
        cube[d, 1] = band_value(1, d)
        cube[d, 2] = 1.0
        cube[d, 2][:, cols % 8 == d] = 0.0  # each date its own cloudy columns
        cube[d, 3] = 100.0 + d
        cube[d, 4] = 200.0 + d
        cube[d, 5] = np.arange(H, dtype=np.float32)[:, None]  # DEM = row number
    cube[CLOUDY_DATE, 2] = 0.0
    cube[NO_SAR_DATE, 3:5] = np.nan
    d, r, c = NAN_PIXEL
    cube[d, 0, r, c] = np.nan
    return cube


def build_dates():
    t0 = pd.Timestamp("2021-04-03T10:36:12Z")
    out = []
    for d, off in enumerate(OFFSETS):
        out.append({
            "start_time": (t0 + pd.Timedelta(days=off)).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "optical_id": f"S2_{d}",
            "sar_id": None if d == NO_SAR_DATE else f"S1_{d}",
            "sar_gap_days": None if d == NO_SAR_DATE else (-1.0 - d if d % 2 else 2.0 + d),
            "clear_fraction": 0.0,
        })
    return out


CUBE = build_cube()
DATES = build_dates()
CLEAR = (CUBE[:, 2] == 1) & np.isfinite(CUBE[:, 0]) & np.isfinite(CUBE[:, 1])  # (T, H, W)


def cube_channels():
    channels = [{"name": n, "sensor": "S2" if k in ("optical", "valid") else "S1", "kind": k}
                for n, k in zip(NAMES, KINDS)]
    channels[-1]["sensor"] = "static"
    return channels


PRIOR, PRESENT = temporal_prior(CUBE, cube_channels(), DATES)  # (T, 2, H, W), (T, H, W)


@pytest.fixture(scope="module")
def tiles_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiles")
    export_tiles(CUBE, cube_channels(), DATES, out, size=SIZE, overlap=0, min_valid_fraction=0.0,
                 block_size=SIZE, val_fraction=0.25, seed=0)
    return out


@pytest.fixture(scope="module")
def old_tiles_dir(tmp_path_factory):
    """An export in the layout written before the temporal prior existed."""
    out = tmp_path_factory.mktemp("old_tiles")
    export_tiles(CUBE, cube_channels(), DATES, out, size=SIZE, overlap=0, min_valid_fraction=0.0,
                 block_size=SIZE, val_fraction=0.25, seed=0, prior=False)
    return out


def close(actual, desired):
    np.testing.assert_allclose(actual, desired, rtol=1e-5, atol=1e-5)


def norm(ds, name, value):
    entry = next(c for c in ds.stats["channels"] if c["name"] == name)
    return (np.asarray(value, dtype=np.float64) - entry["mean"]) / entry["std"]


def chan(ds, sample, name):
    return sample["image"][ds.input_channels.index(name)].numpy()


def tile_clear(sample, d):
    r, c = sample["metadata"]["row"], sample["metadata"]["col"]
    return CLEAR[d, r:r + SIZE, c:c + SIZE]


# ----------------------------------------------------------------------------------- basics

def test_channel_names_and_shapes(tiles_dir):
    ds = GapFillDataset(tiles_dir, "train", k_neighbours=2)
    expected = ["B04@t", "B08@t", "valid@t"]
    for tag in ("t-1", "t-2", "t+1", "t+2"):
        expected += [f"B04@{tag}", f"B08@{tag}", f"valid@{tag}", f"dt@{tag}", f"present@{tag}"]
    expected += ["VV@sar", "VH@sar", "dt@sar", "dem", "B04@prior", "B08@prior", "prior_present@t"]
    assert ds.input_channels == expected
    assert ds.prior_input_indices == [len(expected) - 3, len(expected) - 2]
    assert ds.present_input_index == len(expected) - 1
    assert ds.target_channels == ["B04", "B08"]
    s = ds[0]
    assert s["image"].shape == (len(expected), SIZE, SIZE) and s["image"].dtype == torch.float32
    assert s["mask"].shape == (1, SIZE, SIZE) and s["mask"].dtype == torch.float32
    assert s["target"].shape == (2, SIZE, SIZE) and s["target"].dtype == torch.float32
    assert s["target_valid"].shape == (1, SIZE, SIZE)
    assert set(s["metadata"]) == {"tile", "row", "col", "t", "start_time", "masked_with"}
    assert all(isinstance(v, (int, str)) for v in s["metadata"].values())
    assert GapFillDataset(tiles_dir, k_neighbours=0).input_channels == \
        ["B04@t", "B08@t", "valid@t", "VV@sar", "VH@sar", "dt@sar", "dem",
         "B04@prior", "B08@prior", "prior_present@t"]
    spec = ds.input_spec()
    assert spec["input_channels"] == expected and spec["dt_scale_days"] == DT_SCALE_DAYS
    assert spec["residual"] == {"prior_indices": ds.prior_input_indices,
                                "present_index": ds.present_input_index}


def test_optical_only_export(tmp_path):
    cube = CUBE[:, :3]  # B04, B08, valid
    channels = [{"name": n, "sensor": "S2", "kind": k} for n, k in zip(NAMES[:3], KINDS[:3])]
    export_tiles(cube, channels, DATES, tmp_path, size=SIZE, overlap=0, min_valid_fraction=0.0,
                 block_size=SIZE, val_fraction=0.0, seed=0)
    ds = GapFillDataset(tmp_path, k_neighbours=1)
    assert ds.input_channels == ["B04@t", "B08@t", "valid@t",
                                 "B04@t-1", "B08@t-1", "valid@t-1", "dt@t-1", "present@t-1",
                                 "B04@t+1", "B08@t+1", "valid@t+1", "dt@t+1", "present@t+1",
                                 "B04@prior", "B08@prior", "prior_present@t"]
    assert ds[0]["image"].shape == (16, SIZE, SIZE)


def test_index_splits_and_min_target_valid(tiles_dir):
    train = GapFillDataset(tiles_dir, "train")
    val = GapFillDataset(tiles_dir, "val")
    assert set(train.index["split"]) == {"train"} and set(val.index["split"]) == {"val"}
    n_train, n_val = len(train.index), len(val.index)
    assert n_train >= 1 and n_val >= 1
    # every date but the fully cloudy one
    assert len(train) == n_train * (T - 1) and len(val) == n_val * (T - 1)
    ts = [train[i]["metadata"]["t"] for i in range(len(train))]
    assert CLOUDY_DATE not in ts and sorted(set(ts)) == [d for d in range(T) if d != CLOUDY_DATE]
    assert len(GapFillDataset(tiles_dir, "train", min_target_valid=0.0)) == n_train * T
    assert len(GapFillDataset(tiles_dir, "train", min_target_valid=0.9)) == 0  # 7/8 clear


def test_bad_arguments(tiles_dir, tmp_path):
    with pytest.raises(ValueError, match="split"):
        GapFillDataset(tiles_dir, "test")
    with pytest.raises(ValueError, match="k_neighbours"):
        GapFillDataset(tiles_dir, k_neighbours=-1)
    with pytest.raises(ValueError, match="extra_mask_fraction"):
        GapFillDataset(tiles_dir, extra_mask_fraction=2)
    with pytest.raises(FileNotFoundError):
        GapFillDataset(tmp_path)
    ds = GapFillDataset(tiles_dir)
    with pytest.raises(IndexError):
        ds[len(ds)]


# ---------------------------------------------------------------------------------- content

def test_neighbour_order_and_zeroing(tiles_dir):
    ds = GapFillDataset(tiles_dir, "train", k_neighbours=2, min_target_valid=0.0)
    seen_absent = seen_present = 0
    for i in range(len(ds)):
        s = ds[i]
        t = s["metadata"]["t"]
        assert s["metadata"]["start_time"] == DATES[t]["start_time"]
        for tag, d in (("t", t), ("t-1", t - 1), ("t-2", t - 2), ("t+1", t + 1), ("t+2", t + 2)):
            b04, b08, valid = (chan(ds, s, f"{n}@{tag}") for n in ("B04", "B08", "valid"))
            if not 0 <= d < T:
                seen_absent += 1
                for name in ("B04", "B08", "valid", "dt", "present"):
                    assert not chan(ds, s, f"{name}@{tag}").any(), (i, tag, name)
                continue
            clear = tile_clear(s, d)
            np.testing.assert_array_equal(valid, clear.astype(np.float32))
            # date d landed here: its values where clear, 0 where not
            close(b04[clear], norm(ds, "B04", band_value(0, d)))
            close(b08[clear], norm(ds, "B08", band_value(1, d)))
            assert not b04[~clear].any() and not b08[~clear].any()
            if tag != "t":
                seen_present += 1
                close(chan(ds, s, f"dt@{tag}"), (OFFSETS[d] - OFFSETS[t]) / DT_SCALE_DAYS)
                np.testing.assert_array_equal(chan(ds, s, f"present@{tag}"), 1.0)
        # target and its validity
        clear_t = tile_clear(s, t)
        np.testing.assert_array_equal(s["target_valid"][0].numpy(), clear_t)
        np.testing.assert_array_equal(s["mask"][0].numpy(), clear_t)
        target = s["target"].numpy()
        r, c = s["metadata"]["row"], s["metadata"]["col"]
        finite = np.isfinite(CUBE[t, 0, r:r + SIZE, c:c + SIZE])
        close(target[0][finite], norm(ds, "B04", t))
        assert (target[0][~finite] == 0).all()  # NaN -> 0
        close(target[1], norm(ds, "B08", 10 + t))
    assert seen_absent > 0 and seen_present > 0


def test_nan_pixel_is_not_clear(tiles_dir):
    ds = GapFillDataset(tiles_dir, "train", min_target_valid=0.0)
    d, r, c = NAN_PIXEL
    for i in range(len(ds)):
        s = ds[i]
        m = s["metadata"]
        if m["t"] == d and m["row"] <= r < m["row"] + SIZE and m["col"] <= c < m["col"] + SIZE:
            assert s["target_valid"][0, r - m["row"], c - m["col"]] == 0
            assert chan(ds, s, "B04@t")[r - m["row"], c - m["col"]] == 0
            return
    pytest.skip("the NaN pixel's tile is not in the train split")


def test_sar_and_static_channels(tiles_dir):
    ds = GapFillDataset(tiles_dir, "train", min_target_valid=0.0)
    for i in range(len(ds)):
        s = ds[i]
        t, r = s["metadata"]["t"], s["metadata"]["row"]
        vv, vh, dt = chan(ds, s, "VV@sar"), chan(ds, s, "VH@sar"), chan(ds, s, "dt@sar")
        if t == NO_SAR_DATE:
            assert not vv.any() and not vh.any() and not dt.any()
        else:
            close(vv, norm(ds, "VV", 100 + t))
            close(vh, norm(ds, "VH", 200 + t))
            close(dt, DATES[t]["sar_gap_days"] / DT_SCALE_DAYS)
        dem = np.arange(r, r + SIZE, dtype=np.float64)[:, None] * np.ones((1, SIZE))
        close(chan(ds, s, "dem"), norm(ds, "dem", dem))


# ------------------------------------------------------------------------ artificial masking

def test_artificial_masking_hides_pixels(tiles_dir):
    ds = GapFillDataset(tiles_dir, "train", extra_mask_fraction=1.0, extra_mask_seed=11)
    hidden_total = 0
    others = set()
    for i in range(len(ds)):
        s = ds[i]
        t, other = s["metadata"]["t"], s["metadata"]["masked_with"]
        assert 0 <= other < T and other != t
        others.add(other)
        clear_t, clear_o = tile_clear(s, t), tile_clear(s, other)
        mask = s["mask"][0].numpy().astype(bool)
        np.testing.assert_array_equal(s["target_valid"][0].numpy(), clear_t)  # original
        np.testing.assert_array_equal(mask, clear_t & clear_o)
        np.testing.assert_array_equal(chan(ds, s, "valid@t"), mask)
        assert not chan(ds, s, "B04@t")[~mask].any() and not chan(ds, s, "B08@t")[~mask].any()
        close(chan(ds, s, "B04@t")[mask], norm(ds, "B04", t))
        hidden = clear_t & ~mask  # hidden but known: where the loss goes
        hidden_total += hidden.sum()
        # the neighbours are untouched
        np.testing.assert_array_equal(chan(ds, s, "valid@t+1"),
                                      tile_clear(s, t + 1) if t + 1 < T else 0.0)
    assert hidden_total > 0 and len(others) > 2


def test_artificial_masking_deterministic(tiles_dir):
    a = GapFillDataset(tiles_dir, extra_mask_fraction=0.5, extra_mask_seed=3)
    b = GapFillDataset(tiles_dir, extra_mask_fraction=0.5, extra_mask_seed=3)
    c = GapFillDataset(tiles_dir, extra_mask_fraction=0.5, extra_mask_seed=4)
    ma = [a[i]["metadata"]["masked_with"] for i in range(len(a))]
    assert ma == [b[i]["metadata"]["masked_with"] for i in range(len(b))]
    assert ma == [a[i]["metadata"]["masked_with"] for i in range(len(a))]  # again, same object
    assert ma != [c[i]["metadata"]["masked_with"] for i in range(len(c))]
    assert any(m == -1 for m in ma) and any(m >= 0 for m in ma)  # about half are masked
    for i in range(len(a)):
        assert torch.equal(a[i]["mask"], b[i]["mask"])
        assert torch.equal(a[i]["image"], b[i]["image"])
    plain = GapFillDataset(tiles_dir)
    assert all(plain[i]["metadata"]["masked_with"] == -1 for i in range(len(plain)))


# ------------------------------------------------------------------------------ DataLoader

def _batches(ds, **kwargs):
    return list(DataLoader(ds, batch_size=5, shuffle=False, **kwargs))


def _assert_same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for x, y in zip(batches_a, batches_b):
        for key in ("image", "mask", "target", "target_valid"):
            assert torch.equal(x[key], y[key]), key
        assert x["metadata"]["start_time"] == y["metadata"]["start_time"]
        for key in ("tile", "row", "col", "t", "masked_with"):
            assert torch.equal(x["metadata"][key], y["metadata"][key]), key


def test_default_collate(tiles_dir):
    ds = GapFillDataset(tiles_dir)
    batch = _batches(ds)[0]
    assert batch["image"].shape == (5, ds.n_input_channels, SIZE, SIZE)
    assert batch["metadata"]["t"].shape == (5,)
    assert isinstance(batch["metadata"]["start_time"], list)


def test_pickle_after_use(tiles_dir):
    ds = GapFillDataset(tiles_dir, extra_mask_fraction=1.0, extra_mask_seed=0)
    first = ds[1]
    assert ds._files and ds._files[0]._fd is not None  # open in this process
    blob = pickle.dumps(ds)
    assert len(blob) < 100_000  # the tile array is not in the pickle
    clone = pickle.loads(blob)
    assert not clone._files
    assert torch.equal(clone[1]["image"], first["image"])


def test_tiles_are_read_not_memory_mapped(tiles_dir):
    """Pages of a memory map count in the process's RSS, so a training job grew with the store:
    the dataset reads with positioned reads and never maps tiles.npy."""
    ds = GapFillDataset(tiles_dir, extra_mask_fraction=1.0, extra_mask_seed=0)
    for i in range(len(ds)):
        ds[i]
    maps = Path("/proc/self/maps").read_text()
    assert TILES_FILE not in maps


def test_tile_file_reads_what_numpy_loads(tiles_dir):
    path = Path(tiles_dir) / TILES_FILE
    want = np.load(path)
    tf = TileFile(path)
    assert tf.shape == want.shape and len(tf) == want.shape[0]
    tile = tf[want.shape[0] - 1]
    assert len(tile) == want.shape[1]
    for d in (0, want.shape[1] - 1):
        got = tile[d]
        np.testing.assert_array_equal(got, want[-1, d])
        assert got.flags.writeable
    with pytest.raises(IndexError, match="date"):
        tile[want.shape[1]]
    with pytest.raises(IndexError, match="tile"):
        tf[want.shape[0]]
    tf.close()


def test_tile_file_truncated_is_named(tiles_dir, tmp_path):
    path = Path(tiles_dir) / TILES_FILE
    cut = tmp_path / TILES_FILE
    cut.write_bytes(path.read_bytes()[:-100])
    tf = TileFile(cut)
    with pytest.raises(OSError, match=f"{cut}.*truncated"):
        tf[len(tf) - 1][tf.shape[1] - 1]


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_dataloader_workers_match_single_process(tiles_dir, context):
    ds = GapFillDataset(tiles_dir, extra_mask_fraction=0.5, extra_mask_seed=5)
    reference = _batches(ds, num_workers=0)
    ds[0]  # the tile file is open in this process: workers must still open their own
    _assert_same(reference, _batches(ds, num_workers=2, multiprocessing_context=context))


# --------------------------------------------------------------------------- temporal prior

def test_prior_inputs(tiles_dir):
    """``<band>@prior`` is the whole-cube prior at t, normalised with its band's statistics."""
    ds = GapFillDataset(tiles_dir, "train", min_target_valid=0.0)
    seen_absent = 0
    for i in range(len(ds)):
        s = ds[i]
        t, r, c = (s["metadata"][k] for k in ("t", "row", "col"))
        present = PRESENT[t, r:r + SIZE, c:c + SIZE]
        np.testing.assert_array_equal(chan(ds, s, "prior_present@t"), present.astype(np.float32))
        for b, band in enumerate(("B04", "B08")):
            got = chan(ds, s, f"{band}@prior")
            want = norm(ds, band, PRIOR[t, b, r:r + SIZE, c:c + SIZE])
            close(got[present], want[present])
            assert not got[~present].any()  # no prior: 0
        seen_absent += (~present).sum()
    # every pixel is clear at several dates here, so every (date, pixel) has a prior
    assert PRESENT.all() and seen_absent == 0


def test_prior_is_untouched_by_artificial_masking(tiles_dir):
    masked = GapFillDataset(tiles_dir, "train", extra_mask_fraction=1.0, extra_mask_seed=2)
    plain = GapFillDataset(tiles_dir, "train")
    idx = masked.prior_input_indices + [masked.present_input_index]
    hidden = 0
    for i in range(len(masked)):
        a, b = masked[i], plain[i]
        assert a["metadata"]["masked_with"] >= 0
        hidden += int((b["mask"] - a["mask"]).sum())
        assert torch.equal(a["image"][idx], b["image"][idx])
    assert hidden > 0


def test_prior_uses_band_statistics_and_handles_absence():
    """The assembler normalises a prior with its band's mean/std, whatever the prior's own
    entry says; where ``prior_present`` is 0 the prior input is 0 (even if a value is there)."""
    channels = cube_channels() + [
        {"name": "B04_prior", "kind": "prior", "band": "B04"},
        {"name": "B08_prior", "kind": "prior", "band": "B08"},
        {"name": "prior_present", "kind": "prior"}]
    stats = {"B04": {"mean": 2.0, "std": 4.0}, "B08": {"mean": 10.0, "std": 2.0},
             "VV": {"mean": 0.0, "std": 1.0}, "VH": {"mean": 0.0, "std": 1.0},
             "dem": {"mean": 0.0, "std": 1.0}, "B04_prior": {"mean": 99.0, "std": 99.0}}
    asm = InputAssembler(channels, DATES, stats, 0)
    assert asm.has_prior and asm.residual_spec() == {"prior_indices": [7, 8], "present_index": 9}
    series = np.zeros((T, len(channels), 4, 4), dtype=np.float32)
    series[:, 2] = 1.0
    series[:, 6] = 6.0  # B04 prior
    series[:, 7] = 14.0  # B08 prior
    series[:, 8] = 1.0
    series[3, 8, 0, 0] = 0.0  # no prior at (0, 0) of date 3
    series[3, 6, 1, 1] = np.nan  # NaN prior -> 0
    image = asm.build(series, 3, hide=np.ones((4, 4), bool))[0]
    np.testing.assert_allclose(image[7, 2:, 2:], (6.0 - 2.0) / 4.0)
    np.testing.assert_allclose(image[8, 2:, 2:], (14.0 - 10.0) / 2.0)
    assert image[7, 0, 0] == 0 and image[8, 0, 0] == 0 and image[9, 0, 0] == 0
    assert image[7, 1, 1] == 0 and image[9, 1, 1] == 1
    with pytest.raises(ValueError, match="one '<band>_prior' per optical band"):
        InputAssembler(channels[:-2] + channels[-1:], DATES, stats, 0)


def test_old_export_without_prior_still_loads(old_tiles_dir):
    ds = GapFillDataset(old_tiles_dir, "train", k_neighbours=1)
    assert not any("prior" in n for n in ds.input_channels)
    assert ds.prior_input_indices == [] and ds.present_input_index is None
    assert ds.input_spec()["residual"] is None
    assert ds[0]["image"].shape == (ds.n_input_channels, SIZE, SIZE)
