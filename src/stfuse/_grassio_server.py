"""The fork server behind stfuse.grassio (run as a program, never imported for use).

`python -I -S _grassio_server.py SOCKET_FD LIBGIS LIBRASTER VERSION`: standard library only, so that
it starts fast and no site package can interfere. It dlopens the GRASS libraries once and forks one
helper per job request; a request is one SOCK_SEQPACKET message (JSON: mode and environment)
carrying three file descriptors (the helper's stdin, stdout, stderr). A helper first reports the
region shape, then reads its whole request from stdin before writing anything else, so the parent
can never deadlock on two full pipes. The server ends when the parent's end of the socket closes
(the parent exited or called stfuse.grassio._shutdown_servers). See stfuse.grassio for why helpers
are forked processes and not calls in the caller's process.
"""
import ctypes
import json
import os
import signal
import socket
import struct
import sys

HDR = struct.Struct("<qq")
c_int, c_char_p, c_void_p = ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p


def put(fd, data):
    view = memoryview(data).cast("B")
    while view:
        view = view[os.write(fd, view):]


def fail(fd, status, message):
    data = message.encode("utf-8", "replace")
    put(fd, HDR.pack(status, len(data)) + data)


def read_exact(fd, view):
    got = 0
    while got < len(view):
        n = os.readv(fd, [view[got:]])
        if not n:
            break
        got += n
    return got


def read_all(fd):
    parts = []
    while True:
        part = os.read(fd, 1 << 16)
        if not part:
            return b"".join(parts)
        parts.append(part)


def declare(gis, ras):
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


def job(gis, ras, version, mode, inp, out):
    gis.G__gisinit(version, b"stfuse.grassio")
    rows, cols = ras.Rast_window_rows(), ras.Rast_window_cols()
    put(out, HDR.pack(rows, cols))
    if mode == "shape":
        return
    rowbytes = 4 * cols
    chunk = max(1, min(rows, (1 << 20) // rowbytes))
    buf = ctypes.create_string_buffer(chunk * rowbytes)
    base = ctypes.addressof(buf)

    if mode == "read":
        get_row = ras.Rast_get_f_row
        for line in read_all(inp).splitlines():
            name, mapset, r0, r1 = line.split(b"\t")
            found = gis.G_find_raster2(name, mapset)
            if not found:
                return fail(out, 1, "")
            fd = ras.Rast_open_old(name, found)
            r, r1 = int(r0), int(r1)
            put(out, HDR.pack(0, (r1 - r) * rowbytes))  # the rows follow
            while r < r1:
                n = min(chunk, r1 - r)
                for i in range(n):
                    get_row(fd, base + i * rowbytes, r + i)
                put(out, memoryview(buf)[: n * rowbytes])
                r += n
            ras.Rast_close(fd)
        return

    # mode == "write": a length-prefixed JSON header, an answer, then rows x cols float32 values.
    head = bytearray(8)
    if read_exact(inp, memoryview(head)) != 8:
        return  # the caller gave up (wrong shape)
    req = bytearray(struct.unpack("<q", head)[0])
    if read_exact(inp, memoryview(req)) != len(req):
        return
    req = json.loads(req)
    name = req["name"].encode()
    mapset = gis.G_mapset()
    if req["mapset"] and req["mapset"].encode() != mapset:
        return fail(out, 2, "cannot write <%s@%s>: raster maps can only be written to the current "
                    "mapset <%s>" % (req["name"], req["mapset"], mapset.decode()))
    if gis.G_legal_filename(name) < 0:
        return fail(out, 2, "<%s> is not a legal raster map name" % req["name"])
    if not req["overwrite"] and gis.G_find_raster2(name, mapset):
        return fail(out, 2, "raster map <%s> exists in mapset <%s> (use overwrite=True)"
                    % (req["name"], mapset.decode()))
    put(out, HDR.pack(0, 0))
    fd = ras.Rast_open_new(name, 1)  # FCELL_TYPE
    done = 0
    while done < rows:
        n = min(chunk, rows - done)
        if read_exact(inp, memoryview(buf)[: n * rowbytes]) != n * rowbytes:
            ras.Rast_unopen(fd)
            raise SystemExit("stfuse.grassio: input ended before all rows were written")
        for i in range(n):
            ras.Rast_put_f_row(fd, base + i * rowbytes)
        done += n
    ras.Rast_close(fd)
    if req["title"] is not None:
        ras.Rast_put_cell_title(name, req["title"].encode())
    hist = ctypes.create_string_buffer(4096)  # struct History (~80 bytes), treated as opaque
    ras.Rast_read_history(name, mapset, hist)
    ras.Rast_set_history(hist, 7, req["description"].encode())  # HIST_KEYWRD, r.info's description
    if req["title"] is not None:
        ras.Rast_set_history(hist, 1, req["title"].encode())  # HIST_TITLE
    for text in (req["history"] or "").splitlines():
        ras.Rast_append_history(hist, text.encode())
    ras.Rast_write_history(name, hist)
    ras.Rast_free_history(hist)
    put(out, HDR.pack(0, 0))


def child(sock, gis, ras, version, request, fds):
    code = 1
    try:
        sock.close()
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        inp, out, err = fds
        os.dup2(err, 2)  # GRASS messages
        os.dup2(err, 1)  # stray prints must not get into the data stream
        os.environ.clear()
        os.environ.update(request["env"])
        job(gis, ras, version, request["mode"], inp, out)
        code = 0
    except SystemExit as exc:
        if exc.code not in (None, 0):
            os.write(2, (str(exc.code) + "\n").encode())
        else:
            code = 0
    except BaseException:
        import traceback
        os.write(2, traceback.format_exc().encode())
    finally:
        os._exit(code)


def main():
    sock = socket.socket(fileno=int(sys.argv[1]))
    try:
        gis, ras = ctypes.CDLL(sys.argv[2]), ctypes.CDLL(sys.argv[3])
        declare(gis, ras)
    except Exception as exc:
        os.write(sock.fileno(), ("cannot load the GRASS libraries: %s" % exc).encode())
        return
    version = sys.argv[4].encode()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # helpers are reaped by the kernel
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's business
    os.write(sock.fileno(), b"ready")
    while True:
        try:
            msg, fds, _, _ = socket.recv_fds(sock, 1 << 20, 3)
        except OSError:
            break
        if not msg:
            break
        try:
            request = json.loads(msg)
            if os.fork() == 0:
                child(sock, gis, ras, version, request, fds)
        except Exception as exc:  # cannot fork: tell the caller through the helper's stderr
            if len(fds) == 3:
                os.write(fds[2], ("stfuse.grassio server: %r\n" % exc).encode())
        finally:
            for fd in fds:
                os.close(fd)




if __name__ == "__main__":
    main()
