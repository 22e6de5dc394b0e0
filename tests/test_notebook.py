"""notebooks/walkthrough.ipynb runs from the first cell to the last in a real Jupyter kernel (nbclient +
ipykernel) on a demo project made by a real Snakemake run up to `groups`, and leaves what it says: the
filled STRDS in its own mapset, the quicklook figure."""

import json
import sqlite3
import sys
import time

import pytest

from _demo_project import shared_project
from _scene import ROOT

NOTEBOOK = ROOT / "notebooks" / "walkthrough.ipynb"


def test_committed_notebook_has_no_outputs():
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert len(code) >= 10
    assert all(not c.outputs and c.execution_count is None for c in code), "clear the notebook's outputs"


def kernel_of_this_python(tmp_path, monkeypatch) -> str:
    """A kernel spec that runs this interpreter (the venv's, with stfuse), found before any other."""
    spec = tmp_path / "jupyter" / "kernels" / "stfuse-test"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "stfuse tests", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    return "stfuse-test"


@pytest.mark.grass
@pytest.mark.workflow
@pytest.mark.slow
def test_walkthrough_notebook_runs_every_cell(tmp_path_factory, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    workdir = shared_project(tmp_path_factory)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name=kernel_of_this_python(tmp_path, monkeypatch),
                                     resources={"metadata": {"path": str(workdir)}})
    t0 = time.perf_counter()
    client.execute()   # raises CellExecutionError naming the cell on the first error
    seconds = time.perf_counter() - t0
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "same pairs as the workflow's pairing stage: True" in text
    assert "S2_filled@walkthrough 52 maps" in text            # 13 dates x 4 bands
    assert "read back from GRASS == filled: True" in text
    assert any("image/png" in o.get("data", {}) for o in outputs)   # the figure is shown
    mapset = workdir / "results/demo/grassdata/demo/walkthrough"
    assert (workdir / "results/demo/walkthrough/quicklook.png").stat().st_size > 5000
    with sqlite3.connect(f"file:{mapset / 'tgis/sqlite.db'}?mode=ro", uri=True) as con:
        assert [r[0] for r in con.execute("SELECT id FROM strds_base")] == ["S2_filled@walkthrough"]
        labels = {r[0] for r in con.execute("SELECT semantic_label FROM raster_metadata")}
    assert labels == {"B02", "B03", "B04", "B08"}
    assert not (mapset / ".gislock").exists()
    assert seconds < 90, f"the notebook took {seconds:.0f} s"
