"""GRASS GIS sessions for library code and rule scripts.

One GRASS session per process (TGIS caches its database connection in module globals), one mapset per
parallel job. `gs.setup.init` does not lock a mapset, so `session` takes GRASS's own `.gislock` itself:
a live lock held by another process is an error, a stale one left by a killed job is removed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

log = logging.getLogger("stfuse.grass")


class GrassError(RuntimeError):
    """A GRASS project, mapset, map or dataset is missing or unusable."""


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


def create_mapset(project: str | os.PathLike, mapset: str, *, replace: bool = False) -> Path:
    """Create `mapset` in `project` with the project's default region.

    With replace=True an existing mapset of that name is deleted first: only ever used on the
    pipeline's own mapsets, so a rerun after a killed job starts from a clean slate.
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
        _check_lock(target)
        shutil.rmtree(target)
    target.mkdir()
    shutil.copy(project / "PERMANENT" / "DEFAULT_WIND", target / "WIND")
    return target


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _check_lock(mapset_path: Path) -> None:
    lock = mapset_path / ".gislock"
    if not lock.exists():
        return
    try:
        pid = int(lock.read_text().strip() or 0)
    except (OSError, ValueError):
        pid = 0
    if pid and pid != os.getpid() and _pid_alive(pid):
        raise GrassError(f"mapset {mapset_path} is in use by process {pid} (.gislock)")
    log.warning("removing stale lock %s (process %s is gone)", lock, pid)
    lock.unlink(missing_ok=True)


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
    lock_file = mapset_path / ".gislock"
    if lock:
        _check_lock(mapset_path)
        lock_file.write_text(str(os.getpid()))
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
        if lock:
            lock_file.unlink(missing_ok=True)
        os.environ.clear()
        os.environ.update(saved_env)


def map_exists(gs, name: str, element: str = "raster") -> bool:
    return bool(gs.find_file(name, element=element)["file"])


OWN_MAPSET_MARKER = ".stfuse_mapset"


def own_mapset(project: str | os.PathLike, mapset: str) -> Path:
    """(Re)create a mapset that belongs to the pipeline, marked so that it can be replaced safely.

    A mapset of that name without the marker is the user's: it is never touched.
    """
    path = Path(project) / mapset
    if path.exists() and not (path / OWN_MAPSET_MARKER).exists():
        raise GrassError(
            f"mapset {path} exists and was not made by stfuse; it is left alone: "
            "choose another mapset name in the config (input.grass_project.mapset)"
        )
    created = create_mapset(project, mapset, replace=True)
    (created / OWN_MAPSET_MARKER).write_text("made by stfuse; replaced on every rerun\n")
    return created
