"""Rule ingest_project: check the input, create the GRASS project (or own mapset), record the region."""
from stfuse import existing, ingest, logs

logs.setup(snakemake.log[0])
params = snakemake.params
if "grass_project" in params.input:
    spec = params.input["grass_project"]
    state = existing.prepare_project(params.project, spec.get("mapset") or existing.default_mapset(params.study),
                                     spec["strds"], params.sensors, params.region, study=params.study,
                                     replace_foreign=params.grass.get("replace_foreign_maps", False),
                                     neighbours=(snakemake.config.get("pairing") or {}).get("neighbours", 2))
else:
    # tiles.size from the config, not a param: it only adds a check, and a param would rerun ingest on every change.
    tile_size = (snakemake.config.get("tiles") or {}).get("size")
    state = ingest.prepare_project(snakemake.input.manifest, params.sensors, params.region, params.project, params.checked,
                                   tile_size=tile_size, study=params.study,
                                   replace_foreign=params.grass.get("replace_foreign_maps", False))
ingest.write_state(state, snakemake.output.state)
