"""Slurm: the profiles (static checks, a dry run) and, for real, a one-node Slurm cluster running the demo.

The cluster test starts the test cluster (scripts/slurm/start.sh: apt-get, munge, MariaDB, slurmdbd,
slurmctld, slurmd), runs the demo through profiles/slurm and locally (scripts/slurm/run_demo.sh,
which compares the outputs) and stops the cluster (scripts/slurm/stop.sh). It needs root and takes
a few minutes; STFUSE_SKIP_SLURM=1 skips it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SLURM_SCRIPTS = ROOT / "scripts" / "slurm"
SNAKEMAKE = Path(sys.executable).with_name("snakemake")
STATE = Path(os.environ.get("STFUSE_SLURM_DIR", "/tmp/stfuse-slurm"))
GPU_RULES = {"train_model", "predict_block"}
RESOURCES = {"mem_mb", "runtime", "cpus_per_task"}


def workflow_rules() -> dict[str, int]:
    """Rules that run something (script/shell/run), with their `threads:`, from workflow/rules/*.smk."""
    rules = {}
    for smk in sorted((ROOT / "workflow" / "rules").glob("*.smk")):
        blocks = re.split(r"^(?:rule|checkpoint) (\w+):\s*$", smk.read_text(), flags=re.M)
        for name, body in zip(blocks[1::2], blocks[2::2]):
            if re.search(r"^\s+(script|shell|run|wrapper|notebook):", body, flags=re.M):
                threads = re.search(r"^\s+threads:\s*(\d+)", body, flags=re.M)
                rules[name] = int(threads.group(1)) if threads else 1
    return rules


@pytest.fixture(scope="module")
def slurm_plugin(tmp_path_factory) -> dict:
    """Environment for a Snakemake that loads the Slurm executor plugin, without installing it in the venv.

    The plugin is kept out of the default venv (requirements-slurm.txt, `make setup-slurm`): loaded, it
    makes every Snakemake start wait on `scontrol`. Where the venv lacks it, it is installed into a
    throwaway folder put on PYTHONPATH, so the tests leave no plugin (and no start-up delay) behind.
    """
    env = dict(os.environ)
    probe = subprocess.run([sys.executable, "-c", "import snakemake_executor_plugin_slurm"], capture_output=True)
    if probe.returncode == 0:
        return env
    target = tmp_path_factory.mktemp("slurm-plugin")
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
                          "--target", str(target), "-r", str(ROOT / "requirements-slurm.txt")],
                         capture_output=True, text=True, timeout=600)
    if pip.returncode != 0:
        pytest.skip(f"could not install the Slurm plugin from requirements-slurm.txt: {pip.stderr.strip()[-300:]}")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(target), env.get("PYTHONPATH", "")]))
    return env


def test_slurm_plugin_is_not_in_the_default_lock():
    """Local runs never load the Slurm plugin: it is pinned apart, and its pins agree with the lock's."""
    lock = (ROOT / "requirements.txt").read_text()
    assert "snakemake-executor-plugin-slurm" not in lock
    assert "snakemake-executor-plugin-slurm" not in (ROOT / "requirements.in").read_text()
    extra = [ln for ln in (ROOT / "requirements-slurm.txt").read_text().splitlines() if ln and ln[0] != "#"]
    assert extra == ["snakemake-executor-plugin-slurm==2.8.0", "snakemake-executor-plugin-slurm-jobstep==0.6.1"]
    assert "setup-slurm:" in (ROOT / "Makefile").read_text()


def profile(name: str) -> dict:
    return yaml.safe_load((ROOT / "profiles" / name / "config.yaml").read_text())


def test_slurm_profile_sets_resources_for_every_rule():
    rules = workflow_rules()
    assert {"scene", "ingest_project", "ingest_sensor", "pairing", "groups", "cube_block", "tiles_block",
            "tile_store", "train_model", "predict_block", "register_filled", "holdout", "score_stats_block",
            "score_block", "score"} <= set(rules)
    prof = profile("slurm")
    assert prof["executor"] == "slurm"
    assert RESOURCES <= set(prof["default-resources"])
    set_resources = prof["set-resources"]
    assert set(set_resources) == set(rules), "set-resources must name exactly the workflow's rules"
    for rule, threads in rules.items():
        res = set_resources[rule]
        assert RESOURCES <= set(res), f"{rule}: missing {RESOURCES - set(res)}"
        assert res["cpus_per_task"] == threads, f"{rule}: cpus_per_task must equal threads: {threads}"
        assert isinstance(res["runtime"], int) and res["runtime"] > 0
        assert isinstance(res["mem_mb"], int) and res["mem_mb"] > 0
        assert not {"gpu", "gres", "gpus"} & set(res), f"{rule}: GPUs are off in profiles/slurm"
    for key in ("jobs", "restart-times", "latency-wait", "rerun-incomplete"):
        assert key in prof
    # every per-block rule belongs to a group that the profile packs (a Slurm job lasts minutes, not seconds)
    packed = dict(item.split("=") for item in prof["group-components"])
    for smk in sorted((ROOT / "workflow" / "rules").glob("*.smk")):
        for name, body in re.findall(r"^(?:rule|checkpoint) (\w+):\s*$(.*?)(?=^\S|\Z)", smk.read_text(), re.M | re.S):
            group = re.search(r"^\s+group:\s*\n\s+\"(\w+)\"", body, re.M)
            output = re.search(r"^\s+output:(.*?)^\s+log:", body, re.M | re.S)
            if output and "{{block}}" in output.group(1):
                assert group and group.group(1) in packed, f"{name}: a block rule without a packed group"


def test_gpu_profile_is_the_slurm_profile_plus_one_gpu():
    cpu, gpu = profile("slurm"), profile("slurm-gpu")
    for rule in GPU_RULES:
        assert gpu["set-resources"][rule].pop("gpu") == 1
    assert gpu == cpu, "profiles/slurm-gpu must equal profiles/slurm except for the gpu requests"


@pytest.mark.workflow
def test_slurm_profile_dry_run_resolves_resources(tmp_path, slurm_plugin):
    """The profile parses with the pinned plugin and Snakemake applies its resources (no cluster needed)."""
    proc = subprocess.run(
        [str(SNAKEMAKE), "-s", str(ROOT / "Snakefile"), "--directory", str(tmp_path),
         "--configfile", str(ROOT / "config/config.yaml"), "--profile", str(ROOT / "profiles/slurm"),
         "--workflow-profile", "none", "--dry-run"],
        capture_output=True, text=True, timeout=300, env=slurm_plugin)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    block = out[out.index("rule train_model:"):].split("\n\n")[0]
    line = next(ln for ln in block.splitlines() if ln.strip().startswith("resources:"))
    for item in ("mem_mb=8000", "runtime=120", "cpus_per_task=2"):
        assert item in line.split(", ") or f" {item}" in line, line
    assert "gpu" not in line


def _cluster_skip_reason() -> str | None:
    if os.environ.get("STFUSE_SKIP_SLURM") == "1":
        return "STFUSE_SKIP_SLURM=1"
    if os.geteuid() != 0:
        return "needs root: scripts/slurm/start.sh installs Slurm with apt-get and starts system daemons"
    have_slurm = all(shutil.which(c) for c in ("slurmctld", "slurmd", "sbatch", "munged"))
    if not have_slurm and shutil.which("apt-get") is None:
        return "Slurm is not installed and there is no apt-get to install it"
    if shutil.which(os.environ.get("STFUSE_GRASS", "grass")) is None:
        return "GRASS GIS is not installed (the demo workflow needs it)"
    return None


def _cluster_running() -> bool:
    started = STATE / "started"
    if not started.is_file() or not started.read_text().strip() or shutil.which("scontrol") is None:
        return False
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=30)
    return "is UP" in ping.stdout


def _run(script: str, *args: str, timeout: int, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SLURM_SCRIPTS / script), *args], capture_output=True, text=True,
                          timeout=timeout, env={**(env or os.environ), "SNAKEMAKE": str(SNAKEMAKE)})


@pytest.mark.workflow
@pytest.mark.grass
@pytest.mark.slow
def test_demo_on_a_one_node_slurm_cluster_matches_the_local_run(tmp_path, slurm_plugin):
    reason = _cluster_skip_reason()
    if reason:
        pytest.skip(reason)
    was_running = _cluster_running()
    start = _run("start.sh", timeout=900)
    out = start.stdout + start.stderr
    if start.returncode == 3:
        pytest.skip(f"Slurm could not be installed: {out.strip().splitlines()[-1]}")
    if start.returncode == 4:
        pytest.skip(f"a Slurm configuration not written by start.sh is present: {out.strip().splitlines()[-1]}")
    try:
        assert start.returncode == 0, out[-3000:]
        assert "ready: srun hostname" in out
        again = _run("start.sh", timeout=300)  # idempotent: finds the running daemons
        assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
        assert "slurmctld already running" in again.stdout and "starting slurmctld" not in again.stdout

        demo = _run("run_demo.sh", "--parallel", str(tmp_path / "demo"), timeout=1800, env=slurm_plugin)
        summary_file = tmp_path / "demo" / "summary.json"
        summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
        assert demo.returncode == 0, (demo.stdout + demo.stderr)[-4000:]
        assert summary["ok"], summary["problems"]
        assert summary["ingest_jsons"] == ["S1.json", "S2.json", "project.json"]
        jobs = summary["slurm_jobs"]
        # the demo in 2 x 2 blocks: 7 block jobs per block (cube, tiles x 2, predict x 2, score_stats, score),
        # one Slurm job each on the 2-CPU node, and 13 single jobs
        assert summary["blocks"] == ["r0000c0000", "r0000c0001", "r0001c0000", "r0001c0001"]
        assert summary["block_jobs"] == 28 and len(jobs) == 41, jobs
        assert all(j["state"] == "COMPLETED" for j in jobs), jobs
        assert summary["most_block_jobs_at_once"] >= 2, "block jobs did not run side by side"
        # a grouped job's comment is rule_<group>_<rule>
        ran = {j["comment"].split("_wildcards")[0] for j in jobs}
        assert all(any(c == f"rule_{r}" or c.endswith(f"_{r}") for c in ran) for r in workflow_rules()), ran
        if not summary["scores_bitwise_equal"]:  # allowed, but only within the tolerance (run_demo.sh)
            print("scores.csv within tolerance, not bitwise:", summary["notes"])
    finally:
        if not was_running:  # left running when it was found running (someone else's cluster)
            # stop.sh waits (up to STFUSE_SLURM_STOP_WAIT, 1800 s) for another session's run_demo.sh
            stop = _run("stop.sh", timeout=2000)
            assert stop.returncode == 0, stop.stdout + stop.stderr
    if not was_running:
        assert not _cluster_running()
        for daemon in ("slurmctld", "slurmd", "slurmdbd", "mariadbd"):
            pidfile = STATE / "run" / f"{daemon}.pid"
            pid = pidfile.read_text().strip() if pidfile.is_file() else ""
            comm = Path(f"/proc/{pid}/comm")
            assert not (pid and comm.is_file() and comm.read_text().strip() == daemon), f"{daemon} still runs"
    # Left behind: the Slurm client, no controller. A local Snakemake start must not wait on it.
    probe = subprocess.run([sys.executable, "-c", "import snakemake_executor_plugin_slurm"], capture_output=True)
    if probe.returncode != 0:
        t0 = time.perf_counter()
        subprocess.run([str(SNAKEMAKE), "--version"], capture_output=True, check=True, timeout=120)
        assert time.perf_counter() - t0 < 5, "snakemake --version waits on Slurm after the cluster test"
