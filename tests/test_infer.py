"""Tests for stfuse.infer.predict_cube with a model trained briefly on test_train's scene."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stfuse.dataset import GapFillDataset, InputAssembler, build_input
from stfuse.infer import blend_window, predict_cube
from stfuse.prior import append_prior, temporal_prior
from stfuse.train import load_checkpoint, torch_threads, train
from test_train import FAST, OPTICAL, SIZE, H, W, T, export, make_cube

N_OPT = len(OPTICAL)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with torch_threads(1):  # robust on a busy 2-core machine (see stfuse.train.train)
        yield


@pytest.fixture(scope="module")
def scene():
    return make_cube()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    tiles = export(tmp_path_factory.mktemp("tiles"))
    out = tmp_path_factory.mktemp("run")
    train(tiles, out, epochs=10, **FAST)
    return load_checkpoint(out / "model.pt"), out / "model.pt", tiles


@pytest.fixture(scope="module")
def plain_ckpt(ckpt, tmp_path_factory):
    """A plain (non-residual) model on the same export: its whole output comes from the windows,
    so tiling artefacts are large enough to measure (a briefly trained residual model adds only
    a small correction to the per-pixel prior)."""
    out = tmp_path_factory.mktemp("plain")
    train(ckpt[2], out, epochs=10, residual=False, **FAST)
    return load_checkpoint(out / "model.pt")


@pytest.fixture(scope="module")
def prior(scene):
    """The temporal prior of the scene (T, B, H, W), physical units."""
    return temporal_prior(*scene)[0]


@pytest.fixture(scope="module")
def base(ckpt, prior):
    """What the residual model adds to the network's correction, in physical units: the prior
    where it exists, the band mean (0 in normalised units) where it does not."""
    mean = np.array([next(c["mean"] for c in ckpt[0]["stats"] if c["name"] == b)
                     for b in OPTICAL], dtype=np.float32)
    return np.where(np.isfinite(prior), prior, mean[None, :, None, None])


@pytest.fixture(scope="module")
def reference(plain_ckpt, scene):
    """Prediction of the plain model with one window covering the whole 32 x 32 region: no tile
    borders at all."""
    return predict_cube(plain_ckpt, *scene, tile_size=H, overlap=0)["prediction"]


def clear_of(cube):
    return (cube[:, N_OPT] == 1) & np.isfinite(cube[:, :N_OPT]).all(axis=1)


# ---------------------------------------------------------------------------------- output

def test_filled_keeps_observed_values_and_flags_the_rest(ckpt, scene):
    cube, channels, dates = scene
    cube = cube.copy()
    cube[2, 0, 5, 7] = np.nan  # a NaN band value: not clear, so filled
    res = predict_cube(ckpt[1], cube, channels, dates, batch_size=3)  # from the path
    assert res["prediction"].shape == res["filled"].shape == (T, N_OPT, H, W)
    assert res["prediction"].dtype == res["filled"].dtype == np.float32
    assert res["filled_flag"].shape == (T, H, W) and res["filled_flag"].dtype == np.uint8
    assert res["bands"] == list(OPTICAL) and res["tile_size"] == SIZE and res["overlap"] == 4
    clear = clear_of(cube)
    np.testing.assert_array_equal(res["filled_flag"], (~clear).astype(np.uint8))
    for t in range(T):
        for b in range(N_OPT):
            obs, fil, pred = cube[t, b], res["filled"][t, b], res["prediction"][t, b]
            np.testing.assert_array_equal(fil[clear[t]], obs[clear[t]])  # exact
            np.testing.assert_array_equal(fil[~clear[t]], pred[~clear[t]])
    assert np.isfinite(res["filled"]).all() and np.isfinite(res["prediction"]).all()
    assert res["filled_flag"][2, 5, 7] == 1
    # physical units, and better than the per-band mean on the cloudy pixels
    truth = make_cube()[0][:, :N_OPT]
    hidden = np.broadcast_to(~clear[:, None], truth.shape)
    err = np.abs(res["prediction"] - truth)[hidden].mean()
    mean_err = np.abs(truth - truth.mean(axis=(0, 2, 3), keepdims=True))[hidden].mean()
    assert err < 0.8 * mean_err, (err, mean_err)


def test_same_input_assembly_as_the_dataset(ckpt, scene):
    """The inference input of a window equals the training sample of the same tile and date."""
    cube, channels, dates = scene
    # the very function export_tiles and predict_cube use to add the prior channels
    cube, channels = append_prior(cube, channels, dates)
    ds = GapFillDataset(ckpt[2], "train", k_neighbours=2)
    stats = load_checkpoint(ckpt[1])["stats"]
    asm = InputAssembler(channels, dates, stats, 2)
    assert asm.input_channels == ds.input_channels == ckpt[0]["input_channels"]
    for i in range(0, len(ds), 5):
        s = ds[i]
        r, c, t = (s["metadata"][k] for k in ("row", "col", "t"))
        image = asm.build(cube[:, :, r:r + SIZE, c:c + SIZE], t)[0]
        np.testing.assert_array_equal(image, s["image"].numpy())
        image2 = build_input(cube[:, :, r:r + SIZE, c:c + SIZE], t, channels, dates, stats, 2)[0]
        np.testing.assert_array_equal(image2, image)
    # the per-window cache predict_cube uses changes nothing
    window, cache = cube[:, :, :SIZE, SIZE:], {}
    for t in (2, 0, 5, 2, 3):
        cached = asm.build(window, t, cache=cache)
        for got, want in zip(cached, asm.build(window, t)):
            np.testing.assert_array_equal(got, want)
    assert sorted(cache) == list(range(T))


# ----------------------------------------------------------------------------------- tiling

def _column_jumps(pred):
    """Mean |difference| between adjacent columns and adjacent rows, per border position."""
    return (np.abs(np.diff(pred, axis=3)).mean(axis=(0, 1, 2)),
            np.abs(np.diff(pred, axis=2)).mean(axis=(0, 1, 3)))


def test_no_seams_at_tile_borders(plain_ckpt, scene, reference):
    scale = np.abs(reference - reference.mean(axis=(2, 3), keepdims=True)).mean()
    blended = predict_cube(plain_ckpt, *scene, tile_size=16, overlap=8)
    assert blended["n_windows"] == 9
    hard = predict_cube(plain_ckpt, *scene, tile_size=16, overlap=0)  # hard cuts at row/col 16
    err_blend = np.abs(blended["prediction"] - reference)
    err_hard = np.abs(hard["prediction"] - reference)
    # per column / row: the worst place is still close to the single-window prediction
    worst_blend = max(err_blend.mean(axis=(0, 1, 2)).max(), err_blend.mean(axis=(0, 1, 3)).max())
    worst_hard = max(err_hard.mean(axis=(0, 1, 2)).max(), err_hard.mean(axis=(0, 1, 3)).max())
    assert worst_blend < 0.15 * scale, (worst_blend, scale)
    assert worst_hard > 2 * worst_blend  # the comparison does see seams when there are some
    # no seam: jumps between neighbouring columns/rows are like the reference's everywhere
    for got, ref in zip(_column_jumps(blended["prediction"]), _column_jumps(reference)):
        assert (got / ref).max() < 1.15, (got / ref).round(2)
    jumps_hard = _column_jumps(hard["prediction"])[0] / _column_jumps(reference)[0]
    assert jumps_hard[15] > 1.3  # between columns 15 and 16, where the hard cut is


def test_no_seams_in_the_residual_correction(ckpt, scene, base):
    """The residual model's windows only carry the correction (the prior is per pixel, computed
    on the whole cube before windowing): blended, it shows no seam either."""
    single = predict_cube(ckpt[0], *scene, tile_size=H, overlap=0)["prediction"] - base
    blended = predict_cube(ckpt[0], *scene, tile_size=16, overlap=8)["prediction"] - base
    assert np.abs(single).mean() > 0  # trained: there is a correction
    for got, ref in zip(_column_jumps(blended), _column_jumps(single)):
        assert (got / ref).max() < 1.15, (got / ref).round(2)


def test_two_tilings_agree(ckpt, plain_ckpt, scene, reference):
    scale = np.abs(reference - reference.mean(axis=(2, 3), keepdims=True)).mean()
    for model in (plain_ckpt, ckpt[0]):
        a = predict_cube(model, *scene, tile_size=16, overlap=8)["prediction"]
        b = predict_cube(model, *scene, tile_size=16, overlap=12, batch_size=1)["prediction"]
        diff = np.abs(a - b)
        assert diff.mean() < 0.05 * scale
        assert np.percentile(diff, 99) < 0.3 * scale and diff.max() < scale


def test_blend_window():
    w = blend_window(16)
    assert w.shape == (16, 16) and w.min() > 0 and w.max() <= 1
    np.testing.assert_allclose(w, w.T)
    np.testing.assert_allclose(w, w[::-1, ::-1])


def test_region_smaller_than_a_tile(ckpt, scene):
    cube, channels, dates = scene
    small = np.ascontiguousarray(cube[:, :, :12, :20])
    res = predict_cube(ckpt[0], small, channels, dates)
    assert res["filled"].shape == (T, N_OPT, 12, 20) and np.isfinite(res["filled"]).all()
    np.testing.assert_array_equal(res["filled_flag"], (~clear_of(small)).astype(np.uint8))


# ------------------------------------------------------------------------------ hard dates

def test_date_without_valid_neighbours_is_filled(ckpt, scene):
    cube, channels, dates = scene
    cube = cube.copy()
    cube[:3, N_OPT] = 0.0  # dates 0, 1, 2 fully cloudy: date 0 has t+1, t+2 cloudy, no t-1, t-2
    res = predict_cube(ckpt[0], cube, channels, dates)
    assert res["filled_flag"][0].all()
    pred0 = res["filled"][0]
    assert np.isfinite(pred0).all()
    assert pred0.std(axis=(1, 2)).min() > 0  # still has spatial structure, from the SAR bands
    # no SAR either for that date: the static/present inputs are all that is left, still finite
    dates2 = [dict(d) for d in dates]
    dates2[0]["sar_gap_days"] = None
    cube[0, N_OPT + 1:] = np.nan
    assert np.isfinite(predict_cube(ckpt[0], cube, channels, dates2)["filled"][0]).all()


# ---------------------------------------------------------------------------------- errors

def test_channel_mismatch_names_the_channels(ckpt, scene):
    cube, channels, dates = scene
    with pytest.raises(ValueError, match=r"missing \['VH@sar'\]"):
        predict_cube(ckpt[0], cube[:, :-1], channels[:-1], dates)
    renamed = [dict(c) for c in channels]
    renamed[-1]["name"] = "HH"
    with pytest.raises(ValueError, match=r"missing \['VH@sar'\], unexpected \['HH@sar'\]"):
        predict_cube(ckpt[0], cube, renamed, dates)
    extra = np.concatenate([cube, cube[:, :1]], axis=1)
    with pytest.raises(ValueError, match=r"unexpected \['dem'\]"):
        predict_cube(ckpt[0], extra, channels + [{"name": "dem", "kind": "static"}], dates)


def test_corrupt_checkpoint(ckpt, scene, tmp_path):
    bad = tmp_path / "broken_model.pt"
    bad.write_bytes(ckpt[1].read_bytes()[:1000])
    with pytest.raises(ValueError, match="broken_model.pt"):
        predict_cube(bad, *scene)


def test_bad_tiling_arguments(ckpt, scene):
    with pytest.raises(ValueError, match="multiple of 4"):
        predict_cube(ckpt[0], *scene, tile_size=18)
    with pytest.raises(ValueError, match="overlap"):
        predict_cube(ckpt[0], *scene, tile_size=16, overlap=16)
    with pytest.raises(ValueError, match="dates"):
        predict_cube(ckpt[0], scene[0], scene[1], scene[2][:-1])


def test_cpu_device_threads_and_grad_mode_restored(ckpt, scene):
    before = torch.get_num_threads()
    res = predict_cube(ckpt[0], *scene, device="cpu", threads=2)
    assert np.isfinite(res["prediction"]).all()
    assert torch.is_grad_enabled() and torch.get_num_threads() == before
    with pytest.raises(ValueError, match="threads"):
        predict_cube(ckpt[0], *scene, threads=0)


# ---------------------------------------------------------------------------- temporal prior

def test_untrained_residual_model_predicts_the_prior(ckpt, scene, prior, base):
    """With the network's correction zeroed, inference returns the prior computed on the whole
    cube -- whatever the windows -- and keeps the observed values where clear."""
    assert 0 < np.isnan(prior).sum() < prior.size // 100  # a few pixels clear at one date only
    zeroed = dict(ckpt[0])
    zeroed["state_dict"] = {k: (torch.zeros_like(v) if k.startswith("net.head.") else v)
                            for k, v in ckpt[0]["state_dict"].items()}
    cube, channels, dates = scene
    for size, overlap in ((16, 4), (H, 0)):
        res = predict_cube(zeroed, cube, channels, dates, tile_size=size, overlap=overlap)
        np.testing.assert_allclose(res["prediction"], base, rtol=1e-5, atol=1e-6)
    clear = clear_of(cube)
    np.testing.assert_array_equal(res["filled"][np.broadcast_to(clear[:, None], prior.shape)],
                                  cube[:, :N_OPT][np.broadcast_to(clear[:, None], prior.shape)])


def test_trained_model_is_no_worse_than_the_prior(ckpt, scene, prior):
    """On the cloudy pixels the trained residual model is about as good as the prior or better."""
    cube, channels, dates = scene
    res = predict_cube(ckpt[0], cube, channels, dates)
    truth = make_cube()[0][:, :N_OPT]
    hidden = np.broadcast_to(~clear_of(cube)[:, None], truth.shape)
    err_model = np.abs(res["prediction"] - truth)[hidden].mean()
    err_prior = np.abs(prior - truth)[hidden].mean()
    assert err_model < 1.1 * err_prior, (err_model, err_prior)


def test_old_checkpoint_without_prior(tmp_path, scene):
    tiles = export(tmp_path / "tiles", prior=False)
    train(tiles, tmp_path / "run", epochs=1, **FAST)
    old = load_checkpoint(tmp_path / "run" / "model.pt")
    assert old["residual"] is None
    del old["residual"]
    res = predict_cube(old, *scene)
    assert np.isfinite(res["filled"]).all()
    clear = np.broadcast_to(clear_of(scene[0])[:, None], res["filled"].shape)
    np.testing.assert_array_equal(res["filled"][clear], scene[0][:, :N_OPT][clear])


def test_cube_with_prior_channels_is_refused(ckpt, scene):
    full, full_channels = append_prior(*scene)
    with pytest.raises(ValueError, match="without prior channels"):
        predict_cube(ckpt[0], full, full_channels, scene[2])
