"""Transfer of a trained model: fine-tuning from a checkpoint (train.init_from) and an inference-only study
(train.model naming a checkpoint), in the library and in real Snakemake runs."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from stfuse.tiles import export_tiles
from stfuse.train import HISTORY_COLUMNS, _file_digest, adopt_checkpoint, load_checkpoint, train

from _scene import write_config
from test_train import FAST, SIZE, make_cube
from test_workflow_full import FAST as WF_FAST
from test_workflow_full import TINY
from test_workflow_ingest import run_snakemake

SMALL = dict(model_params={"base_channels": 8, "depth": 2}, epochs=1, **FAST)


def export_variant(out, seed=0, drop=(), order=None):
    """A test_train export of another scene (``seed``), without the channels named in ``drop`` or with its
    channels in ``order`` (names): a study with other bands, or the same bands listed in another order."""
    cube, channels, dates = make_cube(seed)
    names = [c["name"] for c in channels]
    keep = [names.index(n) for n in (order or names) if n not in drop]
    export_tiles(cube[:, keep], [channels[i] for i in keep], dates, out, size=SIZE, overlap=0,
                 min_valid_fraction=0.0, block_size=SIZE, val_fraction=0.25, seed=0, prior=True)
    return out


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A model trained (one epoch) on the scene of seed 0: the checkpoint to transfer."""
    root = tmp_path_factory.mktemp("source")
    train(export_variant(root / "tiles"), root / "model", **SMALL)
    return root / "model"


@pytest.fixture(scope="module")
def other_site(tmp_path_factory):
    """The same bands on another scene (seed 1): the study the model is transferred to."""
    return export_variant(tmp_path_factory.mktemp("site") / "tiles", seed=1)


def params(path):
    return {k: v for k, v in load_checkpoint(path)["state_dict"].items() if not k.endswith(
        ("running_mean", "running_var", "num_batches_tracked"))}  # batch-norm buffers move without a step


# --- fine-tuning (init_from) -------------------------------------------------------------------------------

def test_init_from_starts_from_the_checkpoint_weights_and_records_its_hash(source, other_site, tmp_path):
    init = source / "model.pt"
    # lr 1e-12: an Adam step moves a weight by ~1e-12, so the trained weights are the starting weights
    tuned = train(other_site, tmp_path / "tuned", init_from=init, **dict(SMALL, lr=1e-12))
    fresh = train(other_site, tmp_path / "fresh", **dict(SMALL, lr=1e-12))
    assert tuned["epochs_run"] == 1 and tuned["restart_reason"] is None
    want, got, scratch = params(init), params(tmp_path / "tuned/model.pt"), params(tmp_path / "fresh/model.pt")
    assert set(got) == set(want)
    for key in want:
        assert torch.allclose(got[key], want[key], atol=1e-8), key
    assert any(not torch.allclose(scratch[k], want[k], atol=1e-4) for k in want)  # a fresh start is not it
    ckpt = load_checkpoint(tmp_path / "tuned/model.pt")
    assert ckpt["config"]["init_from"] == _file_digest(init)
    assert ckpt["config"]["init_from_path"] == str(init.resolve())
    # the normalisation statistics are the new site's, not the source's
    site_stats = json.loads((other_site / "stats.json").read_text())["channels"]
    assert ckpt["stats"] == site_stats != load_checkpoint(init)["stats"]
    assert load_checkpoint(tmp_path / "fresh/model.pt")["config"]["init_from"] is None


def test_a_resume_with_another_init_file_starts_afresh(source, other_site, tmp_path):
    out = tmp_path / "tuned"
    train(other_site, out, init_from=source / "model.pt", **SMALL)
    same = train(other_site, out, init_from=source / "model.pt", **SMALL)  # finished: nothing to train
    assert same["epochs_run"] == 0 and same["restart_reason"] is None
    moved = tmp_path / "elsewhere.pt"
    shutil.copy(source / "model.pt", moved)  # same content, other path: still the same run
    assert train(other_site, out, init_from=moved, **SMALL)["restart_reason"] is None
    other = train(other_site, out, init_from=source / "last.pt", **SMALL)  # other weights file
    assert other["epochs_run"] == 1 and "init_from" in other["restart_reason"]


def test_init_from_with_other_channels_is_refused_naming_them(source, tmp_path):
    no_nir = export_variant(tmp_path / "tiles", drop=("B08",))
    out = tmp_path / "model"
    with pytest.raises(ValueError) as err:
        train(no_nir, out, init_from=source / "model.pt", **SMALL)
    msg = str(err.value)
    assert f"init_from checkpoint {source / 'model.pt'}" in msg
    assert "missing channels: B08 (B08@t, " in msg and "B08@prior" in msg and "unexpected channels: none" in msg
    assert not list(out.glob("*.pt"))  # refused before anything is written


def test_init_from_with_another_model_or_order_is_refused(source, other_site, tmp_path):
    with pytest.raises(ValueError, match=r"model_params \{'base_channels': 8, 'depth': 2\}.*train.model_params"):
        train(other_site, tmp_path / "a", init_from=source / "model.pt",
              **dict(SMALL, model_params={"base_channels": 4, "depth": 2}))
    swapped = export_variant(tmp_path / "tiles", order=["B02", "B03", "B04", "B08", "valid", "VH", "VV"])
    with pytest.raises(ValueError, match=r"another order.*sensors.S1.bands: \['VV', 'VH'\]"):
        train(swapped, tmp_path / "b", init_from=source / "model.pt", **SMALL)
    with pytest.raises(FileNotFoundError, match="nothing.pt"):
        train(other_site, tmp_path / "c", init_from=tmp_path / "nothing.pt", **SMALL)


# --- an inference-only study (adopt_checkpoint) --------------------------------------------------------------

def test_adopt_copies_the_checkpoint_with_its_origin_and_says_no_training_ran(source, other_site, tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "last.pt").write_bytes(b"stale: of an earlier training run")
    res = adopt_checkpoint(source / "model.pt", other_site, out, k_neighbours=2)
    assert res["epochs_run"] == 0 and not (out / "last.pt").exists()
    src, got = load_checkpoint(source / "model.pt"), load_checkpoint(out / "model.pt")
    assert got["adopted_from"] == {"path": str((source / "model.pt").resolve()),
                                   "sha256": _file_digest(source / "model.pt"), "adopted_from": None}
    assert got["stats"] == src["stats"]  # the units the model learnt in
    for key in src["state_dict"]:
        assert torch.equal(got["state_dict"][key], src["state_dict"][key])
    history = pd.read_csv(out / "history.csv")
    assert list(history.columns) == list(HISTORY_COLUMNS) and history.empty
    assert (out / "loss.png").stat().st_size > 5000
    # the adopted model fills the other site's cube
    from stfuse.infer import predict_cube

    cube, channels, dates = make_cube(1)
    filled = predict_cube(out / "model.pt", cube, channels, dates, threads=1)["filled"]
    assert filled.shape == (cube.shape[0], 4, cube.shape[2], cube.shape[3]) and np.isfinite(filled).all()


@pytest.mark.parametrize("drop, order, message", [
    (("VH",), None, r"missing channels: VH \(VH@sar\); unexpected channels: none; the study needs the bands"),
    ((), ["B02", "B04", "B03", "B08", "valid", "VV", "VH"],
     r"another order: .*\['B02', 'B03', 'B04'.*sensors.S2.bands: \['B02', 'B03', 'B04', 'B08'\].*not reorder"),
])
def test_adopt_refuses_a_checkpoint_whose_channels_do_not_match(source, tmp_path, drop, order, message):
    tiles = export_variant(tmp_path / "tiles", seed=1, drop=drop, order=order)
    out = tmp_path / "model"
    with pytest.raises(ValueError, match=message) as err:
        adopt_checkpoint(source / "model.pt", tiles, out, key="train.model")
    assert f"checkpoint {source / 'model.pt'} (config key train.model)" in str(err.value)
    assert not out.exists()  # nothing written


# --- real Snakemake runs ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def demo_model(tmp_path_factory):
    """`snakemake train` of the tiny demo study: the model an inference-only study adopts."""
    work = tmp_path_factory.mktemp("demo")
    cfg = write_config(work / "tiny.yaml", "tiny", TINY, **WF_FAST)
    proc = run_snakemake(work, cfg, "train")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return work / "results/tiny/main/model/model.pt"


@pytest.mark.workflow
@pytest.mark.grass
def test_inference_only_study_adopts_the_model_and_registers_without_training(demo_model, tmp_path):
    site = {"synthetic": dict(TINY["synthetic"], seed=7)}  # another scene: the model never saw it
    cfg = write_config(tmp_path / "apply.yaml", "apply", site, **dict(WF_FAST, train={"model": str(demo_model)}))
    proc = run_snakemake(tmp_path, cfg, "register")
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = tmp_path / "results/apply"
    log = (tmp_path / "logs/apply/main/train.log").read_text()
    assert "no training: adopted" in log and "epoch 1/" not in log
    ckpt = load_checkpoint(res / "main/model/model.pt")
    assert ckpt["adopted_from"]["path"] == str(demo_model.resolve())
    assert ckpt["adopted_from"]["sha256"] == _file_digest(demo_model)
    assert pd.read_csv(res / "main/model/history.csv").empty and not (res / "main/model/last.pt").exists()
    filled = json.loads((res / "register/filled.json").read_text())
    assert filled["strds"] == "S2_filled@register" and len(filled["granules"]) > 5
    again = run_snakemake(tmp_path, cfg, "register", extra=["--dry-run"])
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr


@pytest.mark.workflow
@pytest.mark.grass
def test_inference_only_study_with_other_bands_fails_naming_the_missing_channels(demo_model, tmp_path):
    cfg = write_config(tmp_path / "nonir.yaml", "nonir", TINY, **dict(WF_FAST, train={"model": str(demo_model)}))
    config = yaml.safe_load(cfg.read_text())
    config["sensors"]["S2"]["bands"] = ["B02", "B03", "B04"]  # no B08: the model needs it
    cfg.write_text(yaml.safe_dump(config))
    proc = run_snakemake(tmp_path, cfg, "train")
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr + (tmp_path / "logs/nonir/main/train.log").read_text()
    assert f"checkpoint {demo_model} (config key train.model) does not fit" in text
    assert "missing channels: B08 (B08@t, " in text
    assert not (tmp_path / "results/nonir/main/model/model.pt").exists()


@pytest.mark.workflow
@pytest.mark.parametrize("train_cfg, message", [
    ({"model": "no/such/model.pt"}, "config key train.model: checkpoint no/such/model.pt does not exist (tried "),
    ({"init_from": "/no/such/init.pt"}, "config key train.init_from: checkpoint /no/such/init.pt does not exist"),
    ({"model": "results/tiny/main/model/model.pt"}, "is a model of this study"),
])
def test_a_missing_checkpoint_fails_when_the_dag_is_built(tmp_path, train_cfg, message):
    cfg = write_config(tmp_path / "c.yaml", "tiny", TINY, **dict(WF_FAST, train=train_cfg))
    if "results" in train_cfg.get("model", ""):
        (tmp_path / train_cfg["model"]).parent.mkdir(parents=True)
        (tmp_path / train_cfg["model"]).write_bytes(b"x")
    proc = run_snakemake(tmp_path, cfg, extra=["--dry-run"])
    assert proc.returncode != 0
    assert message in proc.stdout + proc.stderr


@pytest.mark.workflow
def test_init_from_and_a_checkpoint_model_together_are_refused(tmp_path, source):
    ckpt = str(source / "model.pt")
    cfg = write_config(tmp_path / "c.yaml", "tiny", TINY, **dict(WF_FAST, train={"model": ckpt, "init_from": ckpt}))
    proc = run_snakemake(tmp_path, cfg, extra=["--dry-run"])
    assert proc.returncode != 0 and "config keys train.model and train.init_from" in proc.stdout + proc.stderr
