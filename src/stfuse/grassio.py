"""Fast GRASS raster <-> NumPy transfer in the current computational region, without temporary files.

API (all in the computational region of the active session; GRASS resamples every map to the region
on the fly, nearest neighbour, exactly as GRASS modules do)::

    read_map(name)          -> (H, W) float32, nulls -> NaN
    read_maps(names)        -> (N, H, W) float32
    read_stack(names)       -> (T, C, H, W) float32 from a T x C nested list
    write_map(array, name, *, overwrite=False, title=None, history=None)   # (H, W) -> FCELL map
    region_shape()          -> (rows, cols)

Names may be fully qualified (``name@mapset``). CELL, FCELL and DCELL maps are all returned as float32.
A map that does not exist raises `stfuse.grass.GrassError` naming it.

How, and why this way
---------------------
The decoding is done by GRASS's own raster library (``Rast_open_old`` + ``Rast_get_f_row``, which
applies the region resampling, converts CELL/DCELL to float and writes nulls as the FCELL null
pattern, an all-ones NaN) called through ctypes -- but in short-lived *helper processes*
(``python -I -S`` running `_HELPER`, which imports nothing but ctypes), never in this process:

* GRASS library errors call ``G_fatal_error``, which ends the process with ``exit()``: a corrupt
  file or a reclass of a vanished map must fail one call with a `GrassError`, not kill a Snakemake
  job's Python or a notebook kernel. In a helper it ends the helper; the parent reports its stderr.
* The GRASS library caches the gisrc (project/mapset), the region and the mapset search path at its
  first use. A helper started per call inherits *the current* ``os.environ`` (``GISRC``,
  ``WIND_OVERRIDE`` from ``grass.script.use_temp_region``, ``GRASS_REGION``), so every call sees the
  session and region exactly as a GRASS module started at that moment would.
* The helpers run in parallel: the rows of all requested maps (flattened to ``N * H`` rows) are
  split into one contiguous band per helper, so each helper fills one contiguous byte range of the
  preallocated output, streamed through its stdout pipe straight into the numpy buffer
  (``readinto``, no intermediate copies besides the pipe). Random row access is cheap in GRASS's
  row-compressed format, so a single large map is split across cores too.
* Many small maps cost one process start per helper, not per map (~ms per 64 x 64 map: a
  ``Rast_open_old`` / ``Rast_close`` pair); `r.out.bin` would need one process per map.

Measured on the 2-core development machine (benchmarks/bench_reader.py, 4000 x 4000 FCELL, 64 MB):
``r.out.bin output=/dev/null`` ~250-290 MB/s (its own decode plus format conversion and fwrite),
``r.out.bin output=-`` into a numpy buffer through a pipe ~150-210 MB/s, one in-process ctypes
``Rast_get_f_row`` loop ~350 MB/s, and this module (two helpers) well above that; see the benchmark
for current numbers. ``grass.script.array`` (r.out.bin to a temporary file, then np.fromfile) and
pygrass' RasterRow (one numpy row object per row) are slower still.

Writing uses the same helper: it reads the array from its stdin and writes it with ``Rast_open_new``
(FCELL) / ``Rast_put_f_row`` in the current region; NaN becomes null. Title and history are set after
``Rast_close`` through ``Rast_put_cell_title`` / ``Rast_write_history``. A write that breaks off
(parent killed, short input) calls ``Rast_unopen``: no half-written map is left behind.
"""

from __future__ import annotations

import fcntl
import functools
import json
import logging
import math
import os
import re
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from .grass import GrassError

log = logging.getLogger("stfuse.grassio")

__all__ = ["read_map", "read_maps", "read_stack", "write_map", "region_shape"]

_HEADER = struct.Struct("<qq")  # (status or rows, byte count or cols)
_OK, _MISSING, _FAILED = 0, 1, 2
_FCELL_NULL = np.uint32(0xFFFFFFFF)  # GRASS's FCELL null: all bits set (a NaN)
# Work below which a second helper costs more than it saves (its start-up is ~15-30 ms).
_SPLIT_SECONDS = 0.06
_EST_BYTES_PER_S = 350e6  # Rast_get_f_row decode rate of one helper, FCELL
_EST_OPEN_S = 0.0003  # Rast_open_old + Rast_close of one map
_MAX_WORKERS = 8

# The helper: runs as `python -I -S -c _HELPER MODE LIBGIS LIBRASTER VERSION` with the session's
# environment. It reports the region shape first, then reads its whole request from stdin before
# writing anything else, so the parent can never deadlock on two full pipes.
_HELPER = r'''
import ctypes, os, struct, sys

HDR = struct.Struct("<qq")
c_int, c_char_p, c_void_p = ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p


def put(data):
    view = memoryview(data).cast("B")
    while view:
        view = view[os.write(1, view):]


def fail(status, message):
    data = message.encode("utf-8", "replace")
    put(HDR.pack(status, len(data)) + data)


def read_exact(view):
    got = 0
    while got < len(view):
        n = sys.stdin.buffer.readinto(view[got:])
        if not n:
            return got
        got += n
    return got


def main():
    mode, libgis, libraster, version = sys.argv[1:5]
    gis = ctypes.CDLL(libgis)
    ras = ctypes.CDLL(libraster)
    gis.G__gisinit.argtypes = [c_char_p, c_char_p]
    gis.G_find_raster2.argtypes = [c_char_p, c_char_p]
    gis.G_find_raster2.restype = c_char_p
    gis.G_mapset.restype = c_char_p
    gis.G_legal_filename.argtypes = [c_char_p]
    ras.Rast_open_old.argtypes = [c_char_p, c_char_p]
    ras.Rast_get_f_row.argtypes = [c_int, c_void_p, c_int]
    ras.Rast_put_f_row.argtypes = [c_int, c_void_p]
    ras.Rast_open_new.argtypes = [c_char_p, c_int]
    ras.Rast_put_cell_title.argtypes = [c_char_p, c_char_p]
    ras.Rast_read_history.argtypes = [c_char_p, c_char_p, c_void_p]
    ras.Rast_write_history.argtypes = [c_char_p, c_void_p]
    ras.Rast_append_history.argtypes = [c_void_p, c_char_p]
    ras.Rast_set_history.argtypes = [c_void_p, c_int, c_char_p]
    ras.Rast_free_history.argtypes = [c_void_p]

    gis.G__gisinit(version.encode(), b"stfuse.grassio")
    rows, cols = ras.Rast_window_rows(), ras.Rast_window_cols()
    put(HDR.pack(rows, cols))
    if mode == "shape":
        return
    rowbytes = 4 * cols
    chunk = max(1, min(rows, (1 << 20) // rowbytes))
    buf = ctypes.create_string_buffer(chunk * rowbytes)
    base = ctypes.addressof(buf)

    if mode == "read":
        get_row = ras.Rast_get_f_row
        for line in sys.stdin.buffer.read().splitlines():
            name, mapset, r0, r1 = line.split(b"\t")
            found = gis.G_find_raster2(name, mapset)
            if not found:
                return fail(1, "")
            fd = ras.Rast_open_old(name, found)
            r, r1 = int(r0), int(r1)
            put(HDR.pack(0, (r1 - r) * rowbytes))
            while r < r1:
                n = min(chunk, r1 - r)
                for i in range(n):
                    get_row(fd, base + i * rowbytes, r + i)
                put(memoryview(buf)[: n * rowbytes])
                r += n
            ras.Rast_close(fd)
        return

    # mode == "write": a length-prefixed JSON header, an answer, then rows x cols float32 values.
    import json

    (size,) = struct.unpack("<q", sys.stdin.buffer.read(8))
    req = json.loads(sys.stdin.buffer.read(size))
    name = req["name"].encode()
    mapset = gis.G_mapset()
    if req["mapset"] and req["mapset"].encode() != mapset:
        return fail(2, "can only write raster maps to the current mapset <%s>" % mapset.decode())
    if gis.G_legal_filename(name) < 0:
        return fail(2, "<%s> is not a legal raster map name" % req["name"])
    if not req["overwrite"] and gis.G_find_raster2(name, mapset):
        return fail(2, "raster map <%s> exists in mapset <%s> (use overwrite=True)"
                    % (req["name"], mapset.decode()))
    put(HDR.pack(0, 0))
    fd = ras.Rast_open_new(name, 1)  # FCELL_TYPE
    done = 0
    while done < rows:
        n = min(chunk, rows - done)
        if read_exact(memoryview(buf)[: n * rowbytes]) != n * rowbytes:
            ras.Rast_unopen(fd)
            sys.exit("stfuse.grassio: input ended before all rows were written")
        for i in range(n):
            ras.Rast_put_f_row(fd, base + i * rowbytes)
        done += n
    ras.Rast_close(fd)
    if req["title"] is not None:
        ras.Rast_put_cell_title(name, req["title"].encode())
    hist = ctypes.create_string_buffer(4096)  # struct History (~80 bytes), treated as opaque
    ras.Rast_read_history(name, mapset, hist)
    ras.Rast_set_history(hist, 7, req["description"].encode())  # HIST_KEYWRD: r.info's description
    if req["title"] is not None:
        ras.Rast_set_history(hist, 1, req["title"].encode())  # HIST_TITLE
    for text in (req["history"] or "").splitlines():
        ras.Rast_append_history(hist, text.encode())
    ras.Rast_write_history(name, hist)
    ras.Rast_free_history(hist)
    put(HDR.pack(0, 0))


main()
'''


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


class _Helper:
    """One helper process; `shape` is the region (rows, cols) it reported."""

    def __init__(self, mode: str, env: dict[str, str]):
        libgis, libraster, version = _grass_libs(env["GISBASE"])
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _HELPER, mode, libgis, libraster, version],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0, env=env,
        )
        _set_pipe_size(self.proc.stdout, 1 << 20)
        self._stderr: list[bytes] = []
        self._drain = threading.Thread(target=self._read_stderr, daemon=True)
        self._drain.start()
        self.shape: tuple[int, int] | None = None

    def _read_stderr(self) -> None:
        for chunk in iter(lambda: self.proc.stderr.read(65536), b""):
            self._stderr.append(chunk)

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
        got, stdout = 0, self.proc.stdout
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
            self.proc.stdin.write(data)
            if close:
                self.proc.stdin.close()
        except BrokenPipeError:
            pass  # the helper died; its exit status and stderr tell why

    def error_text(self) -> str:
        """Wait for the helper to end; its GRASS messages (stderr) and exit status."""
        code = self.finish()
        text = b"".join(self._stderr).decode("utf-8", "replace").strip()
        return text or f"helper exited with status {code}"

    def finish(self, kill: bool = False) -> int:
        if kill and self.proc.poll() is None:
            self.proc.kill()
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except (OSError, ValueError):
                pass
        code = self.proc.wait()
        self._drain.join()
        self.proc.stderr.close()
        if self._stderr and not kill:
            log.debug("GRASS raster helper: %s", b"".join(self._stderr).decode("utf-8", "replace").strip())
        return code


def _set_pipe_size(stream, size: int) -> None:
    """Enlarge a pipe (Linux): fewer, larger reads. Failing is harmless."""
    try:
        fcntl.fcntl(stream.fileno(), getattr(fcntl, "F_SETPIPE_SZ", 1031), size)
    except OSError:
        pass


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
    """A T x C nested list of map names (dates x bands) as a (T, C, H, W) float32 array."""
    names = [list(row) for row in names]
    if len({len(row) for row in names}) > 1:
        raise ValueError(f"read_stack needs a rectangular T x C list; row lengths {[len(r) for r in names]}")
    t, c = len(names), (len(names[0]) if names else 0)
    flat = read_maps([n for row in names for n in row], env=env, workers=workers)
    return flat.reshape(t, c, *flat.shape[1:])


def read_maps(names: Sequence[str], *, env: Mapping[str, str] | None = None,
              workers: int | None = None) -> np.ndarray:
    """Raster maps in the current region as an (N, H, W) float32 array, nulls as NaN.

    `workers` caps the helper processes (default: the CPUs this process may use, at most 8; fewer when
    the work is too small to pay for their start-up).
    """
    names = list(names)
    parsed = [_check_name(n) for n in names]
    env = _environment(env)
    started = time.perf_counter()
    first = _Helper("read", env)
    helpers = [first]
    ok = False
    try:
        rows, cols = first.start()
        startup = time.perf_counter() - started
        out = np.empty((len(names), rows, cols), dtype=np.float32)
        if out.size == 0:
            return out
        rowbytes = 4 * cols
        total_rows = len(names) * rows
        if workers is None:
            work = out.nbytes / _EST_BYTES_PER_S + len(names) * _EST_OPEN_S
            workers = min(_workers_available(), _MAX_WORKERS, max(1, int(work / _SPLIT_SECONDS) + 1))
        workers = max(1, min(int(workers), total_rows))
        helpers += [_Helper("read", env) for _ in range(workers - 1)]
        # The first helper is running already: give it the rows the others decode while starting.
        head_start = min(total_rows // workers, int(startup * _EST_BYTES_PER_S / rowbytes))
        bounds = _split(total_rows, workers, head_start)
        plans = []
        for helper, (a, b) in zip(helpers, zip(bounds[:-1], bounds[1:])):
            items = []  # (map index, first row, end row) covering flattened rows a..b
            while a < b:
                i, r0 = divmod(a, rows)
                r1 = min(rows, r0 + (b - a))
                items.append((i, r0, r1))
                a += r1 - r0
            request = "".join(f"{parsed[i][0]}\t{parsed[i][1]}\t{r0}\t{r1}\n" for i, r0, r1 in items)
            plans.append((helper, items))
            if helper is not first:
                helper.start()
                if helper.shape != (rows, cols):
                    raise GrassError(f"region changed while reading ({(rows, cols)} -> {helper.shape})")
            helper.send(request.encode(), close=True)
        view = memoryview(out.reshape(-1).view(np.uint8))
        errors: list[BaseException] = []

        def run(helper: _Helper, items) -> None:
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
                    start = (i * rows + r0) * rowbytes
                    expect = (r1 - r0) * rowbytes
                    if size != expect or helper.readinto(view[start:start + expect]) != expect:
                        raise GrassError(f"reading raster map <{names[i]}> failed: {helper.error_text()}")
            except BaseException as exc:  # noqa: BLE001 - re-raised in the calling thread
                errors.append(exc)

        threads = [threading.Thread(target=run, args=plan, daemon=True) for plan in plans[1:]]
        for thread in threads:
            thread.start()
        run(*plans[0])
        for thread in threads:
            thread.join()
        if errors:
            # A missing map is the most useful message; otherwise the first failure.
            missing = [e for e in errors if "not found" in str(e)]
            raise (missing or errors)[0]
        ok = True
        return out
    finally:
        for helper in helpers:
            helper.finish(kill=not ok)


def _split(total: int, parts: int, head_start: int) -> list[int]:
    """Boundaries of `parts` contiguous chunks of range(total), the first `head_start` longer."""
    rest = total - head_start
    bounds = [0] + [head_start + rest * k // parts for k in range(1, parts)] + [total]
    return bounds


def write_map(array: np.ndarray, name: str, *, overwrite: bool = False, title: str | None = None,
              history: str | None = None, env: Mapping[str, str] | None = None) -> None:
    """Write an (H, W) array as FCELL raster map `name` in the current mapset and region; NaN -> null.

    The shape must equal the region's (rows, cols). `title` is the map title, `history` lines are
    appended to the map's history (r.info -h).
    """
    array = np.asarray(array)
    if array.dtype.kind not in "biuf":
        raise TypeError(f"write_map needs a real numeric array, got dtype {array.dtype}")
    base, mapset = _check_name(name)
    env = _environment(env)
    helper = _Helper("write", env)
    ok = False
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
        ok = True
    finally:
        helper.finish(kill=not ok)
