"""Rule cube: read every imagery group once into a (T, C, H, W) array; later stages never read GRASS."""
import json
from pathlib import Path

from stfuse import bridge, logs

logs.setup(snakemake.log[0])
project = json.loads(Path(snakemake.input.project).read_text())
bridge.cube_step(project, snakemake.input.groups, Path(snakemake.output.cube).parent)
