"""stfuse.infer.predict_block and the predict step: the cores of a block plan, pasted together, are
predict_cube over the whole region bit for bit, whatever the layout."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from stfuse import blocks
from stfuse import cube as cubes
from stfuse.infer import _forward_sizes, predict_block, predict_cube
from stfuse.steps.predict import predict_block_step
from stfuse.tiles import tile_origins
from stfuse.train import load_checkpoint, torch_threads, train
from test_train import FAST, OPTICAL, SIZE, export, make_channels, make_cube

T, H, W = 5, 70, 90
N_OPT = len(OPTICAL)
KEYS = ("prediction", "filled", "filled_flag")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Briefly trained checkpoints (tile size 16) of test_train's scene: with the temporal prior (a
    residual model: each strip's prior computed in the block) and without (windows straight from the
    cube)."""
    out = {}
    for prior in (True, False):
        tiles = export(tmp_path_factory.mktemp("tiles"), prior=prior)
        run = tmp_path_factory.mktemp("run")
        train(tiles, run, epochs=1, **FAST)
        out[prior] = load_checkpoint(run / "model.pt")
    return out


def random_scene(seed=0, t=T, h=H, w=W):
    """Random cube (t, 4 optical + valid + 2 SAR, h, w) with clouds, no-data cells and a date without SAR."""
    rng = np.random.default_rng(seed)
    cube = np.empty((t, N_OPT + 3, h, w), dtype=np.float32)
    cube[:, :N_OPT] = rng.uniform(0.0, 0.5, (t, N_OPT, h, w))
    cube[:, N_OPT] = (rng.random((t, h, w)) > 0.4).astype(np.float32)
    cube[:, N_OPT + 1:] = rng.normal(-15.0, 3.0, (t, 2, h, w))
    cube[:, :N_OPT][rng.random((t, N_OPT, h, w)) < 0.02] = np.nan  # a band without data
    cube[:, :, 3:9, 50:61] = np.nan  # no data at all
    cube[:, N_OPT, 3:9, 50:61] = np.nan
    cube[2, N_OPT + 1:] = np.nan  # date 2 has no SAR partner
    _, _, dates = make_cube()
    dates = [dict(d) for d in dates[:t]]
    dates[2].update(sar_id=None, sar_gap_days=None)
    return cube, make_channels(), dates


@pytest.fixture(scope="module")
def scene():
    return random_scene()


def stitched(ckpt, cube, channels, dates, plan, **kw):
    """predict_block over each block of ``plan`` (its read window cut from ``cube``), cores pasted."""
    h, w = cube.shape[2:]
    res = {"prediction": np.full((cube.shape[0], N_OPT, h, w), np.nan, np.float32),
           "filled": np.full((cube.shape[0], N_OPT, h, w), np.nan, np.float32),
           "filled_flag": np.full((cube.shape[0], h, w), 7, np.uint8)}
    n_windows = 0
    for b in plan:
        part = cube[(slice(None), slice(None)) + blocks.read_slices(b)]
        got = predict_block(ckpt, part, channels, dates, b, h, w, **kw)
        for key in KEYS:
            assert got[key].shape[-2:] == (b.rows, b.cols)
            blocks.paste(res[key], got[key], b)
        n_windows += got["n_windows"]
    return res, n_windows


LAYOUTS = {
    "one block": lambda: blocks.plan(H, W, 128, SIZE),
    "32-cell blocks": lambda: blocks.plan(H, W, 32, SIZE),
    "thin last blocks": lambda: blocks.plan(H, W, 17, SIZE),   # last block row 2 cells, column 5
    "wide halo": lambda: blocks.plan(H, W, 40, 25),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("prior,overlap,batch_size", [(True, None, 3), (False, 6, 2)])
def test_stitched_cores_are_predict_cube(ckpts, scene, layout, prior, overlap, batch_size):
    kw = dict(overlap=overlap, batch_size=batch_size, device="cpu")
    want = predict_cube(ckpts[prior], *scene, **kw)
    plan = LAYOUTS[layout]()
    got, n_windows = stitched(ckpts[prior], *scene, plan, **kw)
    for key in KEYS:
        assert got[key].dtype == want[key].dtype
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
        assert got[key].tobytes() == want[key].tobytes(), key
    assert n_windows >= want["n_windows"]  # windows over several cores run in each of their blocks


def test_the_layouts_exercise_the_batch_rule():
    """The settings above do exercise the batch rule (stfuse.infer._forward_sizes): with overlap 6 and
    batches of 2 the region's last item runs alone (a lone sample gives other CPU results than one in a
    batch of 2: without padding, blocks differ from predict_cube in the last bits), and in both settings
    some blocks end on a lone item, run padded to the batch size."""
    n_region = len(tile_origins(H, W, SIZE, 6)) * T
    assert n_region % 2 == 1
    sizes = _forward_sizes(n_region, 2, range(n_region))
    assert sizes[-1] == 1 and set(sizes[:-1]) == {2}
    for overlap, bs in ((SIZE // 4, 3), (6, 2)):
        origins = tile_origins(H, W, SIZE, overlap)
        lone = []
        for layout in ("32-cell blocks", "thin last blocks"):
            for b in LAYOUTS[layout]():
                n = sum(r < b.row0 + b.rows and r + SIZE > b.row0 and c < b.col0 + b.cols and c + SIZE > b.col0
                        for r, c in origins)
                lone.append(n * T % bs == 1)
        assert any(lone), (overlap, bs)


def test_halo_too_small(ckpts, scene):
    cube, channels, dates = scene
    b = blocks.plan(H, W, 32, 8)[4]
    part = cube[(slice(None), slice(None)) + blocks.read_slices(b)]
    with pytest.raises(ValueError, match="halo is too small"):
        predict_block(ckpts[True], part, channels, dates, b, H, W, device="cpu")


def test_wrong_cube_or_block(ckpts, scene):
    cube, channels, dates = scene
    b = blocks.plan(H, W, 32, SIZE)[4]
    with pytest.raises(ValueError, match="read window"):
        predict_block(ckpts[True], cube, channels, dates, b, H, W, device="cpu")
    part = cube[(slice(None), slice(None)) + blocks.read_slices(b)]
    with pytest.raises(ValueError, match="outside"):
        predict_block(ckpts[True], part, channels, dates, b, 40, 40, device="cpu")
    with pytest.raises(ValueError, match="out"):
        predict_block(ckpts[True], part, channels, dates, b, H, W, device="cpu",
                      out={"prediction": np.zeros((T, N_OPT, H, W), np.float32)})


def test_region_smaller_than_a_window(ckpts):
    cube, channels, dates = random_scene(seed=3, h=12, w=20)
    want = predict_cube(ckpts[True], cube, channels, dates, batch_size=4, device="cpu")
    (one,) = blocks.plan(12, 20, 64, SIZE)
    got = predict_block(ckpts[True], cube, channels, dates, one, 12, 20, batch_size=4, device="cpu")
    for key in KEYS:
        assert got[key].tobytes() == want[key].tobytes(), key
    b = blocks.plan(12, 20, 10, 8)[0]
    part = cube[(slice(None), slice(None)) + blocks.read_slices(b)]
    with pytest.raises(ValueError, match="single block"):
        predict_block(ckpts[True], part, channels, dates, b, 12, 20, device="cpu")


def write_block_cube(root, cube, channels, dates, block):
    """A block cube directory as the cube step writes it (stfuse.cube)."""
    root.mkdir(parents=True)
    part = np.ascontiguousarray(cube[(slice(None), slice(None)) + blocks.read_slices(block)])
    np.save(root / cubes.CUBE_FILE, part)
    meta = dict(channels=channels, dates=dates, region={"rows": cube.shape[2], "cols": cube.shape[3]},
                block=blocks.to_dict(block), shape=list(part.shape),
                counts=cubes.core_counts(part, channels, block))
    cubes.write_meta(root, meta)
    return root


@pytest.mark.parametrize("heldout", [False, True])
def test_predict_step_end_to_end(ckpts, scene, tmp_path, heldout):
    cube, channels, dates = scene
    model = tmp_path / "model.pt"
    torch.save(ckpts[True], model)
    holdout = None
    ref_cube = cube
    if heldout:
        holdout = tmp_path / "holdout.json"
        donors = {"1": 3, "4": 0}
        holdout.write_text(json.dumps({"donors": donors}))
        ref_cube = cubes.hide(cube, channels, cubes.transplanted(cube, channels, donors))
    want = predict_cube(model, ref_cube, channels, dates, batch_size=4, device="cpu", threads=1)
    size, halo = 32, SIZE
    plan = blocks.plan(H, W, size, halo)
    got = {"prediction": np.zeros_like(want["prediction"]), "filled": np.zeros_like(want["filled"]),
           "filled_flag": np.zeros_like(want["filled_flag"])}
    files = {"prediction": "prediction.npy", "filled": "filled.npy", "filled_flag": "flags.npy"}
    for b in plan:
        cube_dir = write_block_cube(tmp_path / "blocks" / b.id / "cube", cube, channels, dates, b)
        out_dir = tmp_path / "out" / b.id / "infer"
        info = predict_block_step(model, cube_dir, out_dir, holdout_json=holdout, batch_size=4, device="cpu",
                                  threads=1)
        assert sorted(p.name for p in out_dir.iterdir()) == ["filled.npy", "flags.npy", "infer.json",
                                                             "prediction.npy"]
        assert json.loads((out_dir / "infer.json").read_text()) == info
        assert info["block"] == b.id and info["heldout"] is heldout
        assert info["shapes"]["cube"] == [T, N_OPT + 3, b.read_rows, b.read_cols]
        assert max(info["shapes"]["cube"][-2:]) <= size + 2 * halo
        assert info["n_windows"] == len(info["windows"]) > 0
        for key, name in files.items():
            arr = np.load(out_dir / name)
            assert arr.shape[-2:] == (b.rows, b.cols)
            blocks.paste(got[key], arr, b)
    for key in files:
        assert got[key].tobytes() == want[key].tobytes(), key
    # the block cube on disk is untouched by hiding (copy-on-write)
    b = plan[0]
    on_disk = np.load(tmp_path / "blocks" / b.id / "cube" / cubes.CUBE_FILE)
    np.testing.assert_array_equal(on_disk, cube[(slice(None), slice(None)) + blocks.read_slices(b)])
