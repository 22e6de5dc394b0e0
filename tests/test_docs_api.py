"""docs/python-api.md runs as written: its python blocks, in order, in one fresh Python process, on a demo
project made by a real Snakemake run (up to `cube`) of a tiny synthetic study."""

import json
import subprocess
import sys

import pytest

from _demo_project import python_blocks, shared_project
from _scene import ROOT

pytestmark = [pytest.mark.workflow, pytest.mark.grass]

DOC = ROOT / "docs" / "python-api.md"


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return shared_project(tmp_path_factory)


def run_doc(workdir, tmp_path):
    script = tmp_path / "python_api.py"
    script.write_text("\n".join(python_blocks(DOC)))
    return subprocess.run([sys.executable, str(script)], cwd=workdir, capture_output=True, text=True, timeout=600)


def test_illustrations_are_skipped(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("text\n```python\na = 1\n```\n<!-- not run -->\n\n```python\nb = ...\n```\n"
                    "```python title=\"sketch\"\nc = ...\n```\n```bash\nls\n```\n```python\nd = a\n```\n")
    assert python_blocks(page) == ["a = 1\n", "d = a\n"]


def test_the_page_runs_no_placeholders():
    code = "\n".join(python_blocks(DOC))
    assert len(python_blocks(DOC)) >= 8
    assert "..." not in code                      # no placeholders in what runs
    assert code.index("g.mapsets") < code.index("tgis.init()")   # search path before TGIS starts


def test_python_api_doc_runs_in_order_and_prints_what_it_says(project, tmp_path):
    proc = run_doc(project, tmp_path)
    out = proc.stdout
    assert proc.returncode == 0, (out + proc.stderr)[-4000:]
    assert "mapset: scratch" in out
    assert "search path: ['scratch', 'PERMANENT', 'ingest_S2', 'ingest_S1', 'groups']" in out
    assert "region: 48 x 48 cells" in out
    assert "paired 13 of 13 optical granules (mode nearest, max gap 6 d" in out
    assert "read_stack: (13, 2, 48, 48) float32" in out
    assert "cube: (13, 7, 48, 48) ['B02', 'B03', 'B04', 'B08', 'valid', 'VV', 'VH']" in out
    assert "batch: {'image': (16, " in out
    assert "filled: (13, 4, 48, 48)" in out
    assert "blocks == whole region: True" in out
    assert "workflow block r0000c0000 (13, 7, 48, 48) == read here: True" in out
    assert "session closed" in out
    # The scratch mapset is stfuse's, of the study, and records what the page wrote; the lock is gone.
    scratch = project / "results/demo/grassdata/demo/scratch"
    marker = json.loads((scratch / ".stfuse_mapset").read_text())
    assert marker["study"] == "demo" and marker["elements"]["cellhd"] == ["nir_minus_red"]
    assert not (scratch / ".gislock").exists()
    assert (project / "results/demo/api/model/model.pt").is_file()
    # Run again: the page replaces its own mapset and files instead of failing on them.
    again = run_doc(project, tmp_path)
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    assert "blocks == whole region: True" in again.stdout
