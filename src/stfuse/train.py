"""Self-supervised training of a gap-filling model on ``export_tiles`` output.

There is no cloud-free truth to learn from, so the dataset hides *extra* pixels at the target
date with the real cloud mask of another date of the same tile
(:class:`stfuse.dataset.GapFillDataset`, ``extra_mask_fraction``), and the loss is the L1 error
(in normalised units) on the pixels that are hidden but actually clear
(``target_valid & ~mask``). A batch without such pixels is skipped (no forward, no step).

Validation runs on the ``val`` split with a *fixed* artificial masking (every sample masked,
the borrowed date drawn from a seed derived from ``seed``), so validation losses are comparable
across epochs; they drive early stopping and the choice of ``model.pt``. Without a ``val``
split (no validation tile in the export) the same fixed masking is applied to the ``train``
split instead, with a warning.

Reproducibility: the model is initialised after ``torch.manual_seed(seed)``; epoch ``e``
shuffles with a ``torch.Generator`` and masks with a dataset seed both derived from
``(seed, e)`` (per sample, so ``num_workers`` does not matter), so an epoch does not depend on
how the run got there. On CPU ``torch.use_deterministic_algorithms(True)`` is on for the
duration of :func:`train` (restored after). What is reproducible, precisely:

* same data, same arguments, same ``threads`` (the torch intra-op thread count, set for the
  call and restored after -- *not* whatever the process or the workflow manager's core count
  happened to set), same machine (CPU model) and same torch build: **bit-identical** weights,
  losses and predictions; a run resumed from ``last.pt`` ends with the same weights as an
  uninterrupted one;
* another thread count, another CPU (other SIMD kernels) or another torch build: floating-point
  sums are grouped differently, so weights differ in the last bits and predictions by up to
  the order of 1e-4 reflectance after training;
* CUDA (``device="auto"`` picks it when available): mixed precision (``torch.autocast``
  float16 + ``GradScaler``) and deterministic algorithms in warn-only mode: close, but not
  bit-identical, results.

The workflow therefore takes the thread count from the config (``train.threads``,
``infer.threads``), never from the cores Snakemake grants a job (``--cores`` scales those down).

Resuming (``resume=True``): ``last.pt`` holds a *fingerprint* of what the run depends on: the
SHA-256 of every file of the export that training reads (``tiles.npy``, ``index.csv``,
``clear_fraction.npy``, ``channels.json``, ``stats.json``; streamed in chunks, never loaded
whole) and the resolved training settings that change the result (everything in the
checkpoint's ``config`` but the path and ``epochs``, ``patience``, ``max_minutes`` and
``num_workers``: raising ``epochs`` continues a run; the thread count and device do count). A
run resumes only when the fingerprint matches; otherwise (other data, other settings, a
``last.pt`` without fingerprint or unreadable) it logs one warning naming what changed and
starts afresh, removing the stale outputs. A rerun of a finished run trains nothing but
rewrites any missing ``model.pt``, ``history.csv`` and ``loss.png``, so a workflow manager that
deleted them before the rerun finds them again. Hashing reads the export once per call (about
a second per GB). A tile store (:func:`stfuse.tiles.merge_tile_store`) is fingerprinted by its
small files and the SHA-256 each block recorded of its ``tiles.npy`` while writing it (its
``tiles.json``): the big files are never read again.

Bounded epochs: with ``samples_per_epoch`` each epoch trains on that many samples drawn from
``(seed, epoch)`` (a resume-relevant setting: it changes what every epoch sees), and
validation on at most as many, drawn once.

Residual on the temporal prior: when the export holds the prior channels
(:mod:`stfuse.prior`), the model is by default (``residual="auto"``) wrapped in
:class:`stfuse.models.ResidualOnPrior` -- it outputs the prior plus a learnt correction -- and
its output layer is zeroed at initialisation, so training starts from per-pixel linear
interpolation in time and learns what to change.

Files in ``out_dir`` (all written to a temporary name first and moved into place with
``os.replace``, so a kill never leaves a half-written file; created with mode ``0o666`` less the
umask, like any other file):

``model.pt``
    the best epoch (lowest validation loss), see below;
``last.pt``
    the last completed epoch, plus optimiser/scaler state, the RNG states, the history and the
    early-stopping bookkeeping -- what ``resume=True`` continues from;
``history.csv``
    one row per epoch: ``epoch, train_loss, val_loss, train_samples, train_pixels,
    val_pixels, samples_per_s, epoch_s, elapsed_s, best``;
``loss.png``
    train and validation loss curves.

Checkpoint format (a dict; ``torch.load(path, weights_only=True)`` reads it: only tensors,
dicts, lists, tuples, str, int, float, bool and None):

``format`` ("stfuse.checkpoint"), ``format_version`` (2 when ``residual`` is set, else 1: the
oldest reader that understands it), ``kind`` ("best" | "last"),
``model`` (registry name), ``model_params`` (keyword parameters), ``in_channels``,
``out_channels``, ``state_dict``, ``input_channels`` / ``target_channels`` (names, see
:mod:`stfuse.dataset`), ``channels`` (the export's channel dicts, in cube order), ``stats``
(the export's per-channel ``name/kind/mean/std/count``), ``k_neighbours``, ``dt_scale_days``,
``tile_size``, ``overlap`` (of the export), ``config`` (the training arguments, resolved),
``epoch``, ``train_loss``, ``val_loss``, ``best_epoch``, ``best_val_loss``, ``history``
(list of per-epoch dicts), ``versions``, ``fingerprint`` (``data``: file name -> ``"sha256:..."``,
``config``: the settings compared on resume), ``residual`` (None, or ``{"prior_indices": [...],
"present_index": i}``: the model is :class:`stfuse.models.ResidualOnPrior` around the registered
model, whose ``state_dict`` keys then start with ``net.``; checkpoints without the key are plain
models), ``uncertainty`` (``"none"``, ``"laplace"`` or ``"gaussian"``, :mod:`stfuse.models.uncertainty`;
absent in older checkpoints: none; ``out_channels`` stays the number of bands B, the network then outputs
2B: values and log-scales); ``last.pt`` adds ``optimizer``, ``scaler``
(None without AMP), ``rng`` (``torch`` uint8 tensor, ``cuda`` list of tensors, ``numpy``
dict with the MT19937 key as an int64 tensor, ``python`` list), ``epochs_since_best``,
``stopped`` (None | "epochs" | "early_stopping" | "max_minutes") and ``best_checkpoint`` (what
``model.pt`` holds besides the common keys: its ``state_dict``, ``epoch``, losses and history;
a resumed run rewrites a missing ``model.pt`` from it, e.g. after a workflow manager deleted the
outputs of a killed job -- with a residual model that starts from the prior, later epochs may
never improve on the best one).

Transfer: ``init_from`` fine-tunes another run's checkpoint (its weights loaded before the first
epoch, :func:`load_init`; its SHA-256 in ``config["init_from"]``, its path in
``config["init_from_path"]``); :func:`adopt_checkpoint` makes a study use a checkpoint without
training (its ``model.pt`` is a copy plus ``adopted_from``: ``path``, ``sha256`` and the
source's own ``adopted_from``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import numbers
import os
import random
import secrets
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
from stfuse._optional import require_torch

torch = require_torch(__name__)
from torch.utils.data import DataLoader, Subset

import stfuse
from stfuse.dataset import DT_SCALE_DAYS, GapFillDataset
from stfuse.models import ResidualOnPrior, build_model, input_layout, revision, size_multiple, zero_init_output
from stfuse.models import uncertainty as heads
from stfuse.tiles import BLOCK_FILE, CHANNELS_FILE, CLEAR_FILE, INDEX_FILE, STATS_FILE, TILES_FILE

__all__ = ["train", "load_checkpoint", "check_channels", "check_revision", "model_from_checkpoint", "build_network",
           "load_init", "adopt_checkpoint", "channel_mismatch",
           "resolve_device", "torch_threads", "fingerprint", "atomic_write", "CHECKPOINT_FORMAT"]

logger = logging.getLogger("stfuse.train")

CHECKPOINT_FORMAT = "stfuse.checkpoint"
CHECKPOINT_VERSION = 2
MODEL_FILE = "model.pt"
LAST_FILE = "last.pt"
HISTORY_FILE = "history.csv"
PLOT_FILE = "loss.png"
HISTORY_COLUMNS = ("epoch", "train_loss", "val_loss", "train_samples", "train_pixels",
                   "val_pixels", "samples_per_s", "epoch_s", "elapsed_s", "best")
REQUIRED_KEYS = ("model", "model_params", "in_channels", "out_channels", "state_dict",
                 "input_channels", "target_channels", "channels", "stats", "k_neighbours",
                 "tile_size")
OUTPUT_FILES = (MODEL_FILE, LAST_FILE, HISTORY_FILE, PLOT_FILE)
#: settings that must match for ``resume=True`` to continue a run (checked by name in the
#: message; the fingerprint compares every setting of ``config`` but RESUME_FREE_KEYS)
RESUME_KEYS = ("model", "model_params", "batch_size", "lr", "k_neighbours",
               "extra_mask_fraction", "seed", "samples_per_epoch")
#: settings of ``config`` that do not change the result: they may differ when resuming
RESUME_FREE_KEYS = ("tiles_dir", "epochs", "patience", "max_minutes", "num_workers",
                    "init_from_path")  # the init file counts by its content (init_from: its sha256)
#: the export's files that training reads: their contents go into the resume fingerprint
DATA_FILES = (TILES_FILE, INDEX_FILE, CLEAR_FILE, CHANNELS_FILE, STATS_FILE)
#: a tile store's own files (its tiles stay in the blocks' tiles.npy: stfuse.tiles.merge_tile_store)
STORE_FILES = (INDEX_FILE, CLEAR_FILE, CHANNELS_FILE, STATS_FILE)
HASH_CHUNK = 1 << 22  # 4 MiB
VAL_MASK_FRACTION = 1.0


# --------------------------------------------------------------------------------------------
# small helpers

def resolve_device(device) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; anything else goes to ``torch.device``."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}") \
            from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available")
    return dev


def _derived_seed(seed: int, *keys: int) -> int:
    return int(np.random.SeedSequence([int(seed), *keys]).generate_state(1)[0])


def atomic_write(path, write) -> None:
    """``write(tmp_path)`` then ``os.replace`` onto ``path`` (same directory, fsynced).

    The temporary file is created exclusively with mode ``0o666`` less the umask (unlike
    ``tempfile.mkstemp``, which makes it ``0o600``), so ``path`` gets the permissions any other
    output gets; ``write`` may reopen and truncate it, which keeps the mode.
    """
    path = Path(path)
    while True:
        tmp = str(path.parent / f".{path.name}.{secrets.token_hex(6)}.partial")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:  # pragma: no cover - 48 random bits
            continue
        break
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _save(obj, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def _plain(value):
    """JSON-like plain Python values (for checkpoint metadata)."""
    return json.loads(json.dumps(value, default=str))


def _finite_or_none(x):
    return None if x is None or not math.isfinite(x) else float(x)


def _file_digest(path: Path) -> str:
    """``"sha256:<hex>"`` of a file's content, read in HASH_CHUNK pieces (never whole)."""
    digest = hashlib.sha256()
    buf = memoryview(bytearray(HASH_CHUNK))
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            digest.update(buf[:n])
    return f"sha256:{digest.hexdigest()}"


def _store_digests(tiles_dir: Path, stores: list) -> dict:
    """A tile store's data digests: its small files hashed, and each block's tiles.npy by the
    sha256 its block export recorded while writing it (tiles.json) -- the big files are never
    read again, so resuming a run on a whole Sentinel-2 tile costs no extra pass over its tiles."""
    data = {name: _file_digest(tiles_dir / name) for name in STORE_FILES}
    for rel in stores:
        doc_path = tiles_dir / rel / BLOCK_FILE
        if not doc_path.is_file():
            raise FileNotFoundError(f"{doc_path} is missing: the block tiles of store {tiles_dir} "
                                    f"({rel}) are gone")
        data[f"{rel}/{TILES_FILE}"] = str(json.loads(doc_path.read_text())["sha256"])
    return data


def fingerprint(tiles_dir, config: dict) -> dict:
    """What a run depends on: ``data`` (file -> content hash) and ``config`` (the settings of
    ``config`` but RESUME_FREE_KEYS), plain values only.

    ``data``: an export's DATA_FILES, hashed; for a tile store (channels.json lists ``stores``),
    :func:`_store_digests`.
    """
    tiles_dir = Path(tiles_dir)
    stores = json.loads((tiles_dir / CHANNELS_FILE).read_text()).get("stores")
    if stores is not None:
        data = _store_digests(tiles_dir, stores)
    else:
        data = {name: _file_digest(tiles_dir / name) for name in DATA_FILES}
    settings = {k: config[k] for k in sorted(config) if k not in RESUME_FREE_KEYS}
    return {"data": data, "config": _plain(settings)}


def _fingerprint_diffs(old, new: dict) -> list[str]:
    """What differs between two fingerprints (``["tiles.npy changed", "lr: 0.001 -> 0.01"]``)."""
    if not isinstance(old, dict) or not isinstance(old.get("data"), dict) \
            or not isinstance(old.get("config"), dict):
        return ["it holds no fingerprint of its data and settings (written by an older stfuse)"]
    diffs = [f"{name} changed" for name in sorted(set(old["data"]) | set(new["data"]))
             if old["data"].get(name) != new["data"].get(name)]
    for key in sorted(set(old["config"]) | set(new["config"])):
        if old["config"].get(key) != new["config"].get(key):
            diffs.append(f"{key}: {old['config'].get(key)!r} -> {new['config'].get(key)!r}")
    return diffs


@contextmanager
def torch_threads(threads):
    """Run with ``torch.set_num_threads(threads)`` (None: leave it), restored afterwards."""
    if threads is None:
        yield
        return
    if isinstance(threads, bool) or not isinstance(threads, numbers.Integral) or threads < 1:
        raise ValueError(f"threads must be None or an integer >= 1, got {threads!r}")
    before = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextmanager
def _deterministic(device: torch.device):
    was_on = torch.are_deterministic_algorithms_enabled()
    was_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    cudnn_bench = torch.backends.cudnn.benchmark
    try:
        torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
        torch.backends.cudnn.benchmark = False
        yield
    finally:
        torch.use_deterministic_algorithms(was_on, warn_only=was_warn)
        torch.backends.cudnn.benchmark = cudnn_bench


def _rng_state(device: torch.device) -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if device.type == "cuda" else [],
        "numpy": {"name": str(name), "keys": torch.from_numpy(keys.astype(np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": [int(version), [int(v) for v in internal], gauss_next],
    }


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state.get("cuda"):
        torch.cuda.set_rng_state_all(state["cuda"])
    np_state = state["numpy"]
    np.random.set_state((np_state["name"], np_state["keys"].numpy().astype(np.uint32),
                         np_state["pos"], np_state["has_gauss"], np_state["cached"]))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


# --------------------------------------------------------------------------------------------
# checkpoints

def load_checkpoint(path) -> dict:
    """Read a checkpoint written by :func:`train` (``weights_only=True``, onto the CPU).

    Raises FileNotFoundError for a missing file and ValueError naming the file when it is not
    a readable stfuse checkpoint (truncated, corrupt, or some other file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds for a bad file
        raise ValueError(f"{path} is not a readable checkpoint (corrupt, truncated or not "
                         f"written by torch.save): {type(exc).__name__}: "
                         f"{(str(exc).strip().splitlines() or [''])[0]}") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not an stfuse checkpoint (no format={CHECKPOINT_FORMAT!r} "
                         "entry)")
    if int(ckpt.get("format_version", -1)) > CHECKPOINT_VERSION:
        raise ValueError(f"{path}: checkpoint format_version {ckpt.get('format_version')} is "
                         f"newer than this stfuse reads ({CHECKPOINT_VERSION})")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise ValueError(f"{path} is an incomplete stfuse checkpoint: missing {missing}")
    return ckpt


def check_channels(ckpt: dict, input_channels) -> None:
    """ValueError naming the missing and unexpected channels if the data's model inputs
    (``input_channels``) are not exactly the checkpoint's (same names, same order)."""
    expected = list(ckpt["input_channels"])
    got = list(input_channels)
    if got == expected:
        return
    missing = [c for c in expected if c not in got]
    unexpected = [c for c in got if c not in expected]
    if missing or unexpected:
        raise ValueError(f"the data does not match the model's input channels: missing "
                         f"{missing}, unexpected {unexpected} (the model expects {expected})")
    raise ValueError(f"the data has the model's input channels in another order: expected "
                     f"{expected}, got {got}")


def _residual_spec(value) -> dict | None:
    """The checkpoint's ``residual`` entry as plain ints (None: no residual wrapper)."""
    if value is None:
        return None
    if not isinstance(value, dict) or "prior_indices" not in value \
            or "present_index" not in value:
        raise ValueError(f"bad 'residual' entry in checkpoint: {value!r}")
    return {"prior_indices": [int(i) for i in value["prior_indices"]],
            "present_index": int(value["present_index"])}


def build_network(model: str, in_channels: int, out_channels: int, params: dict,
                  residual: dict | None, init: bool = False, tokens: dict | None = None,
                  uncertainty: str | None = "none", log_scale0: float | None = None) -> torch.nn.Module:
    """The registered model, wrapped in :class:`ResidualOnPrior` when ``residual`` is given.

    ``init=True`` (a fresh model to train): the output layer of the wrapped model is zeroed, so
    the model starts out predicting the prior. ``tokens``: the token layout a ``"sequence"``
    model is built with (:meth:`stfuse.dataset.InputAssembler.token_layout`).

    ``uncertainty`` (:mod:`stfuse.models.uncertainty`; None = ``"none"``): with a scale head the
    registered model is built with 2 x ``out_channels`` outputs (``out_channels`` is the number of
    bands B), the residual wrapper adds the prior to the first B only, and with ``init=True`` the
    zeroed output layer's log-scale biases are set to ``log_scale0`` (when given), so training
    starts at that scale.
    """
    if input_layout(model) == "sequence":
        if tokens is None:
            raise ValueError(f"model {model!r} reads the sequence input layout: it needs its token layout "
                             "(the checkpoint's 'token_layout')")
        params = {**dict(params), "tokens": tokens}
    head = heads.check_head(uncertainty)
    n_out = heads.output_channels(out_channels, head)
    net = build_model(model, in_channels, n_out, **dict(params))
    spec = _residual_spec(residual)
    if spec is None:
        return net
    if init and zero_init_output(net, n_out) and head != heads.NONE and log_scale0 is not None:
        heads.init_log_scale(net, out_channels, log_scale0)
    return ResidualOnPrior(net, spec["prior_indices"], spec["present_index"],
                           extra_channels=n_out - out_channels)


def check_revision(ckpt: dict, source: str = "the checkpoint") -> None:
    """ValueError when ``ckpt`` holds weights of another revision of its architecture than this stfuse
    builds (:func:`stfuse.models.revision`; checkpoints without the key are revision 1)."""
    have, want = int(ckpt.get("model_revision", 1)), revision(ckpt["model"])
    if have != want:
        raise ValueError(f"{source} holds model {ckpt['model']!r} of architecture revision {have}, this stfuse "
                         f"builds revision {want}: its weights do not fit; train it again (in a study: "
                         "snakemake -R train_model)")


def model_from_checkpoint(ckpt: dict, device=None) -> torch.nn.Module:
    """Rebuild the model of a loaded checkpoint, weights loaded, in eval mode.

    Checkpoints with a ``residual`` entry give a :class:`ResidualOnPrior` around the registered
    model; older ones (no entry) the registered model itself.
    """
    check_revision(ckpt)
    model = build_network(ckpt["model"], ckpt["in_channels"], ckpt["out_channels"],
                          ckpt["model_params"], ckpt.get("residual"), tokens=ckpt.get("token_layout"),
                          uncertainty=ckpt.get("uncertainty"))
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    model.to(device if device is not None else "cpu", memory_format=torch.channels_last)
    return model



# --------------------------------------------------------------------------------------------
# transfer: fine-tuning from a checkpoint (``init_from``), adopting one without training

#: keys of a "last" checkpoint that only resuming needs (not copied when a study adopts it)
_LAST_ONLY_KEYS = ("optimizer", "scaler", "rng", "epochs_since_best", "stopped", "best_checkpoint")


def _label(name: str) -> str:
    """The semantic label of a model input channel name (``"B08@t-1"`` -> ``"B08"``)."""
    return str(name).split("@", 1)[0]


def channel_mismatch(expected, got) -> str | None:
    """None when the input channel names ``got`` are exactly ``expected`` (same names, same order),
    else what differs: the missing and unexpected channels grouped by semantic label
    (``"missing channels: B08 (B08@t, B08@t-1, ...); unexpected channels: none"``), or the two orders
    of the labels when only the order differs."""
    expected, got = [str(c) for c in expected], [str(c) for c in got]
    if got == expected:
        return None

    def grouped(names):
        labels: dict[str, list[str]] = {}
        for n in names:
            labels.setdefault(_label(n), []).append(n)
        return "; ".join(f"{lab} ({', '.join(ns)})" for lab, ns in labels.items())

    missing = [c for c in expected if c not in got]
    unexpected = [c for c in got if c not in expected]
    if missing or unexpected:
        return (f"missing channels: {grouped(missing) or 'none'}; unexpected channels: "
                f"{grouped(unexpected) or 'none'}")
    order = list(dict.fromkeys(_label(c) for c in expected))
    have = list(dict.fromkeys(_label(c) for c in got))
    return (f"the same channels in another order: the checkpoint's semantic labels are in the order "
            f"{order}, the data's {have}")


def _band_order_hint(ckpt: dict) -> str:
    """How to get the checkpoint's channel order in a study: its bands per sensor, in order."""
    by_sensor: dict[str, list[str]] = {}
    for ch in ckpt.get("channels") or []:
        if ch.get("kind") in ("optical", "sar"):
            by_sensor.setdefault(str(ch.get("sensor", "?")), []).append(str(ch["name"]))
    return ", ".join(f"sensors.{s}.bands: {b}" for s, b in by_sensor.items())


def load_init(init_from, *, model: str, model_params: dict, input_channels, residual: dict | None) -> dict:
    """The checkpoint ``init_from`` loaded and checked for fine-tuning a run that builds ``model``
    with ``model_params`` on data whose model inputs are ``input_channels`` (``residual``: the run's
    residual spec); its ``sha256`` (``"sha256:<hex>"`` of the file) and resolved ``path`` added.

    FileNotFoundError for a missing file, ValueError naming the file and what differs (model, its
    parameters, the missing / unexpected input channels, their order, the residual wrapper).
    Checked before anything is hashed or written, so a bad ``init_from`` costs nothing.
    """
    path = Path(init_from)
    ckpt = load_checkpoint(path)
    where = f"init_from checkpoint {path}"
    if ckpt["model"] != model or _plain(ckpt["model_params"]) != _plain(model_params):
        raise ValueError(f"{where} holds model {ckpt['model']!r} with model_params {ckpt['model_params']}, "
                         f"but this run builds {model!r} with {model_params}: set model and model_params "
                         "(config keys train.model, train.model_params) to the checkpoint's")
    check_revision(ckpt, where)
    problem = channel_mismatch(ckpt["input_channels"], input_channels)
    if problem is not None:
        hint = (f" (list the bands in the checkpoint's order: {_band_order_hint(ckpt)})"
                if problem.startswith("the same channels") else "")
        raise ValueError(f"{where} does not fit this run's input channels: {problem}{hint}")
    if _residual_spec(ckpt.get("residual")) != _residual_spec(residual):
        raise ValueError(f"{where} was trained {'with' if ckpt.get('residual') else 'without'} the residual on "
                         f"the temporal prior, this run {'with' if residual else 'without'} it (argument "
                         "residual): the weights do not fit")
    return dict(ckpt, path=str(path.resolve()), sha256=_file_digest(path))


def _init_weights(net, init: dict, base: dict) -> None:
    """Load ``init``'s weights (:func:`load_init`) into the freshly built ``net`` (before the first epoch)."""
    for key, default in (("uncertainty", "none"), ("input_layout", "stacked")):  # absent in older checkpoints
        if init.get(key, default) != base.get(key, default):
            raise ValueError(f"init_from checkpoint {init['path']} has {key} {init.get(key, default)!r}, this run "
                             f"{base.get(key, default)!r}: the weights do not fit")
    if int(init["out_channels"]) != int(base["out_channels"]):
        raise ValueError(f"init_from checkpoint {init['path']} has {init['out_channels']} output channels "
                         f"({init['target_channels']}), this run {base['out_channels']} "
                         f"({base['target_channels']}): the output layers do not fit")
    try:
        net.load_state_dict(init["state_dict"])
    except RuntimeError as exc:  # shapes or keys: a checkpoint of another build of the model
        raise ValueError(f"init_from checkpoint {init['path']}: its weights do not fit the network "
                         f"this run builds: {(str(exc).strip().splitlines() or [''])[0]}") from exc
    logger.info("initialised the weights from %s (%s, epoch %s of its run); normalisation statistics are this "
                "run's own", init["path"], init["sha256"], init.get("epoch"))


def _study_input_channels(ckpt: dict, channels, dates) -> tuple[list[dict], list[str]]:
    """The channels (prior appended when ``ckpt`` uses it) and model input names a study's export gives under
    ``ckpt``, as :mod:`stfuse.infer` builds them: the checkpoint's K neighbours, placeholder statistics."""
    from stfuse.dataset import InputAssembler
    from stfuse.prior import PRIOR_KIND, prior_layout

    base = [dict(ch) for ch in channels if ch.get("kind") != PRIOR_KIND]
    if any(ch.get("kind") == PRIOR_KIND for ch in ckpt["channels"]):
        base += prior_layout(base)
    known = {str(ch["name"]): {"mean": 0.0, "std": 1.0} for ch in base}  # names only
    layout = ckpt.get("input_layout", "stacked")  # a token model's checkpoint says "sequence"
    return base, list(InputAssembler(base, dates, known, int(ckpt["k_neighbours"]), layout).input_channels)


def adopt_checkpoint(checkpoint, tiles_dir, out_dir, *, k_neighbours=None, key: str = "train.model") -> dict:
    """Use the trained ``checkpoint`` for the study whose export is ``tiles_dir``, without training
    (an inference-only study): the files :func:`train` writes, but no epoch runs.

    Checks first, writing nothing: the study's model inputs -- the channels and dates of
    ``tiles_dir``/channels.json, assembled as :mod:`stfuse.infer` will assemble them (the
    checkpoint's K neighbours; the temporal prior when the checkpoint uses it) -- must be the
    checkpoint's, matched by semantic label and in the same order. A different *order* of the
    same labels is refused, not reordered: the order of a study's channels is its config's
    ``sensors.<name>.bands`` order all the way from the cube to the registered maps, and the
    model's first layer is tied to its own; listing the bands in the checkpoint's order (the
    message says which) is a one-line change that needs no permutation anywhere. Also refused: a
    checkpoint tile size above the export's (``tiles.size``: the blocks' halo is too small for its
    inference windows). Each error names the checkpoint and the config key ``key``.

    ``k_neighbours`` (the study's K): only compared, with a warning when it differs -- inference
    uses the checkpoint's K.

    Then writes ``out_dir``/``model.pt`` (the checkpoint's dict, copied, plus ``adopted_from``:
    ``path``, ``sha256`` and the source's own ``adopted_from``; the resume-only keys of a
    ``last.pt`` dropped), ``history.csv`` (the columns, no row: no epoch ran in this study) and
    ``loss.png`` (says so, with the source run's curves), and removes a stale ``last.pt``. The
    normalisation statistics stay the checkpoint's: the model learnt in those units.

    Returns a summary dict: ``adopted_from``, ``sha256``, ``model``, ``epochs_run`` (0), ``files``.
    """
    src = Path(checkpoint)
    where = f"checkpoint {src} (config key {key})"
    try:
        ckpt = load_checkpoint(src)
    except (FileNotFoundError, ValueError) as exc:
        raise type(exc)(f"config key {key}: {exc}") from exc
    check_revision(ckpt, where)
    tiles_dir, out = Path(tiles_dir), Path(out_dir)
    meta = json.loads((tiles_dir / CHANNELS_FILE).read_text())
    channels, got = _study_input_channels(ckpt, meta["channels"], meta["dates"])
    problem = channel_mismatch(ckpt["input_channels"], got)
    if problem is not None:
        hint = (f"; list the bands in the checkpoint's order ({_band_order_hint(ckpt)}) -- stfuse does not "
                "reorder channels" if problem.startswith("the same channels")
                else "; the study needs the bands (semantic labels) the model was trained on")
        raise ValueError(f"{where} does not fit the inputs of this study ({tiles_dir / CHANNELS_FILE}): "
                         f"{problem}{hint}")
    from stfuse.infer import checkpoint_assembler  # what inference will build: the last word on the fit
    try:
        checkpoint_assembler(ckpt, channels, meta["dates"])
    except ValueError as exc:
        raise ValueError(f"{where} does not fit the inputs of this study ({tiles_dir / CHANNELS_FILE}): "
                         f"{exc}") from exc
    if int(ckpt["tile_size"]) > int(meta["size"]):
        raise ValueError(f"{where} works on {ckpt['tile_size']}-cell windows, but this study's tiles.size is "
                         f"{meta['size']} (the blocks' halo follows it, too small for the model's windows): "
                         f"set tiles.size to {ckpt['tile_size']}")
    if k_neighbours is not None and int(k_neighbours) != int(ckpt["k_neighbours"]):
        logger.warning("the study's K neighbours (train.neighbours, else pairing.neighbours) is %s, but %s was "
                       "trained with K = %s: inference uses the checkpoint's K", k_neighbours, where,
                       ckpt["k_neighbours"])
    sha = _file_digest(src)
    record = {"path": str(src.resolve()), "sha256": sha, "adopted_from": ckpt.get("adopted_from")}
    copy = {k: v for k, v in ckpt.items() if k not in _LAST_ONLY_KEYS}
    copy["adopted_from"] = record
    out.mkdir(parents=True, exist_ok=True)
    (out / LAST_FILE).unlink(missing_ok=True)  # of an earlier training run of this study: stale now
    _save(copy, out / MODEL_FILE)
    _write_history([], out)
    _plot_adopted(ckpt, record, out)
    logger.info("no training: adopted %s (%s): model %s %s, %d input channels, trained on %s (epoch %s)", src,
                sha, ckpt["model"], ckpt["model_params"], ckpt["in_channels"],
                (ckpt.get("config") or {}).get("tiles_dir", "?"), ckpt.get("epoch"))
    return {"adopted_from": record["path"], "sha256": sha, "model": ckpt["model"], "epochs_run": 0,
            "files": {name: str(out / name) for name in (MODEL_FILE, HISTORY_FILE, PLOT_FILE)}}


def _plot_adopted(ckpt: dict, record: dict, out: Path) -> None:
    """loss.png of an adopted model: says that no training ran, shows the source run's curves."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=100)
    ax = fig.subplots()
    history = ckpt.get("history") or []
    for key, label in (("train_loss", "train"), ("val_loss", "validation")):
        values = [np.nan if h.get(key) is None else h[key] for h in history]
        if values:
            ax.plot([h["epoch"] for h in history], values, marker="o", markersize=3,
                    label=f"{label} (the source study's run)")
    ax.set_title("no training in this study: model adopted from\n" + Path(record["path"]).name
                 + " " + record["sha256"][:19], fontsize=9)
    ax.set_xlabel("epoch of the source run")
    ax.set_ylabel("masked L1 (normalised units)")
    ax.grid(alpha=0.3)
    if history:
        ax.legend()
    fig.tight_layout()
    atomic_write(out / PLOT_FILE, lambda tmp: fig.savefig(tmp, format="png"))

# --------------------------------------------------------------------------------------------
# one pass over a loader

def _masked_l1(pred, target, hidden):
    """Sum of |pred - target| over hidden pixels (all bands), in float32. With an uncertainty head
    (``pred`` has twice the target's channels) the error of the mean, its first half."""
    if pred.shape[1] != target.shape[1]:
        pred = pred[:, :target.shape[1]]
    return ((pred.float() - target).abs() * hidden).sum()


def _masked_nll(head: str, pred, target, hidden):
    """Sum of the head's negative log-likelihood (:func:`stfuse.models.uncertainty.nll`, normalised
    units) over hidden pixels and bands, in float32; ``pred`` (N, 2B, s, s): means and log-scales."""
    mean, log_scale = heads.split(pred, target.shape[1])
    return (heads.nll(head, mean, log_scale, target) * hidden).sum()


def _run_epoch(model, loader, device, optimizer=None, scaler=None, amp=False, uncertainty="none",
               sums: dict | None = None):
    """Train (optimizer given) or evaluate; returns (sum of abs errors, n pixel-bands, samples).

    ``uncertainty`` (a head of :mod:`stfuse.models.uncertainty`): training minimises the mean NLL of
    the hidden pixels instead of their L1; the abs errors returned are still the mean's (the
    validation metric, comparable across heads), and ``sums["nll"]`` (when given) gets the NLL sum."""
    training = optimizer is not None
    head = heads.check_head(uncertainty)
    model.train(training)
    total, count, samples = 0.0, 0, 0
    non_blocking = device.type == "cuda"
    grad = torch.enable_grad() if training else torch.inference_mode()
    with grad:
        for batch in loader:
            samples += batch["image"].shape[0]
            hidden = batch["target_valid"] * (1.0 - batch["mask"])  # (B, 1, s, s)
            n = int(hidden.sum().item()) * batch["target"].shape[1]
            if n == 0:
                continue  # nothing hidden-but-known in this batch: it contributes nothing
            x = batch["image"].to(device, non_blocking=non_blocking,
                                  memory_format=torch.channels_last)
            y = batch["target"].to(device, non_blocking=non_blocking)
            hidden = hidden.to(device, non_blocking=non_blocking)
            with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=amp):
                pred = model(x)
            err = _masked_l1(pred, y, hidden)
            objective = err
            if head != heads.NONE:
                objective = _masked_nll(head, pred, y, hidden)
                if sums is not None:
                    sums["nll"] = sums.get("nll", 0.0) + float(objective.detach().item())
            if training:
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(objective / n).backward()
                scaler.step(optimizer)
                scaler.update()
            total += float(err.detach().item())
            count += n
    return total, count, samples


# --------------------------------------------------------------------------------------------
# outputs

def _write_history(history: list[dict], out: Path) -> None:
    frame = pd.DataFrame(history, columns=list(HISTORY_COLUMNS))
    atomic_write(out / HISTORY_FILE,
                 lambda tmp: frame.to_csv(tmp, index=False, lineterminator="\n"))


def _plot_history(history: list[dict], out: Path) -> None:
    from matplotlib.figure import Figure  # no pyplot: no global state, Agg canvas

    epochs = [h["epoch"] for h in history]
    fig = Figure(figsize=(6, 4), dpi=100)
    ax = fig.subplots()
    for key, label in (("train_loss", "train"), ("val_loss", "validation")):
        values = [np.nan if h[key] is None else h[key] for h in history]
        ax.plot(epochs, values, marker="o", markersize=3, label=label)
    best = [h["epoch"] for h in history if h["best"]]
    if best:
        ax.axvline(best[-1], color="grey", linestyle=":", label=f"best (epoch {best[-1]})")
    ax.set_xlabel("epoch")
    ax.set_ylabel("masked L1 (normalised units)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(out / PLOT_FILE, lambda tmp: fig.savefig(tmp, format="png"))


# --------------------------------------------------------------------------------------------
# training

def _check_args(epochs, batch_size, lr, extra_mask_fraction, seed, patience, num_workers,
                max_minutes, residual, samples_per_epoch):
    def integer(value, name, low):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")

    integer(epochs, "epochs", 1)
    integer(batch_size, "batch_size", 1)
    integer(seed, "seed", 0)
    integer(patience, "patience", 1)
    integer(num_workers, "num_workers", 0)
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not lr > 0:
        raise ValueError(f"lr must be a number > 0, got {lr!r}")
    if isinstance(extra_mask_fraction, bool) or not isinstance(extra_mask_fraction, numbers.Real) \
            or not 0 < extra_mask_fraction <= 1:
        raise ValueError("extra_mask_fraction must be within (0, 1] (without artificial masking "
                         f"there is nothing to learn from), got {extra_mask_fraction!r}")
    if max_minutes is not None and (isinstance(max_minutes, bool) or not isinstance(
            max_minutes, numbers.Real) or max_minutes < 0):
        raise ValueError(f"max_minutes must be None or a number >= 0, got {max_minutes!r}")
    if residual not in ("auto", True, False):
        raise ValueError(f"residual must be 'auto', True or False, got {residual!r}")
    if samples_per_epoch is not None:
        integer(samples_per_epoch, "samples_per_epoch", 1)


def _draw(total: int, n: int, seed: int) -> np.ndarray:
    """``n`` of ``range(total)`` drawn with ``seed``: without replacement when ``n <= total``,
    else whole shuffled passes and the rest without replacement (each sample as often as can be)."""
    rng = np.random.default_rng(seed)
    full, rest = divmod(int(n), int(total))
    parts = [rng.permutation(total) for _ in range(full)] + [rng.choice(total, rest, replace=False)]
    return np.concatenate(parts).astype(np.int64)


def _epoch_samples(dataset, samples_per_epoch, seed: int, epoch: int):
    """The training samples of one epoch: all (None), or ``samples_per_epoch`` drawn from
    ``(seed, epoch)`` -- the same for an epoch however the run got there (resume)."""
    if samples_per_epoch is None:
        return dataset
    idx = _draw(len(dataset), samples_per_epoch, _derived_seed(seed, 4, epoch))
    return Subset(dataset, idx.tolist())


def _val_samples(dataset, samples_per_epoch, seed: int):
    """Validation samples: all, or at most ``samples_per_epoch`` drawn once with a fixed seed
    (sorted, so the tiles are read in order), so validation losses stay comparable."""
    if samples_per_epoch is None or len(dataset) <= samples_per_epoch:
        return dataset
    idx = np.sort(_draw(len(dataset), samples_per_epoch, _derived_seed(seed, 5)))
    return Subset(dataset, idx.tolist())


def train(tiles_dir, out_dir, *, model="unet", model_params=None, epochs=30, batch_size=16,
          lr=1e-3, k_neighbours=2, extra_mask_fraction=0.7, seed=0, device="auto", patience=5,
          num_workers=0, resume=True, max_minutes=None, threads=None, residual="auto",
          samples_per_epoch=None, uncertainty="none", init_from=None) -> dict:
    """Train ``model`` on the export in ``tiles_dir``; write checkpoints and logs to ``out_dir``.

    ``tiles_dir`` is an :func:`stfuse.tiles.export_tiles` directory or a tile store
    (:func:`stfuse.tiles.merge_tile_store`): training reads the blocks' tiles where they are.

    Parameters
    ----------
    model, model_params
        Registry name (:func:`stfuse.models.available`) and keyword parameters of the model.
    epochs
        Last epoch to train (epochs are numbered from 1); a resumed run continues to it.
    batch_size, lr
        Mini-batch size and Adam learning rate.
    k_neighbours, extra_mask_fraction
        Passed to :class:`~stfuse.dataset.GapFillDataset` for the training split.
    seed
        Seeds the model initialisation, shuffling and artificial masking.
    device
        ``"auto"`` (CUDA with mixed precision if available, else CPU), ``"cpu"``, ``"cuda"``..
    patience
        Stop after this many epochs without a lower validation loss.
    num_workers
        DataLoader worker processes.
    resume
        Continue from ``out_dir/last.pt`` when it exists and its fingerprint (data and settings,
        see the module docstring) matches this call's; otherwise log a warning naming what
        changed and start afresh. A finished run (all epochs done, or stopped early) is not
        trained further, but its missing outputs are written again. False: start afresh.
    max_minutes
        Time budget of this call: no new epoch is started when it would probably end past it
        (judged by the last epoch's duration); at least one epoch is trained per call, and a
        later call with ``resume=True`` continues.
    threads
        ``torch.set_num_threads`` for this call (restored after); None leaves it as it is.
        Results are bit-identical only for the same thread count (and machine and torch
        build), so pass a fixed number rather than the cores a scheduler happens to grant; it
        is part of the resume fingerprint. On a small machine shared with other jobs, do not
        pass more than the cores this job may use: more intra-op threads than free cores slows
        training down by an order of magnitude.
    residual
        ``"auto"`` (default): wrap the model in :class:`stfuse.models.ResidualOnPrior` when
        the export holds the temporal prior channels; True: require them (ValueError
        otherwise); False: a plain model, the prior (if any) is only an input.
    samples_per_epoch
        None (default): every training sample each epoch. A number: each epoch trains on that
        many samples drawn from ``(seed, epoch)`` (without replacement when there are enough),
        so an epoch over a huge region is bounded; validation then uses at most as many
        samples, drawn once with a fixed seed. Part of the resume fingerprint.
    uncertainty
        ``"none"`` (default): the model outputs the B bands and training minimises their masked
        L1. ``"laplace"`` or ``"gaussian"`` (:mod:`stfuse.models.uncertainty`): the model outputs
        B bands and B log-scales (the registered architecture is built with 2B outputs) and
        training minimises the mean negative log-likelihood of the hidden pixels; the validation
        loss (early stopping, ``model.pt``) stays the masked L1 of the mean, the NLL is logged.
        With the residual wrapper, the zeroed log-scale outputs start at the maximum-likelihood
        scale of the prior's residuals on the first training samples
        (:func:`_initial_log_scale`). The checkpoint's ``uncertainty`` entry says which head;
        inference then also returns a standard deviation per cell.
    init_from
        None (default): the network starts from its seeded initialisation. A path: an stfuse
        checkpoint (``model.pt`` of another run, e.g. of another study) to fine-tune: the
        network is built, then its weights are loaded before the first epoch. Its model,
        ``model_params``, input channels (names and order), outputs and residual wrapper must be
        this run's (ValueError naming the file and what differs, before anything is written:
        :func:`load_init`). Only the weights are taken: the optimizer starts afresh and the
        normalisation statistics stay this export's own -- fine-tuning adapts the model to the new
        study's units, and inference normalises with the statistics saved in the new checkpoint,
        so the two agree. The file's SHA-256 goes into the checkpoint's ``config``
        (``init_from``; its path in ``init_from_path``) and so into the resume fingerprint: a
        resume with another init file starts afresh.

    Returns a summary dict: ``epochs_run`` (in this call), ``last_epoch``, ``best_epoch``,
    ``best_val_loss``, ``samples_per_s`` (training, this call), ``seconds`` (this call),
    ``stopped`` (why training ended), ``resumed_from`` (epoch or None), ``restart_reason``
    (why an existing ``last.pt`` was not resumed, or None), ``device``,
    ``train_samples``, ``val_samples``, ``val_split`` and the output ``files``.
    """
    with torch_threads(threads):
        return _train(tiles_dir, out_dir, model=model, model_params=model_params, epochs=epochs,
                      batch_size=batch_size, lr=lr, k_neighbours=k_neighbours,
                      extra_mask_fraction=extra_mask_fraction, seed=seed, device=device,
                      patience=patience, num_workers=num_workers, resume=resume,
                      max_minutes=max_minutes, residual=residual,
                      samples_per_epoch=samples_per_epoch, uncertainty=uncertainty,
                      init_from=init_from)


def _train(tiles_dir, out_dir, *, model, model_params, epochs, batch_size, lr, k_neighbours,
           extra_mask_fraction, seed, device, patience, num_workers, resume, max_minutes,
           residual, samples_per_epoch, uncertainty="none", init_from=None):
    t_start = time.perf_counter()
    _check_args(epochs, batch_size, lr, extra_mask_fraction, seed, patience, num_workers,
                max_minutes, residual, samples_per_epoch)
    params = {} if model_params is None else dict(model_params)
    try:
        params = _plain(params)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"model_params must be plain JSON values, got {model_params!r}") from exc
    dev = resolve_device(device)
    amp = dev.type == "cuda"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tiles_dir = Path(tiles_dir)

    layout = input_layout(model)  # the input layout the architecture reads (stacked / sequence)
    train_ds, val_ds, val_split, val_seed = _datasets(tiles_dir, k_neighbours, extra_mask_fraction, seed,
                                                      layout)
    prior_spec = train_ds.assembler.residual_spec()
    if residual is True and prior_spec is None:
        raise ValueError(f"residual=True, but {tiles_dir} has no temporal prior channels "
                         "(export it with export_tiles(..., prior=True))")
    residual_spec = prior_spec if residual in ("auto", True) else None
    # checked before the data is hashed or any output touched
    init = None if init_from is None else load_init(init_from, model=model, model_params=params,
                                                     input_channels=train_ds.input_channels,
                                                     residual=residual_spec)
    head = heads.check_head(uncertainty)
    config = {
        "tiles_dir": str(tiles_dir.resolve()), "model": model, "model_params": params,
        "model_revision": revision(model), "epochs": int(epochs), "batch_size": int(batch_size), "lr": float(lr),
        "k_neighbours": int(k_neighbours), "extra_mask_fraction": float(extra_mask_fraction),
        "seed": int(seed), "device": str(dev), "amp": amp, "patience": int(patience),
        "num_workers": int(num_workers), "max_minutes": max_minutes,
        "loss": "masked_l1" if head == heads.NONE else f"{head}_nll",
        "optimizer": "adam", "val_split": val_split, "val_mask_fraction": VAL_MASK_FRACTION,
        "val_mask_seed": val_seed, "torch_threads": torch.get_num_threads(),
        "residual": residual_spec is not None,
        "samples_per_epoch": None if samples_per_epoch is None else int(samples_per_epoch),
        "uncertainty": head,
    }
    config.update(init_from=None if init is None else init["sha256"],
                  init_from_path=None if init is None else init["path"])
    base = _checkpoint_base(tiles_dir, train_ds, config, residual_spec)

    with _deterministic(dev):
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)
        net, optimizer, scaler = _build(base, train_ds, dev, lr, amp, init)
        st = _restore(out, resume, base, net, optimizer, scaler, dev, amp)
        val_used = _val_samples(val_ds, samples_per_epoch, seed)
        _log_start(base, net, dev, amp, train_ds, val_ds, val_used, val_split, batch_size, samples_per_epoch)
        val_loader = DataLoader(val_used, batch_size=batch_size, shuffle=False,
                                num_workers=num_workers, pin_memory=amp)
        elapsed_before = float(st.history[-1]["elapsed_s"]) if st.history else 0.0
        if st.stopped is None and st.start_epoch > epochs:
            st.stopped = "epochs"
        for epoch in range(st.start_epoch, epochs + 1) if st.stopped is None else ():
            loader = _epoch_loader(train_ds, samples_per_epoch, seed, epoch, batch_size, num_workers, amp)
            rec = _fit_epoch(net, loader, val_loader, dev, optimizer, scaler, amp, head)
            _account(st, epoch, rec, tiles_dir, len(train_ds), len(val_ds), val_split, train_ds.n_dates,
                     elapsed_before + (time.perf_counter() - t_start))
            _decide_stop(st, epoch, epochs, patience, max_minutes, time.perf_counter() - t_start,
                         rec["epoch_s"])
            _save_epoch(st, out, base, net, optimizer, scaler, dev, amp, epoch, epochs, patience, max_minutes)
            if st.stopped is not None:
                break
    return _summary(st, out, dev, len(train_ds), len(val_ds), len(val_used), samples_per_epoch, val_split,
                    time.perf_counter() - t_start)


@dataclasses.dataclass
class _State:
    """Where a training run stands: the history and the best epoch so far, why it stopped; restored from
    last.pt when resuming. ``run_*`` count this call's epochs only."""

    history: list = dataclasses.field(default_factory=list)
    best_epoch: int | None = None
    best_loss: float = math.inf
    since_best: int = 0
    start_epoch: int = 1
    stopped: str | None = None
    resumed_from: int | None = None
    restart_reason: str | None = None
    best_saved: dict | None = None  # what model.pt holds (less ``base``), also kept in last.pt
    improved: bool = False          # the last epoch's
    run_samples: int = 0
    run_train_s: float = 0.0
    epochs_run: int = 0


def _datasets(tiles_dir: Path, k_neighbours, extra_mask_fraction, seed, layout="stacked"):
    """(train dataset, validation dataset, its split name, its masking seed): validation on the train split
    (fixed masking) when the export has no validation sample. ValueError when there is nothing to train on."""
    train_ds = GapFillDataset(tiles_dir, "train", k_neighbours=k_neighbours, layout=layout,
                              extra_mask_seed=0, extra_mask_fraction=extra_mask_fraction)
    if train_ds.n_dates < 2:
        raise ValueError(
            f"{tiles_dir}: the export has {train_ds.n_dates} optical date(s); self-supervised "
            "training hides pixels of one date with the real cloud mask of another, so it needs "
            f"at least 2 (and uses K = {k_neighbours} previous and next dates as inputs, config "
            "key pairing.neighbours): the study has too few usable optical dates -- widen its "
            "period or area, or check the optical input")
    if len(train_ds) == 0:
        raise ValueError(
            f"{tiles_dir}: the train split has no sample: no train tile, or no date of its "
            f"{train_ds.n_dates} optical dates with >= {train_ds.min_target_valid:.0%} clear "
            "pixels in any train tile; nothing to train on (the study is too cloudy or too "
            "small: check its optical input and the tiles section of the config)")
    val_split = "val"
    val_seed = _derived_seed(seed, 1)
    val_ds = GapFillDataset(tiles_dir, "val", k_neighbours=k_neighbours, layout=layout,
                            extra_mask_seed=val_seed, extra_mask_fraction=VAL_MASK_FRACTION)
    if len(val_ds) == 0:
        logger.warning("%s has no validation sample: validating on the train split (with a "
                       "fixed masking) instead", tiles_dir)
        val_split = "train"
        val_ds = GapFillDataset(tiles_dir, "train", k_neighbours=k_neighbours, layout=layout,
                                extra_mask_seed=val_seed, extra_mask_fraction=VAL_MASK_FRACTION)
    return train_ds, val_ds, val_split, val_seed


def _checkpoint_base(tiles_dir: Path, train_ds, config: dict, residual_spec) -> dict:
    """What every checkpoint of the run holds besides its weights and state (input layout, statistics, settings,
    versions, the data fingerprint)."""
    meta = json.loads((tiles_dir / "channels.json").read_text())
    t_hash = time.perf_counter()
    fprint = fingerprint(tiles_dir, config)
    logger.debug("fingerprint of %s in %.1f s", tiles_dir, time.perf_counter() - t_hash)
    return {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_VERSION if residual_spec is not None else 1,
        "model": config["model"], "model_params": config["model_params"],
        "model_revision": config["model_revision"],
        "in_channels": train_ds.n_input_channels, "out_channels": len(train_ds.target_channels),
        "input_channels": list(train_ds.input_channels),
        "target_channels": list(train_ds.target_channels),
        "channels": _plain(train_ds.channels),
        "stats": _plain(train_ds.stats["channels"]),
        "k_neighbours": config["k_neighbours"], "dt_scale_days": DT_SCALE_DAYS,
        "tile_size": int(train_ds.size), "overlap": int(meta.get("overlap", 0)),
        "config": config,
        "versions": {"stfuse": str(stfuse.__version__), "torch": str(torch.__version__)},
        "residual": residual_spec,
        "uncertainty": config.get("uncertainty", heads.NONE),  # the scale head (absent in old ones: none)
        "fingerprint": fprint,
        # a token model's input layout (stfuse.dataset); stacked checkpoints leave both out
        **({"input_layout": train_ds.assembler.layout,
            "token_layout": train_ds.assembler.token_layout()}
           if train_ds.assembler.layout != "stacked" else {}),
    }


#: training samples whose prior residuals set the initial log-scale of an uncertainty head
INIT_SCALE_SAMPLES = 64


def _initial_log_scale(train_ds, base: dict) -> float | None:
    """The starting log-scale of a residual model's uncertainty head: the maximum-likelihood constant
    scale (:func:`stfuse.models.uncertainty.log_scale_of`) of the prior's residuals ``target - prior``
    on the hidden-but-clear pixels of the first INIT_SCALE_SAMPLES training samples (in index order,
    with the dataset's masking seed at construction: the same in every run), i.e. exactly what the
    zeroed model predicts at the start. None (no change) without a head or a residual wrapper, or
    without such a pixel; a plain model's log-scale starts near 0 (the band's standard deviation)."""
    head, spec = heads.check_head(base.get("uncertainty")), _residual_spec(base.get("residual"))
    if head == heads.NONE or spec is None:
        return None
    prior_idx, present = spec["prior_indices"], spec["present_index"]
    residuals = []
    for i in range(min(len(train_ds), INIT_SCALE_SAMPLES)):
        s = train_ds[i]
        image, target = s["image"].numpy(), s["target"].numpy()
        hidden = (s["target_valid"][0] * (1.0 - s["mask"][0])).numpy() > 0
        prior = image[prior_idx] * image[present]
        residuals.append((target - prior)[:, hidden].ravel())
    value = heads.log_scale_of(head, np.concatenate(residuals) if residuals else np.empty(0))
    if value is not None:
        logger.info("%s head: log-scale starts at %.3f (scale %.4f in normalised units, from the prior's "
                    "residuals on %d samples)", head, value, math.exp(value), min(len(train_ds), INIT_SCALE_SAMPLES))
    return value


def _build(base: dict, train_ds, dev, lr, amp, init=None):
    """The network (initialised from the seeded RNG, then from ``init``'s weights when fine-tuning), its Adam
    optimizer and the AMP gradient scaler."""
    net = build_network(base["model"], base["in_channels"], base["out_channels"], base["model_params"],
                        base["residual"], init=True, tokens=base.get("token_layout"),
                        uncertainty=base.get("uncertainty"), log_scale0=_initial_log_scale(train_ds, base))
    if init is not None:
        _init_weights(net, init, base)
    multiple = size_multiple(net)
    if train_ds.size % multiple:
        raise ValueError(f"model {base['model']!r} {base['model_params']} needs tile sizes that are multiples "
                         f"of {multiple}; the export's tiles are {train_ds.size} px")
    net.to(dev, memory_format=torch.channels_last)  # ~1.5-2x faster convolutions on CPU
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    return net, optimizer, scaler


def _restore(out: Path, resume: bool, base: dict, net, optimizer, scaler, dev, amp) -> _State:
    """The run's state: from ``out``/last.pt when it may be resumed (same fingerprint and layout; weights,
    optimizer and RNG state loaded), else afresh, with every stale output removed."""
    st = _State()
    last_path = out / LAST_FILE
    last = None
    if resume and last_path.exists():
        try:
            last = load_checkpoint(last_path)
        except ValueError as exc:
            st.restart_reason = f"unreadable: {exc}"
        else:
            # the layout check only matters if the fingerprint matches (another stfuse)
            diffs = _fingerprint_diffs(last.get("fingerprint"), base["fingerprint"]) \
                or _check_resumable(last, base, base["config"])
            if diffs:
                st.restart_reason = "; ".join(diffs)
                last = None
        if st.restart_reason is not None:
            logger.warning("not resuming from %s (%s), starting afresh", last_path, st.restart_reason)
    if last is None:  # afresh: nothing stale may survive (model.pt of other data, its history..)
        for name in OUTPUT_FILES:
            (out / name).unlink(missing_ok=True)
        return st
    net.load_state_dict(last["state_dict"])
    optimizer.load_state_dict(last["optimizer"])
    if amp and last.get("scaler"):
        scaler.load_state_dict(last["scaler"])
    _set_rng_state(last["rng"], dev)
    st.history = list(last["history"])
    st.best_epoch, best_loss = last["best_epoch"], last["best_val_loss"]
    st.best_loss = math.inf if best_loss is None else best_loss
    st.since_best = int(last["epochs_since_best"])
    st.resumed_from = int(last["epoch"])
    st.start_epoch = st.resumed_from + 1
    if last.get("stopped") == "early_stopping":
        st.stopped = "early_stopping"
    st.best_saved = last.get("best_checkpoint")
    if st.best_saved is not None and not (out / MODEL_FILE).exists():
        # e.g. a workflow manager removed the killed job's outputs: if no later epoch
        # improves, model.pt would never be written again
        _save(dict(base, kind="best", **st.best_saved), out / MODEL_FILE)
        logger.info("restored %s (epoch %s) from %s", MODEL_FILE, st.best_saved["epoch"], last_path)
    logger.info("resuming from %s: epoch %d done (best %s, val loss %s)", last_path,
                last["epoch"], st.best_epoch, _finite_or_none(st.best_loss))
    return st


def _log_start(base, net, dev, amp, train_ds, val_ds, val_used, val_split, batch_size, samples_per_epoch):
    n_params = sum(p.numel() for p in net.parameters())
    logger.info("training %s %s%s (%d parameters) on %s%s: %d train / %d %s samples, "
                "%d input channels, tiles %d px, batch %d", base["model"], base["model_params"],
                " as a residual on the temporal prior" if base["residual"] else "", n_params, dev,
                " with mixed precision" if amp else "", len(train_ds), len(val_ds),
                val_split, base["in_channels"], train_ds.size, batch_size)
    if samples_per_epoch is not None:
        logger.info("samples_per_epoch=%d: each epoch draws %d of the %d train samples; "
                    "validating on %d of the %d %s samples", samples_per_epoch,
                    samples_per_epoch, len(train_ds), len(val_used), len(val_ds), val_split)


def _epoch_loader(train_ds, samples_per_epoch, seed, epoch, batch_size, num_workers, amp) -> DataLoader:
    """The epoch's shuffled loader: masking and order seeded from (seed, epoch), so a resumed run repeats them."""
    train_ds.extra_mask_seed = _derived_seed(seed, 2, epoch)
    gen = torch.Generator()
    gen.manual_seed(_derived_seed(seed, 3, epoch))
    return DataLoader(_epoch_samples(train_ds, samples_per_epoch, seed, epoch), batch_size=batch_size,
                      shuffle=True, generator=gen, num_workers=num_workers, pin_memory=amp)


def _fit_epoch(net, loader, val_loader, dev, optimizer, scaler, amp, uncertainty="none") -> dict:
    """One epoch of training, then validation: losses (None without a hidden pixel), counts and seconds.

    The losses are the masked L1 of the mean whatever the head (so early stopping and the choice of
    model.pt compare like with like); with an uncertainty head the mean NLL of both passes is logged
    and returned too (``train_nll``, ``val_nll``)."""
    t_epoch = time.perf_counter()
    sums, v_sums = {}, {}
    total, count, samples = _run_epoch(net, loader, dev, optimizer, scaler, amp, uncertainty, sums)
    train_s = time.perf_counter() - t_epoch
    v_total, v_count, _ = _run_epoch(net, val_loader, dev, amp=amp, uncertainty=uncertainty, sums=v_sums)
    rec = dict(train_loss=total / count if count else None, val_loss=v_total / v_count if v_count else None,
               samples=samples, count=count, v_count=v_count, train_s=train_s,
               epoch_s=time.perf_counter() - t_epoch)
    if heads.check_head(uncertainty) != heads.NONE:
        rec.update(train_nll=sums["nll"] / count if count and "nll" in sums else None,
                   val_nll=v_sums["nll"] / v_count if v_count and "nll" in v_sums else None)
        logger.info("%s NLL (normalised units): train %s, val %s", uncertainty, _fmt(rec["train_nll"]),
                    _fmt(rec["val_nll"]))
    return rec


def _account(st: _State, epoch: int, rec: dict, tiles_dir, n_train, n_val, val_split, n_dates, elapsed) -> None:
    """Book the epoch into ``st``: best epoch (lowest validation loss, else training loss), history row."""
    monitor = rec["val_loss"] if rec["val_loss"] is not None else rec["train_loss"]
    if monitor is None and st.best_saved is None:
        raise ValueError(
            f"{tiles_dir}: epoch {epoch} gave no loss: none of the {n_train} "
            f"train / {n_val} {val_split} samples has a pixel hidden by another "
            f"date's cloud mask that is clear at its own date (the "
            f"{n_dates} optical dates are all clear, or their clouds never "
            "cover clear pixels of another date); nothing to learn from")
    st.improved = monitor is not None and monitor < st.best_loss
    if st.improved:
        st.best_epoch, st.best_loss, st.since_best = epoch, monitor, 0
    else:
        st.since_best += 1
    st.run_samples += rec["samples"]
    st.run_train_s += rec["train_s"]
    st.epochs_run += 1
    st.history.append({
        "epoch": epoch, "train_loss": rec["train_loss"], "val_loss": rec["val_loss"],
        "train_samples": rec["samples"], "train_pixels": rec["count"], "val_pixels": rec["v_count"],
        "samples_per_s": rec["samples"] / rec["train_s"] if rec["train_s"] > 0 else None,
        "epoch_s": rec["epoch_s"], "elapsed_s": elapsed, "best": st.improved,
    })


def _decide_stop(st: _State, epoch, epochs, patience, max_minutes, call_s, epoch_s) -> None:
    if st.since_best >= patience and epoch < epochs:
        st.stopped = "early_stopping"
    elif epoch == epochs:
        st.stopped = "epochs"
    elif max_minutes is not None and call_s + epoch_s > max_minutes * 60:
        st.stopped = "max_minutes"


def _save_epoch(st: _State, out: Path, base, net, optimizer, scaler, dev, amp, epoch, epochs, patience,
                max_minutes) -> None:
    """model.pt when the epoch improved, last.pt (with optimizer and RNG state), history.csv, loss.png, log."""
    h = st.history[-1]
    state = {k: v.detach().cpu().contiguous().clone() for k, v in net.state_dict().items()}
    summary_keys = {"epoch": epoch, "train_loss": h["train_loss"], "val_loss": h["val_loss"],
                    "best_epoch": st.best_epoch, "best_val_loss": _finite_or_none(st.best_loss),
                    "history": [dict(r) for r in st.history]}
    if st.improved:
        st.best_saved = dict(state_dict=state, **summary_keys)
        _save(dict(base, kind="best", **st.best_saved), out / MODEL_FILE)
    _save(dict(base, kind="last", state_dict=state, **summary_keys, optimizer=optimizer.state_dict(),
               scaler=scaler.state_dict() if amp else None, rng=_rng_state(dev), epochs_since_best=st.since_best,
               stopped=st.stopped, best_checkpoint=st.best_saved),
          out / LAST_FILE)
    _write_history(st.history, out)
    _plot_history(st.history, out)
    logger.info("epoch %d/%d: train loss %s, val loss %s%s, %.1f samples/s, "
                "%.2f s (elapsed %.1f s)", epoch, epochs, _fmt(h["train_loss"]),
                _fmt(h["val_loss"]), " (best)" if st.improved else "",
                h["samples_per_s"] or 0.0, h["epoch_s"], h["elapsed_s"])
    if st.stopped == "early_stopping":
        logger.info("early stopping: no better validation loss for %d epochs (best: "
                    "epoch %s, %s)", patience, st.best_epoch, _fmt(st.best_loss))
    elif st.stopped == "max_minutes":
        logger.info("stopping after epoch %d: the next epoch (~%.0f s) would end past "
                    "max_minutes=%s; rerun with resume=True to continue", epoch, h["epoch_s"], max_minutes)


def _summary(st: _State, out: Path, dev, n_train, n_val, n_val_used, samples_per_epoch, val_split,
             seconds) -> dict:
    """Write back what a workflow manager deleted after a finished run (which trains nothing), check that
    model.pt exists, and return :func:`train`'s summary."""
    if st.history and not (out / HISTORY_FILE).exists():
        _write_history(st.history, out)
    if st.history and not (out / PLOT_FILE).exists():
        _plot_history(st.history, out)
    if not (out / MODEL_FILE).exists():  # e.g. NaN losses from the first epoch on
        raise ValueError(f"{out}: no epoch gave a finite loss, so there is no {MODEL_FILE} "
                         f"(losses: {[(h['train_loss'], h['val_loss']) for h in st.history]}); "
                         "lower lr or check the export")
    return {
        "epochs_run": st.epochs_run,
        "last_epoch": st.history[-1]["epoch"] if st.history else 0,
        "best_epoch": st.best_epoch,
        "best_val_loss": _finite_or_none(st.best_loss),
        "samples_per_s": st.run_samples / st.run_train_s if st.run_train_s > 0 else None,
        "seconds": seconds,
        "stopped": st.stopped,
        "resumed_from": st.resumed_from,
        "restart_reason": st.restart_reason,
        "device": str(dev),
        "train_samples": n_train,
        "val_samples": n_val,
        "val_samples_used": n_val_used,
        "samples_per_epoch": samples_per_epoch,
        "val_split": val_split,
        "files": {name: str(out / name) for name in (MODEL_FILE, LAST_FILE, HISTORY_FILE,
                                                     PLOT_FILE)},
    }


def _fmt(x) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.4f}"


def _check_resumable(last: dict, base: dict, config: dict) -> list[str]:
    """The settings and input layout of ``last`` that differ from this run's (none: resumable)."""
    diffs = []
    for key in RESUME_KEYS:
        if last["config"].get(key) != config[key]:
            diffs.append(f"{key}: {last['config'].get(key)!r} -> {config[key]!r}")
    for key in ("input_channels", "target_channels", "tile_size"):
        if last[key] != base[key]:
            diffs.append(f"{key}: {last[key]!r} -> {base[key]!r}")
    if _residual_spec(last.get("residual")) != base["residual"]:
        diffs.append(f"residual: {last.get('residual')!r} -> {base['residual']!r}")
    return diffs
