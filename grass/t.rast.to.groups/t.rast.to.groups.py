#!/usr/bin/env python3

############################################################################
#
# MODULE:       t.rast.to.groups
# AUTHOR(S):    stfuse developers
#
# PURPOSE:      Creates one imagery group per granule (acquisition) of a space time
#               raster dataset, the maps in the order of given semantic labels,
#               static raster maps appended.
# COPYRIGHT:    (C) 2026 by the stfuse developers
#
#  This program is free software; you can redistribute it and/or modify
#  it under the terms of the GNU General Public License as published by
#  the Free Software Foundation; either version 2 of the License, or
#  (at your option) any later version.
#
#############################################################################

# %module
# % description: Creates one imagery group per granule (start time) of a space time raster dataset, maps ordered by semantic label.
# % keyword: temporal
# % keyword: imagery
# % keyword: group
# % keyword: semantic label
# % keyword: time
# % keyword: Sentinel
# % overwrite: yes
# %end

# %option G_OPT_STRDS_INPUT
# % description: Space time raster dataset (bands as semantic labels, e.g. B02, B03, B04, B08)
# %end

# %option
# % key: labels
# % type: string
# % required: no
# % multiple: yes
# % description: Semantic labels of the maps of each group, in group order (default: every label, sorted)
# %end

# %option G_OPT_R_INPUTS
# % key: static
# % required: no
# % description: Raster maps added to every group after the granule's maps (e.g. a DEM)
# %end

# %option
# % key: prefix
# % type: string
# % required: no
# % description: Prefix of the group names <prefix>_<YYYYmmddTHHMMSS> (default: the name of input)
# %end

# %flag
# % key: s
# % description: Do not create a subgroup of the same name in each group
# %end

import sys

import grass.script as gs


def _list(text):
    return [x.strip() for x in text.split(",") if x.strip()] if text else []


def _progress(done, total, group):
    gs.message(f"{group['name']}: {', '.join(group['maps'])}")
    gs.percent(done, total, 1)


def _stop_tgis():
    """Stop TGIS's server processes before the interpreter exits. GRASS 8.2 leaves that to an atexit hook
    that runs after multiprocessing's own: while multiprocessing terminates and then joins its children,
    TGIS's checker thread can restart the C-library server, and the exit waits on it forever."""
    tgis = sys.modules.get("grass.temporal")
    if tgis is not None:
        tgis.stop_subprocesses()


def main(options, flags):
    try:  # stfuse lives in the Python environment of this script's interpreter
        from stfuse import groups_module
    except ImportError as exc:
        gs.fatal(f"t.rast.to.groups needs the stfuse package ({exc}); install it with scripts/install_grass_addon.sh")
    try:
        groups = groups_module.strds_to_groups(options["input"], labels=_list(options["labels"]) or None,
                                               static=_list(options["static"]), prefix=options["prefix"] or None,
                                               subgroup=not flags["s"], overwrite=gs.overwrite(),
                                               progress=_progress)
    except groups_module.GroupsError as exc:
        gs.fatal(str(exc))
    finally:
        _stop_tgis()
    gs.message(f"{len(groups)} imagery group(s) of {len(groups[0]['maps'])} map(s) each "
               f"({', '.join(groups[0]['labels'] + groups[0]['static'])})")
    return 0


if __name__ == "__main__":
    sys.exit(main(*gs.parser()))
