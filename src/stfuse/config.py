"""Checks of a study config that the JSON schema cannot express, run when the Snakemake DAG is built.

:func:`check` raises ``ValueError`` naming the config key at fault, before any job runs, for every
mistake that would otherwise surface late (after GRASS was written, or after hours of training).
It reads no raster: at most the manifest CSV (to count optical dates). What needs the files'
headers (the region with ``region.from: data`` and a manifest) is checked by
:func:`stfuse.manifest.load` in the ingest_project job, still before anything is written.

Cheap on purpose: it does not import torch. The model registry is read from the source of
``stfuse/models`` (:func:`registered_models`); only a model that this reading cannot find falls
back to importing the real registry.

The defaults below mirror workflow/schemas/config.schema.yaml (tests/test_config_checks.py checks
that they agree); they matter only when ``check`` is called on a config the schema did not fill in.
"""

from __future__ import annotations

import ast
import datetime as dt
import math
import numbers
import os
from pathlib import Path

__all__ = ["check", "check_date_count", "check_tiles", "region_size", "explicit_region_size", "registered_models",
           "model_size_multiple", "FLOAT32_MAX"]

FLOAT32_MAX = 3.4028234663852886e38

# Schema defaults used here (see the module docstring).
DEFAULTS = {
    "synthetic": {"width": 64, "height": 64, "start": "2021-04-01", "end": "2021-08-31"},
    "pairing": {"neighbours": 2},
    "tiles": {"size": 32, "overlap": 0},
    "train": {"model": "unet", "model_params": {}},
    "infer": {"overlap": None, "dates": "observed"},
}
# stfuse.synthetic.make_scene's optical revisit (days) and day jitter: with a revisit larger than
# twice the jitter no two dates fall on one day, so the scene has (end - start).days // 5 + 1 dates.
SYNTHETIC_OPTICAL_REVISIT_DAYS = 5.0
SYNTHETIC_OPTICAL_JITTER_DAYS = 1.0

MODELS_DIR = Path(__file__).resolve().parent / "models"


def _get(config: dict, section: str, key: str):
    value = config.get(section)
    value = value if isinstance(value, dict) else {}
    return value.get(key, DEFAULTS[section][key])


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


# --------------------------------------------------------------------------------------------
# reusable pieces (also called for grass_project input and from stfuse.manifest)

def check_date_count(n_dates: int, neighbours: int, where: str) -> None:
    """At least 2 optical dates, and at least K + 1 for K = ``pairing.neighbours``.

    ``where`` names the series in the message, e.g. ``"manifest m.csv, sensor S2"``.
    """
    need = max(2, int(neighbours) + 1)
    if n_dates < need:
        raise ValueError(
            f"{where} has {n_dates} optical date(s); the gap filling needs at least {need} "
            f"(2, and pairing.neighbours + 1 = {int(neighbours) + 1}): add dates or lower config key "
            f"pairing.neighbours ({neighbours})"
        )


def check_tiles(size: int, overlap: int, width: int | None = None, height: int | None = None, *,
                multiple: int = 1, where: str = "the region", infer_overlap=None) -> None:
    """``tiles.size`` fits the region, is a multiple of the model's size multiple and exceeds the
    overlaps (``tiles.overlap``, ``infer.overlap``). ``width``/``height`` None: region unknown yet."""
    if overlap >= size:
        raise ValueError(f"config key tiles.overlap ({overlap}) must be smaller than tiles.size ({size})")
    if infer_overlap is not None and infer_overlap >= size:
        raise ValueError(f"config key infer.overlap ({infer_overlap}) must be smaller than tiles.size ({size})")
    if multiple > 1 and size % multiple:
        raise ValueError(
            f"config key tiles.size ({size}) is not a multiple of {multiple}, which the model needs "
            f"(train.model / train.model_params); use e.g. {max(multiple, size // multiple * multiple)}"
        )
    if width is not None and height is not None and size > min(width, height):
        raise ValueError(
            f"config key tiles.size ({size}) is larger than {where} ({width} x {height} cells); "
            f"use a size <= {min(width, height)}"
        )


def explicit_region_size(region: dict) -> tuple[int, int]:
    """(width, height) in cells of config key region with from: explicit (bounds and resolution)."""
    for key in ("bounds", "resolution"):
        if key not in region:
            raise ValueError(f"config key region.{key} is required when region.from is explicit")
    b, res = region["bounds"], float(region["resolution"])
    if b["east"] <= b["west"] or b["north"] <= b["south"]:
        raise ValueError("config key region.bounds is empty (east <= west or north <= south)")
    return int(round((b["east"] - b["west"]) / res)), int(round((b["north"] - b["south"]) / res))


def region_size(config: dict) -> tuple[int, int, str] | None:
    """(width, height, description) of the study region when the config alone fixes it, else None."""
    region = config.get("region") or {}
    if region.get("from", "data") == "explicit":
        width, height = explicit_region_size(region)
        return width, height, "the explicit region (config key region)"
    inputs = config.get("input") or {}
    if "synthetic" in inputs:
        spec = inputs["synthetic"] or {}
        w = spec.get("width", DEFAULTS["synthetic"]["width"])
        h = spec.get("height", DEFAULTS["synthetic"]["height"])
        return int(w), int(h), "the synthetic scene (config keys input.synthetic.width/height)"
    return None


def parse_date(value, what: str) -> dt.date:
    """A date from a YAML date or an ISO string; ``what`` names the value in the error."""
    if isinstance(value, dt.datetime):
        return value.date()
    if isinstance(value, dt.date):
        return value
    try:
        return dt.date.fromisoformat(str(value)[:10])
    except ValueError:
        raise ValueError(f"{what}: {value!r} is not an ISO date (YYYY-MM-DD)") from None


def synthetic_date_count(spec: dict) -> int:
    """Number of optical dates stfuse.synthetic.make_scene writes for ``input.synthetic``."""
    start = parse_date(spec.get("start", DEFAULTS["synthetic"]["start"]), "config key input.synthetic.start")
    end = parse_date(spec.get("end", DEFAULTS["synthetic"]["end"]), "config key input.synthetic.end")
    if end <= start:
        raise ValueError(f"config key input.synthetic.end ({end}) must be after input.synthetic.start ({start})")
    return int((end - start).days // SYNTHETIC_OPTICAL_REVISIT_DAYS) + 1


# --------------------------------------------------------------------------------------------
# model registry, read without importing torch

_MISSING = object()


def _literal(node):
    try:
        return ast.literal_eval(node)
    except ValueError:
        return _MISSING


def registered_models() -> dict[str, dict]:
    """``{name: {"params": {param: default}, "var_kw": bool, "module": stem}}`` for every builder
    decorated ``@register("name")`` in ``stfuse/models/*.py`` (parsed, not imported).

    ``params`` are the builder's parameters after (in_channels, out_channels); a default that is
    no literal is left out of the values (the name still counts as accepted).
    """
    found = {}
    for path in sorted(MODELS_DIR.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(), filename=str(path))
        except (OSError, SyntaxError):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                continue
            for deco in node.decorator_list:
                if not (isinstance(deco, ast.Call) and deco.args and isinstance(deco.args[0], ast.Constant)
                        and isinstance(deco.args[0].value, str)):
                    continue
                func = deco.func
                if not ((isinstance(func, ast.Name) and func.id == "register")
                        or (isinstance(func, ast.Attribute) and func.attr == "register")):
                    continue
                if not isinstance(node, ast.FunctionDef):
                    continue  # a registered class: leave it to the import fallback
                a = node.args
                positional = a.posonlyargs + a.args
                pos_defaults = [_MISSING] * (len(positional) - len(a.defaults)) + [_literal(d) for d in a.defaults]
                params = {}
                for arg, default in list(zip(positional, pos_defaults))[2:]:
                    params[arg.arg] = default
                for arg, default in zip(a.kwonlyargs, a.kw_defaults):
                    params[arg.arg] = _MISSING if default is None else _literal(default)
                found[deco.args[0].value] = dict(params=params, var_kw=a.kwarg is not None, module=path.stem)
    return found


def _unet_norms() -> tuple:
    tree = ast.parse((MODELS_DIR / "unet.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "NORMS" for t in node.targets):
            return tuple(ast.literal_eval(node.value))
    return ("batch", "group")


def _unet_multiple(params: dict) -> int:
    """Size multiple of stfuse.models.unet.UNet: 2 ** depth (depth pools of 2x2)."""
    for key, low in (("base_channels", 1), ("depth", 0)):
        value = params[key]
        if not _is_int(value) or value < low:
            raise ValueError(f"config key train.model_params.{key}: must be an integer >= {low}, got {value!r}")
    norms = _unet_norms()
    if params["norm"] not in norms:
        raise ValueError(f"config key train.model_params.norm: must be one of {', '.join(norms)}, "
                         f"got {params['norm']!r}")
    return 2 ** int(params["depth"])


def _tattn_multiple(params: dict) -> int:
    """Size multiple of stfuse.models.tattn (its patch size); checks its parameters."""
    for key, low in (("width", 4), ("heads", 1), ("layers", 1), ("patch", 1)):
        value = params[key]
        if not _is_int(value) or value < low:
            raise ValueError(f"config key train.model_params.{key}: must be an integer >= {low}, got {value!r}")
    if params["width"] % params["heads"]:
        raise ValueError(f"config key train.model_params: width {params['width']} is not a multiple of heads "
                         f"{params['heads']}")
    return params["patch"]


# Models whose size multiple follows from their parameters without building them.
SIZE_MULTIPLE = {"unet": _unet_multiple, "tattn": _tattn_multiple}
#: builder parameters that training derives from the data (a sequence model's token layout), never config
DATA_PARAMS = ("tokens",)


def is_checkpoint(model) -> bool:
    """Does ``train.model`` name a checkpoint to adopt (a value ending in ``.pt`` or an existing file), not a
    registered model? (An inference-only study; workflow/rules/common.smk checks the file.)"""
    return isinstance(model, str) and (model.endswith(".pt") or os.path.isfile(model))


def model_size_multiple(name: str, params: dict) -> int:
    """Check ``train.model`` and ``train.model_params`` against the registry; return the tile size
    multiple the model needs. Imports torch only for a model the source reading cannot find."""
    if not isinstance(params, dict):
        raise ValueError(f"config key train.model_params must be a mapping, got {params!r}")
    found = registered_models()
    if name in found:
        info = found[name]
        fixed = [p for p in params if p in DATA_PARAMS]
        if fixed:
            raise ValueError(f"config key train.model_params: {', '.join(map(repr, fixed))} comes from the data "
                             "(training derives it), not from the config")
        unknown = [p for p in params if p not in info["params"]]
        if unknown and not info["var_kw"]:
            raise ValueError(
                f"config key train.model_params: model {name!r} has no parameter(s) {', '.join(map(repr, unknown))}; "
                f"it takes {', '.join(info['params']) or 'none'}"
            )
        required = [p for p, d in info["params"].items()
                    if d is _MISSING and p not in params and p not in DATA_PARAMS]
        if name in SIZE_MULTIPLE:
            if required:
                raise ValueError(f"config key train.model_params: model {name!r} needs {', '.join(required)}")
            return SIZE_MULTIPLE[name]({**info["params"], **params})
        return _built_multiple(name, params)
    try:
        from stfuse.models import available as registry  # imports torch: a model the reading misses
        available = set(registry())
    except ImportError:  # no torch where Snakemake runs (the train jobs have their own env)
        available = set()
    if name not in available:
        raise ValueError(f"config key train.model: unknown model {name!r}; registered models: "
                         f"{', '.join(sorted(available | set(found)) or ['none'])}")
    return _built_multiple(name, params)


def _built_multiple(name: str, params: dict) -> int:
    """Build the model once (imports torch) to read its size multiple; 1 when torch is absent here."""
    try:
        from stfuse import models
    except ImportError:
        return 1
    try:
        net = models.build_model(name, 1, 1, **params)
    except (TypeError, ValueError) as err:
        raise ValueError(f"config key train.model_params: {err}") from None
    return models.size_multiple(net)


# --------------------------------------------------------------------------------------------
# the DAG-time check

def _check_sensors(config: dict) -> tuple[str, str]:
    sensors = config.get("sensors") or {}
    optical = [s for s, spec in sensors.items() if spec.get("role") == "optical"]
    sar = [s for s, spec in sensors.items() if spec.get("role") == "sar"]
    if len(optical) != 1 or len(sar) != 1:
        raise ValueError(
            "config key sensors: need exactly one sensor with role optical and one with role sar, "
            f"got optical={optical} sar={sar}"
        )
    for name, spec in sensors.items():
        for key, default in (("scale", 1.0), ("offset", 0.0)):
            value = spec.get(key, default)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
                    or abs(value) > FLOAT32_MAX:
                raise ValueError(
                    f"config key sensors.{name}.{key}: {value!r} is not a finite float32 number "
                    f"(|value| <= {FLOAT32_MAX:.4g}); physical values are stored as float32"
                )
        scale, offset = float(spec.get("scale", 1.0)), float(spec.get("offset", 0.0))
        if abs(scale) + abs(offset) > FLOAT32_MAX:
            raise ValueError(f"config key sensors.{name}.scale/offset: DN 1 already maps beyond float32 "
                             f"({scale!r} + {offset!r})")
        mask = spec.get("mask")
        if isinstance(mask, dict) and mask.get("band") in (spec.get("bands") or []):
            raise ValueError(
                f"config key sensors.{name}.mask.band: {mask['band']} is also listed in sensors.{name}.bands; "
                "the mask (classification) band must not be a data band"
            )
    return optical[0], sar[0]


def _manifest_path(config: dict) -> Path:
    raw = config["input"]["manifest"]
    path = Path(raw)
    if not path.is_file():
        detail = "" if path.is_absolute() else (
            f" (tried {path.resolve()}: a relative path is taken from the working directory {os.getcwd()})")
        raise ValueError(f"config key input.manifest: {raw} does not exist{detail}")
    return path


def _manifest_date_count(path: Path, sensor: str) -> int:
    from stfuse.manifest import ManifestError, read_manifest  # pandas only; no raster is opened

    try:
        df = read_manifest(path)
    except ManifestError as err:
        raise ValueError(f"config key input.manifest: {err}") from None
    return int(df.loc[df.sensor == sensor, "start_time"].nunique())


def check_dates(value) -> None:
    """Config key infer.dates: ``observed``, ``{every: <pandas offset alias>, start, end}`` (a grid with at least
    one date when start and end are given) or a list of distinct dates/times; ValueError naming the key."""
    from . import anydate

    setting = anydate.parse_setting(value, "config key infer.dates")
    if isinstance(setting, dict) and setting["start"] is not None and setting["end"] is not None:
        try:
            anydate.requested_times(setting, [])
        except ValueError as exc:
            raise ValueError(f"config key {exc}") from None


def check(config: dict) -> None:
    """Every check the study config needs beyond the schema; ValueError naming the key."""
    optical, _sar = _check_sensors(config)
    inputs = config.get("input") or {}
    neighbours = _get(config, "pairing", "neighbours")

    if "manifest" in inputs:
        path = _manifest_path(config)
        check_date_count(_manifest_date_count(path, optical), neighbours,
                         f"manifest {path}, sensor {optical} (config key input.manifest)")
    elif "synthetic" in inputs:
        check_date_count(synthetic_date_count(inputs["synthetic"] or {}), neighbours,
                         "the synthetic scene (config keys input.synthetic.start/end)")

    train = config.get("train") or {}
    name = train.get("model", DEFAULTS["train"]["model"])
    multiple = 1 if is_checkpoint(name) else model_size_multiple(  # a checkpoint: its own tile size counts
        name, train.get("model_params", DEFAULTS["train"]["model_params"]) or {})

    size, overlap = _get(config, "tiles", "size"), _get(config, "tiles", "overlap")
    known = region_size(config)
    width, height, where = known if known else (None, None, "")
    check_tiles(size, overlap, width, height, multiple=multiple, where=where,
                infer_overlap=_get(config, "infer", "overlap"))
    check_dates(_get(config, "infer", "dates"))
    from .blocks import halo_for  # the halo must cover a tile (ValueError naming blocks.halo)

    halo_for(config.get("blocks") or {}, size)
