"""The benchmark's holdout decision: when the data support it, and why not when they do not."""

import json

import numpy as np
import pytest

from stfuse import benchmark

CHANNELS = [{"name": "B04", "sensor": "S2", "kind": "optical"}, {"name": "valid", "sensor": "S2", "kind": "valid"}]


def cube_of(valid):
    """(T, 2, H, W) cube: one optical band (NaN where not valid), the valid channel (NaN = unobserved)."""
    valid = np.asarray(valid, dtype=np.float32)
    band = np.where(valid == 1, 0.3, np.nan).astype(np.float32)
    cube = np.stack([band, valid], axis=1)
    meta = {"channels": CHANNELS, "dates": [{"start_time": f"2023-04-{t + 1:02d}T00:00:00Z"} for t in range(len(valid))]}
    return cube, meta


def test_footprint_cells_never_observed_count_neither_as_clear_nor_cloud():
    valid = np.full((4, 8, 8), np.nan)
    valid[:, :, :4] = 0.0            # the footprint is the left half
    valid[0, :, :4] = 1.0            # clear over the whole footprint
    valid[1, :4, :4] = 1.0           # half cloudy
    cube, meta = cube_of(valid)
    # over the whole region date 0 would be 50 % clear and date 1 75 % cloudy: no benchmark at all
    hidden, dates = benchmark.choose_holdout(cube, meta, min_clear=0.9, seed=0)
    assert dates == [0]
    np.testing.assert_array_equal(hidden[0], (valid[0] == 1) & (valid[1] != 1))


@pytest.mark.parametrize("case, params, reason", [
    ("no clear date", dict(min_clear=0.99), "no optical date is clear enough"),
    ("no donor", dict(min_clear=0.9), "no donor cloud mask for evaluation date 2023-04-01"),
    ("all hidden", dict(min_clear=0.9, max_fraction=1.0), "hide every clear cell"),
])
def test_benchmark_not_possible_says_why(case, params, reason):
    valid = np.zeros((4, 6, 6))
    valid[0] = 1.0                   # one clear date; the others fully cloudy (no donor within [0.05, 0.7])
    if case == "no clear date":
        valid[0, :2] = 0.0
    cube, meta = cube_of(valid)
    with pytest.raises(benchmark.BenchmarkNotPossible, match=reason):
        benchmark.choose_holdout(cube, meta, seed=0, **params)


def test_holdout_step_records_the_decision(tmp_path):
    valid = np.zeros((4, 6, 6))
    valid[0] = 1.0
    cube, meta = cube_of(valid)
    (tmp_path / "cube").mkdir()
    np.save(tmp_path / "cube" / "cube.npy", cube)
    (tmp_path / "cube" / "cube.json").write_text(json.dumps(meta))
    info = benchmark.holdout_step(tmp_path / "cube", tmp_path / "h" / "hidden.npy", tmp_path / "h" / "holdout.json",
                                  min_clear=0.9, seed=0, min_mask_fraction=0.05, max_mask_fraction=0.7,
                                  max_dates=None, data_range=1.0)
    assert info["possible"] is False and "no donor" in info["reason"]
    assert json.loads((tmp_path / "h" / "holdout.json").read_text()) == json.loads(json.dumps(info))
    hidden = np.load(tmp_path / "h" / "hidden.npy")
    assert hidden.shape == (4, 6, 6) and not hidden.any()
    valid[2, :3] = 1.0               # a half-cloudy donor makes it possible
    np.save(tmp_path / "cube" / "cube.npy", cube_of(valid)[0])
    info = benchmark.holdout_step(tmp_path / "cube", tmp_path / "h" / "hidden.npy", tmp_path / "h" / "holdout.json",
                                  min_clear=0.9, seed=0)
    assert info["possible"] is True and info["reason"] is None and info["eval_dates"] == ["2023-04-01T00:00:00Z"]
    assert np.load(tmp_path / "h" / "hidden.npy").sum() == info["hidden_cells"] == 18


def test_not_possible_outputs(tmp_path):
    md = benchmark.not_possible_step(tmp_path, {"possible": False, "reason": "no donor cloud mask for X"})
    assert (tmp_path / "summary.md").read_text() == md
    assert md.startswith("**The benchmark could not score this study**: no donor cloud mask for X.")
    assert "could not score this study</b>: no donor cloud mask for X." in (tmp_path / "summary.html").read_text()
    assert (tmp_path / "scores.csv").read_text().strip().split(",")[:2] == ["band", "metric"]
    for png in ("by_gap.png", "quicklook.png"):
        assert (tmp_path / png).stat().st_size > 3000


def test_summary_html_bolds_the_best_per_column():
    import pandas as pd

    scores = pd.DataFrame([
        dict(protocol="transplanted clouds", method=m, band="all", gap_bin="all", cloud_bin="all", metric=k, value=v)
        for m, mae, ssim in (("linear", 0.05, 0.70), ("stfuse_model", 0.03, 0.65))
        for k, v in (("mae", mae), ("ssim", ssim))])
    page = benchmark.to_html(benchmark.summary_table(scores), "Scored on 2 dates & more")
    assert page.startswith("<!DOCTYPE html>") and "Scored on 2 dates &amp; more" in page
    assert "0.0300" in page and "0.0500" in page and "0.700" in page
    import re

    # one bold cell per column, styled by cell id: the model's MAE (row 1, col 0) and linear's SSIM (row 0, col 1)
    rule = re.search(r"\n(#T_\w+(?:, #T_\w+)*) \{\n  font-weight: bold;", page).group(1)
    assert sorted(cell.split("_", 2)[2] for cell in rule.split(", ")) == ["row0_col1", "row1_col0"], page


def test_observed_uses_the_one_definition_of_clear():
    """valid == 1 with a NaN band is not clear: benchmark.observed agrees with stfuse.cube.clear_mask."""
    from stfuse import cube as cube_mod

    channels = [{"name": "B02", "kind": "optical"}, {"name": "B04", "kind": "optical"}, {"name": "valid", "kind": "valid"}]
    cube = np.ones((2, 3, 2, 2), np.float32)
    cube[0, 1, 0, 0] = np.nan            # valid 1, one band missing
    cube[1, 2, 1, 1] = 0.0               # cloudy
    obs, clear = benchmark.observed(cube, channels)
    np.testing.assert_array_equal(clear, cube_mod.clear_mask(cube, 2, [0, 1]))
    assert not clear[0, 0, 0] and not clear[1, 1, 1] and clear.sum() == 6
    assert np.isnan(obs[0, :, 0, 0]).all()


def test_gap_table_shares_and_best_per_bin():
    import pandas as pd

    from stfuse.benchmark import gap_markdown, gap_table

    rows = []
    for method, maes in (("linear", (0.01, 0.03)), ("stfuse_model", (0.008, 0.04))):
        for gap, mae, n in (("all", 0.02, 100), ("[0,5)", maes[0], 75), ("[5,10)", maes[1], 25)):
            rows.append(dict(band="all", metric="mae", gap_bin=gap, cloud_bin="all", value=mae, n_pixels=n,
                             n_unfilled=0, method=method, protocol="transplanted clouds"))
            rows.append(dict(band="B04", metric="mae", gap_bin=gap, cloud_bin="all", value=9.0, n_pixels=n,
                             n_unfilled=0, method=method, protocol="transplanted clouds"))
    table = gap_table(pd.DataFrame(rows))
    part = table.loc["transplanted clouds"]
    assert list(part.index) == ["[0,5)", "[5,10)"]
    assert part["share"].tolist() == pytest.approx([0.75, 0.25])
    assert part.loc["[5,10)", "stfuse_model"] == pytest.approx(0.04)  # band "all" only, not B04's 9.0
    md = gap_markdown(table)
    assert "| [0,5) | 75.0% | 0.0100 | **0.0080** |" in md
    assert "| [5,10) | 25.0% | **0.0300** | 0.0400 |" in md
