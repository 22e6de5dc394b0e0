# Stage 1: demo scene (synthetic input only), GRASS project, one STRDS per sensor.


rule scene:
    output:
        manifest=f"{RESULTS}/scene/manifest.csv",
        truth=f"{RESULTS}/scene/truth/manifest.csv",
        info=f"{RESULTS}/scene/scene.json",
    log:
        f"{LOGS}/scene/scene.log",
    benchmark:
        f"{BENCH}/scene/scene.tsv"
    conda:
        "../../envs/grass.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        synthetic=section("input", "synthetic"),
    script:
        "../scripts/scene.py"


# a checkpoint: where the config does not fix the region (region from the data, a user's project), the
# block plan of every pixel stage is read from its project.json
checkpoint ingest_project:
    input:
        manifest=manifest_file,
    output:
        state=f"{RESULTS}/ingest/project.json",
    log:
        f"{LOGS}/ingest/project.log",
    benchmark:
        f"{BENCH}/ingest/project.tsv"
    conda:
        "../../envs/grass.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        input=section("input"),
        sensors=section("sensors"),
        region=section("region"),
        project=GRASS_PROJECT,
        checked=f"{RESULTS}/ingest/checked_manifest.csv",
        # Recorded in project.json: every stage's mapsets are named after and marked with the study, and
        # are replaced only as grass.replace_foreign_maps allows.
        study=STUDY,
        grass=section("grass"),
    script:
        "../scripts/ingest_project.py"


rule ingest_sensor:
    input:
        project=f"{RESULTS}/ingest/project.json",
    output:
        state=f"{RESULTS}/ingest/{{sensor}}.json",
    log:
        f"{LOGS}/ingest/{{sensor}}.log",
    benchmark:
        f"{BENCH}/ingest/{{sensor}}.tsv"
    wildcard_constraints:
        sensor="|".join(SENSORS),
    conda:
        "../../envs/grass.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    params:
        sensors=section("sensors"),
        checked=f"{RESULTS}/ingest/checked_manifest.csv",
    script:
        "../scripts/ingest_sensor.py"


rule ingest:
    input:
        stage_targets("ingest"),
