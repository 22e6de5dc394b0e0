"""Fast GRASS raster <-> NumPy transfer in the current computational region, without temporary files.

API (all in the computational region of the active session; GRASS resamples every map to the region
on the fly, nearest neighbour, exactly as GRASS modules do)::

    read_map(name)          -> (H, W) float32, nulls -> NaN
    read_maps(names)        -> (N, H, W) float32
    read_stack(names)       -> (T, C, H, W) float32 from a T x C nested list (dates x bands)
    write_map(array, name, *, overwrite=False, title=None, history=None)   # (H, W) -> FCELL map
    region_shape()          -> (rows, cols)

Names may be fully qualified (``name@mapset``). CELL, FCELL and DCELL maps are all returned as float32.
A map that does not exist raises `stfuse.grass.GrassError` naming it. Every function also takes
``env=`` (an environment such as ``grass.script.region_env`` builds, default ``os.environ``) and the
readers ``workers=`` (most helper processes to use).

How, and why this way
---------------------
Cells are decoded by GRASS's own raster library: ``Rast_open_old`` + ``Rast_get_f_row``, which
applies the region (nearest-neighbour resampling), converts CELL/DCELL to float and writes nulls as
the FCELL null pattern -- all bits set, a NaN -- straight into the output buffer; called through
ctypes, but never in this process. Each call runs in *helper processes forked from a small server*
(the program ``stfuse/_grassio_server.py``, run as ``python -I -S``: standard library only), started
on first use and ended with this process:

* GRASS library errors call ``G_fatal_error``, which ends the process with ``exit()``. A corrupt
  file, a reclass of a vanished map or a bad region must fail one call with a `GrassError`, not kill
  a Snakemake job's Python or a notebook kernel: in a helper it ends the helper, and the parent
  reports the helper's GRASS messages.
* The GRASS library caches the gisrc (project, mapset), the region and the mapset search path at its
  first use. Each helper starts from a library that was loaded but never initialised (the server
  only loads it) and gets the caller's environment (``GISRC``, ``WIND_OVERRIDE`` from
  ``grass.script.use_temp_region``, ``GRASS_REGION``), so every call sees the session, region and
  MASK as a GRASS module started at that moment would (a MASK nulls cells, as in every module).
* Forking is what makes helpers cheap: ``libgrass_raster`` pulls in GDAL and ~115 shared libraries,
  which costs ~45 ms per fresh process here (like every GRASS module's start-up: ``g.region -g``
  ~40 ms); a fork of the server, which loaded them once, plus ``G_gisinit`` ~3 ms (the whole
  `region_shape` call). The first call of a process starts the server (~60 ms).
* Helpers run in parallel: the rows of all requested maps (flattened to ``N * H`` rows) are split
  into one contiguous band per helper, so each helper fills one contiguous byte range of the
  preallocated output, streamed through its stdout pipe straight into the numpy buffer
  (``readinto``; no temporary file, the only copy is the pipe's). Random row access is cheap in
  GRASS's row-compressed format, so a single large map is split across cores too; many small maps
  cost one fork per helper, not one process per map. Writing rows straight into a shared memfd
  instead of a pipe was tried and is slower here: faulting in 64 MB of shmem pages costs ~50 ms,
  against ~4 ms for (transparent-huge-page backed) anonymous memory and ~25 ms for the pipe copies.

Measured on the 2-core development machine (benchmarks/bench_reader.py, 4000 x 4000 FCELL = 64 MB
of float32, medians; the machine is shared, so single runs vary by +-30 %): this module ~530 MB/s
with two helpers (~300 MB/s with one), against ``r.out.bin output=/dev/null`` ~260 MB/s (GRASS's
decode plus format conversion and fwrite), ``r.out.bin output=-`` through a pipe into a numpy
buffer ~150-210 MB/s, ``grass.script.array`` (r.out.bin into a temporary file) ~170 MB/s, a pygrass
RasterRow loop ~150-220 MB/s, and an in-process ctypes loop ~340 MB/s on one core (fastest per core,
as it saves the pipe copies, but with the exit()-on-error and stale-state problems above). 500 maps
of 64 x 64: ~0.6 ms per map (~1 ms with one helper; GRASS decompresses every row and its null bits
with a fresh zstd context, ~12 us each, which dominates small maps), against ~40 ms per map for one
r.out.bin process per map.

Writing uses a helper as well: it reads the array from its stdin and writes it with ``Rast_open_new``
(FCELL) / ``Rast_put_f_row`` in the current region, NaN as null; title and history are set after
``Rast_close`` (``Rast_put_cell_title``, ``Rast_write_history``). A write that breaks off (parent
interrupted, short input) calls ``Rast_unopen``: no half-written map is left behind. Overwriting
behaves like a GRASS module's ``--overwrite`` (same library calls). Writing one map cannot be split
across processes; it runs at GRASS's compression speed (~75 MB/s here, ``r.in.bin`` ~65 MB/s).
"""

from __future__ import annotations

import atexit
import fcntl
import functools
import json
import logging
import os
import re
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from .grass import GrassError

log = logging.getLogger("stfuse.grassio")

__all__ = ["read_map", "read_maps", "read_stack", "write_map", "region_shape"]

_HEADER = struct.Struct("<qq")  # a record: (status, byte count) or the region's (rows, cols)
_OK, _MISSING, _FAILED = 0, 1, 2
_FCELL_NULL = np.uint32(0xFFFFFFFF)  # GRASS's FCELL null pattern: all bits set (a NaN)
# Parallel split: one more helper per this much estimated work (a fork + gisinit costs ~2-5 ms).
# The estimate, from measurements here: ~500 MB/s of cells + ~12 us per row (GRASS decompresses each
# row, and its null bits, with a fresh zstd context: that dominates small maps) + ~0.15 ms per open.
_SPLIT_SECONDS = 0.02
_EST_BYTES_PER_S = 500e6
_EST_ROW_S = 12e-6
_EST_OPEN_S = 0.15e-3
_MAX_WORKERS = 8
_CHUNK = 4 << 20  # bytes read from a helper between checks whether to stop

# The server is a program of its own (src/stfuse/_grassio_server.py, standard library only; its
# docstring describes the protocol), started as `python -I -S <file> SOCKET_FD LIBGIS LIBRASTER VERSION`.
_SERVER_FILE = Path(__file__).with_name("_grassio_server.py")


@functools.lru_cache(maxsize=None)
def _grass_libs(gisbase: str) -> tuple[str, str, str]:
    """Absolute paths of libgrass_gis / libgrass_raster and the header version G__gisinit checks."""
    libdir = Path(gisbase) / "lib"

    def lib(stem: str) -> str:
        for pattern in (f"{stem}.so", f"{stem}.*.so", f"{stem}.so.*", f"{stem}.*.dylib", f"{stem}.dylib"):
            hits = sorted(libdir.glob(pattern))
            if hits:
                return str(hits[0])
        raise GrassError(f"GRASS library {stem} not found in {libdir}")

    version = None
    # What GRASS's own ctypes wrappers pass to G__gisinit (GIS_H_VERSION == GRASS_HEADERS_VERSION).
    wrapper = Path(gisbase) / "etc" / "python" / "grass" / "lib" / "gis.py"
    if wrapper.is_file():
        m = re.search(r"GRASS_HEADERS_VERSION\s*=\s*['\"]([^'\"]+)['\"]", wrapper.read_text(errors="replace"))
        version = m.group(1) if m else None
    if version is None:
        numbers = Path(gisbase) / "etc" / "VERSIONNUMBER"
        if not numbers.is_file():
            raise GrassError(f"cannot tell the GRASS version of {gisbase}")
        version = numbers.read_text().split()[0]
    return lib("libgrass_gis"), lib("libgrass_raster"), version


class _Server:
    """The fork server of one GRASS installation, owned by one process."""

    def __init__(self, gisbase: str):
        libgis, libraster, version = _grass_libs(gisbase)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-I", "-S", str(_SERVER_FILE), str(theirs.fileno()), libgis, libraster, version],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, pass_fds=[theirs.fileno()],
                start_new_session=True,  # Ctrl-C in a terminal reaches the parent only
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.sock = ours
        self.pid = os.getpid()
        answer = ours.recv(4096)
        if answer != b"ready":
            ours.close()
            code = self.proc.wait()
            why = answer.decode("utf-8", "replace") or f"exit status {code}"
            raise GrassError(f"the GRASS raster helper server could not start: {why}")

    def alive(self) -> bool:
        return self.pid == os.getpid() and self.proc.poll() is None

    def submit(self, request: bytes, fds: list[int]) -> None:
        socket.send_fds(self.sock, [request], fds)

    def close(self) -> None:
        self.sock.close()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


_servers: dict[str, _Server] = {}
_servers_lock = threading.Lock()


def _server(gisbase: str, *, fresh: bool = False) -> _Server:
    with _servers_lock:
        server = _servers.get(gisbase)
        if server is not None and (fresh or not server.alive()):
            if server.pid == os.getpid():
                server.close()
            server = None  # (one inherited through fork() belongs to the parent process)
        if server is None:
            server = _servers[gisbase] = _Server(gisbase)
        return server


@atexit.register
def _shutdown_servers() -> None:
    with _servers_lock:
        for server in _servers.values():
            if server.pid == os.getpid():
                server.close()
        _servers.clear()


def _environment(env: Mapping[str, str] | None) -> dict[str, str]:
    env = dict(os.environ if env is None else env)
    if not env.get("GISBASE") or not env.get("GISRC"):
        raise GrassError("no active GRASS session (GISBASE/GISRC not set): use stfuse.grass.session()")
    return env


def _workers_available() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _set_pipe_size(fd: int, size: int) -> None:
    """Enlarge a pipe (Linux): fewer, larger reads. Failing is harmless."""
    try:
        fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), size)
    except OSError:
        pass


class _Helper:
    """One helper process (forked by the server); `shape` is the region (rows, cols) it reported."""

    def __init__(self, mode: str, env: dict[str, str]):
        request = json.dumps({"mode": mode, "env": env}).encode()
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        fds = [in_r, out_w, err_w]
        if mode == "read":
            _set_pipe_size(out_r, 1 << 20)
        try:
            try:
                _server(env["GISBASE"]).submit(request, fds)
            except OSError:  # the server died (killed?): once more with a new one
                _server(env["GISBASE"], fresh=True).submit(request, fds)
        except BaseException:
            for fd in (in_w, out_r, err_r):
                os.close(fd)
            raise
        finally:
            for fd in (in_r, out_w, err_w):
                os.close(fd)
        self.stdin = open(in_w, "wb", buffering=0)
        self.stdout = open(out_r, "rb", buffering=0)
        self.stderr = open(err_r, "rb", buffering=0)
        self._messages: list[bytes] = []
        self._drain = threading.Thread(target=self._read_stderr, daemon=True)
        self._drain.start()
        self.shape: tuple[int, int] | None = None

    def _read_stderr(self) -> None:
        for chunk in iter(lambda: self.stderr.read(65536), b""):
            self._messages.append(chunk)

    def start(self) -> tuple[int, int]:
        """Wait for the helper's region report."""
        if self.shape is None:
            head = self.read_header()
            if head is None:
                raise GrassError(f"GRASS raster helper failed: {self.error_text()}")
            self.shape = head
        return self.shape

    def read_header(self) -> tuple[int, int] | None:
        buf = bytearray(_HEADER.size)
        if self.readinto(memoryview(buf)) != len(buf):
            return None
        return _HEADER.unpack(buf)

    def readinto(self, view: memoryview) -> int:
        got, stdout = 0, self.stdout
        while got < len(view):
            n = stdout.readinto(view[got:])
            if not n:
                break
            got += n
        return got

    def read_message(self, size: int) -> str:
        buf = bytearray(size)
        self.readinto(memoryview(buf))
        return buf.decode("utf-8", "replace")

    def send(self, data, *, close: bool = False) -> None:
        try:
            self.stdin.write(data)
            if close:
                self.stdin.close()
        except BrokenPipeError:
            pass  # the helper ended; its messages tell why

    def error_text(self) -> str:
        """The helper's GRASS messages (stderr), once it has ended."""
        self.finish()
        text = b"".join(self._messages).decode("utf-8", "replace").strip()
        return text or "the helper process ended unexpectedly"

    def finish(self) -> None:
        """Close our ends of the pipes (a helper still running then ends at its next read or write)."""
        for stream in (self.stdin, self.stdout):
            try:
                stream.close()
            except OSError:
                pass
        self._drain.join(timeout=10)
        if not self.stderr.closed and not self._drain.is_alive():
            self.stderr.close()
            if self._messages:
                log.debug("GRASS raster helper: %s", b"".join(self._messages).decode("utf-8", "replace").strip())


def _check_name(name) -> tuple[str, str]:
    if not isinstance(name, str):
        raise TypeError(f"raster map names must be str, got {type(name).__name__}: {name!r}")
    base, _, mapset = name.partition("@")
    if not base or any(c in name for c in "\t\n\r\0"):
        raise GrassError(f"raster map <{name}> not found (not a legal map name)")
    return base, mapset


def region_shape(*, env: Mapping[str, str] | None = None) -> tuple[int, int]:
    """(rows, cols) of the current computational region."""
    helper = _Helper("shape", _environment(env))
    try:
        return helper.start()
    finally:
        helper.finish()


def read_map(name: str, *, env: Mapping[str, str] | None = None, workers: int | None = None) -> np.ndarray:
    """Raster map `name` in the current region as an (H, W) float32 array, nulls as NaN."""
    return read_maps([name], env=env, workers=workers)[0]


def read_stack(names: Sequence[Sequence[str]], *, env: Mapping[str, str] | None = None,
               workers: int | None = None) -> np.ndarray:
    """A T x C nested list of map names (e.g. dates x bands) as a (T, C, H, W) float32 array."""
    if isinstance(names, str) or any(isinstance(row, str) for row in names):
        raise TypeError("read_stack needs a nested list of map names (T x C)")
    rows = [list(row) for row in names]
    if len({len(row) for row in rows}) > 1:
        raise ValueError(f"read_stack needs a rectangular T x C list; row lengths {[len(r) for r in rows]}")
    t, c = len(rows), (len(rows[0]) if rows else 0)
    flat = read_maps([n for row in rows for n in row], env=env, workers=workers)
    return flat.reshape(t, c, *flat.shape[1:])


def read_maps(names: Sequence[str], *, env: Mapping[str, str] | None = None,
              workers: int | None = None) -> np.ndarray:
    """Raster maps in the current region as an (N, H, W) float32 array, nulls as NaN.

    `workers` caps the helper processes (default: the CPUs this process may use, at most 8, fewer
    when the work is too small to pay for them).
    """
    if isinstance(names, str):
        raise TypeError("read_maps needs a list of map names; use read_map for one")
    names = list(names)
    parsed = [_check_name(n) for n in names]
    env = _environment(env)
    helpers = [_Helper("read", env)]
    threads: list[threading.Thread] = []
    errors: list[Exception] = []
    stop = threading.Event()  # set on the first error or an interrupt: the other readers stop
    try:
        rows, cols = helpers[0].start()
        out = np.empty((len(names), rows, cols), dtype=np.float32)
        if out.size == 0:
            helpers[0].send(b"", close=True)
            return out
        rowbytes = 4 * cols
        total_rows = len(names) * rows
        if workers is None:
            work = out.nbytes / _EST_BYTES_PER_S + total_rows * _EST_ROW_S + len(names) * _EST_OPEN_S
            workers = min(_workers_available(), _MAX_WORKERS, 1 + int(work / _SPLIT_SECONDS))
        workers = max(1, min(int(workers), total_rows))
        helpers += [_Helper("read", env) for _ in range(workers - 1)]
        plans = []
        for k, helper in enumerate(helpers):
            a, b = total_rows * k // workers, total_rows * (k + 1) // workers
            items = []  # (map index, first row, end row), covering flattened rows a..b in order
            while a < b:
                i, r0 = divmod(a, rows)
                r1 = min(rows, r0 + (b - a))
                items.append((i, r0, r1))
                a += r1 - r0
            if helper.start() != (rows, cols):
                raise GrassError(f"the region changed while reading: {(rows, cols)} -> {helper.shape}")
            request = "".join(f"{parsed[i][0]}\t{parsed[i][1]}\t{r0}\t{r1}\n" for i, r0, r1 in items)
            helper.send(request.encode(), close=True)
            plans.append((helper, items))
        view = memoryview(out.reshape(-1).view(np.uint8))

        def run(helper: _Helper, items) -> None:
            """Collect one helper's rows (per item a record, then the rows) into their place in `out`."""
            try:
                for i, r0, r1 in items:
                    head = helper.read_header()
                    if head is None:
                        raise GrassError(f"reading raster map <{names[i]}> failed: {helper.error_text()}")
                    status, size = head
                    if status == _MISSING:
                        raise GrassError(f"raster map <{names[i]}> not found")
                    if status != _OK:
                        raise GrassError(f"reading raster map <{names[i]}> failed: {helper.read_message(size)}")
                    if size != (r1 - r0) * rowbytes:
                        raise GrassError(f"reading raster map <{names[i]}>: protocol error")
                    start = (i * rows + r0) * rowbytes
                    for a in range(start, start + size, _CHUNK):
                        if stop.is_set():
                            return
                        b = min(a + _CHUNK, start + size)
                        if helper.readinto(view[a:b]) != b - a:
                            raise GrassError(f"reading raster map <{names[i]}> failed: {helper.error_text()}")
            except Exception as exc:  # re-raised in the calling thread
                errors.append(exc)
                stop.set()
            finally:
                helper.finish()  # a helper still decoding ends at its next write

        for plan in plans[1:]:
            threads.append(threading.Thread(target=run, args=plan, daemon=True))
            threads[-1].start()
        run(*plans[0])
        for thread in threads:
            thread.join()
        if errors:
            # A missing map is the most useful message (the order of maps decides which one).
            missing = [e for e in errors if str(e).endswith("not found")]
            raise (missing or errors)[0]
        return out
    finally:
        stop.set()
        for thread in threads:  # each closes its own helper's pipes, within one chunk
            thread.join(timeout=60)
        for helper in helpers:
            helper.finish()


def write_map(array: np.ndarray, name: str, *, overwrite: bool = False, title: str | None = None,
              history: str | None = None, env: Mapping[str, str] | None = None) -> None:
    """Write an (H, W) array as FCELL raster map `name` in the current mapset and region; NaN -> null.

    The shape must equal the region's (rows, cols). `title` is the map's title, the lines of `history`
    are appended to its history (r.info -h).
    """
    array = np.asarray(array)
    if array.dtype.kind not in "biuf":
        raise TypeError(f"write_map needs a real numeric array, got dtype {array.dtype}")
    base, mapset = _check_name(name)
    env = _environment(env)
    helper = _Helper("write", env)
    try:
        shape = helper.start()
        if array.shape != shape:
            raise ValueError(f"array shape {array.shape} does not match the region shape {shape} (rows, cols)")
        values = np.ascontiguousarray(array, dtype=np.float32)
        nulls = np.isnan(values)
        if nulls.any():
            if np.shares_memory(values, array):
                values = values.copy()
            values.view(np.uint32)[nulls] = _FCELL_NULL  # GRASS's own null pattern, not just any NaN
        if title is not None:
            title = " ".join(str(title).splitlines())  # one line in GRASS's files
        request = json.dumps({
            "name": base, "mapset": mapset, "overwrite": bool(overwrite), "title": title,
            "history": history, "description": "written by stfuse.grassio.write_map",
        }).encode()
        helper.send(struct.pack("<q", len(request)) + request)
        answer = helper.read_header()
        if answer is None:
            raise GrassError(f"writing raster map <{name}> failed: {helper.error_text()}")
        if answer[0] != _OK:
            raise GrassError(helper.read_message(answer[1]))
        helper.send(memoryview(values.reshape(-1).view(np.uint8)), close=True)
        if helper.read_header() != (_OK, 0):
            raise GrassError(f"writing raster map <{name}> failed: {helper.error_text()}")
    finally:
        helper.finish()
