"""Rule scene: write the built-in synthetic demo scene (GeoTIFFs + manifest + cloud-free truth)."""
from pathlib import Path

from stfuse import logs, synthetic

logs.setup(snakemake.log[0])
synthetic.make_scene(Path(snakemake.output.manifest).parent, **snakemake.params.synthetic)
