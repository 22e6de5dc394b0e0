"""The streaming (low-memory) paths of the cube, tiles and predict stages give the very bytes the
whole-cube implementations gave.

The reference is the code as it was before the streaming rewrite (commit ``OLD_COMMIT``), loaded from
git as temporary modules; the tests are skipped where git or that commit is not available.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import stfuse.prior
from stfuse import bridge, grass, grassio, infer, tiles
from stfuse.prior import prior_channels, temporal_prior
from stfuse.train import load_checkpoint, torch_threads, train
from test_train import FAST, export, make_cube

#: the last commit with the whole-cube implementations of bridge/tiles/prior/infer
OLD_COMMIT = "0db3e8b3ea0011138b88a3a2c2fd6cf597384ed8"
ROOT = Path(__file__).resolve().parents[1]
FILES = ("tiles.npy", "index.csv", "clear_fraction.npy", "channels.json", "stats.json")
#: helpers the old code imports from today's stfuse.tiles, private then, under their public names now
RENAMED = {"_check_dates": "check_cube_dates", "_check_channels": "check_cube_channels"}


def _today_names(text: str) -> str:
    """``text`` with its imports of :data:`RENAMED` helpers from stfuse.tiles under today's names."""
    def line(m):
        out = m.group(0)
        for old_name, new_name in RENAMED.items():
            out = re.sub(rf"\b{old_name}\b", f"{new_name} as {old_name}", out)
        return out

    return re.sub(r"^from stfuse\.tiles import .*$", line, text, flags=re.M)


@pytest.fixture(scope="module")
def old(tmp_path_factory):
    """The old stfuse.prior / tiles / infer / bridge as modules ``stfuse._old_<name>``."""
    out = tmp_path_factory.mktemp("old")
    mods = {}
    for name in ("prior", "tiles", "infer", "bridge"):
        try:
            text = subprocess.run(["git", "show", f"{OLD_COMMIT}:src/stfuse/{name}.py"], cwd=ROOT,
                                  check=True, capture_output=True, text=True).stdout
        except (OSError, subprocess.CalledProcessError) as exc:
            pytest.skip(f"reference code of {OLD_COMMIT[:10]} not available: {exc}")
        path = out / f"_old_{name}.py"
        path.write_text(_today_names(text))
        spec = importlib.util.spec_from_file_location(f"stfuse._old_{name}", path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
        mods[name] = mod
    mods["infer"].append_prior = mods["prior"].append_prior  # the old prior all the way
    yield mods
    for name in mods:
        sys.modules.pop(f"stfuse._old_{name}", None)


def scene(seed=0, t=6, h=32, w=32):
    """test_train's scene, with SAR gaps and no-data cells, tiled to (t, h, w)."""
    cube, channels, dates = make_cube(seed)
    reps = (-(-t // cube.shape[0]), 1, -(-h // cube.shape[2]), -(-w // cube.shape[3]))
    cube = np.ascontiguousarray(np.tile(cube, reps)[:t, :, :h, :w])
    dates = [dict(dates[i % len(dates)], start_time=f"2021-{1 + i // 28:02d}-{1 + i % 28:02d}T10:00:00Z")
             for i in range(t)]
    rng = np.random.default_rng(seed + 1)
    cube[1, 5:] = np.nan  # a date without SAR
    cube[2, :, 3:7, 4:9] = np.nan  # no data at all
    cube[:, 0][rng.random((t, h, w)) < 0.05] = np.nan  # stray non-finite optical cells
    return cube, channels, dates


def read_bytes(d):
    return {name: (Path(d) / name).read_bytes() for name in FILES}


# --- prior -------------------------------------------------------------------------------------


def test_prior_is_pixel_local_and_unchanged(old):
    cube, channels, dates = scene(t=9, h=20, w=24)
    dates = tiles.check_cube_dates(dates, len(dates))
    want, want_channels = old["prior"].prior_channels(cube, channels, dates)
    got, got_channels = prior_channels(cube, channels, dates)
    assert got_channels == want_channels
    assert got.tobytes() == want.tobytes()
    # a strip / window of the cube has that strip / window of the whole prior, bit for bit
    for rows, cols in ((slice(3, 11), slice(None)), (slice(0, 7), slice(5, 19))):
        part = prior_channels(np.ascontiguousarray(cube[:, :, rows, cols]), channels, dates)[0]
        assert part.tobytes() == np.ascontiguousarray(want[:, :, rows, cols]).tobytes()
        view = prior_channels(cube[:, :, rows, cols], channels, dates)[0]  # non-contiguous path
        assert view.tobytes() == part.tobytes()
    prior, present = temporal_prior(cube, channels, dates)
    buf = np.empty_like(prior)
    assert temporal_prior(cube, channels, dates, out=buf)[0] is buf
    assert buf.tobytes() == prior.tobytes()
    with pytest.raises(ValueError, match="out must be"):
        temporal_prior(cube, channels, dates, out=buf[:, :1])


# --- tiles -------------------------------------------------------------------------------------


@pytest.mark.parametrize("prior", [True, False])
@pytest.mark.parametrize("size,overlap", [(8, 0), (12, 5)])
def test_export_tiles_bytes_unchanged(old, tmp_path, monkeypatch, prior, size, overlap):
    cube, channels, dates = scene(t=7, h=30, w=34)
    params = dict(size=size, overlap=overlap, min_valid_fraction=0.5, block_size=16,
                  val_fraction=0.3, seed=3, region={"rows": 30, "cols": 34}, prior=prior)
    with monkeypatch.context() as m:
        m.setattr(stfuse.prior, "prior_channels", old["prior"].prior_channels)
        want_summary = old["tiles"].export_tiles(cube, channels, dates, tmp_path / "old", **params)
    got_summary = tiles.export_tiles(cube, channels, dates, tmp_path / "new", **params)
    assert got_summary["tiles_shape"] == want_summary["tiles_shape"]
    assert got_summary["n_low_valid"] == want_summary["n_low_valid"]
    assert read_bytes(tmp_path / "new") == read_bytes(tmp_path / "old")


def test_tiles_step_with_hidden_cells_unchanged(old, tmp_path, monkeypatch):
    cube, channels, dates = scene(t=6, h=24, w=24)
    (tmp_path / "cube").mkdir()
    np.save(tmp_path / "cube" / "cube.npy", cube)
    (tmp_path / "cube" / "cube.json").write_text(json.dumps(
        {"channels": channels, "dates": dates, "region": {"rows": 24}, "shape": list(cube.shape)}))
    before = (tmp_path / "cube" / "cube.npy").read_bytes()
    hidden = np.random.default_rng(4).random((6, 24, 24)) < 0.2
    hidden[3] = False
    params = dict(size=8, overlap=2, min_valid_fraction=0.0, block_size=12, val_fraction=0.25, seed=0)
    with monkeypatch.context() as m:
        m.setattr(stfuse.prior, "prior_channels", old["prior"].prior_channels)
        m.setattr(old["bridge"], "tiles", old["tiles"])
        old["bridge"].tiles_step(tmp_path / "cube", tmp_path / "old", hidden=hidden, **params)
    bridge.tiles_step(tmp_path / "cube", tmp_path / "new", hidden=hidden, **params)
    assert read_bytes(tmp_path / "new") == read_bytes(tmp_path / "old")
    assert (tmp_path / "cube" / "cube.npy").read_bytes() == before  # copy-on-write: file untouched


# --- load_cube / hide ---------------------------------------------------------------------------


def test_load_cube_modes_and_hide(old, tmp_path):
    cube, channels, dates = scene(t=5, h=16, w=18)
    np.save(tmp_path / "cube.npy", cube)
    (tmp_path / "cube.json").write_text(json.dumps({"channels": channels, "dates": dates}))
    before = (tmp_path / "cube.npy").read_bytes()
    hidden = np.random.default_rng(2).random((5, 16, 18)) < 0.3
    hidden[1] = False
    want = old["bridge"].hide(cube, channels, hidden)
    for mode in (None, "c"):
        got, _ = bridge.load_cube(tmp_path, hidden, mmap_mode=mode)
        assert np.asarray(got).tobytes() == want.tobytes()
    ro, _ = bridge.load_cube(tmp_path, mmap_mode="r")
    assert isinstance(ro, np.memmap) and not ro.flags.writeable
    assert np.asarray(ro).tobytes() == cube.tobytes()
    with pytest.raises(ValueError, match="copy-on-write"):
        bridge.load_cube(tmp_path, hidden, mmap_mode="r")
    copy = bridge.hide(cube, channels, hidden)
    assert copy.tobytes() == want.tobytes() and copy is not cube
    assert (tmp_path / "cube.npy").read_bytes() == before
    with pytest.raises(ValueError, match="hidden must have shape"):
        bridge.hide(cube, channels, hidden[:, :4])


# --- cube ------------------------------------------------------------------------------------------


def fake_groups(n_dates=7, n_chan=4, h=9, w=11):
    rng = np.random.default_rng(0)
    maps = {}
    groups = []
    for t in range(n_dates):
        names = []
        for c in range(n_chan):
            if c == n_chan - 1 and t % 3 == 1:  # no SAR at some dates
                names.append(None)
                continue
            name = f"m{t}_{c}@S{c}"
            a = rng.random((h, w), dtype=np.float32)
            a[rng.random((h, w)) < 0.1] = np.nan
            maps[name] = a
            names.append(name)
        groups.append({"maps": names, "start_time": f"2021-01-{t + 1:02d}", "optical_id": f"o{t}",
                       "sar_id": None, "sar_gap_days": None, "clear_fraction": 0.5})
    state = {"groups": groups, "channels": [{"name": f"c{c}"} for c in range(n_chan)]}
    return state, maps, (h, w)


def test_cube_step_same_bytes_as_np_save(old, tmp_path, monkeypatch):
    state, maps, shape = fake_groups()
    calls = []
    monkeypatch.setattr(grassio, "region_shape", lambda **kw: shape)
    monkeypatch.setattr(grassio, "read_maps",
                        lambda names, **kw: calls.append(len(names)) or np.stack([maps[n] for n in names]))
    monkeypatch.setattr(grass, "stage_session", lambda *a, **kw: contextlib.nullcontext())
    monkeypatch.setattr(old["bridge"], "grassio", grassio)
    want = old["bridge"].read_cube(state)
    assert bridge.read_cube(state).tobytes() == want.tobytes()
    for chunk in (1, 3, 100):
        calls.clear()
        assert bridge.read_cube(state, chunk_dates=chunk).tobytes() == want.tobytes()
        assert len(calls) == -(-7 // chunk)
    groups_json = tmp_path / "groups.json"
    groups_json.write_text(json.dumps(state))
    project = {"region": {"rows": shape[0], "cols": shape[1]}}
    meta = bridge.cube_step(project, groups_json, tmp_path / "cube")
    np.save(tmp_path / "want.npy", want)
    assert (tmp_path / "cube" / "cube.npy").read_bytes() == (tmp_path / "want.npy").read_bytes()
    assert meta["shape"] == list(want.shape)
    assert not list((tmp_path / "cube").glob(".*partial"))
    with pytest.raises(ValueError, match="out must be"):
        bridge.read_cube(state, np.empty((1, 1, 1, 1), np.float32))


# --- predict ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    with torch_threads(1):
        out = {}
        for prior in (True, False):
            tiles_dir = export(tmp_path_factory.mktemp("tiles"), prior=prior)
            run = tmp_path_factory.mktemp("run")
            train(tiles_dir, run, epochs=1, **FAST)
            out[prior] = load_checkpoint(run / "model.pt")
        yield out


@pytest.mark.parametrize("prior,h,w,size,overlap", [
    (True, 32, 40, 16, 4),   # strips of the prior
    (True, 12, 20, 16, 4),   # region smaller than a window: NaN padding
    (False, 32, 24, 16, 6),  # no prior: windows straight from the cube
])
def test_predict_cube_bytes_unchanged(old, ckpts, tmp_path, prior, h, w, size, overlap):
    cube, channels, dates = scene(seed=1, t=6, h=h, w=w)
    kw = dict(tile_size=size, overlap=overlap, batch_size=5, device="cpu", threads=1)
    want = old["infer"].predict_cube(ckpts[prior], cube, channels, dates, **kw)
    got = infer.predict_cube(ckpts[prior], cube, channels, dates, **kw)
    for key in ("prediction", "filled", "filled_flag"):
        assert got[key].dtype == want[key].dtype and got[key].shape == want[key].shape
        assert got[key].tobytes() == want[key].tobytes(), key
    # straight into .npy files (what workflow/scripts/infer.py does): np.save's bytes
    n_bands = want["prediction"].shape[1]
    out = {"prediction": ((6, n_bands, h, w), np.float32), "filled": ((6, n_bands, h, w), np.float32),
           "filled_flag": ((6, h, w), np.uint8)}
    out = {k: np.lib.format.open_memmap(tmp_path / f"{k}.npy", mode="w+", dtype=d, shape=s)
           for k, (s, d) in out.items()}
    mm_cube = tmp_path / "cube.npy"
    np.save(mm_cube, cube)
    infer.predict_cube(ckpts[prior], np.load(mm_cube, mmap_mode="c"), channels, dates, out=out, **kw)
    for key, arr in out.items():
        arr.flush()
        np.save(tmp_path / f"want_{key}.npy", want[key])
        assert (tmp_path / f"{key}.npy").read_bytes() == (tmp_path / f"want_{key}.npy").read_bytes(), key
    with pytest.raises(ValueError, match="out"):
        infer.predict_cube(ckpts[prior], cube, channels, dates, out={"prediction": out["filled_flag"]}, **kw)
