#!/usr/bin/env python3

############################################################################
#
# MODULE:       i.fusion.temporal
# AUTHOR(S):    stfuse developers
#
# PURPOSE:      Fills cloud gaps of an optical space time raster dataset (Sentinel-2)
#               with a SAR space time raster dataset (Sentinel-1) by a gap-filling
#               neural network, into a new space time raster dataset.
# COPYRIGHT:    (C) 2026 by the stfuse developers
#
#  This program is free software; you can redistribute it and/or modify
#  it under the terms of the GNU General Public License as published by
#  the Free Software Foundation; either version 2 of the License, or
#  (at your option) any later version.
#
#############################################################################

# %module
# % description: Fills cloud gaps in an optical space time raster dataset with SAR (Sentinel-1) by a neural network.
# % keyword: imagery
# % keyword: temporal
# % keyword: fusion
# % keyword: cloud
# % keyword: gap filling
# % keyword: Sentinel
# % keyword: SAR
# % keyword: deep learning
# %end

# %option G_OPT_STRDS_INPUT
# % key: optical
# % description: Optical space time raster dataset (bands as semantic labels, e.g. B02, B03, B04, B08)
# % guisection: Input
# %end

# %option G_OPT_STRDS_INPUT
# % key: sar
# % description: SAR space time raster dataset (bands as semantic labels, e.g. VV, VH)
# % guisection: Input
# %end

# %option G_OPT_STRDS_INPUT
# % key: mask
# % required: no
# % description: Validity space time raster dataset (1 clear, 0 cloudy, null no data), one map per optical date
# % guisection: Mask
# %end

# %option
# % key: mask_band
# % type: string
# % required: no
# % description: Semantic label of a classification band of the optical dataset (e.g. SCL)
# % guisection: Mask
# %end

# %option
# % key: valid_classes
# % type: integer
# % required: no
# % multiple: yes
# % answer: 4,5,6,7,11
# % description: Classes of mask_band that count as clear (Sentinel-2 SCL: 4,5,6,7,11)
# % guisection: Mask
# %end

# %option
# % key: bands
# % type: string
# % required: no
# % multiple: yes
# % description: Optical bands (semantic labels) in channel order (default: those of model, else all but mask_band)
# % guisection: Input
# %end

# %option
# % key: sar_bands
# % type: string
# % required: no
# % multiple: yes
# % description: SAR bands (semantic labels) in channel order (default: those of model, else all)
# % guisection: Input
# %end

# %option G_OPT_STRDS_OUTPUT
# % description: Name of the gap-filled output space time raster dataset
# %end

# %option G_OPT_STRDS_OUTPUT
# % key: flag_output
# % required: no
# % description: Name of the output dataset of filled-cell flags (1 filled, 0 observed; default: <output>_flag)
# %end

# %option
# % key: max_gap
# % type: double
# % required: no
# % answer: 6
# % description: Largest time between an optical date and its SAR partner (days, inclusive)
# %end

# %option
# % key: dates
# % type: string
# % required: no
# % answer: observed
# % label: Start times of the output: observed (the optical dates), a step (5D, 10D, SMS = 1st and 15th, MS), or dates
# % description: A step runs from the first to the last optical day (UTC); a comma list of dates or times is taken as UTC
# %end

# %option G_OPT_F_INPUT
# % key: model
# % required: no
# % label: Checkpoint trained by the stfuse workflow (default: train a model in place)
# % description: e.g. results/<study>/main/model/model.pt of the stfuse workflow
# % guisection: Model
# %end

# %option G_OPT_F_OUTPUT
# % key: save_model
# % required: no
# % description: File to keep the checkpoint trained in place (reusable as model=)
# % guisection: Model
# %end

# %option
# % key: epochs
# % type: integer
# % required: no
# % answer: 5
# % options: 1-10000
# % description: Training epochs of a model trained in place
# % guisection: Model
# %end

# %option
# % key: tile_size
# % type: integer
# % required: no
# % answer: 32
# % options: 4-4096
# % description: Tile size (cells, a multiple of 4) of a model trained in place
# % guisection: Model
# %end

# %option
# % key: blocks
# % type: integer
# % required: no
# % label: Edge of the spatial blocks the region is processed in, one at a time (cells; default: one block)
# % description: Larger than tile_size (the halo); the output is the same for any value, bit for bit
# %end

# %option G_OPT_MEMORYMB
# % answer: 4096
# % label: Most memory one block may take (MB; by default the whole region is one block)
# %end

# %option G_OPT_M_NPROCS
# % description: Number of threads for training and inference
# %end

# %flag
# % key: c
# % description: Run the model on the CPU even where a GPU (CUDA) is available
# %end

# %flag
# % key: p
# % description: Print the pairing and the memory estimate, write nothing
# %end

# %rules
# % exclusive: mask, mask_band
# % exclusive: model, save_model
# %end

import atexit
import logging
import shutil
import sys
import tempfile

import grass.script as gs


class _ToGrass(logging.Handler):
    """stfuse's log lines as GRASS messages: warnings as warnings, the rest verbose (--v shows them)."""

    def emit(self, record):
        text = record.getMessage()
        if record.levelno >= logging.WARNING:
            gs.warning(text)
        else:
            gs.verbose(text)


def _progress(fraction, message):
    if message:
        gs.message(message)
    else:
        gs.percent(int(round(100 * fraction)), 100, 1)


def _list(text):
    return [x.strip() for x in text.split(",") if x.strip()] if text else None


def _arguments(options, flags, workdir):
    return dict(
        flag_output=options["flag_output"] or None,
        bands=_list(options["bands"]),
        sar_bands=_list(options["sar_bands"]),
        mask=options["mask"] or None,
        mask_band=options["mask_band"] or None,
        valid_classes=[int(c) for c in _list(options["valid_classes"]) or []] or None,
        max_gap_days=float(options["max_gap"]),
        model=options["model"] or None,
        save_model=options["save_model"] or None,
        epochs=int(options["epochs"]),
        tile_size=int(options["tile_size"]),
        memory_mb=float(options["memory"]),
        block_size=int(options["blocks"]) if options["blocks"] else None,
        threads=int(options["nprocs"]),
        device="cpu" if flags["c"] else "auto",
        workdir=workdir,
        overwrite=gs.overwrite(),
        dry_run=flags["p"],
        command="i.fusion.temporal " + " ".join(sys.argv[1:]),
        progress=_progress,
        dates=options["dates"] or "observed",
    )


def main(options, flags):
    try:  # stfuse (and PyTorch) live in the Python environment of this script's interpreter
        from stfuse import fusion, grass, temporal
    except ImportError as exc:
        gs.fatal(f"i.fusion.temporal needs the stfuse package ({exc}); install it with scripts/install_grass_addon.sh")
    if float(options["max_gap"]) <= 0:
        gs.fatal(f"max_gap={options['max_gap']}: must be > 0 days")
    if int(options["nprocs"]) < 1:
        gs.fatal(f"nprocs={options['nprocs']}: must be at least 1")
    gs.use_temp_region()  # nothing here changes the region; any change stays in this module's run
    workdir = tempfile.mkdtemp(prefix="i.fusion.temporal.")
    atexit.register(shutil.rmtree, workdir, ignore_errors=True)
    logger = logging.getLogger("stfuse")
    logger.setLevel(logging.INFO)
    logger.addHandler(_ToGrass())
    logger.propagate = False  # GRASS's message functions only, not a second copy on stderr
    try:
        result = fusion.fill_strds(options["optical"], options["sar"], options["output"],
                                   **_arguments(options, flags, workdir))
    except (fusion.FusionError, grass.GrassError, temporal.DatasetError, ModuleNotFoundError) as exc:
        gs.fatal(str(exc))
    finally:  # GRASS 8.2 may hang at exit on a TGIS server restarted after multiprocessing's own shutdown
        tgis = sys.modules.get("grass.temporal")
        if tgis is not None:
            tgis.stop_subprocesses()
    if flags["p"]:
        print(f"optical={result['optical']} bands={','.join(result['bands'])}")
        print(f"sar={result['sar']} sar_bands={','.join(result['sar_bands'])}")
        print("region: {} dates x {} channels x {} rows x {} cols".format(*result["shape"]))
        print(f"blocks: {result['blocks']} of up to {result['block_size']} x {result['block_size']} cells "
              f"(halo {result['halo']})")
        print(f"memory: {result['estimated_mb']:.1f} MB")
        print(f"pairing: {result['pairing']}")
        print(f"output dates: {len(result['output_times'])}")
        for row in result["unpaired"]:
            print(f"unpaired: {row['optical_id']}: {row['reason']}")
        return 0
    gs.message(f"{result['strds']}: {len(result['output_times'])} dates x {len(result['bands'])} bands, "
               f"{100 * sum(result['filled_fraction']) / len(result['dates']):.1f}% of cells filled "
               f"({result['model']})")
    return 0


if __name__ == "__main__":
    sys.exit(main(*gs.parser()))
