"""Spatial blocks as jobs, for real (GRASS + Snakemake on flanders_2017 with its DEM as a static layer).

The same study runs with one block and with four: the filled series, the training tile store and the
benchmark table must be the same; no pixel job sees more than one block plus halo; a block's job reruns
alone after its outputs are deleted. And a whole Sentinel-2 tile is planned without reading a pixel.
"""

import json
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from stfuse import blocks
from stfuse.cube import Mosaic
from _scene import ROOT, SHARED_DATA
from test_workflow_ingest import run_snakemake

pytestmark = [pytest.mark.workflow, pytest.mark.grass, pytest.mark.slow]

FLANDERS = SHARED_DATA / "flanders_2017"
needs_flanders = pytest.mark.skipif(not (FLANDERS / "manifest.csv").is_file(),
                                    reason="../shared/data/flanders_2017 is absent")


def planned_jobs(proc) -> dict:
    text = proc.stdout + proc.stderr
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", text, re.M) if m.group(1) != "total"}


def flanders_config(path: Path, block_size: int) -> Path:
    study = yaml.safe_load((ROOT / "config/studies/flanders_2017.yaml").read_text())
    study["input"]["manifest"] = str(FLANDERS / "manifest.csv")
    study["static"] = [dict(s, file=str(FLANDERS / "static" / Path(s["file"]).name)) for s in study["static"]]
    study["train"].update(epochs=3, patience=3)
    study["blocks"] = {"size": block_size}
    path.write_text(yaml.safe_dump(study))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = {}
    for name, size in (("one", 64), ("four", 32)):
        work = tmp_path_factory.mktemp(f"blocks_{name}")
        cfg = flanders_config(work / "study.yaml", size)
        proc = run_snakemake(work, cfg)
        assert proc.returncode == 0, proc.stderr[-4000:]
        out[name] = (work, cfg)
    return out


def metas(res: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((res / "blocks").glob("*/cube/cube.json"))]


def mosaic(res: Path, variant: str, name: str) -> np.ndarray:
    ms = metas(res)
    plan = [blocks.from_dict(m["block"]) for m in ms]
    paths = {b.id: res / variant / "blocks" / b.id / "infer" / name for b in plan}
    return Mosaic(paths, plan)[...]


@needs_flanders
def test_four_blocks_give_the_one_blocks_answers(runs):
    one = runs["one"][0] / "results/flanders_2017"
    four = runs["four"][0] / "results/flanders_2017"
    assert len(metas(one)) == 1 and len(metas(four)) == 4
    for variant in ("main", "heldout"):
        index_one = pd.read_csv(one / variant / "tiles/index.csv")
        index_four = pd.read_csv(four / variant / "tiles/index.csv")
        cols = ["tile", "row", "col", "split", "valid_fraction"]
        pd.testing.assert_frame_equal(index_one[cols], index_four[cols])
        s1 = json.loads((one / variant / "tiles/stats.json").read_text())["channels"]
        s4 = json.loads((four / variant / "tiles/stats.json").read_text())["channels"]
        for a, b in zip(s1, s4):
            assert a["name"] == b["name"] and a["count"] == b["count"]
            np.testing.assert_allclose([a["mean"], a["std"]], [b["mean"], b["std"]], rtol=1e-12)
        for name in ("filled.npy", "flags.npy"):
            np.testing.assert_array_equal(mosaic(one, variant, name), mosaic(four, variant, name))
    t1, t4 = pd.read_csv(one / "benchmark/scores.csv"), pd.read_csv(four / "benchmark/scores.csv")
    keys = [c for c in t1.columns if t1[c].dtype == object or c in ("n",)]
    pd.testing.assert_frame_equal(t1.sort_values(keys).reset_index(drop=True),
                                  t4.sort_values(keys).reset_index(drop=True), rtol=1e-9)
    r1 = json.loads((one / "register/filled.json").read_text())
    r4 = json.loads((four / "register/filled.json").read_text())
    assert [g["filled_fraction"] for g in r1["granules"]] == [g["filled_fraction"] for g in r4["granules"]]


@needs_flanders
def test_the_dem_is_a_channel_of_every_date(runs):
    res = runs["four"][0] / "results/flanders_2017"
    for m in metas(res):
        names = [c["name"] for c in m["channels"]]
        assert names[-1] == "dem" and m["channels"][-1]["kind"] == "static"
        cube = np.load(res / "blocks" / m["block"]["id"] / "cube/cube.npy", mmap_mode="r")
        dem = np.asarray(cube[:, -1])
        assert np.isfinite(dem).all() and 30 < dem.min() and dem.max() < 50   # metres, 35-47 in the README
        assert (dem == dem[0]).all(), "a static layer is the same on every date"
    groups = json.loads((res / "groups/groups.json").read_text())
    assert all(g["maps"][-1].startswith("static_dem@") for g in groups["groups"])


@needs_flanders
def test_no_pixel_job_sees_more_than_its_block_and_halo(runs):
    res = runs["four"][0] / "results/flanders_2017"
    for m in metas(res):
        b = blocks.from_dict(m["block"])
        assert (b.read_rows, b.read_cols) == (48, 48) and (b.rows, b.cols) == (32, 32)   # core 32 + halo 16
        assert tuple(m["shape"][2:]) == (48, 48)
        for variant in ("main", "heldout"):
            info = json.loads((res / variant / "blocks" / b.id / "infer/infer.json").read_text())
            assert tuple(info["shapes"]["cube"][2:]) == (48, 48)
            assert np.load(res / variant / "blocks" / b.id / "infer/filled.npy", mmap_mode="r").shape[2:] == (32, 32)


@needs_flanders
def test_a_blocks_job_reruns_alone(runs):
    work, cfg = runs["four"]
    res = work / "results/flanders_2017"
    for p in (res / "main/blocks/r0001c0000/infer").iterdir():
        p.unlink()
    # Snakemake leaves a deleted intermediate alone while everything after it is up to date; asked for
    # (the file, or the stage target `infer`), only that block's job runs
    plan = run_snakemake(work, cfg, "infer", extra=["--dry-run"])
    assert plan.returncode == 0, plan.stderr[-3000:]
    assert planned_jobs(plan) == {"predict_block": 1, "infer": 1}, plan.stdout[-3000:]
    proc = run_snakemake(work, cfg, "infer")
    assert proc.returncode == 0, proc.stderr[-3000:]
    np.testing.assert_array_equal(mosaic(res, "main", "filled.npy"),
                                  mosaic(runs["one"][0] / "results/flanders_2017", "main", "filled.npy"))


def test_a_whole_sentinel2_tile_is_planned_without_reading_a_pixel(tmp_path):
    t0 = time.perf_counter()
    proc = run_snakemake(tmp_path, ROOT / "config/studies/s2tile.yaml", extra=["--dry-run"])
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = planned_jobs(proc)
    assert jobs["cube_block"] == jobs["predict_block"] == jobs["tiles_block"] == 22 * 22, jobs
    assert not (tmp_path / "results").exists()
    assert seconds < 60, f"planning took {seconds:.1f} s"   # ~5 s here; the figure is in docs/scaling.md
