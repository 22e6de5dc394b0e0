"""A study whose data cannot support the benchmark still runs through; the summary says why (real Snakemake).

The optical sensor has no classification band (`mask: null`), so this is also the whole workflow on such a
product.
"""

import json

import pandas as pd
import pytest
import yaml

from _scene import tiny_scene, write_config
from test_workflow_ingest import run_snakemake

pytestmark = [pytest.mark.workflow, pytest.mark.grass]


def cloud_masked_without_scl(scene):
    """Turn the scene's S2 into a product whose only mask is nodata: DN 0 where SCL is not clear, no SCL."""
    import numpy as np
    import rasterio

    m = pd.read_csv(scene)
    s2 = m[m.sensor == "S2"]
    for when, rows in s2.groupby("start_time"):
        paths = dict(zip(rows.semantic_label, rows.path))
        with rasterio.open(scene.parent / paths.pop("SCL")) as src:
            scl = src.read(1)
        for path in paths.values():
            with rasterio.open(scene.parent / path, "r+") as ds:
                ds.write(np.where(np.isin(scl, [4, 5, 6, 7, 11]), ds.read(1), 0), 1)
    m[m.semantic_label != "SCL"].to_csv(scene, index=False)


def test_benchmark_that_cannot_score_says_why_and_the_run_succeeds(tmp_path):
    scene = tiny_scene(tmp_path / "scene")
    cloud_masked_without_scl(scene)
    cfg = write_config(
        tmp_path / "nomask.yaml", "nomask", {"manifest": str(scene)},
        tiles={"size": 16, "overlap": 0, "block_size": 16, "val_fraction": 0.25, "min_valid_fraction": 0.0},
        train={"epochs": 1, "batch_size": 8, "model_params": {"base_channels": 8, "depth": 2}},
        benchmark={"min_clear": 0.5, "min_mask_fraction": 0.99},  # no date is that cloudy: no donor
    )
    config = yaml.safe_load(cfg.read_text())
    config["sensors"]["S2"]["mask"] = None
    cfg.write_text(yaml.safe_dump(config))
    proc = run_snakemake(tmp_path, cfg)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = tmp_path / "results" / "nomask"
    assert json.loads((res / "ingest/S2.json").read_text())["valid_strds"] == "S2_valid@ingest_S2"
    info = json.loads((res / "heldout/holdout.json").read_text())
    assert info["possible"] is False and "no donor cloud mask" in info["reason"]
    summary = (res / "benchmark/summary.md").read_text()
    assert "could not score" in summary and "benchmark.min_mask_fraction" in summary
    assert pd.read_csv(res / "benchmark/scores.csv").empty
    assert (res / "register/filled.json").is_file() and (res / "main/model/model.pt").is_file()
    assert not (res / "heldout/model").exists(), "the heldout variant was trained for nothing"
    again = run_snakemake(tmp_path, cfg, extra=["--dry-run"])
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr
