"""GRASS safety (issue 9): live locks, a user's mapsets and maps, two studies in one project, config
keys that input.grass_project cannot honour. Real GRASS on throwaway projects, real Snakemake on the
tiny scene."""

import contextlib
import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from stfuse import existing, grass, ingest

from _scene import ingest_tiny, sensors, tiny_scene, write_config
from test_workflow_ingest import run_snakemake

GRASS = os.environ.get("STFUSE_GRASS", "grass")
needs_grass = pytest.mark.skipif(shutil.which(GRASS) is None, reason="GRASS GIS is not installed")


def tree_hash(path: Path) -> str:
    """Names and contents of every file under path (a live session's .tmp folder left out)."""
    h = hashlib.sha256()
    for f in sorted(p for p in Path(path).rglob("*") if p.is_file() and ".tmp" not in p.relative_to(path).parts):
        h.update(str(f.relative_to(path)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def _clean_env():
    return {k: v for k, v in os.environ.items() if k not in ("GISRC", "GISBASE", "GIS_LOCK")}


@contextlib.contextmanager
def live_grass(mapset_path: Path, seconds: int = 120):
    """`grass <mapset> --exec sleep N` running (its .gislock written); killed on exit."""
    proc = subprocess.Popen([GRASS, str(mapset_path), "--exec", "sleep", str(seconds)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True, env=_clean_env())
    lock = Path(mapset_path) / ".gislock"
    try:
        deadline = time.monotonic() + 60
        while not (lock.exists() and lock.stat().st_size and grass.lock_pid(lock.read_bytes()) == proc.pid):
            assert proc.poll() is None and time.monotonic() < deadline, "the GRASS session did not start"
            time.sleep(0.05)
        time.sleep(0.5)  # let the launcher finish writing its session files
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        # What a session that ended normally leaves: no lock (a killed one's is stale; tested elsewhere).
        with contextlib.suppress(FileNotFoundError):
            if grass.lock_pid(lock.read_bytes()) == proc.pid:
                lock.unlink()


def grass_exec(mapset_path: Path, *args, create=False):
    cmd = [GRASS, *(["-c"] if create else []), str(mapset_path), "--exec", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_clean_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


# --- the lock --------------------------------------------------------------------------------------------


def test_lock_is_read_in_binary_and_text_form():
    assert grass.lock_pid(struct.pack("=i", 11945)) == 11945
    if sys.byteorder == "little":
        assert grass.lock_pid(bytes.fromhex("a92e0000")) == 11945  # as GRASS 8.2 leaves it
    assert grass.lock_pid(struct.pack("=q", 4194303)) == 4194303
    assert grass.lock_pid(b"11945\n") == 11945 and grass.lock_pid(b"1234") == 1234
    assert grass.lock_pid(b"") == 0 and grass.lock_pid(b"\x01\x02") == 0


@needs_grass
@pytest.mark.grass
def test_live_grass_session_is_in_use_and_nothing_is_deleted(grass_project):
    mapset = grass.own_mapset(grass_project, "safety_lock", study="s", stage="register")
    with grass.session(grass_project, "safety_lock") as gs:
        gs.run_command("r.mapcalc", expression="kept = 1", quiet=True)
    with live_grass(mapset) as proc:
        before = tree_hash(mapset)
        with pytest.raises(grass.MapsetInUse, match=rf"safety_lock is in use by process {proc.pid}"):
            grass.own_mapset(grass_project, "safety_lock", study="s", stage="register")
        with pytest.raises(grass.MapsetInUse, match="in use"):
            with grass.session(grass_project, "safety_lock"):
                pass
        assert tree_hash(mapset) == before and (mapset / "cellhd" / "kept").is_file()
        lock = (mapset / ".gislock").read_bytes()
    (mapset / ".gislock").write_bytes(lock)  # as the killed launcher left it: a stale lock
    grass.own_mapset(grass_project, "safety_lock", study="s", stage="register")


@needs_grass
@pytest.mark.grass
def test_stfuse_lock_is_written_as_grass_writes_it_and_grass_refuses(grass_project):
    grass.own_mapset(grass_project, "safety_held")
    with grass.session(grass_project, "safety_held"):
        data = (grass_project / "safety_held" / ".gislock").read_bytes()
        assert data == struct.pack("=i", os.getpid())
        proc = subprocess.run([GRASS, str(grass_project / "safety_held"), "--exec", "true"], capture_output=True,
                              text=True, env=_clean_env(), timeout=120)
        assert proc.returncode != 0, "GRASS's launcher did not see stfuse's lock"
        assert "currently running GRASS" in proc.stdout + proc.stderr
    assert not (grass_project / "safety_held" / ".gislock").exists()


# --- what stfuse wrote, and what it did not --------------------------------------------------------------


@needs_grass
@pytest.mark.grass
def test_a_users_map_in_an_stfuse_mapset_is_refused_unless_allowed(grass_project):
    with grass.own_session(grass_project, "safety_own", study="s", stage="register") as gs:
        gs.run_command("r.mapcalc", expression="S2_filled_x = 1", quiet=True)
    marker = json.loads((grass_project / "safety_own" / grass.OWN_MAPSET_MARKER).read_text())
    assert marker["study"] == "s" and marker["stage"] == "register"
    assert marker["elements"]["cellhd"] == ["S2_filled_x"]
    # Rerun with nothing added: replaced.
    with grass.own_session(grass_project, "safety_own", study="s", stage="register") as gs:
        gs.run_command("r.mapcalc", expression="S2_filled_x = 1", quiet=True)
    grass_exec(grass_project / "safety_own", "r.mapcalc", "expression=max_nir = 2")
    before = tree_hash(grass_project / "safety_own")
    with pytest.raises(grass.ForeignMaps, match=r"raster max_nir\b.*g\.copy.*replace_foreign_maps"):
        grass.own_mapset(grass_project, "safety_own", study="s", stage="register")
    assert tree_hash(grass_project / "safety_own") == before
    assert not (grass_project / "safety_own" / ".gislock").exists()
    grass.own_mapset(grass_project, "safety_own", study="s", stage="register", replace_foreign=True)
    assert not (grass_project / "safety_own" / "cellhd").exists()


@needs_grass
@pytest.mark.grass
def test_a_users_strds_in_an_stfuse_mapset_is_refused(grass_project):
    """Space-time datasets count as a user's elements too (GRASS keeps them in TGIS's strds_base table)."""
    with grass.own_session(grass_project, "safety_tgis", study="s", stage="register") as gs:
        gs.run_command("r.mapcalc", expression="S2_filled_y = 1", quiet=True)
        gs.run_command("t.create", output="S2_filled", title="t", description="d", quiet=True)
    marker = json.loads((grass_project / "safety_tgis" / grass.OWN_MAPSET_MARKER).read_text())
    assert marker["elements"]["strds"] == ["S2_filled@safety_tgis"] and marker[grass.TGIS_RECORDED]
    grass_exec(grass_project / "safety_tgis", "t.create", "output=my_series", "title=mine", "description=mine")
    before = tree_hash(grass_project / "safety_tgis")
    with pytest.raises(grass.ForeignMaps, match=r"STRDS my_series@safety_tgis"):
        grass.own_mapset(grass_project, "safety_tgis", study="s", stage="register")
    assert tree_hash(grass_project / "safety_tgis") == before
    # a marker from before TGIS was read right (no flag): its datasets are unknown, not foreign
    del marker[grass.TGIS_RECORDED]
    (grass_project / "safety_tgis" / grass.OWN_MAPSET_MARKER).write_text(json.dumps(marker))
    assert grass.foreign_elements(grass_project / "safety_tgis") == {}


@needs_grass
@pytest.mark.grass
def test_an_unfinished_stage_is_replaced_and_another_studys_mapset_is_refused(grass_project):
    grass.own_mapset(grass_project, "safety_partial", study="gp", stage="register")
    with grass.session(grass_project, "safety_partial") as gs:  # a killed job: no record
        gs.run_command("r.mapcalc", expression="half = 1", quiet=True)
    assert json.loads((grass_project / "safety_partial" / grass.OWN_MAPSET_MARKER).read_text())["elements"] is None
    grass.own_mapset(grass_project, "safety_partial", study="gp", stage="register")
    with pytest.raises(grass.GrassError, match=r"made by study 'gp', not by study 'gp2'"):
        grass.own_mapset(grass_project, "safety_partial", study="gp2", stage="register")


# --- a rerun of ingest on stfuse's own project ----------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety_ingest")
    scene, project, states = ingest_tiny(root)
    return root, scene, Path(project["project"])


@needs_grass
@pytest.mark.grass
def test_ingest_rerun_refuses_while_any_mapset_is_in_use(tiny):
    root, scene, project = tiny
    with live_grass(project / "ingest_S1"):
        before = tree_hash(project)
        with pytest.raises(grass.MapsetInUse, match="ingest_S1 is in use"):
            ingest.prepare_project(scene, sensors(), {}, project, root / "checked.csv")
        assert tree_hash(project) == before


@needs_grass
@pytest.mark.grass
def test_ingest_rerun_keeps_a_users_mapset_and_refuses_a_crs_change(tiny):
    root, scene, project = tiny
    grass_exec(project / "mine", "r.mapcalc", "expression=mine = 7", create=True)
    mine = tree_hash(project / "mine")
    other = tiny_scene(root / "scene32632", epsg=32632)
    before = tree_hash(project)
    with pytest.raises(grass.GrassError, match=r"holds what stfuse did not make \(mine\).*CRS changed"):
        ingest.prepare_project(other, sensors(), {}, project, root / "checked_other.csv")
    assert tree_hash(project) == before
    state = ingest.prepare_project(scene, sensors(), {}, project, root / "checked.csv")
    assert tree_hash(project / "mine") == mine
    assert sorted(p.name for p in project.iterdir() if p.is_dir()) == ["PERMANENT", "mine"]
    s1 = ingest.ingest_sensor(state, root / "checked.csv", "S1", sensors()["S1"])
    assert s1["strds"] == "S1@ingest_S1"


# --- config keys that input.grass_project cannot honour -------------------------------------------------


def test_grass_project_input_refuses_scale_offset_nodata():
    cfg = {"study": "g", "input": {"grass_project": {"path": "x", "strds": {}}}, "sensors": sensors()}
    with pytest.raises(ValueError, match=r"config key sensors\.S2\.scale: 0\.0001 .*input\.grass_project reads"):
        existing.check_config(cfg)
    for key, bad in (("offset", 0.5), ("nodata", 0)):
        cfg["sensors"] = {s: dict(spec, scale=1.0, offset=0.0, nodata=None) for s, spec in sensors().items()}
        cfg["sensors"]["S1"][key] = bad
        with pytest.raises(ValueError, match=rf"config key sensors\.S1\.{key}:"):
            existing.check_config(cfg)
    cfg["sensors"]["S1"][key] = None
    existing.check_config(cfg)
    existing.check_config({"input": {"synthetic": {}}, "sensors": sensors()})


# --- the workflow: live sessions, a user's map, two studies ---------------------------------------------

TINY = {"synthetic": {"width": 32, "height": 32, "start": "2021-05-01", "end": "2021-05-31", "seed": 1}}
FAST = dict(
    tiles={"size": 16, "overlap": 0, "block_size": 16, "val_fraction": 0.25, "seed": 0, "min_valid_fraction": 0.0},
    train={"epochs": 1, "batch_size": 8, "model_params": {"base_channels": 8, "depth": 2}},
)


def _out(work: Path, proc) -> str:
    logs = "".join(p.read_text(errors="replace") for p in (work / "logs").rglob("*.log"))
    return proc.stdout + proc.stderr + logs


@pytest.fixture(scope="module")
def registered_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("safety_wf")
    cfg = write_config(work / "tiny.yaml", "tiny", TINY, **FAST)
    proc = run_snakemake(work, cfg, "register")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return work, cfg, work / "results/tiny/grassdata/tiny"


@needs_grass
@pytest.mark.workflow
@pytest.mark.grass
def test_workflow_refuses_to_replace_mapsets_in_use_or_holding_a_users_map(registered_run):
    work, cfg, project = registered_run
    register = project / "register"
    marker = json.loads((register / grass.OWN_MAPSET_MARKER).read_text())
    assert marker["study"] == "tiny" and marker["stage"] == "register" and "S2_filled" in str(marker["elements"])

    # 1. A live GRASS session in register: -R register_filled fails, the mapset is untouched.
    with live_grass(register):
        before = tree_hash(register)
        proc = run_snakemake(work, cfg, "register", extra=["-R", "register_filled"])
        assert proc.returncode != 0
        assert "register is in use" in _out(work, proc)
        assert tree_hash(register) == before

    # 2. The README's old example wrote into register: a rerun names the map and deletes nothing.
    grass_exec(register, "t.rast.series", "input=S2_filled", "where=semantic_label = 'B08'", "method=maximum",
               "output=max_nir")
    before = tree_hash(register)
    proc = run_snakemake(work, cfg, "register", extra=["-R", "register_filled"])
    assert proc.returncode != 0
    assert "raster max_nir" in _out(work, proc) and "replace_foreign_maps" in _out(work, proc)
    assert tree_hash(register) == before

    # 3. A rerun of ingest with a live session in register: nothing in the project is deleted.
    with live_grass(register):
        before = tree_hash(project)
        proc = run_snakemake(work, cfg, "register", extra=["-R", "ingest_project"])
        assert proc.returncode != 0
        assert "register is in use" in _out(work, proc)
        assert tree_hash(project) == before

    # 4. The switch lets stfuse replace the user's map (a parameter of ingest: the workflow reruns).
    allow = write_config(work / "allow.yaml", "tiny", TINY, **FAST, grass={"replace_foreign_maps": True})
    proc = run_snakemake(work, allow, "register")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert not (register / "cellhd" / "max_nir").exists() and (work / "results/tiny/register/filled.json").is_file()


@pytest.fixture(scope="module")
def user_project(tmp_path_factory):
    """A user's project: a mapset 'field' with both STRDS, no stfuse markers."""
    root = tmp_path_factory.mktemp("safety_user")
    _, project, _ = ingest_tiny(root, seed=5)
    path = Path(project["project"])
    (path / ingest.PROJECT_MARKER).unlink()
    for s in sensors():
        (path / f"ingest_{s}" / grass.OWN_MAPSET_MARKER).unlink()
    return root, path


def _gp_config(work: Path, study: str, project: Path, **grass_project):
    cfg = write_config(work / f"{study}.yaml", study, {"grass_project": {
        "path": str(project), "strds": {"S2": "S2@ingest_S2", "S1": "S1@ingest_S1"}, **grass_project}})
    data = yaml.safe_load(cfg.read_text())
    for spec in data["sensors"].values():
        spec.update(scale=1.0, offset=0.0, nodata=None)
    cfg.write_text(yaml.safe_dump(data, sort_keys=False))
    return cfg


@needs_grass
@pytest.mark.workflow
@pytest.mark.grass
def test_two_studies_in_one_grass_project_get_mapsets_of_their_own(user_project, tmp_path):
    root, project = user_project
    # Study gp in a mapset it names; gp2 in its default mapsets: stfuse_gp2, stfuse_gp2_<sensor>.
    proc = run_snakemake(tmp_path, _gp_config(tmp_path, "gp", project, mapset="shared"), "ingest")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_snakemake(tmp_path, _gp_config(tmp_path, "gp2", project), "ingest")
    assert proc.returncode == 0, proc.stderr[-3000:]
    s2 = json.loads((tmp_path / "results/gp2/ingest/S2.json").read_text())
    assert s2["valid_strds"] == "S2_valid@stfuse_gp2_S2"
    assert json.loads((project / "stfuse_gp2_S2" / grass.OWN_MAPSET_MARKER).read_text())["study"] == "gp2"
    # gp2 naming gp's mapset: refused, naming both studies, nothing of gp's touched.
    before = tree_hash(project / "shared")
    proc = run_snakemake(tmp_path, _gp_config(tmp_path, "gp2", project, mapset="shared"), "ingest")
    assert proc.returncode != 0
    assert "made by study 'gp', not by study 'gp2'" in _out(tmp_path, proc)
    assert tree_hash(project / "shared") == before


@pytest.mark.workflow
def test_grass_project_scale_is_refused_when_the_dag_is_built(tmp_path):
    cfg = write_config(tmp_path / "s.yaml", "gs", {"grass_project": {"path": str(tmp_path), "strds": {}}})
    proc = run_snakemake(tmp_path, cfg, "ingest", extra=["--dry-run"])
    assert proc.returncode != 0
    assert "config key sensors.S2.scale" in proc.stdout + proc.stderr
