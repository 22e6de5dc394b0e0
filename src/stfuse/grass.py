"""GRASS GIS sessions for library code and rule scripts.

One GRASS session per process (TGIS caches its database connection in module globals), one mapset per
parallel job. `gs.setup.init` does not lock a mapset, so `session` takes GRASS's own `.gislock` itself,
written the way GRASS 8.2 writes it (the holder's pid as a binary native int32), so that the `grass`
launcher sees stfuse's lock and stfuse sees the launcher's: a live lock held by another process is an
error ("in use"), a stale one left by a killed job is removed.

Mapsets stfuse makes carry a marker `.stfuse_mapset` (JSON): the study and stage that made the mapset
and, once the stage's session has finished, the list of elements it wrote (rasters, vectors, groups,
3D rasters, saved regions, space-time datasets). A mapset is only ever replaced when it is stfuse's,
of the same study, not in use, and holds nothing stfuse did not write (unless the config allows it).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import shutil
import sqlite3
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

log = logging.getLogger("stfuse.grass")


class GrassError(RuntimeError):
    """A GRASS project, mapset, map or dataset is missing or unusable."""


class MapsetInUse(GrassError):
    """A live process (a GRASS session) holds the mapset's .gislock."""


class ForeignMaps(GrassError):
    """A mapset stfuse would replace holds maps stfuse did not write."""


def grass_executable() -> str:
    exe = os.environ.get("STFUSE_GRASS", "grass")
    if shutil.which(exe) is None:
        raise GrassError(
            f"GRASS GIS executable '{exe}' not found on PATH; install GRASS >= 8.2 "
            "(Debian/Ubuntu: apt-get install grass-core) or run scripts/setup.sh"
        )
    return exe


def grass_config(key: str) -> str:
    """`grass --config KEY` (path, python_path, version)."""
    out = subprocess.run(
        [grass_executable(), "--config", key], capture_output=True, text=True, check=True
    )
    return out.stdout.strip()


def _ensure_importable() -> None:
    """Make `import grass.script` work where no .pth file points at GRASS's Python package."""
    try:
        import grass.script  # noqa: F401
    except ImportError:
        sys.path.insert(0, grass_config("python_path"))


def create_project(path: str | os.PathLike, epsg: int | None = None, *, georef: str | None = None) -> Path:
    """Create a GRASS project (a 'location' before 8.4) with the CRS of EPSG:`epsg` or of a raster file."""
    path = Path(path)
    if (epsg is None) == (georef is None):
        raise ValueError("give exactly one of epsg or georef")
    if (path / "PERMANENT").is_dir():
        raise GrassError(f"GRASS project {path} already exists")
    path.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [grass_executable(), "-e", "-c", f"EPSG:{int(epsg)}" if epsg is not None else str(georef), str(path)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0 or not (path / "PERMANENT").is_dir():
        raise GrassError(f"could not create GRASS project {path}: {proc.stderr.strip()}")
    return path


def mapset_exists(project: str | os.PathLike, mapset: str) -> bool:
    return (Path(project) / mapset / "WIND").is_file()


def create_mapset(project: str | os.PathLike, mapset: str, *, replace: bool = False,
                  marker: dict | None = None) -> Path:
    """Create `mapset` in `project` with the project's default region.

    With replace=True an existing mapset of that name is deleted first, under its lock (an error when a
    live process holds it): only ever used on the pipeline's own mapsets. With `marker`, stfuse's
    marker is written before the mapset is complete, so a job killed half-way leaves a mapset that is
    still recognisably stfuse's.
    """
    project = Path(project)
    if not (project / "PERMANENT" / "DEFAULT_WIND").is_file():
        raise GrassError(f"{project} is not a GRASS project (no PERMANENT/DEFAULT_WIND)")
    if mapset == "PERMANENT":
        raise GrassError("refusing to create or replace the PERMANENT mapset")
    target = project / mapset
    if target.exists():
        if not replace:
            raise GrassError(f"mapset {target} already exists")
        _take_lock(target)
        shutil.rmtree(target)
    # Built under a temporary name and renamed into place, so that a kill at any moment leaves either
    # no mapset or a complete one carrying stfuse's marker (never a bare folder that looks like a user's).
    staging = project / f".{mapset}.stfuse-new"
    if staging.exists():
        shutil.rmtree(staging)  # a kill's leftover: the name is stfuse's own
    staging.mkdir()
    if marker is not None:
        write_marker(staging, marker)
    shutil.copy(project / "PERMANENT" / "DEFAULT_WIND", staging / "WIND")
    os.rename(staging, target)
    return target


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


LOCK_FILE = ".gislock"


def lock_pid(data: bytes) -> int:
    """The holder's pid in a .gislock: GRASS 8.2 writes it as a binary native int (4 bytes; a session
    of pid 11945 leaves a9 2e 00 00), older tools as text. ASCII digits are text (a binary Linux pid
    never consists of ASCII digits: that would need a pid >= 0x30000000); otherwise a native int of 4
    or 8 bytes. 0 when empty or unreadable."""
    text = data.strip()
    if text and text.isdigit():
        return int(text)
    if len(data) == 4:
        return struct.unpack("=i", data)[0]
    if len(data) == 8:
        return struct.unpack("=q", data)[0]
    return 0


def _process(pid: int) -> str:
    """'process PID (its command line)' where readable."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        cmd = ""
    return f"process {pid}" + (f" ({cmd})" if cmd else "")


def lock_holder(mapset_path: str | os.PathLike) -> int | None:
    """pid of the live process (other than this one) holding the mapset's .gislock, else None."""
    try:
        pid = lock_pid((Path(mapset_path) / LOCK_FILE).read_bytes())
    except FileNotFoundError:
        return None
    except OSError:
        pid = 0
    if pid > 0 and pid != os.getpid() and _pid_alive(pid):
        return pid
    return None


def _in_use(mapset_path: Path, pid: int) -> MapsetInUse:
    return MapsetInUse(
        f"mapset {mapset_path} is in use by {_process(pid)}, which holds its lock {mapset_path / LOCK_FILE}: "
        "nothing was deleted or changed. Close that GRASS session and run again (remove the .gislock "
        "only if that process is not a GRASS session)"
    )


def _check_lock(mapset_path: Path) -> None:
    """Error when a live process holds the mapset's lock; remove a stale lock (its process is gone)."""
    mapset_path = Path(mapset_path)
    lock = mapset_path / LOCK_FILE
    pid = lock_holder(mapset_path)
    if pid is not None:
        raise _in_use(mapset_path, pid)
    if lock.exists():
        try:
            old = lock_pid(lock.read_bytes())
        except OSError:
            old = 0
        log.warning("removing stale lock %s (%s)", lock,
                    "this process's own" if old == os.getpid() else f"process {old} is gone" if old else "unreadable")
        lock.unlink(missing_ok=True)


def _take_lock(mapset_path: Path) -> Path:
    """Lock the mapset for this process the way GRASS 8.2 does (binary native int32 pid); error when in use."""
    mapset_path = Path(mapset_path)
    lock = mapset_path / LOCK_FILE
    for _ in range(2):
        _check_lock(mapset_path)
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            continue  # taken in between: checked again, an error when the taker is alive
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("=i", os.getpid()))
        return lock
    pid = lock_holder(mapset_path)
    raise _in_use(mapset_path, pid or 0)


def _release_lock(lock: Path) -> None:
    """Remove the lock if it is still this process's."""
    try:
        if lock_pid(lock.read_bytes()) == os.getpid():
            lock.unlink()
    except FileNotFoundError:
        pass


@contextlib.contextmanager
def session(project: str | os.PathLike, mapset: str = "PERMANENT", *, lock: bool = True):
    """Run GRASS modules and grass.script / grass.temporal in `project`/`mapset` in this process.

    Yields the grass.script module. Environment changes are undone on exit.
    """
    _ensure_importable()
    import grass.script as gs
    import grass.script.setup as gsetup

    project = Path(project).resolve()
    mapset_path = project / mapset
    if not (mapset_path / "WIND").is_file():
        raise GrassError(f"GRASS mapset {mapset_path} does not exist")
    saved_env = dict(os.environ)
    lock_file = _take_lock(mapset_path) if lock else None
    handle = None
    try:
        handle = gsetup.init(str(project.parent), project.name, mapset, grass_path=grass_config("path"))
        # Modules report through the log, not a progress bar on stderr per percent.
        os.environ["GRASS_VERBOSE"] = os.environ.get("STFUSE_GRASS_VERBOSE", "0")
        yield gs
    finally:
        tgis = sys.modules.get("grass.temporal")
        if tgis is not None:
            # TGIS keeps helper processes bound to this session; the next session starts its own.
            with contextlib.suppress(Exception):
                tgis.stop_subprocesses()
        if handle is not None:
            gisrc = os.environ.get("GISRC")
            with contextlib.suppress(Exception):
                handle.finish()
            if gisrc:
                Path(gisrc).unlink(missing_ok=True)
        if lock_file is not None:
            _release_lock(lock_file)
        os.environ.clear()
        os.environ.update(saved_env)


def map_exists(gs, name: str, element: str = "raster") -> bool:
    return bool(gs.find_file(name, element=element)["file"])


#: marker file of a GRASS project stfuse made (manifest and synthetic input)
PROJECT_MARKER = ".stfuse_project"
OWN_MAPSET_MARKER = ".stfuse_mapset"

# Element folders of a mapset (what g.list lists) and the kind of map each holds, in messages.
ELEMENTS = {"cellhd": "raster", "vector": "vector", "group": "group", "grid3": "raster_3d", "windows": "region"}
# Space-time dataset tables of a mapset's TGIS database.
TGIS_TABLES = {"strds": "STRDS", "stvds": "STVDS", "str3ds": "STR3DS"}
# Markers written before 2026-12-01 recorded no space-time dataset (the query missed GRASS's *_base tables):
# only markers with this flag say which datasets the stage wrote.
TGIS_RECORDED = "tgis_recorded"
KINDS = {**ELEMENTS, **TGIS_TABLES}


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def read_marker(mapset_path: str | os.PathLike) -> dict | None:
    """stfuse's marker of a mapset: None where there is none (the mapset is not stfuse's).

    A marker without `elements` (a stage that never finished: killed, or failed) records nothing: the
    mapset holds only stfuse's partial output. A plain-text marker of an older stfuse counts as such.
    """
    path = Path(mapset_path) / OWN_MAPSET_MARKER
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    return data if isinstance(data, dict) else {"made_by": "stfuse"}


def write_marker(mapset_path: str | os.PathLike, data: dict) -> None:
    path = Path(mapset_path) / OWN_MAPSET_MARKER
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def mapset_elements(mapset_path: str | os.PathLike) -> dict[str, list[str]]:
    """What a mapset holds: names per element folder (cellhd, vector, group, grid3, windows) and the
    ids of its space-time datasets (strds, stvds, str3ds) from its TGIS database, if it has one."""
    mapset_path = Path(mapset_path)
    out = {}
    for folder in ELEMENTS:
        d = mapset_path / folder
        out[folder] = sorted(p.name for p in d.iterdir()) if d.is_dir() else []
    db = mapset_path / "tgis" / "sqlite.db"
    for table in TGIS_TABLES:
        out[table] = []
    if db.is_file():
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            for table in TGIS_TABLES:
                with contextlib.suppress(sqlite3.Error):  # a table GRASS has not made yet
                    out[table] = sorted(r[0] for r in con.execute(f"SELECT id FROM {table}_base"))
        finally:
            con.close()
    return out


def foreign_elements(mapset_path: str | os.PathLike, marker: dict | None = None) -> dict[str, list[str]]:
    """Elements of an stfuse mapset that its stage did not write (per element folder / TGIS table).

    Empty where the stage never finished (nothing recorded: all of it is stfuse's partial output).
    """
    marker = read_marker(mapset_path) if marker is None else marker
    recorded = (marker or {}).get("elements")
    if recorded is None:
        return {}
    now = mapset_elements(mapset_path)
    if not marker.get(TGIS_RECORDED):  # recorded before stfuse read TGIS right: its datasets are unknown
        now = {k: v for k, v in now.items() if k not in TGIS_TABLES}
    out = {k: [n for n in names if n not in set(recorded.get(k, []))] for k, names in now.items()}
    return {k: v for k, v in out.items() if v}


def describe_elements(elements: dict[str, list[str]]) -> str:
    return "; ".join(f"{KINDS.get(k, k)} {', '.join(v)}" for k, v in elements.items())


def record_mapset(mapset_path: str | os.PathLike) -> dict:
    """Record in the marker what the stage wrote (called when its session finishes without error)."""
    marker = read_marker(mapset_path) or {"made_by": "stfuse"}
    marker.update(elements=mapset_elements(mapset_path), finished=_now(), **{TGIS_RECORDED: True})
    write_marker(mapset_path, marker)
    return marker


def _foreign_error(mapset_path: Path, foreign: dict, stage: str | None) -> ForeignMaps:
    project, mapset = mapset_path.parent, mapset_path.name
    rasters = foreign.get("cellhd", [])
    example = (f" (e.g. grass -c {project}/analysis --exec g.copy raster={rasters[0]}@{mapset},{rasters[0]}, "
               f"then grass {mapset_path} --exec g.remove -f type=raster name={rasters[0]})") if rasters else ""
    return ForeignMaps(
        f"mapset {mapset_path} holds what stfuse did not write there: {describe_elements(foreign)}. "
        f"stfuse replaces this mapset when it reruns {stage or 'the stage that made it'}, which would delete "
        "them; nothing was deleted. Keep them by moving them into a mapset of your own (g.copy, for space-time "
        f"datasets t.create + t.register there), then removing them from {mapset}{example}; or set "
        "grass: {replace_foreign_maps: true} in the config to let stfuse delete them"
    )


def check_replaceable(mapset_path: str | os.PathLike, *, study: str | None = None, stage: str | None = None,
                      replace_foreign: bool = False, marker: dict | None = None) -> None:
    """Error unless stfuse may delete this mapset: stfuse's, of this study, holding only what stfuse wrote.

    The lock is checked by the caller (taken before this check and held until the mapset is deleted).
    """
    mapset_path = Path(mapset_path)
    marker = read_marker(mapset_path) if marker is None else marker
    if marker is None:
        raise GrassError(
            f"mapset {mapset_path} exists and was not made by stfuse; it is left alone: "
            "choose another mapset name in the config (input.grass_project.mapset)"
        )
    other = marker.get("study")
    if other and study and other != study:
        raise GrassError(
            f"mapset {mapset_path} was made by study '{other}', not by study '{study}': two studies would "
            f"overwrite each other's results; nothing was deleted. Give study '{study}' a mapset of its own "
            f"(input.grass_project.mapset; leave it out for stfuse_{study})"
        )
    foreign = foreign_elements(mapset_path, marker)
    if foreign:
        if not replace_foreign:
            raise _foreign_error(mapset_path, foreign, stage or marker.get("stage"))
        log.warning("replacing mapset %s deletes what stfuse did not write there (grass.replace_foreign_maps): %s",
                    mapset_path, describe_elements(foreign))


def own_mapset(project: str | os.PathLike, mapset: str, *, study: str | None = None, stage: str | None = None,
               replace_foreign: bool = False) -> Path:
    """(Re)create a mapset that belongs to the pipeline, marked so that it can be replaced safely.

    A mapset of that name without the marker is the user's: it is never touched. An existing stfuse
    mapset is replaced only when no live process holds it, it was made by the same study, and it holds
    nothing stfuse did not write (or replace_foreign); all of that is checked under its lock.
    """
    path = Path(project) / mapset
    if path.exists():
        marker = read_marker(path)
        if marker is None:
            check_replaceable(path, marker=marker)  # raises: not stfuse's
        lock = _take_lock(path)
        try:
            check_replaceable(path, study=study, stage=stage, replace_foreign=replace_foreign, marker=marker)
        except BaseException:
            _release_lock(lock)
            raise
        if marker.get("elements") is None:
            log.info("replacing %s: its stage never finished (partial output)", path)
        shutil.rmtree(path)
    return create_mapset(project, mapset, marker=dict(made_by="stfuse", study=study, stage=stage,
                                                      created=_now(), elements=None))


@contextlib.contextmanager
def own_session(project: str | os.PathLike, mapset: str, *, study: str | None = None, stage: str | None = None,
                replace_foreign: bool = False):
    """A fresh own mapset (own_mapset) and a session in it; when the body ends without error, the
    marker records what the stage wrote there (so that later additions by a user are recognised)."""
    own_mapset(project, mapset, study=study, stage=stage, replace_foreign=replace_foreign)
    with session(project, mapset) as gs:
        yield gs
        record_mapset(Path(project) / mapset)


def _crs_files(project: Path) -> dict[str, bytes]:
    names = ("PROJ_INFO", "PROJ_UNITS", "PROJ_EPSG", "PROJ_SRID", "PROJ_WKT")
    return {n: (project / "PERMANENT" / n).read_bytes() for n in names if (project / "PERMANENT" / n).is_file()}


def rebuild_project(project: str | os.PathLike, *, epsg: int | None = None, georef: str | None = None,
                    study: str | None = None, replace_foreign: bool = False) -> bool:
    """Clear an existing stfuse project for a rerun of ingest, deleting only what stfuse made.

    Every check runs before anything is deleted: no mapset stfuse would delete (its own and PERMANENT)
    may be in use (their locks are taken and held), each of stfuse's mapsets must be of this study and
    hold only what stfuse wrote. Where the project holds nothing else, it is deleted whole and False is
    returned (the caller creates it anew). Where it holds more (a user's mapset, maps in PERMANENT, other
    files), PERMANENT and all that is kept, stfuse's mapsets are deleted one by one, and True is
    returned (the caller resets the default region); if the CRS changed, that is refused.
    """
    project = Path(project)
    permanent = project / "PERMANENT"
    own, other, staging = [], [], []
    for entry in sorted(project.iterdir()):
        if entry.name in ("PERMANENT", PROJECT_MARKER):
            continue
        if entry.is_dir() and entry.name.endswith(".stfuse-new"):
            staging.append(entry)  # a mapset create_mapset was building when a job was killed
            continue
        (own if entry.is_dir() and read_marker(entry) is not None else other).append(entry)
    if any(mapset_elements(permanent).values()):
        other.append(permanent)
    locks = []
    try:
        for mapset in (*own, permanent):
            locks.append(_take_lock(mapset))
        for mapset in own:
            check_replaceable(mapset, study=study, stage=(read_marker(mapset) or {}).get("stage"),
                              replace_foreign=replace_foreign)
        if other:
            with tempfile.TemporaryDirectory(prefix="stfuse_crs_") as tmp:
                fresh = _crs_files(create_project(Path(tmp) / "p", epsg, georef=georef))
            if fresh != _crs_files(project):
                names = ", ".join(e.name for e in other)
                raise GrassError(
                    f"GRASS project {project} holds what stfuse did not make ({names}) and the study's CRS "
                    f"changed ({'EPSG:' + str(epsg) if epsg is not None else georef}): stfuse cannot rebuild the "
                    "project without deleting them; nothing was deleted. Move them into a project of your own, "
                    "or remove them, and run again"
                )
    except BaseException:
        for lock in locks:
            _release_lock(lock)
        raise
    for leftover in staging:
        shutil.rmtree(leftover)
    for mapset in own:  # each still under the lock taken above
        log.info("deleting stfuse's mapset %s", mapset)
        shutil.rmtree(mapset)
    if other:
        _release_lock(locks[-1])
        log.info("kept %s (not stfuse's): %s", project, ", ".join(e.name for e in other))
        return True
    shutil.rmtree(project)
    return False


# --- stage sessions: a mapset of its own per workflow job ------------------------------------------------


def stage_mapset(project_state: dict, stage: str) -> str:
    """The pipeline's own mapset for a stage: `<stage>`, or `<prefix>_<stage>` in a user's project."""
    prefix = project_state.get("mapset")
    return f"{prefix}_{stage}" if project_state.get("source") == "grass_project" else stage


@contextlib.contextmanager
def stage_session(project_state: dict, stage: str, read_mapsets):
    """A fresh own mapset for `stage`, the mapsets it reads on its search path, the study region.

    The mapset is replaced only when it is the same study's and holds nothing stfuse did not write there
    (or the project state allows it: `replace_foreign_maps`); on success its marker records what was written.
    """
    project = project_state["project"]
    mapset = stage_mapset(project_state, stage)
    with own_session(project, mapset, study=project_state.get("study"), stage=stage,
                           replace_foreign=project_state.get("replace_foreign_maps", False)) as gs:
        reads = sorted({m for m in read_mapsets if m and m != mapset})
        if reads:
            gs.run_command("g.mapsets", mapset=",".join(reads), operation="add", quiet=True)
        from .ingest import grid_from_project, set_region  # ingest imports this module

        set_region(gs, grid_from_project(project_state))
        yield gs


def map_mapset(map_or_strds_id: str) -> str:
    """The mapset of a fully qualified ``name@mapset`` ("" when unqualified)."""
    return map_or_strds_id.split("@", 1)[1] if "@" in map_or_strds_id else ""


_mapset = map_mapset
