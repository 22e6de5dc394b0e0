"""The filled series registered back into GRASS: an STRDS that t.rast.* modules use like any other."""

import numpy as np
import pandas as pd
import pytest

from stfuse import grass, grassio, register

from _scene import ingest_tiny

pytestmark = pytest.mark.grass


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    root = tmp_path_factory.mktemp("register")
    scene, project, states = ingest_tiny(root)
    dates = [{"start_time": g["start_time"]} for g in states["S2"]["granules"]]
    rng = np.random.default_rng(0)
    filled = rng.uniform(0, 0.5, (len(dates), 4, 32, 32)).astype(np.float32)
    flags = (rng.uniform(size=(len(dates), 32, 32)) < 0.3).astype(np.uint8)
    state = register.register_filled(project, states["S2"], states["S1"], dates, filled, flags,
                                     checkpoint_sha="ab" * 32, config_sha="cd" * 32)
    return project, states, state, filled, flags


def test_filled_strds_has_labels_times_and_values(registered):
    project, states, state, filled, flags = registered
    assert state["strds"] == "S2_filled@register"
    with grass.session(project["project"], "register") as gs:
        rows = pd.read_csv(pd.io.common.StringIO(gs.read_command(
            "t.rast.list", input=state["strds"], columns="name,start_time,semantic_label", format="csv")))
        first = grassio.read_map(state["granules"][0]["maps"]["B08"])
    assert len(rows) == filled.shape[0] * 4
    assert sorted(set(rows.semantic_label)) == ["B02", "B03", "B04", "B08"]
    want_times = sorted({g["start_time"].replace("T", " ").rstrip("Z") for g in states["S2"]["granules"]})
    assert sorted(set(rows.start_time)) == want_times
    np.testing.assert_allclose(first, filled[0, 3], rtol=1e-6)


def test_t_rast_series_runs_on_the_result(registered):
    project, states, state, filled, flags = registered
    with grass.session(project["project"], "register") as gs:
        gs.run_command("t.rast.series", input=state["flag_strds"], output="filled_share", method="average",
                       quiet=True)
        gs.run_command("t.rast.series", input=state["strds"], where="semantic_label = 'B04'",
                       output="b04_max", method="maximum", quiet=True)
        share = grassio.read_map("filled_share")
        b04_max = grassio.read_map("b04_max")
    np.testing.assert_allclose(share, flags.mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(b04_max, filled[:, 2].max(axis=0), rtol=1e-6)


def test_lineage_in_description_and_history(registered):
    project, states, state, filled, flags = registered
    with grass.session(project["project"], "register") as gs:
        info = gs.read_command("t.info", input=state["strds"])
        history = gs.read_command("r.info", map=state["granules"][0]["maps"]["B02"], flags="h")
    for text in (info, history):
        assert "abababababababab" in text and "cdcdcdcdcdcdcdcd" in text  # checkpoint and config hashes
    assert "S2@ingest_S2" in info


def test_provenance_in_map_history_and_strds_description(tmp_path):
    """The full config and the command land in every filled map's history and in the STRDS' metadata."""
    scene, project, states = ingest_tiny(tmp_path)
    dates = [{"start_time": g["start_time"]} for g in states["S2"]["granules"]]
    filled = np.full((len(dates), 4, 32, 32), 0.2, np.float32)
    flags = np.zeros((len(dates), 32, 32), np.uint8)
    # quoted YAML strings ('2021-05-01') once broke TGIS's SQL
    config = {"study": "tiny", "input": {"synthetic": {"start": "2021-05-01"}}, "train": {"epochs": 7}}
    text = register.provenance_text(config, "snakemake --cores 2 --configfile tiny.yaml")
    state = register.register_filled(project, states["S2"], states["S1"], dates, filled, flags,
                                     checkpoint_sha="ab" * 32, config_sha="cd" * 32, provenance=text)
    with grass.session(project["project"], "register") as gs:
        history = gs.read_command("r.info", flags="h", map=state["granules"][0]["maps"]["B02"])
        info = gs.read_command("t.info", input=state["strds"])
    for out in (history, info):
        assert "snakemake --cores 2 --configfile tiny.yaml" in out
        assert "epochs: 7" in out
    assert "start: '2021-05-01'" in info
