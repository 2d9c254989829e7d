"""The data-efficiency benchmark's scores (`bootdiff.efficiency.models`, `bootdiff.efficiency.report`),
on hand-made results: the gap closed, each row at its validation minimum (one early-stopping rule
for every model, the kimg read off its selection run's validation curve, never the test curve),
and what each row is worth in full-resolution images."""

import math

import pytest

from bootdiff.efficiency import report as efficiency_report
from bootdiff.efficiency.models import gap_closed, select


def test_gap_closed():
    assert gap_closed(1.0, 0.8, 0.6) == pytest.approx(0.5)
    assert gap_closed(1.0, 0.6, 0.6) == pytest.approx(1.0)
    assert gap_closed(1.0, 1.1, 0.6) == pytest.approx(-0.25)  # worse than the baseline
    assert math.isnan(gap_closed(1.0, 0.9, 1.0))  # no gap to close
    assert math.isnan(gap_closed(0.4745, 0.503, 0.4734))  # a gap inside the noise: no ratio
    assert gap_closed(0.4845, 0.4795, 0.4734) == pytest.approx(0.45, abs=0.01)  # 2.3 %: a gap
    assert math.isnan(gap_closed(float("nan"), 0.9, 0.5))
    s = efficiency_report.summarize({"oracle": {"test_G": 0.5, "swd": 0.1},
                              "N8/baseline": {"test_G": 1.0, "swd": 0.3}, "N8/bootstrap": {"test_G": 0.75, "swd": 0.25},
                              "N8/select-a": {"test_G": 0.9, "trial": {"label": "a"}}},
                             {"ns": [8], "g_sigma_data": 0.5, "pool": [1], "partial": [2], "test": [3], "views": []},
                             {"full_res_kimg": 1, "view_kimg": 2})
    assert s["per_n"]["8"]["gap_closed_test_G"] == pytest.approx(0.5)
    assert s["per_n"]["8"]["gap_closed_swd"] == pytest.approx(0.25)
    assert "bootstrap_early_stopped" not in s["per_n"]["8"]  # no curves: nothing to stop early on

    # early stopping, one rule for both models: the kimg comes from the model's selection run's
    # validation curve, never from its test curve; the residual setting is picked at its minimum
    val = [{"kimg": 2.0, "test_G": 0.9}, {"kimg": 4.0, "test_G": 0.7}, {"kimg": 6.0, "test_G": 0.8}]
    test = [{"kimg": 2.0, "test_G": 0.6, "train_G": 0.5}, {"kimg": 4.05, "test_G": 0.65, "train_G": 0.4},
            {"kimg": 6.0, "test_G": 0.75, "train_G": 0.3}]
    base_val = [{"kimg": 2.0, "test_G": 0.95}, {"kimg": 6.0, "test_G": 0.85}]
    base_test = [{"kimg": 2.0, "test_G": 0.7}, {"kimg": 6.0, "test_G": 0.9}]
    results = {"oracle": {"test_G": 0.5}, "N8/baseline": {"test_G": 1.0, "curve": base_test},
               "N8/bootstrap": {"test_G": 0.75, "curve": test, "trial": {"label": "a"}},
               "N8/select-baseline": {"test_G": 0.85, "curve": base_val},
               "N8/select-a": {"test_G": 0.8, "trial": {"label": "a"}, "curve": val},
               "N8/select-b": {"test_G": 0.75, "trial": {"label": "b"}, "curve": [{"kimg": 2.0, "test_G": 0.78}]}}
    assert select(results, 8) == {"label": "a"}  # 0.7 at 4 kimg beats b's 0.78, though b ends lower
    row = efficiency_report.summarize(results, {"ns": [8], "g_sigma_data": 0.5, "pool": [1], "partial": [2],
                                                "test": [3], "views": []}, {"full_res_kimg": 1, "view_kimg": 2})["per_n"]["8"]
    assert row["bootstrap_early_stopped"] == {"kimg": 4.05, "test_G": 0.65, "train_G": 0.4, "val_kimg": 4.0,
                                              "val_G": 0.7}
    # the baseline's validation minimum is at 6 kimg, though its test G is lowest at 2
    assert row["baseline_early_stopped"]["kimg"] == 6.0 and row["baseline_early_stopped"]["test_G"] == 0.9
    assert row["gap_closed_test_G_early_stopped"] == pytest.approx((0.9 - 0.65) / (0.9 - 0.5))
    assert row["gap_closed_test_G"] == pytest.approx(0.5)
    assert row["selection"] == {"baseline": 0.85, "a": 0.7, "b": 0.78}
    md = efficiency_report.markdown(efficiency_report.summarize(results, {"ns": [8], "g_sigma_data": 0.5, "pool": [1],
                                    "partial": [2], "test": [3], "views": []}, {"full_res_kimg": 1, "view_kimg": 2}))
    assert "| 8 | baseline, stopped at 6 kimg (validation minimum) | 0.9 |" in md
    assert "| 8 | bootstrap, stopped at 4.05 kimg (validation minimum) | 0.65 |" in md


def test_worth_in_images_against_hand_computed_values():
    from bootdiff.efficiency.models import worth_in_images

    curve = {16: 0.55, 64: 0.47, 256: 0.45}
    # halfway from 0.55 to 0.47 in G is halfway from 16 to 64 in log N: sqrt(16·64) = 32
    assert worth_in_images(0.51, curve) == {"images": pytest.approx(32.0), "bound": "="}
    # a quarter of the way from 64 to 256: 64·4^0.25 = 90.51
    assert worth_in_images(0.465, curve)["images"] == pytest.approx(64 * 4 ** 0.25)
    assert worth_in_images(0.47, curve) == {"images": 64.0, "bound": "="}
    assert worth_in_images(0.40, curve) == {"images": 256.0, "bound": ">"}  # beats every measured N
    assert worth_in_images(0.60, curve) == {"images": 16.0, "bound": "<"}
    assert worth_in_images(float("nan"), curve)["images"] is None
    # a non-monotone curve is taken as its running minimum: 0.5 at 64 counts as 0.47 (from N=16 on)
    bumpy = {16: 0.47, 64: 0.50, 256: 0.43}
    assert worth_in_images(0.45, bumpy)["images"] == pytest.approx(128.0)  # halfway 64 -> 256 in log N
    assert worth_in_images(0.47, bumpy) == {"images": 16.0, "bound": "="}


def test_summary_says_what_each_model_is_worth_in_images():
    """Worth on the curve of the stopped baselines plus the oracle at the whole pool (64 + 960)."""
    results = {"oracle": {"test_G": 0.44}, "N16/baseline": {"test_G": 0.55}, "N64/baseline": {"test_G": 0.47},
               "N16/bootstrap": {"test_G": 0.51}, "N64/bootstrap": {"test_G": 0.43},
               "N16/ambient": {"test_G": 0.455}, "N16/combined": {"test_G": 0.6}}
    plan = {"ns": [16, 64], "g_sigma_data": 0.5, "pool": list(range(64)), "partial": list(range(960)),
            "test": [0], "views": []}
    s = efficiency_report.summarize(results, plan, {"full_res_kimg": 1, "view_kimg": 2, "ambient_kimg": 3})
    w16, w64 = s["per_n"]["16"]["worth"], s["per_n"]["64"]["worth"]
    assert w16["bootstrap"]["images"] == pytest.approx(32.0) and w16["bootstrap"]["partial_pool_worth"] == pytest.approx(16.0)
    # 0.455 is halfway from 0.47 (N = 64) to 0.44 (the oracle, N = 1024) in G: 64·16^0.5 = 256
    assert w16["ambient"]["images"] == pytest.approx(256.0) and w16["ambient"]["bound"] == "="
    assert w16["combined"] == {"images": 16.0, "bound": "<", "partial_pool_worth": 0.0}
    assert w64["bootstrap"]["bound"] == ">"  # better than the oracle: worth more than every image there is
    md = efficiency_report.markdown(s)
    assert "| 16 | bootstrap | ≈ 32 | +16 images |" in md and "| 64 | bootstrap | > 1024 |" in md
    assert "ambient 3 kimg (the bootstrap's training FLOPs)" in md
