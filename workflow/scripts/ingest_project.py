"""Rule ingest_project: check the input, create the GRASS project (or own mapset), record the region."""
from stfuse import existing, ingest, logs

logs.setup(snakemake.log[0])
params = snakemake.params
if "grass_project" in params.input:
    spec = params.input["grass_project"]
    state = existing.prepare_project(params.project, spec.get("mapset", "stfuse"), spec["strds"], params.sensors, params.region)
else:
    state = ingest.prepare_project(snakemake.input.manifest, params.sensors, params.region, params.project, params.checked)
ingest.write_state(state, snakemake.output.state)
