"""Predictive uncertainty per filled cell (config train.uncertainty): the heads' losses, the 2B-output model,
the std of inference (units, zeros where observed, blocks = whole region bit for bit), its registration as an
STRDS, and the benchmark's calibration counts."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

from stfuse import blocks, metrics
from stfuse.benchmark import MODEL, TRANSPLANTED, PartsMerger, calibration_report, plot_calibration
from stfuse.infer import _prepare, _strip_reader, predict_block, predict_cube
from stfuse.models import ResidualOnPrior, build_model, uncertainty as heads
from stfuse.steps.predict import predict_block_step
from stfuse.dataset import GapFillDataset
from stfuse.train import (
    _masked_l1,
    _masked_nll,
    _run_epoch,
    build_network,
    load_checkpoint,
    model_from_checkpoint,
    torch_threads,
    train,
)
from test_infer_blocks import H, LAYOUTS, N_OPT, SIZE, T, random_scene, write_block_cube
from test_train import FAST, export, make_cube


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def tiles(tmp_path_factory):
    return export(tmp_path_factory.mktemp("tiles"), prior=True)


@pytest.fixture(scope="module")
def ckpts(tiles, tmp_path_factory):
    """Briefly trained checkpoints of test_train's scene, per head."""
    out = {}
    for head in ("laplace", "gaussian", "none"):
        run = tmp_path_factory.mktemp(f"run_{head}")
        train(tiles, run, epochs=2, uncertainty=head, **FAST)
        out[head] = load_checkpoint(run / "model.pt")
    return out


# --- the losses -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("head", ["laplace", "gaussian"])
def test_nll_is_minimised_by_the_right_scale(head):
    """A toy problem: two groups of cells with noise of scale 0.05 and 0.4 around different medians. Free
    per-group means and log-scales fitted by Adam on the masked NLL land on the maximum-likelihood values: the
    median and mean |r| (Laplace), the mean and rms (Gaussian); a masked-out cell with a huge error changes
    nothing."""
    rng = np.random.default_rng(0)
    n = 4000
    centre = np.array([0.3, -1.0])
    scale = np.array([0.05, 0.4])
    noise = rng.laplace(size=(2, n)) if head == "laplace" else rng.normal(size=(2, n))
    y = centre[:, None] + scale[:, None] * noise
    y[0, 0] = 1e4                                       # hidden = 0 there: must not count
    target = torch.tensor(y, dtype=torch.float32).reshape(1, 2, n, 1)   # (N, B, s, s), each group a "band"
    hidden = torch.ones(1, 1, n, 1)
    hidden[0, 0, 0, 0] = 0.0                            # cell 0 does not count (in either band)
    params = torch.zeros(1, 4, 1, 1, requires_grad=True)  # 2 means, 2 log-scales
    opt = torch.optim.Adam([params], lr=0.05)
    for _ in range(1500):
        opt.zero_grad()
        loss = _masked_nll(head, params.expand(1, 4, n, 1), target, hidden) / (2 * (n - 1))
        loss.backward()
        opt.step()
    mean = params.detach()[0, :2, 0, 0].numpy()
    b = np.exp(params.detach()[0, 2:, 0, 0].numpy())
    r = y[:, 1:]                                        # the cells that count
    if head == "laplace":
        want_mean = np.median(r, axis=1)
        want_b = np.abs(r - want_mean[:, None]).mean(axis=1)
    else:
        want_mean = r.mean(axis=1)
        want_b = np.sqrt(((r - want_mean[:, None]) ** 2).mean(axis=1))
    np.testing.assert_allclose(mean, want_mean, atol=0.02 * scale.max())
    np.testing.assert_allclose(b, want_b, rtol=0.02)
    np.testing.assert_allclose(b, scale, rtol=0.1)      # and those estimate the true scale
    # std = sqrt(2) b for a Laplace, sigma for a Gaussian: the sample's std
    np.testing.assert_allclose(heads.std_factor(head) * b, r.std(axis=1), rtol=0.06)


def test_nll_values_and_clamp():
    mean = torch.zeros(1, 1, 1, 1)
    y = torch.full((1, 1, 1, 1), 0.5)
    ls = torch.full((1, 1, 1, 1), math.log(0.25))
    assert heads.nll("laplace", mean, ls, y).item() == pytest.approx(0.5 / 0.25 + math.log(0.25) + math.log(2))
    assert heads.nll("gaussian", mean, ls, y).item() == pytest.approx(
        0.5 * (0.5 / 0.25) ** 2 + math.log(0.25) + 0.5 * math.log(2 * math.pi))
    _, clamped = heads.split(torch.tensor([[[[0.0]], [[-50.0]]]]), 1)
    assert clamped.item() == pytest.approx(heads.LOG_SCALE_MIN)
    _, clamped = heads.split(torch.tensor([[[[0.0]], [[50.0]]]]), 1)
    assert clamped.item() == pytest.approx(heads.LOG_SCALE_MAX)
    with pytest.raises(ValueError, match="uncertainty must be one of"):
        heads.check_head("student")
    np.testing.assert_allclose(heads.nominal_coverage("gaussian", [1, 2]), [0.6827, 0.9545], atol=1e-4)
    np.testing.assert_allclose(heads.nominal_coverage("laplace", [1, 2]), [0.7569, 0.9409], atol=1e-4)


# --- the model ------------------------------------------------------------------------------------------

def test_residual_wrapper_adds_the_prior_to_the_band_values_only():
    torch.manual_seed(0)
    net = build_network("unet", 6, 2, {"base_channels": 4, "depth": 1},
                        {"prior_indices": [3, 4], "present_index": 5}, init=True, uncertainty="laplace",
                        log_scale0=-1.5)
    assert isinstance(net, ResidualOnPrior) and net.extra_channels == 2
    assert net.net.head.out_channels == 4                      # the registered model is built with 2B outputs
    net.eval()
    x = torch.randn(3, 6, 8, 8)
    x[:, 5] = (torch.arange(3) > 0).float()[:, None, None]     # sample 0 has no prior
    out = net(x)
    assert out.shape == (3, 4, 8, 8)
    # a fresh model: the prior (where present) and the initial log-scale everywhere
    torch.testing.assert_close(out[:, :2], x[:, 3:5] * x[:, 5:6])
    torch.testing.assert_close(out[:, 2:], torch.full((3, 2, 8, 8), -1.5))
    with pytest.raises(ValueError, match="the network predicts 2 channels but the prior has 2 bands"):
        ResidualOnPrior(build_model("unet", 6, 2, base_channels=4, depth=1), [3, 4], 5, extra_channels=2)(x)


def test_training_with_a_head(ckpts, tiles):
    """The checkpoint says which head (out_channels = B, the network 2B); the validation loss is the masked L1
    of the mean (as with the plain head), the NLL is the training objective."""
    ck = ckpts["laplace"]
    assert ck["uncertainty"] == "laplace" and ck["out_channels"] == N_OPT
    assert ck["config"]["loss"] == "laplace_nll" and ckpts["none"]["config"]["loss"] == "masked_l1"
    assert ckpts["none"]["uncertainty"] == "none"
    model = model_from_checkpoint(ck)
    val = GapFillDataset(tiles, "val", k_neighbours=ck["k_neighbours"], extra_mask_seed=ck["config"]["val_mask_seed"],
                         extra_mask_fraction=1.0)
    sums = {}
    total, count, _ = _run_epoch(model, DataLoader(val, batch_size=4), torch.device("cpu"), uncertainty="laplace",
                                 sums=sums)
    assert total / count == pytest.approx(ck["val_loss"], rel=1e-6)
    # by hand: the L1 of the first B outputs, and the NLL of the whole output
    l1 = nll = 0.0
    with torch.inference_mode():
        for batch in DataLoader(val, batch_size=4):
            hidden = batch["target_valid"] * (1.0 - batch["mask"])
            pred = model(batch["image"])
            assert pred.shape[1] == 2 * N_OPT
            l1 += float(_masked_l1(pred[:, :N_OPT], batch["target"], hidden))
            nll += float(_masked_nll("laplace", pred, batch["target"], hidden))
    assert total == pytest.approx(l1, rel=1e-6) and sums["nll"] == pytest.approx(nll, rel=1e-6)


def test_initial_log_scale_is_the_priors_residual_scale(tiles, tmp_path):
    """Before the first step the head predicts the prior and the ML scale of its residuals: one epoch with
    lr ~ 0 leaves the training NLL at that of a constant scale fitted to the residuals (the minimum over
    constant scales)."""
    train(tiles, tmp_path, epochs=1, lr=1e-12, uncertainty="laplace", **FAST)
    ck = load_checkpoint(tmp_path / "model.pt")
    model = model_from_checkpoint(ck)
    ds = GapFillDataset(tiles, "train", k_neighbours=ck["k_neighbours"], extra_mask_seed=0,
                        extra_mask_fraction=ck["config"]["extra_mask_fraction"])
    batch = next(iter(DataLoader(ds, batch_size=len(ds))))
    with torch.inference_mode():
        out = model(batch["image"])
    hidden = (batch["target_valid"] * (1 - batch["mask"]))[:, 0] > 0
    residual = (batch["target"] - out[:, :N_OPT]).permute(1, 0, 2, 3)[:, hidden].numpy()
    ls = out[:, N_OPT:].numpy()
    assert np.ptp(ls) < 1e-5                              # one constant, set by the bias
    assert float(ls.mean()) == pytest.approx(math.log(np.abs(residual).mean()), abs=0.05)


# --- inference ------------------------------------------------------------------------------------------

def test_std_shape_units_and_zeros_where_observed(ckpts):
    """std (T, B, H, W) float32, 0 exactly where the cell is observed, > 0 where filled; on a region of one
    window it is sqrt(2) exp(log-scale) x the band's std, the model's output in physical units."""
    cube, channels, dates = make_cube()
    ck = ckpts["laplace"]
    res = predict_cube(ck, cube, channels, dates, device="cpu")
    std, flag = res["std"], res["filled_flag"]
    assert std.dtype == np.float32 and std.shape == res["filled"].shape
    filled = np.broadcast_to(flag[:, None] == 1, std.shape)
    assert (std[~filled] == 0).all() and (std[filled] > 0).all() and np.isfinite(std).all()
    assert 0 < flag.mean() < 1
    # one window: no blending, the output by hand
    part = np.ascontiguousarray(cube[:, :, :SIZE, :SIZE])
    one = predict_cube(ck, part, channels, dates, device="cpu")
    run = _prepare(ck, channels, dates, tile_size=None, overlap=None, batch_size=8, device="cpu")
    strip = _strip_reader(run, part, dates)(0)
    x = np.stack([run.assembler.build(strip, t)[0] for t in range(part.shape[0])])
    with torch.inference_mode():
        out = run.model(torch.from_numpy(x)).numpy()
    _, band_std = run.assembler.target_mean_std()
    want = math.sqrt(2) * np.exp(np.clip(out[:, N_OPT:], heads.LOG_SCALE_MIN, heads.LOG_SCALE_MAX)) \
        * band_std[None, :, None, None]
    fill = np.broadcast_to(one["filled_flag"][:, None] == 1, want.shape)
    np.testing.assert_allclose(one["std"][fill], want[fill], rtol=1e-5)
    mean, _ = run.assembler.target_mean_std()
    np.testing.assert_allclose(one["prediction"], out[:, :N_OPT] * band_std[None, :, None, None]
                               + mean[None, :, None, None], rtol=1e-5, atol=1e-6)


def test_checkpoints_without_a_head_give_no_std(ckpts):
    cube, channels, dates = make_cube()
    assert predict_cube(ckpts["none"], cube, channels, dates, device="cpu")["std"] is None
    old = {k: v for k, v in ckpts["none"].items() if k != "uncertainty"}      # written before the key existed
    res = predict_cube(old, cube, channels, dates, device="cpu")
    assert res["std"] is None and res["uncertainty"] == "none"
    with pytest.raises(ValueError, match="std: the checkpoint has no uncertainty head"):
        predict_cube(old, cube, channels, dates, device="cpu",
                     out={"std": np.zeros((cube.shape[0], N_OPT) + cube.shape[2:], np.float32)})


@pytest.mark.parametrize("layout", ["32-cell blocks", "thin last blocks"])
def test_block_std_is_the_whole_regions_bit_for_bit(ckpts, layout):
    cube, channels, dates = random_scene()
    h, w = cube.shape[2:]
    for head in ("laplace", "gaussian"):
        want = predict_cube(ckpts[head], cube, channels, dates, batch_size=3, device="cpu")
        got = {k: np.full_like(want[k], np.nan) for k in ("prediction", "std")}
        for b in LAYOUTS[layout]():
            part = cube[(slice(None), slice(None)) + blocks.read_slices(b)]
            res = predict_block(ckpts[head], part, channels, dates, b, h, w, batch_size=3, device="cpu")
            for k in got:
                blocks.paste(got[k], res[k], b)
        for k in got:
            assert got[k].tobytes() == want[k].tobytes(), (head, k)


def test_predict_step_writes_std(ckpts, tmp_path):
    cube, channels, dates = random_scene()
    model = tmp_path / "model.pt"
    torch.save(ckpts["laplace"], model)
    want = predict_cube(model, cube, channels, dates, batch_size=4, device="cpu")
    plan = blocks.plan(H, cube.shape[3], 48, SIZE)
    got = np.full_like(want["std"], np.nan)
    for b in plan:
        cube_dir = write_block_cube(tmp_path / "blocks" / b.id / "cube", cube, channels, dates, b)
        out_dir = tmp_path / "out" / b.id
        info = predict_block_step(model, cube_dir, out_dir, batch_size=4, device="cpu", threads=1, std=True)
        assert info["uncertainty"] == "laplace" and info["shapes"]["std.npy"] == [T, N_OPT, b.rows, b.cols]
        blocks.paste(got, np.load(out_dir / "std.npy"), b)
    assert got.tobytes() == want["std"].tobytes()
    plain = tmp_path / "plain.pt"
    torch.save(ckpts["none"], plain)
    cube_dir = tmp_path / "blocks" / plan[0].id / "cube"
    with pytest.raises(ValueError, match=r"plain\.pt has no uncertainty head.*train\.uncertainty"):
        predict_block_step(plain, cube_dir, tmp_path / "x", device="cpu", threads=1, std=True)
    predict_block_step(plain, cube_dir, tmp_path / "y", device="cpu", threads=1)   # None: as the checkpoint says
    assert not (tmp_path / "y" / "std.npy").exists() and (tmp_path / "y" / "filled.npy").exists()


# --- calibration ----------------------------------------------------------------------------------------

def _hand_case():
    """2 dates, 2 bands, 3 x 4 cells; errors 0.5, 1.5 and 2.5 std on the hidden cells, one cell with NaN
    truth, one unhidden cell with a huge error (neither counts)."""
    truth = np.zeros((2, 2, 3, 4))
    pred = np.zeros_like(truth)
    std = np.full_like(truth, 0.1)
    hidden = np.zeros((2, 3, 4), bool)
    cells = [(0, 0, 0, 0.05), (0, 0, 1, 0.15), (0, 1, 1, 0.25), (1, 2, 3, -0.05), (1, 0, 3, 0.12)]
    for t, r, c, e in cells:
        hidden[t, r, c] = True
        pred[t, 0, r, c] = e                  # band 0: the error given
        pred[t, 1, r, c] = -0.05              # band 1: always 0.5 std
    hidden[1, 1, 1] = True
    truth[1, :, 1, 1] = np.nan               # no truth: not evaluated
    pred[0, :, 2, 2] = 9.0                   # not hidden: not evaluated
    return truth, pred, std, hidden


def test_calibration_counts_on_a_hand_made_case():
    truth, pred, std, hidden = _hand_case()
    cal = metrics.calibration(truth, pred, std, hidden, ["B1", "B2"], multiples=(1.0, 2.0, 3.0))
    assert cal["n"] == 5 and cal["multiples"] == [1.0, 2.0, 3.0] and cal["bands"] == ["B1", "B2"]
    # band 1 errors in std: 0.5, 1.5, 2.5, 0.5, 1.2 -> within 1: 2, within 2: 4, within 3: 5
    assert cal["observed"]["B1"] == [2 / 5, 4 / 5, 1.0]
    assert cal["observed"]["B2"] == [1.0, 1.0, 1.0]
    assert cal["observed"]["all"] == [7 / 10, 9 / 10, 1.0]


def test_calibration_merges_exactly_over_blocks():
    """The counts of the blocks' cores, merged as the score step merges the model's parts, are the whole
    region's."""
    rng = np.random.default_rng(1)
    truth = rng.normal(size=(3, 2, 20, 30))
    pred = truth + rng.laplace(scale=0.1, size=truth.shape)
    std = np.abs(rng.normal(0.14, 0.03, size=truth.shape))
    hidden = rng.random((3, 20, 30)) < 0.4
    whole = metrics.calibration(truth, pred, std, hidden, ["a", "b"])
    merger = PartsMerger()
    for b in blocks.plan(20, 30, 8, 3):
        sl = (slice(None), slice(None)) + blocks.read_slices(b)
        core = (b.core_row_offset, b.core_col_offset, b.rows, b.cols)
        part = pd.concat([metrics.partial_scores(truth[sl], pred[sl], hidden[sl[:1] + sl[2:]], ["a", "b"], core=core),
                          metrics.calibration_parts(truth[sl], pred[sl], std[sl], hidden[sl[:1] + sl[2:]], ["a", "b"],
                                                    core=core)], ignore_index=True)
        merger.add({(TRANSPLANTED, MODEL): part})
    got = merger.calibration()
    assert got == whole and got["n"] == int(hidden.sum())
    # the model's other scores are unchanged by the extra rows
    plain = metrics.score(truth, pred, hidden, ["a", "b"])
    table = merger.table()
    table = table[table.method == MODEL].drop(columns=["method", "protocol"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(table[table.metric != "ssim"].reset_index(drop=True),
                                  plain[plain.metric != "ssim"].reset_index(drop=True), rtol=1e-12)


def test_calibration_report_and_plot(tmp_path):
    truth, pred, std, hidden = _hand_case()
    cal = metrics.calibration(truth, pred, std, hidden, ["B1", "B2"])
    md, page, info = calibration_report(cal, "laplace")
    assert "| all | 70.0 % | 90.0 % |" in md and "| B1 | 40.0 % | 80.0 % |" in md
    assert "68.3 % / 95.4 %" in md and "75.7 % / 94.1 %" in md and "<table>" in page
    assert info["within_1_std"]["all"] == 0.7 and info["within_2_std"]["B2"] == 1.0
    assert len(info["nominal"]) == len(metrics.CALIBRATION_MULTIPLES) and info["head"] == "laplace"
    json.dumps(info)
    plot_calibration(cal, "laplace", tmp_path / "c.png")
    plot_calibration(None, None, tmp_path / "none.png")
    assert (tmp_path / "c.png").stat().st_size > 10_000 and (tmp_path / "none.png").stat().st_size > 1000


# --- registration ---------------------------------------------------------------------------------------

@pytest.mark.grass
def test_std_strds_in_grass(tmp_path):
    from _scene import ingest_tiny
    from stfuse import grass, grassio, register

    scene, project, states = ingest_tiny(tmp_path)
    dates = [{"start_time": g["start_time"]} for g in states["S2"]["granules"]]
    rng = np.random.default_rng(0)
    n = len(dates)
    filled = rng.uniform(0, 0.5, (n, 4, 32, 32)).astype(np.float32)
    flags = (rng.uniform(size=(n, 32, 32)) < 0.3).astype(np.uint8)
    std = np.where(flags[:, None] == 1, rng.uniform(0.001, 0.05, (n, 4, 32, 32)), 0).astype(np.float32)
    state = register.register_filled(project, states["S2"], states["S1"], dates, filled, flags,
                                     checkpoint_sha="ab" * 32, config_sha="cd" * 32, std=std)
    assert state["std_strds"] == "S2_filled_std@register"
    with grass.session(project["project"], "register") as gs:
        def listed(strds):
            return pd.read_csv(pd.io.common.StringIO(gs.read_command(
                "t.rast.list", input=strds, columns="name,start_time,semantic_label", format="csv")))
        rows, filled_rows = listed(state["std_strds"]), listed(state["strds"])
        info = gs.parse_command("t.info", input=state["std_strds"], flags="g")
        maps = {(g["start_time"], band): name for g in state["granules"] for band, name in g["std"].items()}
        values = {key: grassio.read_map(name) for key, name in maps.items()}
        flag_maps = [grassio.read_map(g["flag"]) for g in state["granules"]]
    assert info["temporal_type"] == "absolute" and int(info["number_of_maps"]) == n * 4
    assert sorted(set(rows.semantic_label)) == ["B02", "B03", "B04", "B08"]
    assert sorted(rows.start_time) == sorted(filled_rows.start_time)        # the filled series' start times
    assert all(name.startswith("S2_filled_std_") for name in rows.name)
    for t, g in enumerate(state["granules"]):
        for b, band in enumerate(["B02", "B03", "B04", "B08"]):
            got = values[(g["start_time"], band)]
            np.testing.assert_allclose(got, std[t, b], rtol=1e-6)
            np.testing.assert_array_equal(got > 0, flag_maps[t] == 1)         # > 0 exactly where filled
