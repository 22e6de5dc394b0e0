"""DAG-time config checks (stfuse.config.check): each late error now fails when the DAG is built, naming the key."""

import copy
import inspect
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from stfuse import config as cfgcheck

from _scene import ROOT, sensors, write_config

SCHEMA = yaml.safe_load((ROOT / "workflow/schemas/config.schema.yaml").read_text())
SNAKEMAKE = Path(sys.executable).with_name("snakemake")
TINY = {"synthetic": {"width": 32, "height": 32, "start": "2021-05-01", "end": "2021-05-31"}}


def base(**extra) -> dict:
    cfg = {"study": "s", "input": copy.deepcopy(TINY), "sensors": sensors(), "region": {"from": "data"}}
    cfg.update(extra)
    return cfg


def write_manifest(path: Path, optical_times, sar_times=("2021-05-02T17:00:00Z",)) -> Path:
    """A manifest CSV only (no rasters: the DAG-time checks never open them)."""
    rows = [f"S2_{b}_{i}.tif,S2,{b},{t}" for i, t in enumerate(optical_times)
            for b in ("B02", "B03", "B04", "B08", "SCL")]
    rows += [f"S1_{b}_{i}.tif,S1,{b},{t}" for i, t in enumerate(sar_times) for b in ("VV", "VH")]
    path.write_text("path,sensor,semantic_label,start_time\n" + "\n".join(rows) + "\n")
    return path


def test_demo_config_passes_without_importing_torch():
    code = ("import sys, yaml, stfuse.config as c; "
            f"c.check(yaml.safe_load(open({str(ROOT / 'config/config.yaml')!r}))); "
            "assert 'torch' not in sys.modules, 'torch imported at DAG time'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_base_config_passes():
    cfgcheck.check(base())


# --- sensors ---

def test_exactly_one_optical_and_one_sar():
    cfg = base()
    cfg["sensors"]["S1"]["role"] = "optical"
    with pytest.raises(ValueError, match=r"config key sensors: need exactly one sensor with role optical"):
        cfgcheck.check(cfg)


@pytest.mark.parametrize("key, value", [("scale", 1e39), ("offset", -1e39), ("scale", float("inf")),
                                        ("offset", float("nan"))])
def test_scale_or_offset_beyond_float32(key, value):
    cfg = base()
    cfg["sensors"]["S2"][key] = value
    with pytest.raises(ValueError, match=rf"config key sensors.S2.{key}: .* is not a finite float32 number"):
        cfgcheck.check(cfg)


def test_mask_band_also_a_data_band():
    cfg = base()
    cfg["sensors"]["S2"]["bands"] = ["B02", "SCL"]
    with pytest.raises(ValueError, match=r"config key sensors.S2.mask.band: SCL is also listed in sensors.S2.bands"):
        cfgcheck.check(cfg)


# --- manifest input ---

def test_relative_manifest_that_does_not_exist_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = base(input={"manifest": "data/m.csv"})
    with pytest.raises(ValueError) as err:
        cfgcheck.check(cfg)
    msg = str(err.value)
    assert "config key input.manifest: data/m.csv does not exist" in msg
    assert str(tmp_path / "data" / "m.csv") in msg and f"working directory {tmp_path}" in msg


@pytest.mark.parametrize("n_dates, neighbours, ok", [(1, 0, False), (1, 2, False), (2, 2, False), (3, 2, True),
                                                     (2, 1, True), (2, 0, True)])
def test_optical_date_count_of_a_manifest(tmp_path, n_dates, neighbours, ok):
    times = [f"2021-05-{d:02d}T10:30:00Z" for d in range(1, n_dates + 1)]
    m = write_manifest(tmp_path / "m.csv", times, sar_times=["2021-05-01T17:00:00Z"] * 1 + ["2021-05-09T17:00:00Z"])
    cfg = base(input={"manifest": str(m)}, pairing={"neighbours": neighbours})
    if ok:
        cfgcheck.check(cfg)
    else:
        with pytest.raises(ValueError, match=rf"m.csv, sensor S2 .* has {n_dates} optical date\(s\); the gap filling "
                                             rf"needs at least {max(2, neighbours + 1)} .*config key pairing.neighbours"):
            cfgcheck.check(cfg)


def test_manifest_csv_errors_surface_at_dag_time(tmp_path):
    m = write_manifest(tmp_path / "m.csv", ["2021-05-01T10:30:00Z", "2021-05-06T10:30:00", "2021-05-11T10:30:00Z"])
    with pytest.raises(ValueError, match=r"config key input.manifest: .*m.csv:7: start_time .* has no time zone"):
        cfgcheck.check(base(input={"manifest": str(m)}))


def test_check_date_count_is_reusable():
    cfgcheck.check_date_count(3, 2, "x")
    with pytest.raises(ValueError, match=r"STRDS S2@m has 2 optical date\(s\); the gap filling needs at least 3"):
        cfgcheck.check_date_count(2, 2, "STRDS S2@m")


# --- synthetic input ---

@pytest.mark.parametrize("start, end", [("2021-05-01", "2021-05-31"), ("2021-04-01", "2021-08-31"),
                                        ("2021-05-01", "2021-05-04"), ("2021-05-01", "2021-05-10"),
                                        ("2021-01-01", "2021-01-06")])
def test_synthetic_date_count_matches_the_scene(start, end):
    import datetime as dt

    import numpy as np

    from stfuse import synthetic

    sig = inspect.signature(synthetic.make_scene).parameters
    assert sig["optical_revisit_days"].default == cfgcheck.SYNTHETIC_OPTICAL_REVISIT_DAYS
    for seed in range(5):
        times = synthetic.acquisition_times(np.random.default_rng(seed), dt.date.fromisoformat(start),
                                            dt.date.fromisoformat(end), cfgcheck.SYNTHETIC_OPTICAL_REVISIT_DAYS,
                                            10.5, cfgcheck.SYNTHETIC_OPTICAL_JITTER_DAYS)
        assert len(times) == cfgcheck.synthetic_date_count({"start": start, "end": end})


def test_synthetic_scene_with_one_date():
    cfg = base(input={"synthetic": {"start": "2021-05-01", "end": "2021-05-03"}})
    with pytest.raises(ValueError, match=r"the synthetic scene .* has 1 optical date\(s\)"):
        cfgcheck.check(cfg)
    cfg["input"]["synthetic"]["end"] = "2021-04-01"
    with pytest.raises(ValueError, match=r"config key input.synthetic.end"):
        cfgcheck.check(cfg)


# --- tiles and model ---

@pytest.mark.parametrize("extra, message", [
    (dict(tiles={"size": 48}), r"config key tiles.size \(48\) is larger than the synthetic scene .*\(32 x 32 cells\)"),
    (dict(tiles={"size": 30}), r"config key tiles.size \(30\) is not a multiple of 4"),
    (dict(tiles={"size": 32}, train={"model_params": {"depth": 6}}), r"tiles.size \(32\) is not a multiple of 64"),
    (dict(tiles={"size": 16, "overlap": 16}), r"config key tiles.overlap \(16\) must be smaller than tiles.size"),
    (dict(tiles={"size": 16}, infer={"overlap": 20}), r"config key infer.overlap \(20\) must be smaller"),
    (dict(region={"from": "explicit", "resolution": 10,
                  "bounds": {"west": 0, "east": 200, "south": 0, "north": 400}}),
     r"tiles.size \(32\) is larger than the explicit region \(config key region\) \(20 x 40 cells\)"),
    (dict(region={"from": "explicit", "resolution": 10}), r"config key region.bounds is required"),
    (dict(train={"model": "unet3"}), r"config key train.model: unknown model 'unet3'; registered models: tattn, unet"),
    (dict(train={"model_params": {"depht": 3}}), r"config key train.model_params: model 'unet' has no parameter"),
    (dict(train={"model_params": {"depth": 1.5}}), r"config key train.model_params.depth: must be an integer"),
    (dict(train={"model_params": {"norm": "layer"}}), r"config key train.model_params.norm: must be one of"),
])
def test_tiles_and_model(extra, message):
    with pytest.raises(ValueError, match=message):
        cfgcheck.check(base(**extra))


def test_tile_checks_pass_where_they_should():
    cfgcheck.check(base(tiles={"size": 32}, train={"model_params": {"depth": 5}}))
    cfgcheck.check(base(tiles={"size": 8, "overlap": 4}, infer={"overlap": 6}, train={"model_params": {"depth": 3}}))
    # manifest input with region from data: the region is checked in ingest_project (tests/test_manifest.py)
    cfgcheck.check_tiles(1024, 0, None, None, multiple=4)


def test_registry_read_from_source_matches_the_real_registry():
    import torch  # noqa: F401  (the real registry needs it; the DAG-time reading does not)

    from stfuse import models
    from stfuse.models.unet import NORMS, UNet

    found = cfgcheck.registered_models()
    assert sorted(found) == models.available()
    for name, info in found.items():
        params = list(inspect.signature(models._REGISTRY[name]).parameters.values())[2:]
        required = inspect.Parameter.empty  # the source reading marks it _MISSING
        assert {p.name: cfgcheck._MISSING if p.default is required else p.default for p in params} == info["params"]
    assert cfgcheck._unet_norms() == NORMS
    for depth in range(4):
        assert cfgcheck.model_size_multiple("unet", {"depth": depth}) == UNet(1, 1, depth=depth).size_multiple
    from stfuse.models.tattn import TemporalAttentionNet

    tokens = {"tokens": [{"tag": "t", "bands": [0], "valid": 1, "sar": [], "sar_present": 2, "doy": [3, 4]}],
              "n_bands": 1, "n_sar": 0}
    for patch in (None, 2, 8):
        params = {} if patch is None else {"patch": patch}
        built = TemporalAttentionNet(5, 1, tokens, **params)
        assert cfgcheck.model_size_multiple("tattn", params) == built.size_multiple == (patch or 4)
    with pytest.raises(ValueError, match="multiple of heads"):
        cfgcheck.model_size_multiple("tattn", {"width": 10, "heads": 4})
    with pytest.raises(ValueError, match=r"train.model_params.patch: must be an integer >= 1, got 0"):
        cfgcheck.model_size_multiple("tattn", {"patch": 0})
    with pytest.raises(ValueError, match="comes from the data"):
        cfgcheck.model_size_multiple("tattn", {"tokens": {}})


def test_defaults_mirror_the_schema():
    props = SCHEMA["properties"]
    for section, keys in cfgcheck.DEFAULTS.items():
        schema = props["input"]["properties"]["synthetic"] if section == "synthetic" else props[section]
        for key, value in keys.items():
            assert schema["properties"][key]["default"] == value, (section, key)


# --- schema patterns ---

def _patterns(node):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "pattern":
                yield v
            else:
                yield from _patterns(v)
    elif isinstance(node, list):
        for v in node:
            yield from _patterns(v)


def test_every_schema_pattern_refuses_a_trailing_newline():
    patterns = list(_patterns(SCHEMA))
    assert len(patterns) >= 5
    for p in patterns:
        assert re.search(p, "ab1") and not re.search(p, "ab1\n"), p


@pytest.mark.parametrize("edit", [
    lambda c: c.update(study="mol\n"),
    lambda c: c["sensors"]["S2"]["bands"].append("B05\n"),
    lambda c: c["sensors"].update({"S1\n": c["sensors"].pop("S1")}),
    lambda c: c.update(static=[{"name": "dem\n", "file": "dem.tif"}]),
])
def test_schema_refuses_names_with_a_trailing_newline(edit):
    cfg = base()
    edit(cfg)
    with pytest.raises(jsonschema.ValidationError, match=r"does not match"):
        jsonschema.Draft202012Validator(SCHEMA).validate(cfg)


# --- real snakemake -n: the error comes at DAG build, naming the key, and nothing is written ---

def dry_run(tmp_path, cfg_dict):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg_dict))
    cmd = [str(SNAKEMAKE), "-s", str(ROOT / "Snakefile"), "--directory", str(tmp_path), "--cores", "1",
           "--dry-run", "ingest", "--configfile", str(path)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def _manifest_study(tmp_path, n_dates):
    m = write_manifest(tmp_path / "m.csv", [f"2021-05-{d:02d}T10:30:00Z" for d in range(1, n_dates + 1)])
    return base(input={"manifest": str(m)})


@pytest.mark.workflow
@pytest.mark.parametrize("edit, message", [
    (lambda c, t: c["sensors"]["S2"].update(scale=1e39), "config key sensors.S2.scale"),
    (lambda c, t: c["sensors"]["S2"].update(bands=["B02", "SCL"]), "config key sensors.S2.mask.band"),
    (lambda c, t: c["input"]["synthetic"].update(end="2021-05-03"), "config key pairing.neighbours"),
    (lambda c, t: c.update(_manifest_study(t, 1)), "has 1 optical date(s)"),
    (lambda c, t: c.update(input={"manifest": "nope/m.csv"}), "tried {t}/nope/m.csv: a relative path is taken "
                                                              "from the working directory {t})"),
    (lambda c, t: c.update(tiles={"size": 48}), "config key tiles.size (48) is larger"),
    (lambda c, t: c.update(tiles={"size": 30}), "config key tiles.size (30) is not a multiple of 4"),
    (lambda c, t: c.update(train={"model": "resnet"}), "config key train.model: unknown model 'resnet'"),
    (lambda c, t: c.update(train={"model_params": {"width": 8}}), "config key train.model_params"),
    (lambda c, t: c.update(study="mol\n"), "does not match"),
])
def test_snakemake_refuses_at_dag_build(tmp_path, edit, message):
    cfg = base()
    edit(cfg, tmp_path)
    proc = dry_run(tmp_path, cfg)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert message.format(t=tmp_path) in out, out[-2000:]
    assert not (tmp_path / "results").exists() and not (tmp_path / "logs").exists()


@pytest.mark.workflow
def test_snakemake_tile_size_beyond_the_data_region_fails_in_ingest_project_before_grass(tmp_path):
    from _scene import tiny_scene

    scene = tiny_scene(tmp_path / "scene")
    cfg = write_config(tmp_path / "c.yaml", "big", {"manifest": str(scene)}, tiles={"size": 64})
    cmd = [str(SNAKEMAKE), "-s", str(ROOT / "Snakefile"), "--directory", str(tmp_path), "--cores", "1",
           "ingest", "--configfile", str(cfg)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    log = (tmp_path / "logs/big/ingest/project.log").read_text()
    assert "config key tiles.size (64) is larger than the region from the data (32 x 32 cells)" in log
    assert not (tmp_path / "results/big/grassdata").exists()


def test_blocks_halo_smaller_than_a_tile_is_refused_when_the_dag_is_built():
    cfgcheck.check(base(tiles={"size": 16}, blocks={"size": 64}))             # halo null: the tile size
    cfgcheck.check(base(tiles={"size": 16}, blocks={"size": 64, "halo": 24}))
    with pytest.raises(ValueError, match=r"blocks\.halo \(8\) must be at least tiles\.size \(16\)"):
        cfgcheck.check(base(tiles={"size": 16}, blocks={"size": 64, "halo": 8}))
