"""The MAISI label dictionary: names and IDs, body regions, tumour labels and label-map checks.

The dictionary ships as package data (``maisi_core/data/label_dict.json``, copied unchanged from
NV-Generate-CTMR). IDs 1-132 name anatomical structures (eight of them are unused ``dummy`` slots),
0 is background and 200 is the body envelope, which every released ControlNet expects on each body
voxel that carries no organ label.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

import numpy as np

from maisi_core.errors import LabelMapError, LabelNameError, did_you_mean

BACKGROUND_ID = 0
BODY_ID = 200
LABEL_DICT_VERSION = "maisi-ct-132@da438fe"
MAX_LABEL_ID = 255  # the ControlNet's 8-bit label encoding caps IDs here

# Body regions in MAISI's order (the ddpm model's one-hot index).
BODY_REGIONS: tuple[str, ...] = ("head_neck", "chest", "abdomen", "lower")
_REGION_ALIASES = {
    "head": "head_neck", "head_neck": "head_neck", "head/neck": "head_neck", "neck": "head_neck",
    "chest": "chest", "thorax": "chest", "chest/thorax": "chest",
    "abdomen": "abdomen",
    "lower": "lower", "pelvis": "lower", "pelvis/lower": "lower", "lower_body": "lower",
}

LUNG_IDS = (28, 29, 30, 31, 32)
KIDNEY_IDS = (5, 14)
VERTEBRA_IDS = tuple(range(33, 57)) + (127,)
RIB_IDS = tuple(range(63, 87))
BONE_IDS = VERTEBRA_IDS + RIB_IDS + tuple(range(87, 98)) + (120, 122)

# Tumour label -> the organ IDs it grows in (used for placement and for removing tumours).
TUMOR_HOSTS: dict[int, tuple[int, ...]] = {
    23: LUNG_IDS,          # lung tumor
    24: (4,),              # pancreatic tumor
    26: (1,),              # hepatic tumor
    27: (62,),             # colon cancer primaries
    128: BONE_IDS,         # bone lesion
}
TUMOR_IDS = tuple(sorted(TUMOR_HOSTS))


@dataclass(frozen=True)
class TumorType:
    """A pathology a spec can ask for: its MAISI label, host organ and the body regions the host lies in.

    Attributes:
        label_id: the tumour's MAISI label ID (a key of :data:`TUMOR_HOSTS`).
        host_organs: host organ names in the QC vocabulary (``lung``, ``liver``, ...).
        regions: the body regions (``head_neck``, ``chest``, ``abdomen``, ``lower``) the host lies in.
    """

    label_id: int
    host_organs: tuple[str, ...]
    regions: tuple[str, ...]

    @property
    def host_ids(self) -> tuple[int, ...]:
        """The host's MAISI label IDs (where the tumour is placed)."""
        return TUMOR_HOSTS[self.label_id]


# The one table of tumour types (spec ``pathology.type`` -> what it means for labels and placement).
TUMOR_TYPES: dict[str, TumorType] = {
    "lung_tumor": TumorType(23, ("lung",), ("chest",)),
    "hepatic_tumor": TumorType(26, ("liver",), ("abdomen",)),
    "pancreatic_tumor": TumorType(24, ("pancreas",), ("abdomen",)),
    "colon_tumor": TumorType(27, ("colon",), ("abdomen", "lower")),
    "bone_lesion": TumorType(128, ("bone",), ("head_neck", "chest", "abdomen", "lower")),
}
# remove_tumors (upstream's rules): lesions relabelled as their organ, and lesions filled by the
# majority label of their neighbouring host voxels.
TUMOR_REMAP: dict[int, int] = {26: 1, 24: 4, 27: 62, 116: 14, 117: 5}
TUMOR_MAJORITY_HOSTS: dict[int, tuple[int, ...]] = {23: LUNG_IDS, 128: BONE_IDS}

# Structures that characterise each body region (used for region detection and phantom/QC lists).
REGION_STRUCTURES: dict[str, tuple[int, ...]] = {
    "head_neck": (22, 120, 126, 112, 113, 121) + tuple(range(50, 57)) + (57, 11),
    "chest": LUNG_IDS + (115, 6, 57, 11, 132, 122, 114, 89, 90, 91, 92, 87, 88, 125, 119, 108, 109,
                         110, 111, 123, 124, 23) + RIB_IDS + tuple(range(38, 50)),
    "abdomen": (1, 3, 4, 5, 14, 8, 9, 10, 12, 13, 19, 62, 7, 6, 17, 25, 104, 105, 106, 107, 24, 26,
                116, 117) + tuple(range(33, 38)),
    "lower": (15, 118, 93, 94, 95, 96, 97, 127, 58, 59, 60, 61, 98, 99, 100, 101, 102, 103, 62, 27),
}
# MAISI's own region-detection rule (CTMR scripts/utils.py): a region is present when any of these is.
_REGION_MARKERS: dict[str, tuple[int, ...]] = {
    "head_neck": (22, 120),
    "chest": LUNG_IDS,
    "abdomen": (1, 2, 3, 4, 5, 14),
    "lower": (93, 94),
}


@lru_cache(maxsize=1)
def label_dict() -> dict[str, int]:
    """Return the MAISI label dictionary, name -> ID (133 entries, body = 200)."""
    text = resources.files("maisi_core").joinpath("data/label_dict.json").read_text()
    return {str(k): int(v) for k, v in json.loads(text).items()}


@lru_cache(maxsize=1)
def _names_by_id() -> dict[int, str]:
    return {v: k for k, v in label_dict().items()}


@lru_cache(maxsize=1)
def _ids_by_lower_name() -> dict[str, int]:
    return {k.lower(): v for k, v in label_dict().items() if not k.startswith("dummy")}


def dummy_ids() -> tuple[int, ...]:
    """Return the unused placeholder IDs (``dummy1`` ... ``dummy8``)."""
    return tuple(sorted(v for k, v in label_dict().items() if k.startswith("dummy")))


def known_ids() -> frozenset[int]:
    """Return every ID a label map may hold: background, the named structures and body."""
    dummies = set(dummy_ids())
    return frozenset({BACKGROUND_ID} | {v for v in label_dict().values() if v not in dummies})


def label_id(name: str) -> int:
    """Return the ID of a structure name (case and spaces/underscores are ignored).

    Raises:
        LabelNameError: the name is not in the dictionary; the message suggests the closest one.
    """
    key = " ".join(str(name).strip().replace("_", " ").split()).lower()
    by_lower = _ids_by_lower_name()
    if key in by_lower:
        return by_lower[key]
    hint = did_you_mean(str(name).strip(), [k for k in label_dict() if not k.startswith("dummy")])
    raise LabelNameError(
        f"label_id expects a structure name from the MAISI label dictionary, but got name={name!r}.{hint}"
    )


def label_name(label: int) -> str:
    """Return the structure name of an ID (``0`` is ``background``)."""
    label = int(label)
    if label == BACKGROUND_ID:
        return "background"
    name = _names_by_id().get(label)
    if name is None or name.startswith("dummy"):
        raise LabelNameError(
            f"label_name expects an ID of the MAISI label dictionary (0, 1-132 without the dummy slots "
            f"{list(dummy_ids())}, or {BODY_ID}), but got label={label}."
        )
    return name


def normalize_region(region: str) -> str:
    """Return the canonical body-region name (``head_neck``, ``chest``, ``abdomen``, ``lower``)."""
    key = str(region).strip().lower().replace(" ", "_")
    if key in _REGION_ALIASES:
        return _REGION_ALIASES[key]
    hint = did_you_mean(key, _REGION_ALIASES)
    raise LabelNameError(
        f"normalize_region expects one of {sorted(_REGION_ALIASES)}, but got region={region!r}.{hint}"
    )


def region_index(region: str) -> int:
    """Return MAISI's 0-3 index of a body region (0 head/neck, 1 chest, 2 abdomen, 3 lower)."""
    return BODY_REGIONS.index(normalize_region(region))


def region_structures(region: str) -> tuple[int, ...]:
    """Return the structure IDs typical of a body region."""
    return REGION_STRUCTURES[normalize_region(region)]


def regions_in_label_map(label_map: np.ndarray) -> tuple[str, ...]:
    """Return the body regions present in a label map, head to feet, by MAISI's marker rule."""
    present = set(np.unique(np.asarray(label_map)).tolist())
    return tuple(r for r in BODY_REGIONS if present.intersection(_REGION_MARKERS[r]))


def tumor_ids_in(label_map: np.ndarray) -> tuple[int, ...]:
    """Return the tumour labels present in a label map."""
    present = set(np.unique(np.asarray(label_map)).tolist())
    return tuple(t for t in TUMOR_IDS if t in present)


def remove_tumors(label_map: np.ndarray) -> np.ndarray:
    """Return a tumour-free copy of a label map: the unconditional branch of classifier-free guidance.

    The rules are upstream's ``remove_tumors`` (CTMR ``scripts/augmentation.py``, no pseudo labels):

    * :data:`TUMOR_REMAP`: hepatic tumour 26 → liver 1, pancreatic tumour 24 → pancreas 4, colon
      cancer 27 → colon 62, left kidney cyst 116 → left kidney 14, right kidney cyst 117 → right kidney 5.
    * :data:`TUMOR_MAJORITY_HOSTS`: every voxel of lung tumour 23 becomes the most frequent lung lobe
      in the one-voxel ring (3×3×3 dilation) around the tumour, or the most frequent lobe in the whole
      map when the ring touches none (lobe 28 when the map has no lobe at all).

    Two deliberate differences: bone lesion 128 gets the same majority vote over the bone labels
    (upstream leaves it in place without pseudo labels, so bone-lesion guidance would change nothing
    in the mask), and the dilation treats voxels outside the volume as empty (upstream pads with ones,
    so lobe voxels on the volume's border also vote). Brain tumour IDs (176, 401-403) are outside the
    132-label vocabulary and never occur here.
    """
    out = np.array(label_map, copy=True)
    arr = np.asarray(label_map)
    for tumor, host in TUMOR_REMAP.items():
        out[arr == tumor] = host
    for tumor, hosts in TUMOR_MAJORITY_HOSTS.items():
        out = _fill_by_majority_vote(out, out == tumor, hosts)
    return out


def _fill_by_majority_vote(label_map: np.ndarray, lesion: np.ndarray, hosts: Sequence[int]) -> np.ndarray:
    """Set every ``lesion`` voxel to the ring's most frequent ``hosts`` label (ties: the first in ``hosts``)."""
    if not lesion.any():
        return label_map
    from scipy import ndimage

    ring = ndimage.binary_dilation(lesion, structure=np.ones((3, 3, 3), dtype=bool)) & ~lesion
    votes = label_map[ring & np.isin(label_map, hosts)]
    if votes.size == 0:
        votes = label_map[np.isin(label_map, hosts)]
    counts = [int(np.count_nonzero(votes == h)) for h in hosts]
    label_map[lesion] = hosts[int(np.argmax(counts))]
    return label_map


def check_label_map(
    label_map: np.ndarray,
    *,
    expected_shape: Sequence[int] | None = None,
    extra_ids: Iterable[int] = (),
    require_body: bool = True,
    who: str = "check_label_map",
) -> None:
    """Check a label map against the MAISI vocabulary; raise one clear error on the first problem.

    Args:
        label_map: integer array ``(X, Y, Z)`` in MAISI IDs.
        expected_shape: the output size the map must have, if any.
        extra_ids: IDs allowed beyond the dictionary (fine-tuned classes in dummy or free slots).
        require_body: whether label 200 must be present (the released ControlNets need it).
        who: the caller's name, used in messages.

    Raises:
        LabelMapError: wrong dimensionality, dtype or shape; unknown IDs; IDs above 255; no body label.
    """
    arr = np.asarray(label_map)
    if arr.ndim != 3:
        raise LabelMapError(
            f"{who} expects a 3D label map (X, Y, Z), but got shape={tuple(arr.shape)}. "
            "Squeeze batch/channel axes before passing it."
        )
    if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool):
        if not np.issubdtype(arr.dtype, np.floating) or not np.all(np.equal(np.mod(arr, 1), 0)):
            raise LabelMapError(
                f"{who} expects integer label IDs, but got dtype={arr.dtype} with non-integer values. "
                "Load label maps with nearest-neighbour interpolation only."
            )
    if expected_shape is not None and tuple(arr.shape) != tuple(int(s) for s in expected_shape):
        raise LabelMapError(
            f"{who} expects a label map of the output size {tuple(int(s) for s in expected_shape)}, "
            f"but got shape={tuple(arr.shape)}. Resample the map (nearest) or change output_size."
        )
    ids = set(np.unique(arr).astype(np.int64).tolist())
    allowed = set(known_ids()) | {int(i) for i in extra_ids}
    unknown = sorted(ids - allowed)
    if unknown:
        too_big = [i for i in unknown if i > MAX_LABEL_ID or i < 0]
        if too_big:
            raise LabelMapError(
                f"{who} expects label IDs in 0..{MAX_LABEL_ID} (the ControlNet's 8-bit encoding), "
                f"but got ids={too_big[:10]}. Remap the labels to MAISI IDs first."
            )
        raise LabelMapError(
            f"{who} expects IDs of the MAISI label dictionary (see maisi_core.anatomy.labels.label_dict()), "
            f"but got unknown ids={unknown[:10]}. Remap them with maisi_core.anatomy.masks or pass extra_ids."
        )
    if require_body and BODY_ID not in ids:
        raise LabelMapError(
            f"{who} expects the body label {BODY_ID} on every body voxel without an organ label, but got "
            f"a map without it (ids={sorted(ids)[:10]}...). Pass fix_body=True to add it, or add it with "
            "maisi_core.anatomy.labels.add_body_label."
        )


def add_body_label(label_map: np.ndarray, *, closing_iterations: int = 2) -> np.ndarray:
    """Return a copy where the body envelope around the labelled structures carries label 200.

    The envelope is the hole-filled, closed foreground of the map (every non-zero voxel), taken slice by
    slice along the last axis; background voxels inside it become ``BODY_ID``. This is the explicit
    fix-up for maps from segmenters that label organs only. It cannot recover body voxels outside the
    organs' outer hull, so prefer masks that already carry the body outline.
    """
    from scipy import ndimage

    arr = np.array(label_map, copy=True)
    fg = arr != BACKGROUND_ID
    if not fg.any():
        raise LabelMapError(
            "add_body_label expects at least one labelled voxel, but got an all-background label map."
        )
    struct = ndimage.generate_binary_structure(3, 1)
    envelope = ndimage.binary_closing(fg, structure=struct, iterations=closing_iterations, border_value=0)
    envelope |= fg
    for k in range(envelope.shape[2]):
        envelope[:, :, k] = ndimage.binary_fill_holes(envelope[:, :, k])
    arr[envelope & ~fg] = BODY_ID
    return arr
