"""SIGKILL the workflow at several points, rerun it, and get the outputs of an uninterrupted run.

Also the determinism check: two clean runs (the reference and each resumed one) give identical tiles,
predictions and benchmark tables.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from _scene import ROOT, write_config
from test_workflow_full import FAST, TINY

pytestmark = [pytest.mark.workflow, pytest.mark.grass, pytest.mark.slow]
SNAKEMAKE = Path(sys.executable).with_name("snakemake")
SLOW_TRAIN = dict(FAST, train=dict(FAST["train"], epochs=6))

# name -> (file under the work dir whose appearance or content marks the moment to kill, text or None)
KILL_POINTS = {
    "import": ("results/tiny/grassdata/tiny/ingest_S2", None),
    "tile_export": ("logs/tiny/main/blocks/r0000c0000/tiles.log", None),
    "training": ("logs/tiny/main/train.log", "epoch 2/"),
    "registration": ("logs/tiny/register/register.log", None),
}
COMPARED = [
    "results/tiny/main/blocks/r0000c0000/tiles/tiles.npy", "results/tiny/heldout/blocks/r0000c0000/tiles/tiles.npy",
    "results/tiny/main/tiles/index.csv",
    "results/tiny/main/blocks/r0000c0000/infer/filled.npy", "results/tiny/heldout/blocks/r0000c0000/infer/filled.npy",
    "results/tiny/benchmark/scores.csv",
]


def command(work: Path, cfg: Path, *extra):
    return [str(SNAKEMAKE), "-s", str(ROOT / "Snakefile"), "--directory", str(work), "--cores", "2", *extra,
            "--configfile", str(cfg)]


def run(work, cfg, *extra):
    proc = subprocess.run(command(work, cfg, *extra), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def run_and_kill(work: Path, cfg: Path, marker: str, text: str | None, timeout=600) -> bool:
    """Start the workflow, SIGKILL its whole process group at the marker; True if it was killed mid-run."""
    proc = subprocess.Popen(command(work, cfg), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    target = work / marker
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if target.exists() and (text is None or text in target.read_text(errors="replace")):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.02)
    proc.wait()
    return False


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    work = tmp_path_factory.mktemp("reference")
    cfg = write_config(work / "tiny.yaml", "tiny", TINY, **SLOW_TRAIN)
    run(work, cfg)
    return work


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_killed_run_resumes_to_identical_outputs(reference, tmp_path, point):
    cfg = write_config(tmp_path / "tiny.yaml", "tiny", TINY, **SLOW_TRAIN)
    marker, text = KILL_POINTS[point]
    assert run_and_kill(tmp_path, cfg, marker, text), f"the run finished before reaching {point}"
    assert not (tmp_path / "results/tiny/benchmark/scores.csv").exists()
    run(tmp_path, cfg, "--unlock")
    run(tmp_path, cfg)
    for rel in COMPARED:
        got, want = tmp_path / rel, reference / rel
        if rel.endswith(".npy"):
            np.testing.assert_array_equal(np.load(got), np.load(want), err_msg=rel)
        else:
            assert got.read_bytes() == want.read_bytes(), rel
    if point == "training":
        log = (tmp_path / "logs/tiny/main/train.log").read_text()
        assert "resum" in log.lower(), "training restarted from scratch instead of resuming"
