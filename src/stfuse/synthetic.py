"""A deterministic, built-in demo scene: Sentinel-2 with clouds, Sentinel-1, and the cloud-free truth.

The scene is small and cheap so that tests, examples and benchmarks can run without downloads.
It is meant to be plausible, not accurate: fields with their own phenology drive both the optical
reflectance (red falls and NIR rises with vegetation) and the SAR backscatter (VH rises with
biomass), so a method that learns the S1 -> S2 link has something real to learn.

Everything is drawn from one ``numpy.random.Generator`` seeded with ``seed``, always in the same
order, so the same arguments give byte-identical files.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import logging
from pathlib import Path

import numpy as np
import rasterio
from rasterio.crs import CRS
from rasterio import Affine
from scipy.ndimage import gaussian_filter

from .config import parse_date

logger = logging.getLogger("stfuse.synthetic")

S2_BANDS = ("B02", "B03", "B04", "B08")
S1_BANDS = ("VH", "VV")
SCL_VEGETATION, SCL_BARE, SCL_WATER = 4, 5, 6
SCL_SHADOW, SCL_CLOUD_MEDIUM, SCL_CLOUD_HIGH, SCL_CIRRUS = 3, 8, 9, 10
SCL_CODES = (SCL_SHADOW, SCL_VEGETATION, SCL_BARE, SCL_WATER, SCL_CLOUD_MEDIUM, SCL_CLOUD_HIGH, SCL_CIRRUS)

# Land-cover classes: (base, amplitude, green-up day of year, width, senescence day, width).
# Vegetation fraction = base + amp * (logistic(green-up) - logistic(senescence)).
CLASSES = {
    "winter_cereal": (0.10, 0.80, 80, 8.0, 185, 6.0),
    "spring_barley": (0.05, 0.80, 125, 7.0, 200, 5.0),
    "maize": (0.05, 0.85, 165, 7.0, 265, 6.0),
    "sugar_beet": (0.05, 0.85, 145, 8.0, 290, 10.0),
    "grassland": (0.45, 0.35, 95, 10.0, 290, 15.0),
    "bare_soil": (0.03, 0.00, 100, 10.0, 300, 10.0),
}
# Reflectance end-members in B02, B03, B04, B08 order.
SOIL = np.array([0.08, 0.11, 0.15, 0.22])
VEG = np.array([0.03, 0.07, 0.03, 0.45])
WATER = np.array([0.06, 0.05, 0.035, 0.02])
CLOUD = np.array([0.44, 0.42, 0.41, 0.42])
TIME_FMT = "%Y-%m-%dT%H:%M:%SZ"


def _validate(start, end, width, height, optical_revisit_days, sar_revisit_days,
              cloud_cover, fully_cloudy_fraction, n_fields):
    start, end = parse_date(start, "start"), parse_date(end, "end")
    if end <= start:
        raise ValueError(f"end ({end}) must be after start ({start})")
    for name, size in (("width", width), ("height", height)):
        if int(size) != size or size < 16 or size % 2:
            raise ValueError(f"{name} must be an even integer >= 16, got {size!r}")
    for name, days in (("optical_revisit_days", optical_revisit_days), ("sar_revisit_days", sar_revisit_days)):
        if not days > 0:
            raise ValueError(f"{name} must be > 0, got {days!r}")
    for name, frac in (("cloud_cover", cloud_cover), ("fully_cloudy_fraction", fully_cloudy_fraction)):
        if not 0.0 <= frac <= 1.0:
            raise ValueError(f"{name} must be within [0, 1], got {frac!r}")
    if int(n_fields) != n_fields or n_fields < 1:
        raise ValueError(f"n_fields must be an integer >= 1, got {n_fields!r}")
    return start, end


def acquisition_times(rng, start: dt.date, end: dt.date, revisit_days: float, hour: float,
                      jitter_days: float) -> list[dt.datetime]:
    """Nominal revisit grid with day jitter and a +-15 min time-of-day jitter (naive UTC)."""
    n_days = (end - start).days
    nominal = np.arange(0.0, n_days + 1e-9, revisit_days)
    jitter = rng.uniform(-jitter_days, jitter_days, nominal.size)  # drawn in full: fixed RNG use
    seconds = rng.integers(-15 * 60, 15 * 60 + 1, nominal.size)
    midnight = dt.datetime.combine(start, dt.time())
    days, times = set(), []
    for off, jit, sec in zip(nominal, jitter, seconds):
        day = int(np.clip(np.rint(off + jit), 0, n_days))
        if day not in days:  # tiny revisits could land twice on one day
            days.add(day)
            times.append(midnight + dt.timedelta(days=day, hours=hour, seconds=int(sec)))
    return sorted(times)


def _landscape(rng, height, width, n_fields):
    """Voronoi fields with a class, jittered phenology and offsets, a pond, static texture."""
    pts = rng.uniform(0, 1, (n_fields, 2)) * [height, width]
    rr, cc = np.mgrid[0:height, 0:width]
    d2 = (rr[..., None] - pts[:, 0]) ** 2 + (cc[..., None] - pts[:, 1]) ** 2
    labels = np.argmin(d2, axis=-1)
    names = list(CLASSES)
    pool = np.resize(rng.permutation(len(names)), n_fields)  # every class before any repeats
    fields = []
    for k in range(n_fields):
        base, amp, sos, k1, eos, k2 = CLASSES[names[pool[k]]]
        fields.append({
            "class": names[pool[k]],
            "pheno": (base, amp * rng.uniform(0.85, 1.1), sos + rng.uniform(-7, 7), k1,
                      eos + rng.uniform(-7, 7), k2),
            "soil_brightness": rng.uniform(0.85, 1.15),
            "vv_offset": rng.normal(0, 0.6), "vh_offset": rng.normal(0, 0.5),
        })
    # a small pond gives the water classes (SCL 6, very low backscatter) something to show
    cy, cx = rng.uniform(0.2, 0.8) * height, rng.uniform(0.2, 0.8) * width
    ry, rx = height / rng.uniform(8, 12), width / rng.uniform(7, 10)
    water = ((rr - cy) / ry) ** 2 + ((cc - cx) / rx) ** 2 <= 1.0
    texture = gaussian_filter(rng.standard_normal((height, width)), 1.5)
    texture = 0.05 * texture / texture.std()
    return labels, fields, water, texture


def _veg_fraction(t: dt.datetime, labels, fields, texture):
    doy = (t - dt.datetime(t.year, 1, 1)).total_seconds() / 86400.0 + 1.0
    per_field = []
    for f in fields:
        base, amp, sos, k1, eos, k2 = f["pheno"]
        rise, fall = 1 / (1 + np.exp(-(doy - sos) / k1)), 1 / (1 + np.exp(-(doy - eos) / k2))
        per_field.append(base + amp * (rise - fall))
    veg = np.asarray(per_field)[labels]
    return np.clip(veg + texture * (veg > 0.05), 0.0, 1.0)  # bare soil stays bare


def _clouds(rng, fraction, height, width):
    """Cloud opacity (0 = clear) from thresholded smooth noise; opacity is low at the edges."""
    z = gaussian_filter(rng.standard_normal((height, width)), min(height, width) / 10.0)
    z = (z - z.mean()) / z.std()
    if fraction <= 0.0:
        return np.zeros_like(z)
    if fraction >= 0.99:
        return 0.45 + 0.55 * (z - z.min()) / (z.max() - z.min())
    thr = np.quantile(z, 1.0 - fraction)
    return np.where(z >= thr, 0.1 + 0.9 * np.clip((z - thr) / 0.8, 0.0, 1.0), 0.0)


def _cloud_fractions(rng, n, cloud_cover, fully_cloudy_fraction):
    """Per-date fractions: some dates fully cloudy, >= 2 clear, the rest so the mean ~ cloud_cover."""
    if cloud_cover >= 1.0:
        n_clear, n_full = 0, n
    else:  # clear dates first (a demo needs them), then as many fully cloudy as the budget allows
        n_clear = min(2, n)
        n_full = min(int(round(fully_cloudy_fraction * n)), int(np.floor(cloud_cover * n)))
        if cloud_cover > 0 and fully_cloudy_fraction > 0:
            n_full = max(n_full, 1)
        # partly cloudy dates stay <= 90 % cloudy: a very cloudy season needs more full ones
        n_full = max(n_full, int(np.ceil((cloud_cover * n - 0.9 * (n - n_clear)) / 0.1 - 1e-9)))
        n_full = min(n_full, n - n_clear)
    n_rest = n - n_full - n_clear
    mean_rest = np.clip((cloud_cover * n - n_full) / max(n_rest, 1), 0.0, 0.9)
    rest = rng.beta(2 * mean_rest + 1e-6, 2 * (1 - mean_rest) + 1e-6, n_rest)
    if n_rest and rest.mean() > 0:  # pull the sample mean onto the target, so the average holds
        rest = rest * mean_rest / rest.mean()
    rest = np.where(rest < 0.02, 0.0, np.clip(rest, 0.03, 0.9))  # near-clear dates become clear
    fractions = np.concatenate([np.ones(n_full), np.zeros(n_clear), rest])
    return fractions[rng.permutation(n)]


def _to_dn(reflectance):
    # DN 0 is nodata, so valid reflectance never rounds to 0
    return np.clip(np.rint(reflectance * 10000.0), 1, 10000).astype(np.uint16)


def _write(path: Path, array, transform, crs, nodata, tags):
    profile = dict(driver="GTiff", width=array.shape[1], height=array.shape[0], count=1,
                   dtype=array.dtype.name, crs=crs, transform=transform, nodata=nodata,
                   compress="deflate")
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(array, 1)
        dst.update_tags(**tags)


def _write_manifest(path: Path, rows):
    rows = sorted(rows, key=lambda r: (r[1], r[3], r[2]))  # sensor, time, band
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["path", "sensor", "semantic_label", "start_time"])
        writer.writerows(rows)


def make_scene(out_dir, *, seed=0, width=64, height=64, start="2021-04-01", end="2021-08-31",
               optical_revisit_days=5.0, sar_revisit_days=6.0, cloud_cover=0.4,
               fully_cloudy_fraction=0.15, n_fields=12, epsg=32631,
               west=500000.0, north=5650000.0) -> Path:
    """Write the demo scene into ``out_dir`` and return the path of ``out_dir/manifest.csv``."""
    start_d, end_d = _validate(start, end, width, height, optical_revisit_days, sar_revisit_days,
                               cloud_cover, fully_cloudy_fraction, n_fields)
    width, height = int(width), int(height)
    out = Path(out_dir)
    for sub in ("S2", "S1", "truth"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    crs = CRS.from_epsg(epsg)
    t10, t20 = Affine(10.0, 0, west, 0, -10.0, north), Affine(20.0, 0, west, 0, -20.0, north)  # north-up

    labels, fields, water, texture = _landscape(rng, height, width, n_fields)
    opt_times = acquisition_times(rng, start_d, end_d, optical_revisit_days, 10.5, 1.0)
    # S1 repeats its orbit tightly (small jitter) and passes in the evening: never an optical instant
    sar_times = acquisition_times(rng, start_d, end_d, sar_revisit_days, 17.5, 0.5)
    fractions = _cloud_fractions(rng, len(opt_times), cloud_cover, fully_cloudy_fraction)
    logger.info("synthetic scene: %d optical and %d SAR dates, %dx%d px, seed %d -> %s",
                len(opt_times), len(sar_times), width, height, seed, out)

    rows, truth_rows, dates = [], [], []
    soil = SOIL[:, None, None] * np.asarray([f["soil_brightness"] for f in fields])[labels]
    for t, frac in zip(opt_times, fractions):
        stamp, iso = t.strftime("%Y%m%dT%H%M%S"), t.strftime(TIME_FMT)
        veg = _veg_fraction(t, labels, fields, texture)
        refl = (1 - veg) * soil + veg * VEG[:, None, None]
        refl = np.where(water, WATER[:, None, None], refl)
        refl = refl + rng.normal(0, 0.004, (4, 1, 1)) + rng.normal(0, 0.003, refl.shape)  # atmosphere, noise
        refl = np.clip(refl, 0.001, 0.6)
        nir, red = refl[3], refl[2]
        scl = np.where(water, SCL_WATER, np.where((nir - red) / (nir + red) > 0.35, SCL_VEGETATION, SCL_BARE))

        opacity = _clouds(rng, frac, height, width)
        dy, dx = int(rng.integers(2, 7)), int(rng.integers(0, 4))
        brightness = rng.uniform(0.9, 1.15)
        cloud = opacity > 0
        # the shadow falls north-west of the thicker cloud (sun in the south-east in the morning)
        caster = np.where(opacity >= 0.35, opacity, 0.0)
        shade = np.zeros_like(caster)
        shade[: height - dy, : width - dx] = caster[dy:, dx:]
        shadow = (shade > 0) & ~cloud
        obs = np.where(shadow, refl * (1 - 0.55 * shade), refl)
        obs = np.where(cloud, (1 - opacity) * refl + opacity * brightness * CLOUD[:, None, None], obs)
        scl = np.where(shadow, SCL_SHADOW, scl)
        scl = np.where(cloud, np.where(opacity < 0.35, SCL_CIRRUS,
                                       np.where(opacity < 0.7, SCL_CLOUD_MEDIUM, SCL_CLOUD_HIGH)), scl)

        for b, band in enumerate(S2_BANDS):
            tags = {"semantic_label": band, "start_time": iso}
            name = f"S2_{band}_{stamp}.tif"
            _write(out / "S2" / name, _to_dn(obs[b]), t10, crs, 0, tags)
            _write(out / "truth" / name, _to_dn(refl[b]), t10, crs, 0, tags)
            rows.append((f"S2/{name}", "S2", band, iso))
            truth_rows.append((name, "S2", band, iso))
        name = f"S2_SCL_{stamp}.tif"
        _write(out / "S2" / name, scl.astype(np.uint8), t10, crs, 0, {"semantic_label": "SCL", "start_time": iso})
        rows.append((f"S2/{name}", "S2", "SCL", iso))
        dates.append({"start_time": iso, "cloud_fraction": round(float(cloud.mean()), 4),
                      "shadow_fraction": round(float(shadow.mean()), 4)})
        logger.debug("S2 %s cloud %.2f", iso, cloud.mean())

    vv_off = np.asarray([f["vv_offset"] for f in fields])[labels]
    vh_off = np.asarray([f["vh_offset"] for f in fields])[labels]
    looks = 1.5  # at 10 m; 2x2 averaging gives ~6 looks at 20 m, close to IW GRD
    for t in sar_times:
        stamp, iso = t.strftime("%Y%m%dT%H%M%S"), t.strftime(TIME_FMT)
        veg = _veg_fraction(t, labels, fields, texture)
        wet = rng.uniform(-0.5, 0.5) * (1 - veg)  # rain brightens soil, mostly through VV
        db = {"VH": np.where(water, -27.0, -22.0 + 8.0 * veg + vh_off + 1.0 * wet),
              "VV": np.where(water, -23.0, -14.0 + 4.0 * veg + vv_off + 2.5 * wet)}
        for band in S1_BANDS:
            power = 10 ** (db[band] / 10) * rng.gamma(looks, 1 / looks, (height, width))
            power = power.reshape(height // 2, 2, width // 2, 2).mean(axis=(1, 3))
            name = f"S1_{band}_{stamp}.tif"
            _write(out / "S1" / name, (10 * np.log10(power)).astype(np.float32), t20, crs, float("nan"),
                   {"semantic_label": band, "start_time": iso})
            rows.append((f"S1/{name}", "S1", band, iso))

    manifest = out / "manifest.csv"
    _write_manifest(manifest, rows)
    _write_manifest(out / "truth" / "manifest.csv", truth_rows)
    params = dict(seed=int(seed), width=width, height=height, start=start_d.isoformat(), end=end_d.isoformat(),
                  optical_revisit_days=float(optical_revisit_days), sar_revisit_days=float(sar_revisit_days),
                  cloud_cover=float(cloud_cover), fully_cloudy_fraction=float(fully_cloudy_fraction),
                  n_fields=int(n_fields), epsg=int(epsg), west=float(west), north=float(north))
    scene = {"parameters": params, "optical_dates": dates,
             "fully_cloudy_dates": [d["start_time"] for d in dates if d["cloud_fraction"] >= 0.99],
             "clear_dates": [d["start_time"] for d in dates if d["cloud_fraction"] == 0.0],
             "sar_dates": [t.strftime(TIME_FMT) for t in sar_times],
             "fields": [f["class"] for f in fields]}
    (out / "scene.json").write_text(json.dumps(scene, indent=2) + "\n")
    logger.info("synthetic scene written: mean cloud fraction %.2f, %d fully cloudy, %d clear",
                float(np.mean([d["cloud_fraction"] for d in dates])), len(scene["fully_cloudy_dates"]),
                len(scene["clear_dates"]))
    return manifest
