"""Real Snakemake runs of the ingest stage: a tiny synthetic scene, ../shared/data/mol_2023, config errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from _scene import ROOT, SHARED_DATA, write_config

pytestmark = [pytest.mark.workflow, pytest.mark.grass]
SNAKEMAKE = Path(sys.executable).with_name("snakemake")


def run_snakemake(workdir: Path, configfile: Path, *targets: str, extra=(), cores: int = 2):
    cmd = [str(SNAKEMAKE), "-s", str(ROOT / "Snakefile"), "--directory", str(workdir), "--cores", str(cores),
           *targets, *extra, "--configfile", str(configfile)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900)


def test_ingest_stage_on_tiny_synthetic_scene(tmp_path):
    cfg = write_config(tmp_path / "tiny.yaml", "tiny",
                       {"synthetic": {"width": 32, "height": 32, "start": "2021-05-01", "end": "2021-05-31"}})
    proc = run_snakemake(tmp_path, cfg, "ingest")
    assert proc.returncode == 0, proc.stderr[-3000:]
    s2 = json.loads((tmp_path / "results/tiny/ingest/S2.json").read_text())
    s1 = json.loads((tmp_path / "results/tiny/ingest/S1.json").read_text())
    scene = json.loads((tmp_path / "results/tiny/scene/scene.json").read_text())
    assert len(s2["granules"]) == len(scene["optical_dates"])
    assert len(s1["granules"]) == len(scene["sar_dates"])
    assert s2["region"]["cols"] == 32 and s2["region"]["res_x"] == 10.0
    assert (tmp_path / "logs/tiny/ingest/S2.log").read_text().count("registered") == 1
    # A second run with nothing changed has nothing to do.
    again = run_snakemake(tmp_path, cfg, "ingest", extra=["--dry-run"])
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr


@pytest.mark.skipif(not (SHARED_DATA / "mol_2023").is_dir(), reason="../shared/data/mol_2023 is absent")
def test_ingest_stage_on_mol_2023(tmp_path):
    study = yaml.safe_load((ROOT / "config/studies/mol_2023.yaml").read_text())
    study["input"]["manifest"] = str(SHARED_DATA / "mol_2023" / "manifest.csv")
    cfg = tmp_path / "mol.yaml"
    cfg.write_text(yaml.safe_dump(study))
    proc = run_snakemake(tmp_path, cfg, "ingest")
    assert proc.returncode == 0, proc.stderr[-3000:]
    s2 = json.loads((tmp_path / "results/mol_2023/ingest/S2.json").read_text())
    s1 = json.loads((tmp_path / "results/mol_2023/ingest/S1.json").read_text())
    assert (len(s2["granules"]), len(s1["granules"])) == (12, 10)  # per the data README
    assert s2["region"]["cols"] == 64 and s2["region"]["rows"] == 66


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c.update(regoin={"from": "data"}), "'regoin' was unexpected"),
        (lambda c: c["sensors"]["S2"].update(scael=0.1), "'scael' was unexpected"),
        (lambda c: c["sensors"]["S1"].update(role="radar"), "'radar' is not one of"),
        (lambda c: c["input"]["synthetic"].update(width="wide"), "'wide' is not of type 'integer'"),
        (lambda c: c["sensors"]["S2"]["mask"].update(band="B02"), "sensors.S2.mask.band"),
    ],
)
def test_config_typos_fail_at_once_naming_the_key(tmp_path, edit, message):
    cfg = {"study": "bad", "input": {"synthetic": {}}, "sensors": yaml.safe_load(
        (ROOT / "config/config.yaml").read_text())["sensors"]}
    edit(cfg)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = run_snakemake(tmp_path, path, "ingest", extra=["--dry-run"])
    assert proc.returncode != 0
    assert message in proc.stderr + proc.stdout
    assert not (tmp_path / "results").exists()


def test_bad_manifest_fails_before_grass_is_touched(tmp_path):
    rows = [f"{b}.tif,S2,{b},2021-05-0{d}T10:00:00Z" for d in (1, 4, 7) for b in ("B02", "B03", "B04", "B08", "SCL")]
    rows += [f"{b}.tif,S1,{b},2021-05-02T17:00:00Z" for b in ("VV", "VH")]
    (tmp_path / "m.csv").write_text("path,sensor,semantic_label,start_time\n" + "\n".join(rows) + "\n")
    cfg = write_config(tmp_path / "c.yaml", "broken", {"manifest": str(tmp_path / "m.csv")})
    proc = run_snakemake(tmp_path, cfg, "ingest")
    assert proc.returncode != 0
    log = (tmp_path / "logs/broken/ingest/project.log").read_text()
    assert "m.csv:18: file" in log and "VH.tif does not exist" in log
    assert not (tmp_path / "results/broken/grassdata").exists()


def test_study_config_replaces_the_demo_config():
    """--configfile gives a study; the demo config must not be merged into it (inputs would clash)."""
    study = ROOT / "config" / "studies" / "mol_2023.yaml"
    proc = subprocess.run([str(SNAKEMAKE), "--dry-run", "--cores", "1", "--configfile", str(study)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "results/mol_2023/" in out and "results/demo/" not in out
    assert "rule scene:" not in out
