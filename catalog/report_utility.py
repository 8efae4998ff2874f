"""The dataset card's "Downstream utility" section, from a datasets row's ``utility_*`` columns.

``factory.utility`` records them: the same segmenter trained on real cases only and on real plus synthetic
cases, scored on held-out real cases. This module only reads the JSON columns (no torch); the numbers and
their confidence intervals are shown as recorded, with a plain statement of what they do and do not say.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from catalog.report_html import esc, figure_png, table

WEAK_BASELINE_DICE = 0.5  # below this mean Dice the real-only arm is too weak for the comparison to mean much
FEW_TEST_CASES = 10  # below this many test cases a bootstrap interval is itself unreliable
_ARM_COLOURS = ("#555555", "#3b6ea5", "#e8710a", "#1a7f37", "#8e44ad", "#c62828")


def utility_section(dataset: Mapping[str, Any] | None) -> str:
    """Return the section's HTML, or ``""`` when the row has no ``utility_results``."""
    text = (dataset or {}).get("utility_results")
    if not text:
        return ""
    results = json.loads(text)
    rows = list(results.get("rows") or [])
    if not rows:
        return ""
    parts = ["<h2>Downstream utility</h2>", _setup(dataset), plot_utility(rows) or "",
             utility_table(rows), f"<p>{esc(reading(rows, dataset))}</p>"]
    ood = (results.get("ood") or {}).get("rows")
    if ood:
        parts += ["<h3>Out-of-distribution test set</h3>", plot_utility(ood) or "", utility_table(ood),
                  f"<p>{esc(reading(ood, dataset, ood=True))}</p>"]
    return "\n".join(parts)


def _setup(dataset: Mapping[str, Any]) -> str:
    budget = _json(dataset.get("utility_budget"), {})
    arms = _json(dataset.get("utility_arms"), [])
    arm_text = "; ".join(f"{a.get('name')}: {a.get('n_real')} real + {a.get('n_synthetic')} synthetic" for a in arms)
    budget_text = ", ".join(f"{k} {budget[k]}" for k in ("epochs", "patch_size", "spacing_mm", "seed", "device")
                            if k in budget)
    facts = [["segmenter", dataset.get("utility_segmenter") or "—"],
             ["budget (every arm)", budget_text or "—"],
             ["arms (training cases)", arm_text or "—"],
             ["test set", dataset.get("utility_test") or "—"],
             ["real data", "recorded only as its fingerprint, sha256 "
                           f"{str(dataset.get('utility_real_fingerprint') or '—')[:16]}…"]]
    return ('<p class="note">The same segmenter, budget and seeds in every arm; each arm is scored on held-out real '
            "cases that no arm trained on. 95 % CIs are bootstrap intervals over the test cases; ΔDice is paired "
            "against the real-only arm.</p>" + table(None, facts))


def _json(text: Any, default: Any) -> Any:
    try:
        return json.loads(text) if text else default
    except ValueError:
        return default


def _label(row: Mapping[str, Any]) -> str:
    return "mean" if row["structure"] == "mean" else f"{row.get('name') or 'structure'} ({row['structure']})"


def _ci(value: float | None, ci: Sequence[float] | None, signed: bool = False) -> str:
    if value is None:
        return "—"
    fmt = "+.3f" if signed else ".3f"
    if not ci or any(c is None for c in ci):
        return format(value, fmt)
    return f"{value:{fmt}} [{ci[0]:{fmt}}, {ci[1]:{fmt}}]"


def utility_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The per-structure table: arm, structure, n, Dice [CI], surface Dice [CI], ΔDice [CI]."""
    body = [[r["arm"], _label(r), r.get("n_cases"), _ci(r.get("dice"), r.get("dice_ci")),
             _ci(r.get("surface_dice"), r.get("surface_dice_ci")),
             _ci(r.get("delta_dice"), r.get("delta_dice_ci"), signed=True)] for r in rows]
    return table(["arm", "structure", "test cases", "Dice [95 % CI]", "surface Dice [95 % CI]",
                  "ΔDice vs real [95 % CI]"], body)


def plot_utility(rows: Sequence[Mapping[str, Any]]) -> str | None:
    """An ``<img>``: Dice per arm (points with 95 % CI error bars) for each structure and the mean, or None."""
    from matplotlib.figure import Figure

    arms = list(dict.fromkeys(r["arm"] for r in rows))
    labels = list(dict.fromkeys(_label(r) for r in rows if r["structure"] != "mean")) + ["mean"]
    if not arms or not any(r.get("dice") is not None for r in rows):
        return None
    fig = Figure(figsize=(max(6.0, 0.9 * len(labels) * max(1, len(arms)) / 2 + 2), 4.2))
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(arms)
    for i, arm in enumerate(arms):
        xs, ys, lo, hi = [], [], [], []
        for x, label in enumerate(labels):
            row = next((r for r in rows if r["arm"] == arm and _label(r) == label), None)
            if row is None or row.get("dice") is None:
                continue
            ci = row.get("dice_ci") or (row["dice"], row["dice"])
            xs.append(x - 0.4 + width * (i + 0.5))
            ys.append(row["dice"])
            lo.append(max(0.0, row["dice"] - (ci[0] if ci[0] is not None else row["dice"])))
            hi.append(max(0.0, (ci[1] if ci[1] is not None else row["dice"]) - row["dice"]))
        ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o", capsize=3, color=_ARM_COLOURS[i % len(_ARM_COLOURS)], label=arm)
    ax.axvline(len(labels) - 1.5, color="#bbbbbb", lw=0.8)
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax.set_ylim(0.0, 1.0)
    ax.set_ylabel("Dice on held-out real cases")
    ax.set_title("Dice per arm with bootstrap 95 % CI")
    ax.legend(loc="best", fontsize="small")
    return figure_png(fig)


def reading(rows: Sequence[Mapping[str, Any]], dataset: Mapping[str, Any], *, ood: bool = False) -> str:
    """A plain statement of what the mean Dice deltas say and what they do not."""
    means = [r for r in rows if r["structure"] == "mean" and r.get("delta_dice") is not None]
    n = max((int(r.get("n_cases") or 0) for r in rows), default=0)
    said = []
    for r in means:
        lo, hi = (r.get("delta_dice_ci") or (None, None))
        if lo is None or hi is None:
            verdict = "no interval was computed"
        elif lo > 0:
            verdict = "its CI lies above zero: on this test set, this arm did better than real only"
        elif hi < 0:
            verdict = "its CI lies below zero: on this test set, this arm did worse than real only"
        else:
            verdict = "its CI includes zero: no evidence of a difference either way"
        said.append(f"{r['arm']} changes mean Dice by {r['delta_dice']:+.3f} ({verdict})")
    where = "the out-of-distribution set" if ood else "the held-out real test set"
    head = (f"On {where} ({n} case{'s' if n != 1 else ''}): " + "; ".join(said) + ". ") if said else ""
    baseline = next((r.get("dice") for r in rows if r["structure"] == "mean" and r.get("delta_dice") is None
                     and r.get("dice") is not None), None)
    if baseline is not None and baseline < WEAK_BASELINE_DICE:
        head += (f"The real-only arm reaches a mean Dice of only {baseline:.3f}: the segmenter is barely trained at "
                 "this budget, so the comparison says little about the data. ")
    if 0 < n < FEW_TEST_CASES:
        head += f"A bootstrap over {n} test cases gives unreliable intervals. "
    return (head + "These numbers hold for this segmenter, budget and real set only. They say nothing about real "
            "patient CT if the \"real\" set is itself synthetic or a phantom. With few test cases the intervals are "
            "wide; overlapping intervals between arms are not evidence of a difference, and a CI that includes zero "
            "is not evidence of no effect. A gain at a small budget need not persist with a stronger segmenter "
            "or more real data.")
