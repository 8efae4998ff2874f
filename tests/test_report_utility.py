"""The dataset card's "Downstream utility" section (catalog.report_utility), from recorded JSON columns only."""

from __future__ import annotations

import json

from _catalog_cases import write_case
from catalog.report_utility import reading, utility_section, utility_table


def _row(arm, structure, dice, ci, delta=None, delta_ci=None, n=5, name="liver"):
    return {"arm": arm, "structure": structure, "name": None if structure == "mean" else name, "n_cases": n,
            "dice": dice, "dice_ci": ci, "surface_dice": dice, "surface_dice_ci": ci,
            "delta_dice": delta, "delta_dice_ci": delta_ci}


ROWS = [_row("real", 1, 0.70, [0.60, 0.80]), _row("real", "mean", 0.70, [0.60, 0.80]),
        _row("real+synth_1to1", 1, 0.80, [0.72, 0.88], 0.10, [0.04, 0.16]),
        _row("real+synth_1to1", "mean", 0.80, [0.72, 0.88], 0.10, [0.04, 0.16]),
        _row("synth_only", 1, 0.65, [0.50, 0.78], -0.05, [-0.20, 0.09]),
        _row("synth_only", "mean", 0.65, [0.50, 0.78], -0.05, [-0.20, 0.09])]


def _dataset(rows=ROWS, ood=None) -> dict:
    results = {"rows": rows, "baseline": "real", "bootstrap": 1000, "seed": 0, "ci_level": 0.95}
    if ood is not None:
        results["ood"] = {"rows": ood, "baseline": "real", "bootstrap": 1000, "seed": 0, "ci_level": 0.95}
    return {"utility_segmenter": "segresnet", "utility_results": json.dumps(results),
            "utility_budget": json.dumps({"epochs": 20, "patch_size": [32, 32, 32], "seed": 0, "device": "cpu"}),
            "utility_arms": json.dumps([{"name": "real", "ratio": None, "n_real": 12, "n_synthetic": 0},
                                        {"name": "real+synth_1to1", "ratio": 1.0, "n_real": 12, "n_synthetic": 12}]),
            "utility_real_fingerprint": "ab" * 32, "utility_test": "held-out split of --real: 5 of 20 cases"}


def test_utility_section_is_empty_without_results():
    assert utility_section(None) == ""
    assert utility_section({"utility_results": None}) == ""
    assert utility_section({"utility_results": json.dumps({"rows": []})}) == ""


def test_utility_section_has_chart_table_setup_and_reading():
    html = utility_section(_dataset())
    assert html.startswith("<h2>Downstream utility</h2>")
    assert html.count('src="data:image/png;base64,') == 1
    assert "<td>real+synth_1to1</td><td>liver (1)</td><td>5</td><td>0.800 [0.720, 0.880]</td>" in html
    assert "<td>+0.100 [+0.040, +0.160]</td>" in html
    assert "held-out split of --real: 5 of 20 cases" in html and "sha256 abababababababab…" in html
    assert "real+synth_1to1: 12 real + 12 synthetic" in html
    assert "epochs 20" in html and "ΔDice is paired" in html


def test_reading_states_what_the_intervals_say_and_do_not_say():
    text = reading(ROWS, _dataset())
    assert text.startswith("On the held-out real test set (5 cases): ")
    assert "real+synth_1to1 changes mean Dice by +0.100 (its CI lies above zero: on this test set, this arm did " \
           "better than real only)" in text
    assert "synth_only changes mean Dice by -0.050 (its CI includes zero: no evidence of a difference" in text
    assert "say nothing about real patient CT if the \"real\" set is itself synthetic or a phantom" in text
    assert "overlapping intervals between arms are not evidence of a difference" in text
    assert "A bootstrap over 5 test cases gives unreliable intervals." in text and "barely trained" not in text
    hurt = [_row("real", "mean", 0.3, [0.2, 0.4], n=12), _row("x", "mean", 0.1, [0.0, 0.2], -0.2, [-0.3, -0.1], n=12)]
    text = reading(hurt, {})
    assert "its CI lies below zero: on this test set, this arm did worse than real only" in text
    assert "The real-only arm reaches a mean Dice of only 0.300: the segmenter is barely trained" in text
    assert "unreliable intervals" not in text


def test_utility_section_shows_the_ood_set_separately():
    ood = [_row("real", "mean", 0.4, [0.3, 0.5], n=3), _row("real+synth_1to1", "mean", 0.5, [0.4, 0.6], 0.1,
                                                             [-0.02, 0.2], n=3)]
    html = utility_section(_dataset(ood=ood))
    assert "<h3>Out-of-distribution test set</h3>" in html
    assert html.count('src="data:image/png;base64,') == 2
    assert "On the out-of-distribution set (3 cases)" in html


def test_utility_table_escapes_recorded_text():
    html = utility_table([_row("<script>x</script>", 1, 0.5, None, name="<b>liver</b>")])
    assert "<script>" not in html and "&lt;script&gt;" in html and "&lt;b&gt;liver&lt;/b&gt; (1)" in html
    assert "<td>0.500</td>" in html  # no interval recorded: the value alone


def test_card_shows_the_section_only_when_the_latest_row_has_results(tmp_path):
    from catalog.report import build_report_html
    from catalog.store import open_catalog

    cat = open_catalog(tmp_path)
    cat.append_samples([write_case(tmp_path, i) for i in range(2)])
    base = {"dataset": "demo", "dataset_version": "1", "spec_id": "spec-abc123", "n_samples": 2}
    cat.append_dataset(base)
    assert "Downstream utility" not in build_report_html(cat, max_previews=0)
    cat.append_dataset({**base, **_dataset()})
    html = build_report_html(cat, max_previews=0)
    assert "<h2>Downstream utility</h2>" in html and "0.800 [0.720, 0.880]" in html
