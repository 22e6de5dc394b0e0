"""Former home of the stage 2-4 steps; kept so that ``stfuse.bridge.<name>`` still works.

The code now lives where its concept does: GRASS stage sessions in :mod:`stfuse.grass`, the pairing and
groups steps in :mod:`stfuse.steps.pairing` / :mod:`stfuse.steps.groups`, reading cubes from GRASS and the
whole-region cube in :mod:`stfuse.cube`, the block steps in :mod:`stfuse.steps`.
"""

from .cube import (CUBE_CHUNK_DATES, channel_layout, cube_dates, cube_step, hide, load_cube,  # noqa: F401
                   read_cube, read_cube_step, tiles_step)
from .grass import map_mapset, stage_mapset, stage_session  # noqa: F401
from .steps.groups import groups_step, import_static  # noqa: F401
from .steps.pairing import (READ_CHUNK_BYTES, clear_fractions, data_fractions, optical_table,  # noqa: F401
                            pairing_step, sar_table)
