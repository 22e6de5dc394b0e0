"""Tests for stfuse.models and stfuse.train on a tiny scene (T=6, 4+1+2 channels, 32 x 32)."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
import torch

from torch.utils.data import DataLoader

from stfuse.dataset import GapFillDataset
from stfuse.models import ResidualOnPrior, available, build_model, register, zero_init_output
from stfuse.tiles import export_tiles
from stfuse.train import (
    VAL_MASK_FRACTION,
    _derived_seed,
    _run_epoch,
    build_network,
    check_channels,
    load_checkpoint,
    model_from_checkpoint,
    train,
)

OPTICAL = ("B02", "B03", "B04", "B08")
SAR = ("VV", "VH")
T, H, W, SIZE = 6, 32, 32, 16
FAST = dict(batch_size=4, patience=100, threads=1)  # 1 thread: robust on a busy 2-core box


def make_channels():
    ch = [{"name": n, "sensor": "S2", "kind": "optical"} for n in OPTICAL]
    ch.append({"name": "valid", "sensor": "S2", "kind": "valid"})
    ch += [{"name": n, "sensor": "S1", "kind": "sar"} for n in SAR]
    return ch


def _smooth(rng, cell):
    """Smooth random field (H, W): bilinear interpolation of a coarse normal grid."""
    coarse = rng.normal(size=(H // cell + 2, W // cell + 2))
    y, x = np.arange(H) / cell, np.arange(W) / cell
    y0, x0 = y.astype(int), x.astype(int)
    fy, fx = (y - y0)[:, None], (x - x0)[None]
    return (coarse[y0][:, x0] * (1 - fy) * (1 - fx) + coarse[y0 + 1][:, x0] * fy * (1 - fx)
            + coarse[y0][:, x0 + 1] * (1 - fy) * fx + coarse[y0 + 1][:, x0 + 1] * fy * fx)


def make_cube(seed=0, cloud=0.4):
    """Vegetation field with a seasonal cycle driving reflectance and backscatter, blobby clouds."""
    rng = np.random.default_rng(seed)
    veg = 1.0 / (1.0 + np.exp(-2.0 * _smooth(rng, 8)))
    cube = np.zeros((T, len(OPTICAL) + 1 + len(SAR), H, W), dtype=np.float32)
    for t in range(T):
        v = veg * (0.5 + 0.5 * np.sin(np.pi * t / (T - 1)))
        cube[t, 0], cube[t, 1] = 0.08 - 0.05 * v, 0.11 - 0.04 * v
        cube[t, 2], cube[t, 3] = 0.15 - 0.12 * v, 0.22 + 0.23 * v
        cube[t, :4] += rng.normal(0.0, 0.005, (4, H, W))
        cube[t, 4] = (_smooth(rng, 6) > (cloud - 0.5) * 2).astype(np.float32)
        cube[t, 5] = -12.0 + 6.0 * v + rng.normal(0.0, 0.5, (H, W))
        cube[t, 6] = -18.0 + 8.0 * v + rng.normal(0.0, 0.5, (H, W))
    t0 = pd.Timestamp("2021-05-01T10:30:00Z")
    dates = [{"start_time": (t0 + pd.Timedelta(days=6 * t)).strftime("%Y-%m-%dT%H:%M:%SZ"),
              "optical_id": f"S2_{t}", "sar_id": f"S1_{t}", "sar_gap_days": 1.0 - t % 3,
              "clear_fraction": float(cube[t, 4].mean())} for t in range(T)]
    return cube, make_channels(), dates


def export(out, seed=0, prior=True):
    cube, channels, dates = make_cube(seed)
    export_tiles(cube, channels, dates, out, size=SIZE, overlap=0, min_valid_fraction=0.0,
                 block_size=SIZE, val_fraction=0.25, seed=0, prior=prior)
    return out


@pytest.fixture(scope="module")
def tiles_dir(tmp_path_factory):
    return export(tmp_path_factory.mktemp("tiles"))


@pytest.fixture(scope="module")
def trained(tiles_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    summary = train(tiles_dir, out, epochs=10, **FAST)
    return out, summary


@pytest.fixture(scope="module")
def old_tiles_dir(tmp_path_factory):
    """The same scene exported without the temporal prior (the layout before it existed)."""
    return export(tmp_path_factory.mktemp("old_tiles"), prior=False)


def state(path):
    return load_checkpoint(path)["state_dict"]


def val_loss(model, tiles_dir, seed=0):
    """Masked L1 of ``model`` on the validation split, with train()'s fixed validation masking."""
    ds = GapFillDataset(tiles_dir, "val", k_neighbours=2, extra_mask_seed=_derived_seed(seed, 1),
                        extra_mask_fraction=VAL_MASK_FRACTION)
    total, count, _ = _run_epoch(model, DataLoader(ds, batch_size=4), torch.device("cpu"))
    return total / count


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ------------------------------------------------------------------------------ registry

def test_registry_and_unet():
    assert "unet" in available()
    net = build_model("unet", 9, 4)
    assert net.size_multiple == 4
    assert net(torch.zeros(2, 9, 16, 16)).shape == (2, 4, 16, 16)
    deep = build_model("unet", 3, 2, base_channels=8, depth=3, norm="group")
    assert deep(torch.zeros(1, 3, 24, 24)).shape == (1, 2, 24, 24)
    with pytest.raises(ValueError, match="multiple of 8"):
        deep(torch.zeros(1, 3, 20, 20))
    with pytest.raises(ValueError, match="unknown model 'nope'.*unet"):
        build_model("nope", 3, 2)
    with pytest.raises(ValueError, match="bad parameters"):
        build_model("unet", 3, 2, width=3)


def test_register_new_architecture(tiles_dir, tmp_path):
    from stfuse import models

    @register("test_pointwise")
    def build(in_channels, out_channels, *, hidden=8):
        return torch.nn.Sequential(torch.nn.Conv2d(in_channels, hidden, 1), torch.nn.ReLU(),
                                   torch.nn.Conv2d(hidden, out_channels, 1))

    try:
        assert "test_pointwise" in available()
        summary = train(tiles_dir, tmp_path, model="test_pointwise",
                        model_params={"hidden": 4}, epochs=1, **FAST)
        ckpt = load_checkpoint(tmp_path / "model.pt")
        assert ckpt["model"] == "test_pointwise" and ckpt["model_params"] == {"hidden": 4}
        assert summary["epochs_run"] == 1
        model = model_from_checkpoint(ckpt)  # residual on the prior around the registered model
        assert isinstance(model, ResidualOnPrior)
        assert isinstance(model.net, torch.nn.Sequential)
    finally:
        models._REGISTRY.pop("test_pointwise", None)


# ------------------------------------------------------------------------------ training

def test_training_lowers_the_loss(trained, tiles_dir):
    out, summary = trained
    hist = pd.read_csv(out / "history.csv")
    assert list(hist["epoch"]) == list(range(1, 11))
    assert summary["epochs_run"] == 10 and summary["stopped"] == "epochs"
    # the residual model starts out as the prior (linear interpolation in time): training
    # lowers the loss below that starting point
    ckpt = load_checkpoint(out / "model.pt")
    torch.manual_seed(0)
    start = build_network("unet", ckpt["in_channels"], ckpt["out_channels"], {},
                          ckpt["residual"], init=True)
    start.eval()
    prior_loss = val_loss(start, tiles_dir)
    assert hist["val_loss"].iloc[0] < 1.05 * prior_loss  # epoch 1 starts from the prior
    # (this tiny scene is mostly pixel noise, so the margin over the prior is modest)
    assert hist["val_loss"].min() < 0.97 * prior_loss, (prior_loss, hist["val_loss"].tolist())
    assert val_loss(model_from_checkpoint(ckpt), tiles_dir) == pytest.approx(
        hist["val_loss"].min(), rel=1e-4)
    first, last = hist["train_loss"].iloc[:2].mean(), hist["train_loss"].iloc[-3:].mean()
    assert last < 0.95 * first, hist["train_loss"].tolist()
    assert summary["best_val_loss"] == pytest.approx(hist["val_loss"].min())
    assert summary["best_epoch"] == int(hist["epoch"][hist["val_loss"].idxmin()])
    assert hist["val_pixels"].nunique() == 1  # fixed validation masking: same pixels each epoch
    assert summary["samples_per_s"] > 0 and summary["seconds"] > 0
    assert (out / "loss.png").stat().st_size > 1000
    assert not list(out.glob("*.partial"))


def test_checkpoint_contents(trained, tiles_dir):
    out, summary = trained
    for name in ("model.pt", "last.pt"):
        ckpt = torch.load(out / name, weights_only=True)  # plain types only
        assert ckpt["format"] == "stfuse.checkpoint" and ckpt["model"] == "unet"
        assert ckpt["tile_size"] == SIZE and ckpt["k_neighbours"] == 2
        assert ckpt["target_channels"] == list(OPTICAL)
        assert ckpt["input_channels"][:5] == ["B02@t", "B03@t", "B04@t", "B08@t", "valid@t"]
        n_in = len(ckpt["input_channels"])
        assert ckpt["input_channels"][-5:] == [f"{b}@prior" for b in OPTICAL] + ["prior_present@t"]
        assert [c["name"] for c in ckpt["stats"]] == [c["name"] for c in make_channels()] + \
            [f"{b}_prior" for b in OPTICAL] + ["prior_present"]
        assert ckpt["residual"] == {"prior_indices": list(range(n_in - 5, n_in - 1)),
                                    "present_index": n_in - 1}
        assert ckpt["format_version"] == 2 and ckpt["config"]["residual"] is True
        assert all(k.startswith("net.") for k in ckpt["state_dict"])
        assert ckpt["config"]["seed"] == 0 and ckpt["config"]["epochs"] == 10
    best = load_checkpoint(out / "model.pt")
    assert best["kind"] == "best" and best["epoch"] == summary["best_epoch"]
    last = load_checkpoint(out / "last.pt")
    assert last["kind"] == "last" and last["epoch"] == 10 and len(last["history"]) == 10
    assert {"optimizer", "rng", "scaler", "epochs_since_best"} <= set(last)
    net = model_from_checkpoint(best)
    assert not net.training


def test_progress_is_logged(tiles_dir, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="stfuse.train"):
        train(tiles_dir, tmp_path, epochs=1, **FAST)
    text = "\n".join(r.getMessage() for r in caplog.records if r.name == "stfuse.train")
    assert "epoch 1/1: train loss" in text and "val loss" in text and "samples/s" in text


def test_deterministic(tiles_dir, tmp_path):
    a = train(tiles_dir, tmp_path / "a", epochs=2, **FAST)
    b = train(tiles_dir, tmp_path / "b", epochs=2, **FAST)
    assert_same_state(state(tmp_path / "a" / "last.pt"), state(tmp_path / "b" / "last.pt"))
    assert a["best_val_loss"] == b["best_val_loss"]
    train(tiles_dir, tmp_path / "c", epochs=2, seed=1, **FAST)
    sa, sc = state(tmp_path / "a" / "last.pt"), state(tmp_path / "c" / "last.pt")
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_resume_equals_uninterrupted(tiles_dir, tmp_path):
    train(tiles_dir, tmp_path / "straight", epochs=4, **FAST)
    first = train(tiles_dir, tmp_path / "resumed", epochs=2, **FAST)
    assert first["epochs_run"] == 2
    # a workflow manager deletes the outputs of a killed job: model.pt comes back from last.pt
    # even when no later epoch improves on the best one
    (tmp_path / "resumed" / "model.pt").unlink()
    second = train(tiles_dir, tmp_path / "resumed", epochs=4, **FAST)
    assert second["resumed_from"] == 2 and second["epochs_run"] == 2
    for name in ("last.pt", "model.pt"):
        assert_same_state(state(tmp_path / "straight" / name), state(tmp_path / "resumed" / name))
    best = load_checkpoint(tmp_path / "resumed" / "model.pt")
    assert best["epoch"] == load_checkpoint(tmp_path / "straight" / "model.pt")["epoch"]
    last = load_checkpoint(tmp_path / "resumed" / "last.pt")
    assert last["best_checkpoint"]["epoch"] == best["epoch"]
    assert_same_state(last["best_checkpoint"]["state_dict"], best["state_dict"])
    h1 = pd.read_csv(tmp_path / "straight" / "history.csv")
    h2 = pd.read_csv(tmp_path / "resumed" / "history.csv")
    pd.testing.assert_series_equal(h1["val_loss"], h2["val_loss"])
    # a finished run is not trained again (a deleted model.pt is restored all the same)
    (tmp_path / "resumed" / "model.pt").unlink()
    again = train(tiles_dir, tmp_path / "resumed", epochs=4, **FAST)
    assert again["epochs_run"] == 0 and again["stopped"] == "epochs"
    assert_same_state(state(tmp_path / "straight" / "model.pt"),
                      state(tmp_path / "resumed" / "model.pt"))
    # other settings: start afresh (and say why), as with resume=False
    other = train(tiles_dir, tmp_path / "resumed", epochs=1, lr=0.01, **FAST)
    assert other["resumed_from"] is None and other["restart_reason"] == "lr: 0.001 -> 0.01"
    assert other["epochs_run"] == 1
    fresh = train(tiles_dir, tmp_path / "resumed", epochs=1, lr=0.01, resume=False, **FAST)
    assert fresh["resumed_from"] is None and fresh["epochs_run"] == 1


def test_max_minutes_stops_and_resume_continues(tiles_dir, tmp_path):
    s = train(tiles_dir, tmp_path, epochs=3, max_minutes=0, **FAST)
    assert s["epochs_run"] == 1 and s["stopped"] == "max_minutes"
    s = train(tiles_dir, tmp_path, epochs=3, **FAST)
    assert s["resumed_from"] == 1 and s["epochs_run"] == 2 and s["stopped"] == "epochs"


def test_early_stopping(tiles_dir, tmp_path):
    s = train(tiles_dir, tmp_path, epochs=30, batch_size=4, patience=1, threads=1)
    assert s["stopped"] == "early_stopping" and s["epochs_run"] < 30
    hist = pd.read_csv(tmp_path / "history.csv")
    assert hist["val_loss"].iloc[-1] >= hist["val_loss"].iloc[:-1].min()  # no improvement
    assert load_checkpoint(tmp_path / "model.pt")["epoch"] == s["best_epoch"]
    again = train(tiles_dir, tmp_path, epochs=30, batch_size=4, patience=1, threads=1)
    assert again["epochs_run"] == 0 and again["stopped"] == "early_stopping"


def test_batch_without_hidden_pixels_contributes_nothing():
    net = build_model("unet", 3, 2, base_channels=4, depth=1)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    batch = {"image": torch.randn(2, 3, 8, 8), "target": torch.randn(2, 2, 8, 8),
             "mask": torch.ones(2, 1, 8, 8), "target_valid": torch.ones(2, 1, 8, 8)}
    opt = torch.optim.Adam(net.parameters())
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    total, count, samples = _run_epoch(net, [batch], torch.device("cpu"), opt, scaler)
    assert (total, count, samples) == (0.0, 0, 2)
    assert_same_state(before, net.state_dict())  # no step, no BatchNorm statistics update


def test_bad_arguments(tiles_dir, tmp_path):
    with pytest.raises(ValueError, match="extra_mask_fraction"):
        train(tiles_dir, tmp_path, extra_mask_fraction=0.0)
    with pytest.raises(ValueError, match="epochs"):
        train(tiles_dir, tmp_path, epochs=0)
    with pytest.raises(ValueError, match="multiples of 32"):
        train(tiles_dir, tmp_path, model_params={"depth": 5}, epochs=1)
    with pytest.raises(ValueError, match="unknown model"):
        train(tiles_dir, tmp_path, model="nope", epochs=1)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            train(tiles_dir, tmp_path, device="cuda", epochs=1)


def test_without_val_split_validates_on_train(tmp_path, caplog):
    cube, channels, dates = make_cube()
    export_tiles(cube, channels, dates, tmp_path / "tiles", size=SIZE, overlap=0,
                 min_valid_fraction=0.0, block_size=SIZE, val_fraction=0.0, seed=0)
    with caplog.at_level(logging.WARNING, logger="stfuse.train"):
        s = train(tmp_path / "tiles", tmp_path / "out", epochs=1, **FAST)
    assert s["val_split"] == "train" and s["best_val_loss"] is not None
    assert "no validation sample" in caplog.text


# ------------------------------------------------------------------------------ checkpoints

def test_corrupt_checkpoint_names_the_file(trained, tmp_path):
    out, _ = trained
    data = (out / "model.pt").read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[:len(data) // 2])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, other)
    for path in (truncated, garbage, other):
        with pytest.raises(ValueError, match=path.name):
            load_checkpoint(path)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")


def test_check_channels(trained):
    ckpt = load_checkpoint(trained[0] / "model.pt")
    names = list(ckpt["input_channels"])
    check_channels(ckpt, names)
    with pytest.raises(ValueError, match=r"missing \['VH@sar'\], unexpected \['HH@sar'\]"):
        check_channels(ckpt, [n if n != "VH@sar" else "HH@sar" for n in names])
    with pytest.raises(ValueError, match="another order"):
        check_channels(ckpt, names[::-1])


# ------------------------------------------------------------------------ residual on the prior

def test_residual_model_starts_at_the_prior(tiles_dir):
    ds = GapFillDataset(tiles_dir, "train", extra_mask_fraction=1.0, extra_mask_seed=0)
    spec = ds.assembler.residual_spec()
    batch = next(iter(DataLoader(ds, batch_size=4)))
    x = batch["image"]
    prior = x[:, spec["prior_indices"]] * x[:, spec["present_index"]:spec["present_index"] + 1]
    for model, params in (("unet", {}), ("unet", {"norm": "group", "depth": 1})):
        torch.manual_seed(0)
        net = build_network(model, ds.n_input_channels, 4, params, spec, init=True)
        assert isinstance(net, ResidualOnPrior) and net.size_multiple == net.net.size_multiple
        assert not net.net.head.weight.any() and not net.net.head.bias.any()
        for mode in (net.train, net.eval):
            mode()
            out = net(x)
            torch.testing.assert_close(out, prior, rtol=0, atol=1e-6)
    # the prior is the leave-one-out interpolation: a real prediction, with a real error
    hidden = batch["target_valid"] * (1 - batch["mask"])
    err = ((prior - batch["target"]).abs() * hidden).sum() / (hidden.sum() * 4)
    assert 0 < err < 1.0
    # without init the wrapper still adds the prior to whatever the network says
    torch.manual_seed(0)
    raw = build_network("unet", ds.n_input_channels, 4, {}, spec).eval()
    torch.testing.assert_close(raw(x) - raw.net(x), prior)
    # the output layer is found generically (last Conv2d/Linear with the output width)
    seq = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 1), torch.nn.Conv2d(5, 2, 1))
    assert zero_init_output(seq, 2) and not seq[1].weight.any() and seq[0].weight.any()
    assert not zero_init_output(torch.nn.Sequential(torch.nn.Identity()), 2)
    with pytest.raises(ValueError, match="present_index"):
        ResidualOnPrior(seq, [0, 1], 1)


def test_without_prior_plain_model_and_old_checkpoints(old_tiles_dir, tiles_dir, tmp_path):
    # an export without the prior trains a plain model, as before
    s = train(old_tiles_dir, tmp_path / "old", epochs=2, **FAST)
    ckpt = load_checkpoint(tmp_path / "old" / "model.pt")
    assert ckpt["residual"] is None and ckpt["format_version"] == 1
    assert not any("prior" in n for n in ckpt["input_channels"])
    assert s["epochs_run"] == 2
    del ckpt["residual"]  # a checkpoint written before the key existed
    assert not isinstance(model_from_checkpoint(ckpt), ResidualOnPrior)
    with pytest.raises(ValueError, match="no temporal prior channels"):
        train(old_tiles_dir, tmp_path / "x", epochs=1, residual=True, **FAST)
    with pytest.raises(ValueError, match="residual must be"):
        train(tiles_dir, tmp_path / "x", epochs=1, residual="yes", **FAST)
    # residual=False: the prior is only an input
    train(tiles_dir, tmp_path / "plain", epochs=1, residual=False, **FAST)
    plain = load_checkpoint(tmp_path / "plain" / "model.pt")
    assert plain["residual"] is None and plain["input_channels"][-1] == "prior_present@t"
    assert not isinstance(model_from_checkpoint(plain), ResidualOnPrior)
    # the other setting starts afresh instead of resuming
    s = train(tiles_dir, tmp_path / "plain", epochs=1, **FAST)
    assert s["resumed_from"] is None and s["restart_reason"] == "residual: False -> True"
    assert load_checkpoint(tmp_path / "plain" / "model.pt")["residual"] is not None
