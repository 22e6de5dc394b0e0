"""The GRASS module t.rast.to.groups (stfuse.groups_module), installed with scripts/install_grass_addon.sh and run
the GRASS way (`grass <project>/<mapset> --exec t.rast.to.groups ...`) on a tiny scene in a throwaway project."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from _scene import ROOT, ingest_tiny
from test_module_grass import Grass, hash_tree, said

pytestmark = pytest.mark.grass

MODULE = "t.rast.to.groups"
GRASS = os.environ.get("STFUSE_GRASS", "grass")
LABELS = ["B08", "B04", "B02"]  # not sorted: the group order must be the one given


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The tiny scene in a fresh project, the modules installed into a temporary addon base, a user mapset `user`
    with ingest_S2 on its search path and a static map `dem` (semantic label DEM) of its own."""
    if shutil.which(GRASS) is None:
        pytest.skip("GRASS GIS is not installed")
    root = tmp_path_factory.mktemp("groups")
    _, project, states = ingest_tiny(root)
    env = dict(os.environ, GRASS_ADDON_BASE=str(root / "addons"))
    subprocess.run([str(ROOT / "scripts" / "install_grass_addon.sh")], env=env, check=True, capture_output=True)
    project_dir = Path(project["project"])
    subprocess.run([GRASS, "-e", "-c", str(project_dir / "user")], env=env, check=True, capture_output=True)
    g = Grass(project_dir, "user", env)
    g.run("sh", "-c", "g.mapsets mapset=ingest_S2 operation=add && r.mapcalc expression='dem = 100 + row()' "
                      "&& r.semantic.label map=dem semantic_label=DEM")
    return dict(root=root, project=project_dir, granules=states["S2"]["granules"], env=env, g=g)


def others(site) -> dict:
    return {m.name: hash_tree(m) for m in sorted(site["project"].iterdir()) if m.is_dir() and m.name != "user"}


def in_one_session(site, script: str) -> list[list[str]]:
    """Run a shell script in one GRASS session; its stdout split into blocks at lines '---'."""
    out = site["g"].run("sh", "-c", script).stdout
    return [block.split() for block in out.split("---\n")[:-1]]


def group_listing(site, names: list[str], subgroup: bool = False) -> dict[str, list[str]]:
    """i.group -g of each group (or of its subgroup of the same name): the maps in group order."""
    sub = " subgroup={n}" if subgroup else ""
    script = "; ".join(f"i.group -g group={n}{sub.format(n=n)}; echo ---" for n in names)
    return dict(zip(names, in_one_session(site, script)))


def semantic_labels(site, maps: list[str]) -> list[str]:
    script = "; ".join(f"r.info -e map={m} | sed -n 's/^semantic_label=//p'; echo ---" for m in maps)
    return [" ".join(b) for b in in_one_session(site, script)]


def group_names(site) -> set[str]:
    return set(site["g"].run("g.list", "type=group", "mapset=user").stdout.split())


def expected(site, prefix: str, labels: list[str], static=("dem@user",)) -> dict[str, list[str]]:
    def band(granule, label):
        return granule["mask_band"] if label == "SCL" else granule["maps"][label]

    return {f"{prefix}_{g['start_time'].replace('-', '').replace(':', '').rstrip('Z')}":
            [band(g, b) for b in labels] + list(static) for g in site["granules"]}


@pytest.fixture(scope="module")
def made(site):
    """Groups of the bands B08, B04, B02 plus the static map, with subgroups."""
    before = others(site)
    proc = site["g"].run(MODULE, "input=S2@ingest_S2", f"labels={','.join(LABELS)}", "static=dem")
    return dict(proc=proc, before=before, after=others(site))


def test_help_exits_0(site):
    proc = subprocess.run([GRASS, "--tmp-location", "EPSG:32631", "--exec", MODULE, "--help"], env=site["env"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    text = proc.stderr + proc.stdout
    assert "input=name" in text and "labels=" in text and "static=" in text and "--overwrite" in text


def test_one_group_per_granule_maps_in_label_order(made, site):
    want = expected(site, "S2", LABELS)
    assert len(want) == len(site["granules"]) > 1
    assert group_names(site) == set(want)
    assert group_listing(site, sorted(want)) == want
    assert group_listing(site, sorted(want), subgroup=True) == want
    assert f"{len(want)} imagery group(s) of 4 map(s) each" in said(made["proc"])


def test_semantic_labels_kept(made, site):
    maps = next(iter(expected(site, "S2", LABELS).values()))
    assert semantic_labels(site, maps) == LABELS + ["DEM"]


def test_only_the_current_mapset_changed(made):
    assert set(made["before"]) == {"PERMANENT", "ingest_S1", "ingest_S2"}
    assert made["after"] == made["before"]


def test_default_labels_sorted_without_subgroups(made, site):
    """No labels=: every label sorted (SCL included); an unqualified STRDS found on the search path; -s."""
    site["g"].run(MODULE, "-s", "input=S2", "prefix=all")
    want = expected(site, "all", ["B02", "B03", "B04", "B08", "SCL"], static=())
    assert group_listing(site, sorted(want)) == want
    assert in_one_session(site, "; ".join(f"i.group -sg group={n}; echo ---" for n in sorted(want))) == \
        [[]] * len(want)


def refused(site, *args) -> str:
    """Run the module expecting a refusal; the user mapset must be unchanged. Returns what it said."""
    before = hash_tree(site["project"] / "user")
    proc = site["g"].run(MODULE, *args, check=False)
    assert proc.returncode != 0
    assert hash_tree(site["project"] / "user") == before
    return said(proc)


@pytest.mark.parametrize("name", ["NoSuchS2@ingest_S2", "NoSuchS2"])
def test_bad_strds_named(made, site, name):
    err = refused(site, f"input={name}")
    assert name in err and "not found" in err


@pytest.mark.parametrize("labels, says", [("B08,B99", "S2@ingest_S2 has no maps with semantic label B99"),
                                          ("B08,B08", "labels=: B08 given more than once")])
def test_bad_labels_named(made, site, labels, says):
    assert says in refused(site, "input=S2@ingest_S2", f"labels={labels}", "prefix=bad")


def test_missing_static_map_named(made, site):
    err = refused(site, "input=S2@ingest_S2", "static=nodem", "prefix=bad")
    assert "static=nodem" in err and "not found" in err


def test_existing_groups_refused_without_overwrite(made, site):
    err = refused(site, "input=S2@ingest_S2", f"labels={','.join(LABELS)}")
    first = sorted(expected(site, "S2", LABELS))[0]
    assert first in err and "--overwrite" in err and "nothing was written" in err


def test_granule_lacking_a_label_named(made, site):
    """An STRDS of the user's where one granule has no B04: refused, naming the granule and the label."""
    granules = site["granules"]
    maps = [g["maps"]["B08"] for g in granules] + [g["maps"]["B04"] for g in granules[1:]]
    before = others(site)
    site["g"].run("sh", "-c", "t.create output=part type=strds temporaltype=absolute title=part description=part "
                              f"&& t.register input=part maps={','.join(maps)}")
    err = refused(site, "input=part", "labels=B08,B04", "prefix=bad")
    assert "part@user" in err and "B04" in err and granules[0]["start_time"] in err
    assert others(site) == before


def test_overwrite_replaces_groups(made, site):
    """--overwrite makes each group anew (i.group alone would append to it); the other groups are kept."""
    site["g"].run(MODULE, "input=S2@ingest_S2", "labels=B04", "--overwrite")
    want = expected(site, "S2", ["B04"], static=())
    assert group_listing(site, sorted(want)) == want
    assert group_listing(site, sorted(want), subgroup=True) == want
    assert set(expected(site, "all", [], static=())) <= group_names(site)
