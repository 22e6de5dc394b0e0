"""The temporal attention model (stfuse.models.tattn) and the sequence input layout it reads."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from stfuse.dataset import GapFillDataset, InputAssembler
from stfuse.infer import predict_cube
from stfuse.models import available, input_layout
from stfuse.prior import temporal_prior
from stfuse.tiles import export_tiles
from stfuse.train import build_network, load_checkpoint, load_init, model_from_checkpoint, torch_threads, train
from test_train import make_channels, make_cube

OPTICAL = ("B02", "B03", "B04", "B08")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with torch_threads(1):
        yield


def stats_of(channels):
    return {c["name"]: {"mean": 0.0, "std": 1.0} for c in channels}


# ---------------------------------------------------------------------------------- layout

def test_registered_with_the_sequence_layout():
    assert "tattn" in available()
    assert input_layout("tattn") == "sequence" and input_layout("unet") == "stacked"
    with pytest.raises(ValueError, match="unknown model"):
        input_layout("nope")


def test_sequence_layout_extends_the_stacked_one():
    cube, channels, dates = make_cube()
    dates = [dict(d) for d in dates]
    dates[3]["sar_gap_days"] = None  # date 3 has no paired SAR
    stacked = InputAssembler(channels, dates, stats_of(channels), 2)
    seq = InputAssembler(channels, dates, stats_of(channels), 2, "sequence")
    n = stacked.n_input_channels
    assert seq.input_channels[:n] == stacked.input_channels
    img_s = stacked.build(cube, 2)[0]
    img_q = seq.build(cube, 2)[0]
    np.testing.assert_array_equal(img_q[:n], img_s)  # the stacked part is unchanged
    pos = {c: i for i, c in enumerate(seq.input_channels)}
    # the SAR of each neighbour date, as the neighbour's own date gives it
    np.testing.assert_array_equal(img_q[pos["VV@sar:t-1"]], cube[1, 5])
    np.testing.assert_array_equal(img_q[pos["VH@sar:t+2"]], cube[4, 6])
    assert img_q[pos["sar_present@t+1"]].max() == 0.0  # t+1 = date 3 has no SAR ...
    assert not img_q[pos["VV@sar:t+1"]].any()          # ... so its SAR inputs are 0
    assert img_q[pos["sar_present@t-2"]].min() == 1.0
    # the season: day of year on the unit circle
    doy = pd.Timestamp(dates[2]["start_time"]).day_of_year - 1
    assert img_q[pos["doy_sin@t"], 0, 0] == pytest.approx(np.sin(2 * np.pi * doy / 365.25), abs=1e-6)
    assert img_q[pos["doy_cos@t"], 0, 0] == pytest.approx(np.cos(2 * np.pi * doy / 365.25), abs=1e-6)
    # beyond the start of the series: a neighbour that does not exist is all 0
    img0 = seq.build(cube, 0)[0]
    for name in ("VV@sar:t-1", "sar_present@t-1", "doy_sin@t-1", "doy_cos@t-2"):
        assert not img0[pos[name]].any()
    layout = seq.token_layout()
    assert [t["tag"] for t in layout["tokens"]] == ["t", "t-1", "t-2", "t+1", "t+2"]
    assert layout["tokens"][1]["sar"] == [pos["VV@sar:t-1"], pos["VH@sar:t-1"]]
    with pytest.raises(ValueError, match="layout='sequence'"):
        stacked.token_layout()
    with pytest.raises(ValueError, match="layout must be one of"):
        InputAssembler(channels, dates, stats_of(channels), 2, "tokens")


# ----------------------------------------------------------------------------------- model

@pytest.fixture(scope="module")
def net_and_assembler():
    cube, channels, dates = make_cube()
    asm = InputAssembler(channels, dates, stats_of(channels), 2, "sequence")
    torch.manual_seed(0)
    net = build_network("tattn", asm.n_input_channels, len(OPTICAL), {"width": 16, "heads": 2},
                        None, tokens=asm.token_layout()).eval()
    return net, asm, cube


def test_output_shape_and_bad_parameters(net_and_assembler):
    net, asm, cube = net_and_assembler
    x = torch.from_numpy(np.stack([asm.build(cube, t)[0] for t in range(3)]))
    with torch.no_grad():
        assert net(x).shape == (3, len(OPTICAL), 32, 32)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        net(x[..., :15, :15])
    with pytest.raises(ValueError, match="token layout"):
        build_network("tattn", asm.n_input_channels, 4, {}, None)
    with pytest.raises(ValueError, match="multiple of heads"):
        build_network("tattn", asm.n_input_channels, 4, {"width": 10, "heads": 4}, None,
                      tokens=asm.token_layout())
    with pytest.raises(ValueError, match="does not fit"):
        build_network("tattn", 20, 4, {}, None, tokens=asm.token_layout())


def test_absent_dates_do_not_count(net_and_assembler):
    """Date 0 has no t-1 / t-2: whatever their input channels hold, the output is the same."""
    net, asm, cube = net_and_assembler
    x = torch.from_numpy(asm.build(cube, 0)[0][None])
    junk = x.clone()
    for tok in asm.token_layout()["tokens"][1:3]:
        idx = tok["bands"] + [tok["valid"], tok["dt"]] + tok["sar"] + tok["doy"]
        junk[:, idx] = torch.randn(len(idx), 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net(junk), net(x), rtol=0, atol=1e-5)
        # ... but a present date does count
        other = x.clone()
        other[:, asm.token_layout()["tokens"][3]["bands"]] += 1.0
        assert (net(other) - net(x)).abs().max() > 1e-3


def test_prediction_does_not_depend_on_the_batch(net_and_assembler):
    net, asm, cube = net_and_assembler
    x = torch.from_numpy(np.stack([asm.build(cube, t)[0] for t in range(4)]))
    with torch.no_grad():
        together = net(x)
        alone = torch.cat([net(x[i:i + 1]) for i in range(4)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------- a long gap the SAR series fills

T_LONG, GAP = 16, (6, 7, 8, 9)


def sar_scene(seed=0):
    """Reflectance that follows the backscatter date by date: each 4 x 4 patch has a dip (a harvest,
    a flood) at a date of its own that no optical neighbour shows when the dip falls inside a long
    cloudy gap, while the SAR of every date shows it."""
    rng = np.random.default_rng(seed)
    n_opt = len(OPTICAL)
    channels = make_channels()
    cube = np.zeros((T_LONG, len(channels), 32, 32), dtype=np.float32)
    patch = rng.integers(0, T_LONG, (8, 8)).repeat(4, 0).repeat(4, 1)  # the date of the dip
    depth = rng.uniform(0.3, 1.0, (8, 8)).repeat(4, 0).repeat(4, 1)
    t_axis = np.arange(T_LONG)[:, None, None]
    veg = 0.6 + 0.2 * np.sin(np.pi * t_axis / (T_LONG - 1)) \
        - depth * np.exp(-0.5 * ((t_axis - patch) / 0.8) ** 2)
    for t in range(T_LONG):
        v = veg[t]
        cube[t, 0], cube[t, 1], cube[t, 2], cube[t, 3] = 0.08 - 0.05 * v, 0.11 - 0.04 * v, \
            0.15 - 0.12 * v, 0.22 + 0.23 * v
        cube[t, :n_opt] += rng.normal(0.0, 0.003, (n_opt, 32, 32))
        cube[t, n_opt] = rng.random((32, 32)) > 0.35  # scattered clouds everywhere
        cube[t, n_opt + 1] = -12.0 + 6.0 * v + rng.normal(0.0, 0.2, (32, 32))
        cube[t, n_opt + 2] = -18.0 + 8.0 * v + rng.normal(0.0, 0.2, (32, 32))
    t0 = pd.Timestamp("2021-05-01T10:30:00Z")
    dates = [{"start_time": (t0 + pd.Timedelta(days=5 * t)).strftime("%Y-%m-%dT%H:%M:%SZ"),
              "sar_gap_days": 0.5} for t in range(T_LONG)]
    return cube, channels, dates


@pytest.fixture(scope="module")
def long_gap_run(tmp_path_factory):
    cube, channels, dates = sar_scene()
    tiles = tmp_path_factory.mktemp("tattn_tiles")
    export_tiles(cube, channels, dates, tiles, size=16, overlap=8, min_valid_fraction=0.0,
                 block_size=16, val_fraction=0.25, seed=0, prior=True)
    out = tmp_path_factory.mktemp("tattn_run")
    summary = train(tiles, out, model="tattn", model_params={"width": 24, "heads": 2}, epochs=25,
                    batch_size=8, lr=3e-3, patience=100, threads=1, k_neighbours=3)
    return cube, channels, dates, out / "model.pt", summary


def test_fills_a_long_gap_from_sar_better_than_linear(long_gap_run):
    cube, channels, dates, model, summary = long_gap_run
    ckpt = load_checkpoint(model)
    assert ckpt["input_layout"] == "sequence" and ckpt["model"] == "tattn"
    assert ckpt["token_layout"]["tokens"][0]["tag"] == "t" and len(ckpt["token_layout"]["tokens"]) == 7
    n_opt = len(OPTICAL)
    truth = cube[:, :n_opt].copy()
    gappy = cube.copy()
    gappy[list(GAP), n_opt] = 0.0  # four cloudy dates in a row: 20 days without a clear view
    pred = predict_cube(ckpt, gappy, channels, dates, batch_size=8)["prediction"]
    linear = temporal_prior(gappy, channels, dates)[0]  # per-cell linear interpolation in time
    hidden = np.zeros(truth.shape, dtype=bool)
    hidden[list(GAP)] = True
    err_model = np.abs(pred - truth)[hidden].mean()
    err_linear = np.abs(linear - truth)[hidden].mean()
    assert np.isfinite(err_model) and np.isfinite(err_linear)
    # the SAR series carries the dip that no clear optical date shows: the model must use it
    assert err_model < 0.7 * err_linear, (err_model, err_linear)


def test_checkpoint_round_trip_and_stacked_models_unchanged(long_gap_run, tmp_path):
    cube, channels, dates, model, _ = long_gap_run
    ckpt = load_checkpoint(model)
    net = model_from_checkpoint(ckpt)
    assert type(net).__name__ == "ResidualOnPrior" and type(net.net).__name__ == "TemporalAttentionNet"
    assert ckpt["model_revision"] == 2
    # weights of the first tattn (self-attention at half resolution; no model_revision) are refused by name
    old = {k: v for k, v in ckpt.items() if k != "model_revision"}
    with pytest.raises(ValueError, match="'tattn' of architecture revision 1, this stfuse builds revision 2"):
        model_from_checkpoint(old)
    torch.save(old, tmp_path / "old.pt")
    with pytest.raises(ValueError, match=r"init_from checkpoint .*old\.pt holds model 'tattn' of architecture "
                                         "revision 1"):
        load_init(tmp_path / "old.pt", model="tattn", model_params=ckpt["model_params"],
                  input_channels=ckpt["input_channels"], residual=ckpt["residual"])
    # an inference cube whose channels do not give the model's inputs is refused by name
    with pytest.raises(ValueError, match="missing"):
        predict_cube(ckpt, cube[:, :-1], channels[:-1], dates)
    # a stacked model's checkpoint has no token layout and reads the stacked inputs
    ds = GapFillDataset(ckpt["config"]["tiles_dir"], "train", k_neighbours=3)
    assert "sar_present@t" not in ds.input_channels
