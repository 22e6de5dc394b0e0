"""The GRASS module i.fusion.temporal, installed with scripts/install_grass_addon.sh and run the GRASS way
(`grass <project>/<mapset> --exec i.fusion.temporal ...`) on a tiny scene ingested into a throwaway project."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from _scene import ROOT, ingest_tiny

pytestmark = [pytest.mark.grass, pytest.mark.slow]

MODULE = "i.fusion.temporal"
BANDS = ["B02", "B03", "B04", "B08"]
GRASS = os.environ.get("STFUSE_GRASS", "grass")


def hash_tree(path: Path, skip=(".tmp", ".gislock")) -> dict[str, str]:
    """sha256 of every file under path (GRASS's per-session .tmp and the lock aside)."""
    out = {}
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = f.relative_to(path)
        if rel.parts[0] not in skip:
            out[str(rel)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def said(proc: subprocess.CompletedProcess) -> str:
    """What a run printed on stderr, with GRASS's line wrapping (at 80 columns) undone."""
    return " ".join(proc.stderr.split())


class Grass:
    """grass --exec in a subprocess, with the addon base of the installed module."""

    def __init__(self, project: Path, mapset: str, env: dict):
        self.project, self.mapset, self.env = project, mapset, env

    def run(self, *args, check=True) -> subprocess.CompletedProcess:
        proc = subprocess.run([GRASS, str(self.project / self.mapset), "--exec", *args], env=self.env,
                              capture_output=True, text=True, timeout=300)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        return proc

    def listing(self, strds: str) -> pd.DataFrame:
        out = self.run("t.rast.list", f"input={strds}", "columns=name,start_time,semantic_label", "format=csv").stdout
        return pd.read_csv(io.StringIO(out))

    def fill(self, *args, check=True) -> subprocess.CompletedProcess:
        return self.run(MODULE, "optical=S2@ingest_S2", "sar=S1@ingest_S1", *args, check=check)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The tiny scene in a fresh project, the module installed into a temporary addon base, a user mapset
    `user` with the ingest mapsets on its search path."""
    if shutil.which(GRASS) is None:
        pytest.skip("GRASS GIS is not installed")
    root = tmp_path_factory.mktemp("module")
    scene, project, states = ingest_tiny(root)
    addons = root / "addons"
    env = dict(os.environ, GRASS_ADDON_BASE=str(addons))
    subprocess.run([str(ROOT / "scripts" / "install_grass_addon.sh")], env=env, check=True, capture_output=True)
    script = addons / "scripts" / MODULE
    project_dir = Path(project["project"])
    subprocess.run([GRASS, "-e", "-c", str(project_dir / "user")], env=env, check=True, capture_output=True)
    g = Grass(project_dir, "user", env)
    g.run("g.mapsets", "mapset=ingest_S2,ingest_S1", "operation=add")
    return dict(root=root, project=project_dir, states=states, env=env, script=script, g=g)


def others(site) -> dict:
    """Hashes of every file of the mapsets other than the current one."""
    return {m.name: hash_tree(m) for m in sorted(site["project"].iterdir()) if m.is_dir() and m.name != "user"}


def read_maps(site, names: list[str]) -> np.ndarray:
    from stfuse import grass, grassio

    with grass.session(site["project"], "user"):
        return grassio.read_maps(names)


def snapshot(site, strds="S2_gf") -> dict:
    """The output STRDS as t.rast.list reports it, its flag STRDS and the filled values of every map."""
    g = site["g"]
    rows = g.listing(strds)
    flags = g.listing(f"{strds}_flag")
    return dict(rows=rows, flags=flags, values=read_maps(site, list(rows.name)),
                flag_values=read_maps(site, list(flags.name)), info=g.run("t.info", strds).stdout)


@pytest.fixture(scope="module")
def first(site):
    """Train in place (1 epoch, 16-cell tiles), validity from the SCL band; keep the checkpoint."""
    before = others(site)
    proc = site["g"].fill("mask_band=SCL", "output=S2_gf", "epochs=1", "tile_size=16", "nprocs=1",
                          f"save_model={site['root'] / 'model.pt'}")
    return dict(proc=proc, before=before, after=others(site), **snapshot(site))


@pytest.fixture(scope="module")
def refused(first, site):
    """The same output again without --overwrite."""
    user = site["project"] / "user"
    before = hash_tree(user)
    proc = site["g"].fill("mask_band=SCL", "output=S2_gf", "epochs=1", "tile_size=16", check=False)
    return dict(proc=proc, before=before, after=hash_tree(user))


@pytest.fixture(scope="module")
def overwritten(refused, site):
    """--overwrite, with the checkpoint of the first run (model=) and the validity STRDS of the ingest (mask=)."""
    before = others(site)
    proc = site["g"].fill("mask=S2_valid@ingest_S2", "output=S2_gf", f"model={site['root'] / 'model.pt'}",
                          "--overwrite")
    return dict(proc=proc, before=before, after=others(site), **snapshot(site))


def input_series(site):
    """The input bands (T, B, H, W) and validity (T, H, W) of the ingested optical series."""
    granules = site["states"]["S2"]["granules"]
    bands = read_maps(site, [g["maps"][b] for g in granules for b in BANDS])
    valid = read_maps(site, [g["valid"] for g in granules])
    return bands.reshape(len(granules), len(BANDS), *bands.shape[1:]), valid, granules


def check_series(site, snap):
    """One map per optical date and band, labels, UTC start times of the input, values."""
    bands, valid, granules = input_series(site)
    rows, flags = snap["rows"], snap["flags"]
    assert len(rows) == len(granules) * len(BANDS)
    assert sorted(set(rows.semantic_label)) == BANDS
    want = sorted(g["start_time"].replace("T", " ").rstrip("Z") for g in granules)
    assert sorted(set(rows.start_time)) == want
    assert sorted(flags.start_time) == want and set(flags.semantic_label) == {"filled"}
    assert "Temporal type: ............. absolute" in snap["info"]
    values = snap["values"].reshape(bands.shape)
    order = [want.index(t) for t in rows.start_time[::len(BANDS)]]
    assert order == sorted(order)
    assert np.isfinite(values).all()
    assert values.min() > -0.5 and values.max() < 1.5  # reflectance
    clear = (valid == 1)[:, None] & np.isfinite(bands)
    assert clear.any()
    np.testing.assert_array_equal(values[clear], bands[clear])  # observed values kept where clear
    flag = snap["flag_values"]
    assert set(np.unique(flag)) <= {0.0, 1.0}
    np.testing.assert_array_equal(flag == 0, clear.all(axis=1))


def test_help_exits_0(site):
    proc = subprocess.run([GRASS, "--tmp-location", "EPSG:32631", "--exec", MODULE, "--help"], env=site["env"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "optical=name" in proc.stderr + proc.stdout and "--overwrite" in proc.stderr + proc.stdout


def test_make_setup_installed_it_on_the_default_addon_path():
    """After `make setup` (which make test runs first), a plain GRASS session finds the module."""
    env = {k: v for k, v in os.environ.items() if k not in ("GRASS_ADDON_BASE", "GRASS_ADDON_PATH", "GISRC")}
    proc = subprocess.run([GRASS, "--tmp-location", "EPSG:32631", "--exec", MODULE, "--help"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "optical=name" in proc.stderr + proc.stdout


def test_installed_with_the_venv_python(site):
    script = site["script"]
    assert os.access(script, os.X_OK)
    assert script.read_text().splitlines()[0] == f"#!{ROOT / '.venv' / 'bin' / 'python'}"


def test_trained_in_place_output_strds(first, site):
    check_series(site, first)
    assert (site["root"] / "model.pt").is_file()
    assert "trained in place" in said(first["proc"])


def test_only_the_current_mapset_changed(first, overwritten):
    assert set(first["before"]) == {"PERMANENT", "ingest_S1", "ingest_S2"}
    assert first["after"] == first["before"]
    assert overwritten["after"] == overwritten["before"] == first["before"]


def test_existing_output_refused_without_overwrite(refused):
    assert refused["proc"].returncode != 0
    err = said(refused["proc"])
    assert "S2_gf" in err and "--overwrite" in err and "nothing was written" in err
    assert refused["after"] == refused["before"]


def test_overwrite_with_the_saved_model_and_a_mask_strds(overwritten, site):
    check_series(site, overwritten)  # registered anew: still one map per date and band, no doubles
    assert "model.pt" in said(overwritten["proc"])


def test_result_usable_by_t_rast_series(overwritten, site):
    g = site["g"]
    g.run("t.rast.series", "input=S2_gf", "where=semantic_label = 'B08'", "method=maximum", "output=nir_max",
          "--overwrite")
    nir_max = read_maps(site, ["nir_max"])[0]
    values = overwritten["values"].reshape(-1, len(BANDS), *nir_max.shape)
    np.testing.assert_allclose(nir_max, values[:, 3].max(axis=0), rtol=1e-6)


@pytest.mark.parametrize("name", ["NoSuchS2@ingest_S2", "NoSuchS2"])
def test_bad_input_name_fails_naming_it(site, name, first):
    before = hash_tree(site["project"] / "user")
    proc = site["g"].run(MODULE, f"optical={name}", "sar=S1@ingest_S1", "output=S2_bad", check=False)
    assert proc.returncode != 0
    assert name in said(proc) and "not found" in said(proc)
    assert hash_tree(site["project"] / "user") == before


def test_mapset_off_the_search_path_is_named(site, first):
    site["g"].run("g.mapsets", "mapset=ingest_S1", "operation=remove")
    try:
        proc = site["g"].run(MODULE, "optical=S2@ingest_S2", "sar=S1@ingest_S1", "output=S2_bad", check=False)
    finally:
        site["g"].run("g.mapsets", "mapset=ingest_S1", "operation=add")
    assert proc.returncode != 0 and "g.mapsets mapset=ingest_S1 operation=add" in said(proc)


def test_memory_limit_and_dry_run(site, first):
    from stfuse.fusion import estimate_bytes

    g = site["g"]
    before = hash_tree(site["project"] / "user")
    plan = g.fill("-p", "mask_band=SCL", "output=S2_dry").stdout
    n = len(site["states"]["S2"]["granules"])
    want = estimate_bytes(n, len(BANDS) + 1 + 2, len(BANDS), 32, 32) / 2**20
    assert f"memory: {want:.1f} MB" in plan and "paired" in plan
    proc = g.fill("mask_band=SCL", "output=S2_big", "memory=0", check=False)
    assert proc.returncode != 0 and "memory=0 MB" in said(proc)
    assert hash_tree(site["project"] / "user") == before


def test_refused_in_an_stfuse_mapset_and_over_its_inputs(site, first):
    own = site["project"] / "ingest_S2"
    before = hash_tree(own)
    proc = Grass(site["project"], "ingest_S2", site["env"]).fill("mask_band=SCL", "output=S2_here", check=False)
    assert proc.returncode != 0 and "<ingest_S2> is one of stfuse's own" in said(proc)
    assert hash_tree(own) == before
    proc = site["g"].run(MODULE, "optical=S2_gf", "sar=S1@ingest_S1", "output=S2_gf", "--overwrite", check=False)
    assert proc.returncode != 0 and "S2_gf@user is one of the input datasets" in said(proc)


def test_validity_without_a_mask_is_nodata_as_in_ingest():
    """No mask and no mask band: 1 where every band has data, 0 where some have, null where none has."""
    from types import SimpleNamespace

    from stfuse.fusion import derive_validity

    cube = np.ones((1, 4, 1, 3), np.float32)  # two bands, the validity slot, one SAR band; three cells
    cube[0, 0, 0, 1] = np.nan  # one band missing
    cube[0, :2, 0, 2] = np.nan  # both missing
    derive_validity(cube, SimpleNamespace(bands=["B04", "B08"], mask=None, mask_band=None))
    np.testing.assert_array_equal(cube[0, 2, 0], [1, 0, np.nan])


def test_model_of_other_channels_refused_naming_them(site, first):
    before = hash_tree(site["project"] / "user")
    proc = site["g"].fill("mask_band=SCL", "bands=B02,B03,B04", "output=S2_three",
                          f"model={site['root'] / 'model.pt'}", check=False)
    assert proc.returncode != 0
    assert "model.pt" in said(proc) and "missing ['B08@t'" in said(proc)
    assert hash_tree(site["project"] / "user") == before


def test_dry_run_lists_unpaired_dates(site, first):
    plan = site["g"].fill("-p", "mask_band=SCL", "output=S2_dry", "max_gap=0.01").stdout
    n = len(site["states"]["S2"]["granules"])
    assert plan.count("unpaired: S2_") == n and "within 0.01 days" in plan


@pytest.fixture(scope="module")
def in_blocks(first, site):
    """`first` again (the same training in place, one epoch on 16-cell tiles), in 2 x 2 blocks of up to 24 cells
    (halo 16) instead of one block: the uneven cores 24 and 8 cells wide."""
    proc = site["g"].fill("mask_band=SCL", "output=S2_blocks", "epochs=1", "tile_size=16", "nprocs=1", "blocks=24")
    return dict(proc=proc, **snapshot(site, "S2_blocks"))


def test_blocks_give_the_one_block_maps_bit_for_bit(first, in_blocks, site):
    check_series(site, in_blocks)
    assert "block r0001c0001 (4 of 4)" in said(in_blocks["proc"])
    assert list(in_blocks["rows"].start_time) == list(first["rows"].start_time)
    assert list(in_blocks["rows"].semantic_label) == list(first["rows"].semantic_label)
    for key in ("values", "flag_values"):
        assert in_blocks[key].shape == first[key].shape
        assert in_blocks[key].tobytes() == first[key].tobytes(), key


def test_block_plan_printed_and_checked(site, first):
    from stfuse.fusion import ESTIMATE_MARGIN, estimate_bytes

    g = site["g"]
    before = hash_tree(site["project"] / "user")
    n = len(site["states"]["S2"]["granules"])
    plan = g.fill("-p", "mask_band=SCL", "output=S2_dry", "tile_size=8", "blocks=16").stdout
    assert "blocks: 4 of up to 16 x 16 cells (halo 8)" in plan
    # memory= bounds one block: the largest read window, a 16-cell core with an 8-cell halo inside the region
    want = max(estimate_bytes(n, len(BANDS) + 1 + 2, len(BANDS), 24, 24), int(4 * 32 * 32 * ESTIMATE_MARGIN))
    assert f"memory: {want / 2**20:.1f} MB" in plan
    assert "blocks: 1 of up to 32 x 32 cells (halo 32)" in g.fill("-p", "mask_band=SCL", "output=S2_dry").stdout
    proc = g.fill("mask_band=SCL", "output=S2_small", "tile_size=8", "blocks=8", check=False)
    assert proc.returncode != 0 and "blocks=8" in said(proc) and "use blocks=9 or more" in said(proc)
    proc = g.fill("mask_band=SCL", "output=S2_big", "tile_size=8", "blocks=16", "memory=0.01", check=False)
    assert proc.returncode != 0 and "the largest of its 4 blocks (blocks=16)" in said(proc)
    assert hash_tree(site["project"] / "user") == before


def test_dates_gives_exactly_the_requested_start_times(site, first):
    """dates=5D: a map set every 5 days from the first to the last optical UTC day; the days without an optical
    date are predicted everywhere (flag 1); a comma list gives those times; a bad value is named."""
    g = site["g"]
    granules = site["states"]["S2"]["granules"]
    times = pd.to_datetime([gr["start_time"] for gr in granules], utc=True)
    grid = pd.date_range(times.min().floor("D"), times.max().floor("D"), freq="5D")
    days = set(times.floor("D"))
    query = [t for t in grid if t not in days]
    assert query and len(query) < len(grid)  # both kinds of date
    g.fill("mask_band=SCL", "output=S2_any", f"model={site['root'] / 'model.pt'}", "dates=5D")
    snap = snapshot(site, "S2_any")
    rows, flags = snap["rows"], snap["flags"]
    want = [t.strftime("%Y-%m-%d %H:%M:%S") for t in grid]
    assert sorted(set(rows.start_time)) == want and sorted(flags.start_time) == want
    assert len(rows) == len(grid) * len(BANDS) and sorted(set(rows.semantic_label)) == BANDS
    values, flag = snap["values"], snap["flag_values"]
    assert np.isfinite(values).all() and values.min() > -0.5 and values.max() < 1.5
    is_query = np.array([pd.Timestamp(t, tz="UTC") in query for t in flags.start_time])
    assert (flag[is_query] == 1).all() and set(np.unique(flag)) <= {0.0, 1.0}
    # a requested day with an optical date is that date filled: the same maps as the observed-mode run
    same_day = [t for t in grid if t in days]
    opt_time = {t.floor("D"): t.strftime("%Y-%m-%d %H:%M:%S") for t in times}
    for t in same_day[:2]:
        here = rows[rows.start_time == t.strftime("%Y-%m-%d %H:%M:%S")].sort_values("semantic_label")
        there = first["rows"].reset_index(drop=True)
        there = there[there.start_time == opt_time[t]].sort_values("semantic_label")
        np.testing.assert_allclose(values[here.index], first["values"][there.index], atol=1e-5)
    # a comma list: one day with an optical date (at its time) and one without
    pick = [times[0].strftime("%Y-%m-%dT%H:%M:%S"), query[0].strftime("%Y-%m-%d")]
    g.fill("mask_band=SCL", "output=S2_two", f"model={site['root'] / 'model.pt'}", f"dates={','.join(pick)}")
    two = g.listing("S2_two")
    assert sorted(set(two.start_time)) == sorted([times[0].strftime("%Y-%m-%d %H:%M:%S"),
                                                  query[0].strftime("%Y-%m-%d %H:%M:%S")])
    before = hash_tree(site["project"] / "user")
    proc = g.fill("mask_band=SCL", "output=S2_bad", "dates=2021-05-01,someday", check=False)
    assert proc.returncode != 0 and "dates=2021-05-01,someday" in said(proc) and "'someday'" in said(proc)
    assert hash_tree(site["project"] / "user") == before
