"""The `stfuse` console script: check, scores, run (a dry run of the real workflow)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stfuse import cli

ROOT = Path(__file__).resolve().parents[1]
STFUSE = Path(sys.executable).parent / "stfuse"


def stfuse(*args, cwd=None):
    return subprocess.run([str(STFUSE), *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_console_script_help():
    assert STFUSE.is_file(), "make setup installs the stfuse console script"
    proc = stfuse("--help")
    assert proc.returncode == 0, proc.stderr
    for command in ("run", "check", "scores"):
        assert command in proc.stdout
    assert stfuse("run", "--help").returncode == 0


def test_check_plans_s2tile_without_reading_pixels(tmp_path):
    proc = stfuse("check", str(ROOT / "config" / "studies" / "s2tile.yaml"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "s2tile.yaml: OK" in proc.stdout
    assert "10980 x 10980 cells" in proc.stdout and "484 blocks (22 x 22)" in proc.stdout
    assert not any(tmp_path.iterdir()), "check writes nothing"


def _config(tmp_path, **changes):
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    for dotted, value in changes.items():
        section, key = dotted.split(".")
        config.setdefault(section, {})[key] = value
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_check_names_the_key_at_fault(tmp_path):
    proc = stfuse("check", str(_config(tmp_path, **{"tiles.size": 30})))
    assert proc.returncode == 2
    assert "study.yaml" in proc.stderr and "tiles.size" in proc.stderr
    proc = stfuse("check", str(_config(tmp_path, **{"blocks.halo": 4})))
    assert proc.returncode == 2 and "blocks.halo" in proc.stderr


def test_check_names_an_unknown_key_and_a_missing_manifest(tmp_path):
    proc = stfuse("check", str(_config(tmp_path, **{"train.epochz": 3})))
    assert proc.returncode == 2 and "epochz" in proc.stderr
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    config["input"] = {"manifest": "no/such/manifest.csv"}
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = stfuse("check", str(path))
    assert proc.returncode == 2
    assert "input.manifest" in proc.stderr and "no/such/manifest.csv" in proc.stderr


def test_check_missing_config_file(tmp_path):
    proc = stfuse("check", str(tmp_path / "nope.yaml"))
    assert proc.returncode == 2 and "nope.yaml does not exist" in proc.stderr


def test_scores_of_a_study_without_benchmark(tmp_path):
    proc = stfuse("scores", "no_such_study")
    assert proc.returncode == 2
    assert "results/no_such_study/benchmark/summary.md" in proc.stderr


def test_scores_prints_the_summary(tmp_path):
    bench = tmp_path / "results" / "mine" / "benchmark"
    bench.mkdir(parents=True)
    (bench / "summary.md").write_text("| method | mae |\n| model | 0.01 |\n")
    for name in ("Snakefile", "workflow"):
        (tmp_path / name).symlink_to(ROOT / name)
    proc = stfuse("--workflow", str(tmp_path), "scores", "mine")
    assert proc.returncode == 0, proc.stderr
    assert "| model | 0.01 |" in proc.stdout and "scores.csv" in proc.stdout


def test_workflow_elsewhere_is_refused(tmp_path):
    proc = stfuse("--workflow", str(tmp_path), "check", "x.yaml")
    assert proc.returncode == 2 and "no stfuse workflow" in proc.stderr


@pytest.mark.workflow
def test_run_dry_run_plans_the_demo(tmp_path):
    """`stfuse run CONFIG -n` checks the config, then asks Snakemake for the jobs (targets before
    --configfile), in the workflow directory; -- passes arguments to Snakemake."""
    proc = stfuse("run", str(ROOT / "config" / "config.yaml"), "register", "-n", "--cores", "1",
                  "--", "--directory", str(tmp_path), "--quiet", "rules")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "ingest_project" in out and "register_filled" in out
    assert "train_model" in out and "score_block" not in out
    assert not (tmp_path / "results").exists(), "a dry run writes no result"


def test_run_refuses_a_bad_config_before_snakemake(tmp_path):
    proc = stfuse("run", str(_config(tmp_path, **{"tiles.size": 30})), "-n")
    assert proc.returncode == 2 and "tiles.size" in proc.stderr
    assert "+ " not in proc.stderr, "Snakemake was not started"


def test_snakemake_command_puts_targets_before_configfile():
    cmd = cli.snakemake_command(ROOT, Path("/x/c.yaml"), 2, ["register"], True, ["--quiet"])
    assert cmd.index("register") < cmd.index("--configfile")
    assert cmd[-2:] == ["--configfile", "/x/c.yaml"]


def test_progress_lines_are_rate_limited(caplog):
    import logging

    from stfuse.logs import Progress

    log = logging.getLogger("stfuse.test_progress")
    ticks = iter([1.0, 2.0, 50.0, 51.0, 52.0])
    with caplog.at_level(logging.INFO, logger="stfuse.test_progress"):
        p = Progress(log, "inference", 5, "windows", every_s=10.0)
        p._clock = lambda: next(ticks)
        p.start = 0.0
        for _ in range(5):
            p.step()
    lines = [r.getMessage() for r in caplog.records]
    # the first item, the first after 10 s, and the last: not one line per item
    assert lines == ["inference: 1/5 windows (20%), 1 s, ~4 s left",
                     "inference: 3/5 windows (60%), 50 s, ~33 s left",
                     "inference: 5/5 windows (100%), 52 s, ~0 s left"]
