"""The whole workflow for real on a tiny synthetic scene: every stage, then reruns and a parameter change."""

import json
import re
import shutil
import subprocess

import pandas as pd
import pytest
import yaml

from _scene import ROOT, write_config
from test_workflow_ingest import SNAKEMAKE, run_snakemake

pytestmark = [pytest.mark.workflow, pytest.mark.grass, pytest.mark.slow]

TINY = {"synthetic": {"width": 32, "height": 32, "start": "2021-05-01", "end": "2021-06-30", "seed": 1}}
FAST = dict(
    tiles={"size": 16, "overlap": 0, "block_size": 16, "val_fraction": 0.25, "seed": 0, "min_valid_fraction": 0.0},
    train={"epochs": 2, "batch_size": 8, "model_params": {"base_channels": 8, "depth": 2}},
    benchmark={"min_clear": 0.8, "quicklook_dates": 2},
)


def planned_jobs(proc) -> dict:
    """job counts from a dry run's 'Job stats' table"""
    text = proc.stdout + proc.stderr
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", text, re.M) if m.group(1) != "total"}


def test_test_config_is_the_tiny_study(tmp_path):
    """.test/config/config.yaml (the catalogue's test study) is this module's TINY + FAST study."""
    want = yaml.safe_load(write_config(tmp_path / "tiny.yaml", "tiny", TINY, **FAST).read_text())
    assert yaml.safe_load((ROOT / ".test" / "config" / "config.yaml").read_text()) == want


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """`snakemake --cores 4 --directory <copy of .test>` with no --configfile: the catalogue's test run (the
    Snakefile's default config/config.yaml is read from the working directory)."""
    work = tmp_path_factory.mktemp("full")
    shutil.copytree(ROOT / ".test", work, dirs_exist_ok=True)
    cfg = work / "config" / "config.yaml"
    # More cores than the machine has: as many jobs side by side as the DAG allows (parallel safety).
    proc = subprocess.run([str(SNAKEMAKE), "-s", str(ROOT / "Snakefile"), "--directory", str(work), "--cores", "4"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "study: tiny" in cfg.read_text() and (work / "results" / "tiny").is_dir()
    logs = "".join(p.read_text(errors="replace") for p in (work / "logs").rglob("*.log"))
    assert "database is locked" not in logs and ".gislock" not in logs
    return work, cfg


def test_every_stage_produces_its_outputs(demo_run):
    work, _ = demo_run
    res = work / "results" / "tiny"
    filled = json.loads((res / "register/filled.json").read_text())
    assert filled["strds"] == "S2_filled@register" and len(filled["granules"]) > 5
    scores = pd.read_csv(res / "benchmark/scores.csv")
    assert set(scores.method) == {"nearest", "linear", "whittaker", "harmonic", "sar_regression", "stfuse_model"}
    assert set(scores.protocol) == {"transplanted clouds", "real clouds (synthetic truth)"}
    assert "| stfuse_model |" in (res / "benchmark/summary.md").read_text()
    for png in ("benchmark/by_gap.png", "benchmark/quicklook.png", "main/model/loss.png", "heldout/model/loss.png"):
        assert (res / png).stat().st_size > 5000
    assert "epoch 2/2" in (work / "logs/tiny/main/train.log").read_text()


def test_rerun_does_nothing_and_a_tile_change_reruns_only_what_depends_on_it(demo_run):
    work, cfg = demo_run
    again = run_snakemake(work, cfg, extra=["--dry-run"])
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr
    config = yaml.safe_load(cfg.read_text())
    config["tiles"]["val_fraction"] = 0.5   # not tiles.size: it is the blocks' halo too, so cubes would change
    changed = work / "changed.yaml"
    changed.write_text(yaml.safe_dump(config))
    plan = run_snakemake(work, changed, extra=["--dry-run"])
    assert plan.returncode == 0, plan.stderr[-2000:]
    jobs = planned_jobs(plan)
    assert jobs.get("tiles_block") == 2 and jobs.get("train_model") == 2
    for upstream in ("scene", "ingest_project", "ingest_sensor", "pairing", "groups", "cube_block", "holdout"):
        assert upstream not in jobs, f"{upstream} would rerun after a tile-split change"


def landing_page(report_html) -> str:
    """The HTML of the page a Snakemake report opens on (its global description, kept as a JSON string)."""
    match = re.search(r"^\s*var workflow_desc = (.*);\s*$", report_html.read_text(errors="replace"), re.M)
    assert match, f"{report_html}: no workflow_desc (Snakemake's report template changed?)"
    return json.loads(match.group(1))


def table_rows(html: str) -> list[list[str]]:
    """The body rows of every table in ``html``, as cell texts (tags stripped)."""
    body = "".join(re.findall(r"<tbody[^>]*>(.*?)</tbody>", html, re.S))
    return [[re.sub(r"<[^>]+>", "", c).strip() for c in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)]
            for row in re.findall(r"<tr[^>]*>(.*?)</tr>", body, re.S)]


def test_report_html(demo_run):
    work, cfg = demo_run
    proc = run_snakemake(work, cfg, extra=["--report", str(work / "report.html")])
    assert proc.returncode == 0, proc.stderr[-2000:]
    html = (work / "report.html").read_text(errors="replace")
    assert "quicklook" in html and "Benchmark" in html
    assert "summary.html" in html  # the benchmark table as HTML (the report does not render Markdown)
    # the landing page describes the run (workflow/report/workflow.rst, rendered with the study's config) and
    # shows the run's overall score tables: summary.md's rows, number for number, per protocol in order
    page = landing_page(work / "report.html")
    assert "filled the cloud gaps of the optical series of study" in page
    want, in_scores = [], False
    for line in (work / "results/tiny/benchmark/summary.md").read_text().splitlines():
        if line.startswith("| method |"):      # a score table's header (summary.md may hold other tables)
            in_scores = True
        elif not line.startswith("|"):
            in_scores = False
        elif in_scores and not line.startswith("| ---"):
            want.append([c.strip().strip("*") for c in line.strip("|").split("|")])
    assert len(want) == 12 and table_rows(page) == want    # 6 methods x 2 protocols (synthetic truth)
    for protocol in ("transplanted clouds", "real clouds (synthetic truth)"):
        assert f"{protocol} (best per column in bold)" in page
    assert "appears here after" not in page


def test_report_before_the_benchmark_says_where_the_table_comes_from(demo_run):
    """A report of a run up to `register` (no benchmark in its DAG): the landing page renders without the
    score table and says which target makes it."""
    work, cfg = demo_run
    proc = run_snakemake(work, cfg, "register", extra=["--report", str(work / "register.html")])
    assert proc.returncode == 0, proc.stderr[-2000:]
    page = landing_page(work / "register.html")
    assert "filled the cloud gaps of the optical series of study" in page
    assert "appears here after" in page and "snakemake benchmark" in page
    assert table_rows(page) == [] and "best per column in bold" not in page
