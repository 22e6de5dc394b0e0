"""Imagery groups from an STRDS inside a running GRASS session (the engine of the module t.rast.to.groups).

:func:`strds_to_groups` makes one imagery group per granule (acquisition: the maps sharing a start time,
:func:`stfuse.temporal.granules`) of an STRDS, named ``<prefix>_<YYYYmmddTHHMMSS>`` (UTC), holding the
granule's maps in the order of the given semantic labels, then the static maps; by default a subgroup of
the same name holds the same maps (what i.cluster, i.maxlik or r.learn.ml2 read). The maps keep their own
semantic labels (i.group only refers to them). It writes only into the current mapset, and only after every
check has passed: the STRDS, the labels, every granule's maps, the static maps, the group names.
"""

from __future__ import annotations

import re
from pathlib import Path

from . import temporal

#: a GRASS element name: a letter, then letters, digits, _ (as stfuse.fusion checks output names)
LEGAL_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


class GroupsError(ValueError):
    """Bad input to :func:`strds_to_groups`; the message names the option, STRDS, label, map or group at fault."""


def _resolve(gs, tgis, dbif, strds: str) -> str:
    """The full id of the STRDS (current mapset first, then the search path), as i.fusion.temporal finds it."""
    from .fusion import FusionError, resolve_strds

    try:
        return resolve_strds(gs, tgis, dbif, strds, "input")
    except FusionError as exc:
        raise GroupsError(str(exc)) from None


def _registered(tgis, strds_id: str):
    try:
        return temporal.registered_maps(tgis, strds_id)
    except temporal.DatasetError as exc:
        raise GroupsError(f"input={strds_id}: {exc}") from None


def choose_labels(maps, strds_id: str, labels) -> list[str]:
    """The labels in group order: as given (no repeats), else every semantic label of the STRDS, sorted."""
    if labels:
        labels = list(labels)
        repeated = sorted({b for b in labels if labels.count(b) > 1})
        if repeated:
            raise GroupsError(f"labels=: {', '.join(repeated)} given more than once")
        return labels
    found = sorted(set(maps.semantic_label.dropna()) - {""})
    if not found:
        raise GroupsError(f"input={strds_id}: its maps have no semantic labels; set them with r.semantic.label "
                          "or t.register, or name the labels with labels=")
    return found


def _check_unique(maps, strds_id: str, labels: list[str]) -> None:
    """Two maps of one label at one start time would make the group's content a guess: refuse them."""
    chosen = maps[maps.semantic_label.isin(labels)]
    twice = chosen[chosen.duplicated(["start_time", "semantic_label"], keep=False)]
    if len(twice):
        r = twice.iloc[0]
        both = ", ".join(twice[(twice.start_time == r.start_time) & (twice.semantic_label == r.semantic_label)].id)
        raise GroupsError(f"input={strds_id}: the granule at {temporal.iso(r.start_time)} has more than one map "
                          f"with semantic label {r.semantic_label} ({both})")


def granule_table(tgis, strds_id: str, labels) -> tuple[list[str], object]:
    """(labels in group order, one row per granule: id, start_time, a map id per label); GroupsError naming
    the STRDS and the label no granule has, or the granule that lacks one."""
    maps = _registered(tgis, strds_id)
    labels = choose_labels(maps, strds_id, labels)
    _check_unique(maps, strds_id, labels)
    try:
        return labels, temporal.granules(tgis, strds_id, labels)
    except temporal.DatasetError as exc:
        raise GroupsError(f"input={strds_id}: {exc}") from None


def resolve_static(gs, static) -> list[str]:
    """Full ids of the static raster maps (searched as GRASS finds maps); GroupsError naming a missing one."""
    out = []
    for name in static:
        found = gs.find_file(name, element="cell")
        if not found["file"]:
            raise GroupsError(f"static={name}: raster map <{name}> not found (in the current mapset and on the "
                              "search path; add its mapset with g.mapsets)")
        out.append(found["fullname"])
    repeated = sorted({m for m in out if out.count(m) > 1})
    if repeated:
        raise GroupsError(f"static=: {', '.join(repeated)} given more than once")
    return out


def _check_mapset(gs) -> None:
    """Refuse one of stfuse's own mapsets: a rerun of the workflow replaces them (as i.fusion.temporal does)."""
    from .grass import read_marker

    env = gs.gisenv()
    if read_marker(Path(env["GISDBASE"], env["LOCATION_NAME"], env["MAPSET"])) is not None:
        raise GroupsError(f"the current mapset <{env['MAPSET']}> is one of stfuse's own (a rerun of the workflow "
                          "replaces it); make the groups in a mapset of your own, e.g. grass -c <project>/analysis")


def _check_prefix(prefix: str) -> None:
    if "@" in prefix:
        raise GroupsError(f"prefix={prefix}: groups are made in the current mapset; give the prefix without @mapset")
    if not LEGAL_NAME.fullmatch(prefix):
        raise GroupsError(f"prefix={prefix}: not a legal group name (a letter, then letters, digits, _)")


def existing_groups(gs, names: list[str]) -> list[str]:
    """The names among `names` of groups that exist in the current mapset."""
    mapset = gs.gisenv()["MAPSET"]
    return [n for n in names if gs.find_file(n, element="group", mapset=mapset)["file"]]


def plan_groups(gs, tgis, dbif, strds: str, *, labels=None, static=(), prefix=None, overwrite=False) -> list[dict]:
    """Every check, nothing written: one dict per group to make (name, start_time, maps, labels, static)."""
    _check_mapset(gs)
    strds_id = _resolve(gs, tgis, dbif, strds)
    prefix = prefix or strds_id.split("@")[0]
    _check_prefix(prefix)
    labels, table = granule_table(tgis, strds_id, labels)
    static_maps = resolve_static(gs, static)
    plan = [dict(name=f"{prefix}_{temporal.stamp(r.start_time)}", start_time=temporal.iso(r.start_time),
                 maps=[r._asdict()[b] for b in labels] + static_maps, labels=labels, static=static_maps)
            for r in table.itertuples(index=False)]
    taken = existing_groups(gs, [g["name"] for g in plan])
    if taken and not overwrite:
        more = f" and {len(taken) - 3} more" if len(taken) > 3 else ""
        raise GroupsError(f"input={strds_id}: imagery group(s) <{'>, <'.join(taken[:3])}>{more} already exist in the "
                          f"current mapset <{gs.gisenv()['MAPSET']}>; nothing was written. Use --overwrite to "
                          "replace them")
    return plan


def write_group(gs, group: dict, *, subgroup: bool = True, replace: bool = False) -> None:
    """Make one group (and its subgroup) with the maps in order; an existing group is removed first when
    `replace` (i.group appends to an existing group, so replacing it means removing it)."""
    if replace and existing_groups(gs, [group["name"]]):
        gs.run_command("g.remove", type="group", name=group["name"], flags="f", quiet=True)
    # i.group keeps the order given: the order of the labels, then the static maps.
    args = dict(group=group["name"], input=",".join(group["maps"]), quiet=True)
    if subgroup:
        args["subgroup"] = group["name"]
    gs.run_command("i.group", **args)


def strds_to_groups(strds: str, *, labels=None, static=(), prefix=None, subgroup: bool = True,
                    overwrite: bool = False, progress=None) -> list[dict]:
    """One imagery group per granule of STRDS `strds`, in the current mapset of the running GRASS session.

    Group ``<prefix>_<YYYYmmddTHHMMSS>`` (default prefix: the STRDS's name; UTC start time) holds the
    granule's maps in the order of `labels` (semantic labels; default: every label of the STRDS, sorted),
    then the `static` raster maps; with `subgroup` a subgroup of the same name holds the same maps.
    Existing groups are refused unless `overwrite`. GroupsError for bad input, before anything is written.
    ``progress(done, total, group)`` is called after each group. Returns one dict per group: name (the
    group's full id ``name@mapset``), start_time (ISO, UTC), maps (full ids, in group order), labels (those
    of the granule's maps, in order) and static (the static maps' full ids, the last maps).
    """
    import grass.script as gs
    import grass.temporal as tgis

    tgis.init()
    dbif = tgis.SQLDatabaseInterfaceConnection()
    dbif.connect()
    try:
        plan = plan_groups(gs, tgis, dbif, strds, labels=labels, static=static, prefix=prefix, overwrite=overwrite)
    finally:
        dbif.close()
    mapset = gs.gisenv()["MAPSET"]
    out = []
    for done, group in enumerate(plan, 1):
        write_group(gs, group, subgroup=subgroup, replace=overwrite)
        out.append(dict(group, name=f"{group['name']}@{mapset}"))
        if progress:
            progress(done, len(plan), out[-1])
    return out
