"""What the viewer page shows a volume with: CT window presets and the MAISI label colour map.

The colour map is discrete: one colour per MAISI label ID, named after the MAISI label dictionary
(:mod:`maisi_core.anatomy.labels`, torch-free). Background and the body envelope (ID 200, which covers
every body voxel without an organ label) are transparent, so the organs stay visible; tumour labels
get saturated warm colours that stand out from the organs they grow in.
"""

from __future__ import annotations

import colorsys
import dataclasses
from typing import Any

from maisi_core.anatomy import labels as _labels

# Golden-ratio hue steps keep neighbouring IDs (often neighbouring organs) far apart in hue.
_HUE_STEP = 0.618033988749895
_SATURATIONS = (0.75, 0.55, 0.9)
_VALUES = (0.95, 0.8)
# Tumour label -> RGB: warm and saturated so a lesion stands out from its host organ.
TUMOR_COLOURS: dict[int, tuple[int, int, int]] = {
    23: (255, 64, 0),     # lung tumor
    24: (255, 0, 128),    # pancreatic tumor
    26: (255, 0, 0),      # hepatic tumor
    27: (255, 160, 0),    # colon cancer primaries
    128: (255, 0, 255),   # bone lesion
}
TRANSPARENT_IDS: frozenset[int] = frozenset({_labels.BACKGROUND_ID, _labels.BODY_ID})


@dataclasses.dataclass(frozen=True)
class WindowPreset:
    """A CT display window: intensities in ``[level - width/2, level + width/2]`` HU map to black..white.

    Attributes:
        key: short identifier used by the page (``soft_tissue``).
        title: what the button says.
        width_hu: window width in HU.
        level_hu: window centre (level) in HU.
    """

    key: str
    title: str
    width_hu: float
    level_hu: float

    @property
    def range_hu(self) -> tuple[float, float]:
        """The HU range ``(low, high)`` the window spans."""
        return self.level_hu - self.width_hu / 2, self.level_hu + self.width_hu / 2

    def to_dict(self) -> dict[str, Any]:
        """The preset as JSON-ready values, with its HU range."""
        low, high = self.range_hu
        return {**dataclasses.asdict(self), "min_hu": low, "max_hu": high}


# The usual radiology windows (width/level in HU); the first is the page's default for CT.
WINDOW_PRESETS: tuple[WindowPreset, ...] = (
    WindowPreset("soft_tissue", "Soft tissue", 400.0, 40.0),
    WindowPreset("lung", "Lung", 1500.0, -600.0),
    WindowPreset("bone", "Bone", 1800.0, 400.0),
    WindowPreset("liver", "Liver", 150.0, 30.0),
    WindowPreset("mediastinum", "Mediastinum", 350.0, 50.0),
    WindowPreset("brain", "Brain", 80.0, 40.0),
)


def label_colour(label: int) -> tuple[int, int, int]:
    """The RGB colour (0-255 each) of MAISI label ``label``: fixed for tumours, spread in hue for the rest."""
    if label in TUMOR_COLOURS:
        return TUMOR_COLOURS[label]
    hue = (label * _HUE_STEP) % 1.0
    sat = _SATURATIONS[label % len(_SATURATIONS)]
    val = _VALUES[(label // len(_SATURATIONS)) % len(_VALUES)]
    red, green, blue = colorsys.hsv_to_rgb(hue, sat, val)
    return round(red * 255), round(green * 255), round(blue * 255)


def build_label_colormap() -> dict[str, Any]:
    """The discrete MAISI label colour map in NiiVue's sparse form.

    Returns:
        ``{"R": [...], "G": [...], "B": [...], "A": [...], "I": [...], "labels": [...]}``: one entry per
        label ID ``I`` (background 0, the named structures, body 200; no unused ``dummy`` slots), with
        alpha 0 for background and body and 255 for the rest.
    """
    ids = sorted(_labels.known_ids())
    colours = [(0, 0, 0) if i == _labels.BACKGROUND_ID else label_colour(i) for i in ids]
    return {
        "R": [c[0] for c in colours],
        "G": [c[1] for c in colours],
        "B": [c[2] for c in colours],
        "A": [0 if i in TRANSPARENT_IDS else 255 for i in ids],
        "I": ids,
        "labels": [_labels.label_name(i) for i in ids],
        "version": _labels.LABEL_DICT_VERSION,
    }
