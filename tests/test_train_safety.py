"""Issue 9, training/inference: resume fingerprint, output permissions, thread-count
independence of the rule scripts, and the guard against exports with too few dates."""

from __future__ import annotations

import json
import logging
import os
import runpy
import shutil
import stat
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

import stfuse.infer
import stfuse.logs
import stfuse.train
from stfuse.infer import predict_cube
from stfuse.tiles import export_tiles
from stfuse.train import OUTPUT_FILES, load_checkpoint, train
from test_train import FAST, SIZE, assert_same_state, export, make_cube, state

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "workflow" / "scripts"


def export_dates(out, keep):
    """The test scene with only the dates in ``keep``."""
    cube, channels, dates = make_cube()
    export_tiles(cube[keep], channels, [dates[t] for t in keep], out, size=SIZE, overlap=0,
                 min_valid_fraction=0.0, block_size=SIZE, val_fraction=0.25, seed=0)
    return out


@pytest.fixture(scope="module")
def tiles_dir(tmp_path_factory):
    return export(tmp_path_factory.mktemp("tiles"))


def warnings_of(caplog):
    return [r.getMessage() for r in caplog.records
            if r.name == "stfuse.train" and r.levelno >= logging.WARNING]


# ---------------------------------------------------------------------- resume fingerprint

def test_other_data_starts_afresh_same_data_resumes(tiles_dir, tmp_path, caplog):
    out = tmp_path / "run"
    train(tiles_dir, out, epochs=2, **FAST)
    fewer = export_dates(tmp_path / "fewer", list(range(5)))  # one optical date dropped
    with caplog.at_level(logging.INFO, logger="stfuse.train"):
        s = train(fewer, out, epochs=3, **FAST)
    assert s["resumed_from"] is None and s["epochs_run"] == 3
    assert "tiles.npy changed" in s["restart_reason"]
    (line,) = warnings_of(caplog)
    assert "not resuming" in line and "tiles.npy changed" in line and "afresh" in line
    # what it wrote is a fresh run on the new data, not 1 epoch on top of the old weights
    train(fewer, tmp_path / "straight", epochs=3, **FAST)
    assert_same_state(state(out / "last.pt"), state(tmp_path / "straight" / "last.pt"))
    assert_same_state(state(out / "model.pt"), state(tmp_path / "straight" / "model.pt"))
    assert len(pd.read_csv(out / "history.csv")) == 3
    # same data, more epochs: continues
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="stfuse.train"):
        s = train(fewer, out, epochs=4, **FAST)
    assert s["resumed_from"] == 3 and s["epochs_run"] == 1 and s["restart_reason"] is None
    assert not warnings_of(caplog)


def test_changed_stats_or_settings_start_afresh(tiles_dir, tmp_path, caplog):
    data = tmp_path / "tiles"
    shutil.copytree(tiles_dir, data)
    out = tmp_path / "run"
    train(data, out, epochs=2, **FAST)
    # settings that do not change the result: resume
    s = train(data, out, epochs=3, patience=50, max_minutes=100, batch_size=4, threads=1)
    assert s["resumed_from"] == 2 and s["epochs_run"] == 1
    # only stats.json differs
    stats = json.loads((data / "stats.json").read_text())
    stats["channels"][0]["mean"] += 0.01
    (data / "stats.json").write_text(json.dumps(stats))
    with caplog.at_level(logging.WARNING, logger="stfuse.train"):
        s = train(data, out, epochs=3, **FAST)
    assert s["resumed_from"] is None and s["restart_reason"] == "stats.json changed"
    assert s["epochs_run"] == 3
    # a setting that changes the result: named in the one warning line
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="stfuse.train"):
        s = train(data, out, epochs=1, lr=0.01, **FAST)
    assert s["resumed_from"] is None and s["restart_reason"] == "lr: 0.001 -> 0.01"
    assert warnings_of(caplog) == [f"not resuming from {out / 'last.pt'} (lr: 0.001 -> 0.01), "
                                   "starting afresh"]
    # the fingerprint is in both checkpoints
    for name in ("model.pt", "last.pt"):
        fp = load_checkpoint(out / name)["fingerprint"]
        assert set(fp["data"]) == {"tiles.npy", "index.csv", "clear_fraction.npy",
                                   "channels.json", "stats.json"}
        assert all(v.startswith("sha256:") for v in fp["data"].values())
        assert fp["config"]["lr"] == 0.01 and "epochs" not in fp["config"]
        assert "patience" not in fp["config"] and "tiles_dir" not in fp["config"]


def test_old_or_unreadable_last_pt_starts_afresh(tiles_dir, tmp_path):
    out = tmp_path / "run"
    train(tiles_dir, out, epochs=1, **FAST)
    last = torch.load(out / "last.pt", weights_only=True)
    del last["fingerprint"]  # written before the fingerprint existed
    torch.save(last, out / "last.pt")
    s = train(tiles_dir, out, epochs=2, **FAST)
    assert s["resumed_from"] is None and "no fingerprint" in s["restart_reason"]
    (out / "last.pt").write_bytes(b"garbage")
    s = train(tiles_dir, out, epochs=1, **FAST)
    assert s["resumed_from"] is None and s["restart_reason"].startswith("unreadable")


def test_rerun_of_a_finished_run_writes_the_declared_outputs(tiles_dir, tmp_path):
    out = tmp_path / "run"
    train(tiles_dir, out, epochs=2, **FAST)
    history = (out / "history.csv").read_bytes()
    best = state(out / "model.pt")
    for name in ("model.pt", "history.csv", "loss.png"):  # what Snakemake deletes before a rerun
        (out / name).unlink()
    s = train(tiles_dir, out, epochs=2, **FAST)
    assert s["epochs_run"] == 0 and s["resumed_from"] == 2 and s["stopped"] == "epochs"
    assert (out / "history.csv").read_bytes() == history
    assert (out / "loss.png").stat().st_size > 1000
    assert_same_state(state(out / "model.pt"), best)


# ---------------------------------------------------------------------- file permissions

@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_outputs_follow_the_umask(tiles_dir, tmp_path, umask, mode):
    before = os.umask(umask)
    try:
        train(tiles_dir, tmp_path, epochs=1, **FAST)
    finally:
        os.umask(before)
    for name in OUTPUT_FILES:
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name
    assert not list(tmp_path.glob(".*.partial"))


# ---------------------------------------------------------------------- too few dates

def test_single_date_fails_at_once(tmp_path):
    tiles = export_dates(tmp_path / "tiles", [0])
    with pytest.raises(ValueError, match=r"tiles.*has 1 optical date.*pairing\.neighbours"):
        train(tiles, tmp_path / "out", epochs=10, **FAST)
    assert not (tmp_path / "out" / "last.pt").exists()


def test_no_hidden_pixel_fails_at_the_first_epoch(tmp_path):
    cube, channels, dates = make_cube()
    cube[:, 4] = 1.0  # every date clear: another date's mask hides nothing
    export_tiles(cube, channels, dates, tmp_path / "tiles", size=SIZE, overlap=0,
                 min_valid_fraction=0.0, block_size=SIZE, val_fraction=0.25, seed=0)
    with pytest.raises(ValueError, match="epoch 1 gave no loss"):
        train(tmp_path / "tiles", tmp_path / "out", epochs=10, **FAST)
    assert not (tmp_path / "out" / "last.pt").exists()


def test_nan_losses_log_cleanly_and_fail(tiles_dir, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(stfuse.train, "_run_epoch", lambda *a, **k: (float("nan"), 10, 4))
    with caplog.at_level(logging.INFO, logger="stfuse.train"), \
            pytest.raises(ValueError, match="no epoch gave a finite loss"):
        train(tiles_dir, tmp_path, epochs=3, batch_size=4, patience=1, threads=1)
    messages = [r.getMessage() for r in caplog.records]  # no "%d format: NoneType" error
    assert any("early stopping" in m and "epoch None" in m for m in messages)


# ---------------------------------------------------------------------- thread count

def test_weights_do_not_depend_on_the_global_thread_count(tiles_dir, tmp_path):
    before = torch.get_num_threads()
    try:
        for n, name in ((1, "a"), (2, "b")):
            torch.set_num_threads(n)
            train(tiles_dir, tmp_path / name, epochs=2, batch_size=4, patience=100, threads=2)
            assert torch.get_num_threads() == n
    finally:
        torch.set_num_threads(before)
    assert_same_state(state(tmp_path / "a" / "last.pt"), state(tmp_path / "b" / "last.pt"))
    assert load_checkpoint(tmp_path / "a" / "model.pt")["config"]["torch_threads"] == 2


def test_prediction_does_not_depend_on_the_global_thread_count(tiles_dir, tmp_path):
    train(tiles_dir, tmp_path, epochs=1, **FAST)
    scene = make_cube()
    before = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(predict_cube(tmp_path / "model.pt", *scene, device="cpu",
                                        threads=2)["prediction"])
    finally:
        torch.set_num_threads(before)
    np.testing.assert_array_equal(results[0], results[1])


def _run_script(name, snakemake, monkeypatch):
    monkeypatch.setattr(stfuse.logs, "setup", lambda *a, **k: None)  # keep pytest's logging
    runpy.run_path(str(SCRIPTS / name), init_globals={"snakemake": snakemake})


def _train_job(tiles, out, cores, threads):
    params = {"model": "unet", "model_params": {}, "epochs": 2, "batch_size": 4, "lr": 0.001,
              "extra_mask_fraction": 0.7, "patience": 100, "seed": 0, "device": "cpu",
              "max_minutes": None, "threads": threads}
    return SimpleNamespace(
        input=SimpleNamespace(index=str(tiles / "index.csv"), tiles=str(tiles / "tiles.npy")),
        output=SimpleNamespace(model=str(out / "model.pt"), history=str(out / "history.csv"),
                               curve=str(out / "loss.png")),
        log=[str(out.parent / f"{out.name}.log")],
        params=SimpleNamespace(train=params, k_neighbours=2, adopt=None),
        threads=cores)


def test_train_rule_script_takes_threads_from_the_config(tiles_dir, tmp_path, monkeypatch):
    seen = []
    real = stfuse.train.train
    monkeypatch.setattr(stfuse.train, "train",
                        lambda *a, **k: seen.append(k["threads"]) or real(*a, **k))
    for cores, name in ((1, "one"), (2, "two")):  # snakemake --cores 1 / --cores 2
        _run_script("train.py", _train_job(tiles_dir, tmp_path / name, cores, 2), monkeypatch)
    assert seen == [2, 2]
    assert_same_state(state(tmp_path / "one" / "last.pt"), state(tmp_path / "two" / "last.pt"))
    losses = ["train_loss", "val_loss"]  # (the other columns hold timings)
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "one" / "history.csv")[losses],
                                  pd.read_csv(tmp_path / "two" / "history.csv")[losses])


def test_infer_rule_script_takes_threads_from_the_config(tiles_dir, tmp_path, monkeypatch):
    from stfuse import blocks, cube as cubes

    train(tiles_dir, tmp_path / "model", epochs=1, **FAST)
    cube, channels, dates = make_cube()
    h, w = cube.shape[2:]
    block = blocks.plan(h, w, max(h, w), SIZE)[0]   # one block: the whole region
    (tmp_path / "cube").mkdir()
    np.save(tmp_path / "cube" / "cube.npy", cube)
    cubes.write_meta(tmp_path / "cube", {"channels": channels, "dates": dates, "region": {"rows": h, "cols": w},
                                         "block": blocks.to_dict(block), "shape": list(cube.shape),
                                         "counts": cubes.core_counts(cube, channels, block)})
    seen = []
    real = stfuse.infer.predict_block
    monkeypatch.setattr(stfuse.infer, "predict_block",
                        lambda *a, **k: seen.append(k["threads"]) or real(*a, **k))
    outputs = []
    for cores in (1, 2):
        out = tmp_path / f"infer{cores}"
        out.mkdir()
        job = SimpleNamespace(
            input=SimpleNamespace(model=str(tmp_path / "model" / "model.pt"),
                                  cube=str(tmp_path / "cube" / "cube.npy"), holdout=[]),
            output=SimpleNamespace(filled=str(out / "filled.npy"),
                                   prediction=str(out / "prediction.npy"),
                                   flags=str(out / "flags.npy"), info=str(out / "infer.json")),
            log=[str(out / "infer.log")],
            params=SimpleNamespace(infer={"batch_size": 16, "overlap": None, "device": "cpu",
                                          "threads": 2}, std=None),
            threads=cores)
        _run_script("predict_block.py", job, monkeypatch)
        outputs.append(np.load(out / "prediction.npy"))
    assert seen == [2, 2]
    np.testing.assert_array_equal(outputs[0], outputs[1])


def test_schema_and_config_have_the_thread_keys():
    import yaml

    schema = yaml.safe_load((ROOT / "workflow/schemas/config.schema.yaml").read_text())
    config = yaml.safe_load((ROOT / "config/config.yaml").read_text())
    for section, default in (("train", 2), ("infer", 1)):   # inference: one thread per block job
        spec = schema["properties"][section]["properties"]["threads"]
        assert spec["type"] == "integer" and spec["minimum"] == 1 and spec["default"] == default
        assert "bit-identical" in spec["description"]
        assert config[section]["threads"] == default
