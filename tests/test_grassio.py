"""stfuse.grassio against real GRASS: values, nulls, region offsets and resampling, types, errors."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from stfuse import grassio
from stfuse.grass import GrassError, create_mapset, session

pytestmark = pytest.mark.grass

ROWS, COLS, RES = 20, 30, 10
FULL = dict(n=ROWS * RES, s=0, w=0, e=COLS * RES, res=RES)  # the maps' own grid
T, C = 3, 2  # read_stack test: dates x bands

EXPRESSIONS = [
    # value = row * 1000 + col (GRASS rows and cols count from 1), some nulls
    "known = if((row() + col()) % 7 == 0, null(), float(row() * 1000 + col()))",
    "cellmap = if(row() == col(), null(), row() * 1000 + col())",
    "dcellmap = if(col() == 1, null(), double(row()) * 1000 + col() + 0.25)",
    *(f"st_{t}_{c} = float({10 * t + c})" for t in range(T) for c in range(C)),
]


def expected(kind: str = "known") -> np.ndarray:
    r, c = np.mgrid[1 : ROWS + 1, 1 : COLS + 1]
    value = (r * 1000 + c).astype(np.float64)
    if kind == "known":
        return np.where((r + c) % 7 == 0, np.nan, value).astype(np.float32)
    if kind == "cellmap":
        return np.where(r == c, np.nan, value).astype(np.float32)
    if kind == "dcellmap":
        return np.where(c == 1, np.nan, value + 0.25).astype(np.float32)
    raise ValueError(kind)


def assert_same(got: np.ndarray, want: np.ndarray) -> None:
    """Equal cell by cell, NaN (null) positions included."""
    assert got.dtype == np.float32
    assert got.shape == want.shape
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(got, want)


@pytest.fixture(scope="module")
def gs(grass_project):
    create_mapset(grass_project, "grassio")
    with session(grass_project, "grassio") as gs:
        gs.run_command("g.region", **FULL)
        gs.write_command("r.mapcalc", file="-", stdin="\n".join(EXPRESSIONS))
        yield gs


@pytest.fixture(autouse=True)
def full_region(gs):
    gs.run_command("g.region", **FULL)
    return gs


def test_region_shape(gs):
    assert grassio.region_shape() == (ROWS, COLS)
    gs.run_command("g.region", n=150, s=50, w=100, e=250)
    assert grassio.region_shape() == (10, 15)


def test_read_known_map_with_nulls(gs):
    got = grassio.read_map("known")
    assert_same(got, expected())
    assert np.isnan(got).sum() == int(gs.parse_command("r.univar", map="known", flags="g")["null_cells"])


def test_fully_qualified_name(gs):
    assert_same(grassio.read_map("known@grassio"), expected())


@pytest.mark.parametrize("name, datatype", [("cellmap", "CELL"), ("dcellmap", "DCELL"), ("known", "FCELL")])
def test_cell_dcell_fcell_read_as_float32(gs, name, datatype):
    assert gs.raster_info(name)["datatype"] == datatype
    assert_same(grassio.read_map(name), expected(name))


def test_round_trip_grass_numpy_grass_numpy(gs):
    first = grassio.read_map("known")
    grassio.write_map(first, "copy", overwrite=True)
    assert_same(grassio.read_map("copy"), first)
    info = gs.raster_info("copy")
    assert info["datatype"] == "FCELL"
    assert (info["north"], info["south"], info["west"], info["east"]) == (200, 0, 0, 300)
    assert (info["nsres"], info["ewres"]) == (RES, RES)
    # real nulls, as GRASS itself counts them
    univar = gs.parse_command("r.univar", map="copy", flags="g")
    assert int(univar["null_cells"]) == np.isnan(first).sum()
    assert float(univar["max"]) == np.nanmax(first)


def test_write_any_nan_and_other_dtypes(gs):
    data = expected().astype(np.float64)
    data[0, 0] = -np.nan  # another NaN bit pattern than GRASS's
    grassio.write_map(data, "from_f64", overwrite=True)
    assert_same(grassio.read_map("from_f64"), data.astype(np.float32))
    ints = np.arange(ROWS * COLS, dtype=np.int32).reshape(ROWS, COLS)
    grassio.write_map(ints, "from_int", overwrite=True)
    assert gs.raster_info("from_int")["datatype"] == "FCELL"
    assert_same(grassio.read_map("from_int"), ints.astype(np.float32))
    view = expected()[:, ::-1]  # not C-contiguous
    grassio.write_map(view, "from_view", overwrite=True)
    assert_same(grassio.read_map("from_view"), np.ascontiguousarray(view))


def test_shifted_subwindow(gs):
    gs.run_command("g.region", n=150, s=50, w=100, e=250)  # rows 5..14, cols 10..24 of the map
    assert_same(grassio.read_map("known"), expected()[5:15, 10:25])


def test_region_beyond_the_map_gives_nan_outside(gs):
    gs.run_command("g.region", n=230, s=150, w=-30, e=60)  # 3 rows above, 3 cols left of the map
    want = np.full((8, 9), np.nan, dtype=np.float32)
    want[3:, 3:] = expected()[:5, :6]
    assert_same(grassio.read_map("known"), want)
    gs.run_command("g.region", n=-100, s=-200, w=0, e=100)  # no overlap at all
    assert np.isnan(grassio.read_map("known")).all()


def test_coarser_region_nearest_neighbour(gs):
    # 20 m cells whose centres are the centres of the map's even rows / cols
    gs.run_command("g.region", n=205, s=5, w=-5, e=295, res=20)
    assert grassio.region_shape() == (10, 15)
    assert_same(grassio.read_map("known"), expected()[::2, ::2])


def test_same_resampling_as_grass_modules(gs):
    from grass.script import array as garray

    for region in (dict(n=200, s=0, w=0, e=300, res=20),  # centres on cell edges
                   dict(n=213, s=-27, w=-13, e=311, res=7.3)):  # arbitrary
        gs.run_command("g.region", **region)
        want = np.asarray(garray.array(mapname="known", null=np.nan), dtype=np.float32)
        assert_same(grassio.read_map("known"), want)


def test_read_maps_and_read_stack_order(gs):
    names = [[f"st_{t}_{c}" for c in range(C)] for t in range(T)]
    stack = grassio.read_stack(names)
    assert stack.shape == (T, C, ROWS, COLS) and stack.dtype == np.float32
    for t in range(T):
        for c in range(C):
            assert (stack[t, c] == 10 * t + c).all()
    flat = grassio.read_maps([n for row in names for n in row] + ["known"])
    assert flat.shape == (T * C + 1, ROWS, COLS)
    np.testing.assert_array_equal(flat[:-1], stack.reshape(T * C, ROWS, COLS))
    assert_same(flat[-1], expected())
    assert grassio.read_maps([]).shape == (0, ROWS, COLS)
    assert grassio.read_stack([]).shape == (0, 0, ROWS, COLS)


@pytest.mark.parametrize("workers", [1, 2, 3, 7])
def test_split_between_workers(gs, workers):
    """Maps split into row bands across helper processes come back in place."""
    names = ["known", "cellmap", "st_2_1", "known", "dcellmap"]
    got = grassio.read_maps(names, workers=workers)
    for i, name in enumerate(names):
        want = expected(name) if not name.startswith("st_") else np.full((ROWS, COLS), 21, np.float32)
        assert_same(got[i], want)
    assert_same(grassio.read_map("known", workers=workers), expected())


def test_wrong_shape_write_raises_value_error(gs):
    with pytest.raises(ValueError, match=r"\(20, 31\).*\(20, 30\)"):
        grassio.write_map(np.zeros((ROWS, COLS + 1)), "bad_shape")
    with pytest.raises(ValueError, match=r"\(600,\)"):
        grassio.write_map(np.zeros(ROWS * COLS), "bad_shape")
    assert not gs.find_file("bad_shape", element="raster")["file"]


def test_missing_map_is_named(gs):
    with pytest.raises(GrassError, match="no_such_map"):
        grassio.read_map("no_such_map")
    with pytest.raises(GrassError, match="known@no_such_mapset"):
        grassio.read_map("known@no_such_mapset")
    with pytest.raises(GrassError, match="<absent>"):
        grassio.read_maps(["known", "st_0_0", "absent", "known"], workers=2)
    with pytest.raises(GrassError, match="<gone>"):
        grassio.read_stack([["known", "known"], ["known", "gone"]])


def test_write_refuses_existing_map_unless_overwrite(gs):
    data = np.ones((ROWS, COLS), np.float32)
    grassio.write_map(data, "once", overwrite=True)
    with pytest.raises(GrassError, match="once.*exists"):
        grassio.write_map(data * 2, "once")
    assert_same(grassio.read_map("once"), data)
    grassio.write_map(data * 2, "once", overwrite=True)
    assert_same(grassio.read_map("once"), data * 2)
    with pytest.raises(GrassError, match="current mapset"):
        grassio.write_map(data, "elsewhere@PERMANENT")
    grassio.write_map(data, "qualified@grassio", overwrite=True)
    assert_same(grassio.read_map("qualified"), data)


def test_write_title_and_history(gs):
    grassio.write_map(expected(), "titled", overwrite=True, title="Fused B04", history="fused from S1\nmodel v1")
    assert gs.raster_info("titled")["title"].strip('"') == "Fused B04"
    hist = gs.read_command("r.info", map="titled", flags="h")
    assert "fused from S1" in hist and "model v1" in hist


def test_write_in_a_sub_region_is_georeferenced(gs):
    gs.run_command("g.region", n=150, s=50, w=100, e=250)
    sub = expected()[5:15, 10:25] + 0.5
    grassio.write_map(sub, "sub", overwrite=True)
    info = gs.raster_info("sub")
    assert (info["north"], info["south"], info["west"], info["east"]) == (150, 50, 100, 250)
    gs.run_command("g.region", **FULL)
    full = grassio.read_map("sub")
    want = np.full((ROWS, COLS), np.nan, np.float32)
    want[5:15, 10:25] = sub
    assert_same(full, want)


def test_region_from_env(gs):
    env = dict(os.environ, GRASS_REGION=gs.region_env(n=150, s=50, w=100, e=250))
    assert grassio.region_shape(env=env) == (10, 15)
    assert_same(grassio.read_map("known", env=env), expected()[5:15, 10:25])
    assert grassio.region_shape() == (ROWS, COLS)  # the session's region is untouched


def test_temp_region(gs):
    gs.use_temp_region()
    try:
        gs.run_command("g.region", n=150, s=50, w=100, e=250)
        assert_same(grassio.read_map("known"), expected()[5:15, 10:25])
    finally:
        gs.del_temp_region()
    assert grassio.region_shape() == (ROWS, COLS)


def test_grass_fatal_error_does_not_end_this_process(gs):
    grassio.write_map(expected(), "broken", overwrite=True)
    env = gs.gisenv()
    fcell = Path(env["GISDBASE"], env["LOCATION_NAME"], env["MAPSET"], "fcell", "broken")
    fcell.write_bytes(fcell.read_bytes()[:40])  # truncated data file
    with pytest.raises(GrassError, match="broken"):
        grassio.read_map("broken")
    assert_same(grassio.read_map("known"), expected())  # still working


def test_mask_applies_as_in_grass_modules(gs):
    gs.run_command("r.mask", raster="cellmap")  # cellmap is null on the diagonal
    try:
        got = grassio.read_map("st_0_1")
    finally:
        gs.run_command("r.mask", flags="r")
    assert_same(got, np.where(np.isnan(expected("cellmap")), np.nan, 1).astype(np.float32))
    assert_same(grassio.read_map("st_0_1"), np.ones((ROWS, COLS), np.float32))


def test_helper_server_restarts_after_being_killed(gs):
    grassio.region_shape()
    server = grassio._servers[os.environ["GISBASE"]]
    server.proc.kill()
    server.proc.wait()
    assert_same(grassio.read_map("known"), expected())
    assert grassio._servers[os.environ["GISBASE"]] is not server


def test_no_session():
    with pytest.raises(GrassError, match="no active GRASS session"):
        grassio.region_shape(env={})


def test_server_is_a_module_that_only_runs_as_a_program():
    """The fork server is a real source file (seen by linters and tests); importing it starts nothing."""
    import subprocess
    import sys

    import stfuse._grassio_server as server
    from stfuse import grassio

    assert callable(server.main) and grassio._SERVER_FILE == Path(server.__file__)
    # Standard library only: it must import under -I -S, as the server is started.
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", f"import runpy; runpy.run_path({str(grassio._SERVER_FILE)!r})"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
