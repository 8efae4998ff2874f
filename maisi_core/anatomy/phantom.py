"""A procedural anatomical phantom: label maps in MAISI IDs for any body region, size and spacing.

The phantom is the factory's training corpus and its default mask source. Every structure is a
superquadric, ellipsoid or tube whose size and place are given in millimetres in a *body frame*
(``x`` to the patient's right, ``y`` anterior, ``depth`` downwards from the vertex of the head), so
any ``output_size_vox`` and ``spacing_mm`` work: the volume covers a field of view and the organs
that fall into it appear. Each seed draws a patient scale, per-organ offsets, sizes, small
rotations and a low-frequency surface ripple, so shapes vary smoothly between seeds and the same
seed gives the same voxels. The random draws do not depend on the grid, so one seed at 2 mm and at
4 mm describes the same patient.

World coordinates are RAS+ as NIfTI defines them (``+x`` towards the patient's right, ``+y``
anterior, ``+z`` superior), with a diagonal, positive affine centred on the volume: the liver
(patient's right) sits at high ``x`` indices and the spleen (patient's left) at low ones. A viewer
in radiological convention (Slicer, ITK-SNAP) shows the liver on the left of the screen.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from maisi_core.anatomy import body as anatomy, labels
from maisi_core.anatomy.body import derive_rng
from maisi_core.errors import ConfigError, GeometryError, TumorPlacementError
from maisi_core.engine.geometry import affine_from_spacing

logger = logging.getLogger(__name__)

# Depth span (mm from the vertex, unscaled adult) that each body region's scans cover.
REGION_DEPTH_MM: dict[str, tuple[float, float]] = {
    "head_neck": (0.0, 290.0),
    "chest": (280.0, 560.0),
    "abdomen": (530.0, 760.0),
    "lower": (740.0, 1000.0),
}
PATIENT_SCALE_RANGE = (0.9, 1.1)  # lateral and antero-posterior size factor per seed
PATIENT_HEIGHT_SCALE_RANGE = (0.93, 1.07)  # cranio-caudal size factor per seed
FOV_JITTER_MM = 15.0  # standard deviation of the field-of-view centre along the body axis
TUMOR_RIPPLE = 0.12  # relative surface ripple of a placed tumour


@dataclass(frozen=True)
class TumorSpec:
    """A tumour to place: its label (ID or MAISI name) and the range of its diameter in mm.

    Attributes:
        label: one of the tumour labels (23 lung tumor, 24 pancreatic tumor, 26 hepatic tumor,
            27 colon cancer primaries, 128 bone lesion), as ID or name.
        diameter_mm: ``(low, high)`` range the nominal diameter is drawn from.
    """

    label: int | str
    diameter_mm: tuple[float, float] = (10.0, 30.0)

    def __post_init__(self) -> None:
        tid = labels.label_id(self.label) if isinstance(self.label, str) else int(self.label)
        if tid not in labels.TUMOR_HOSTS:
            raise ConfigError(
                f"TumorSpec expects a tumour label from {list(labels.TUMOR_IDS)} (or its name), "
                f"but got label={self.label!r}."
            )
        lo, hi = (float(v) for v in self.diameter_mm)
        if not (0.0 < lo <= hi):
            raise ConfigError(
                f"TumorSpec expects a diameter range (low, high) in mm with 0 < low <= high, "
                f"but got diameter_mm={tuple(self.diameter_mm)!r}."
            )
        object.__setattr__(self, "label", tid)
        object.__setattr__(self, "diameter_mm", (lo, hi))

    @property
    def label_id(self) -> int:
        """The tumour's MAISI ID."""
        return int(self.label)


@dataclass(frozen=True)
class PhantomConfig:
    """What phantom to draw.

    Attributes:
        regions: body regions to cover (``head_neck``, ``chest``, ``abdomen``, ``lower`` or their
            aliases); several give a span from the highest to the lowest. A single string is accepted.
        output_size_vox: volume size ``(X, Y, Z)`` in voxels.
        spacing_mm: voxel size ``(x, y, z)`` in mm.
        tumor: an optional tumour to place in its host organ.
    """

    regions: tuple[str, ...] | str = ("chest", "abdomen")
    output_size_vox: tuple[int, int, int] = (64, 64, 64)
    spacing_mm: tuple[float, float, float] = (6.0, 6.0, 6.0)
    tumor: TumorSpec | None = None

    def __post_init__(self) -> None:
        regions = (self.regions,) if isinstance(self.regions, str) else tuple(self.regions)
        if not regions:
            raise ConfigError(
                f"PhantomConfig expects at least one body region from {list(labels.BODY_REGIONS)}, "
                f"but got regions={self.regions!r}."
            )
        canonical = {labels.normalize_region(r) for r in regions}
        object.__setattr__(self, "regions", tuple(r for r in labels.BODY_REGIONS if r in canonical))
        size = tuple(self.output_size_vox)
        if len(size) != 3 or any(int(s) != s or int(s) < 1 for s in size):
            raise GeometryError(
                f"PhantomConfig expects output_size_vox as three positive integers, but got "
                f"output_size_vox={self.output_size_vox!r}."
            )
        spacing = tuple(float(s) for s in self.spacing_mm)
        if len(spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing):
            raise GeometryError(
                f"PhantomConfig expects spacing_mm as three positive numbers, but got "
                f"spacing_mm={self.spacing_mm!r}."
            )
        object.__setattr__(self, "output_size_vox", tuple(int(s) for s in size))
        object.__setattr__(self, "spacing_mm", spacing)
        if self.tumor is not None and not isinstance(self.tumor, TumorSpec):
            raise ConfigError(
                f"PhantomConfig expects tumor to be a TumorSpec or None, but got tumor={self.tumor!r}."
            )


@dataclass(frozen=True)
class PlacedTumor:
    """A tumour painted into a label map.

    Attributes:
        label: the tumour's MAISI ID.
        name: its MAISI name.
        host_ids: the organ IDs it was clipped to.
        center_vox: voxel index ``(i, j, k)`` of its centre.
        center_mm: RAS world position of its centre in mm.
        diameter_mm: nominal diameter drawn from the requested range.
        volume_mm3: volume actually painted (after clipping to the host).
    """

    label: int
    name: str
    host_ids: tuple[int, ...]
    center_vox: tuple[int, int, int]
    center_mm: tuple[float, float, float]
    diameter_mm: float
    volume_mm3: float


@dataclass(frozen=True, eq=False)
class PhantomCase:
    """One phantom.

    Attributes:
        label_map: MAISI IDs, uint8 ``(X, Y, Z)``.
        affine: ``(4, 4)`` diagonal RAS voxel-to-world matrix in mm.
        tumors: the tumours placed.
        regions: the requested body regions, head to feet.
        seed: the seed that drew it.
    """

    label_map: np.ndarray
    affine: np.ndarray
    tumors: list[PlacedTumor] = field(default_factory=list)
    regions: tuple[str, ...] = ()
    seed: int = 0

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        """Voxel size in mm."""
        return tuple(float(v) for v in np.diag(self.affine)[:3])  # type: ignore[return-value]


def generate_phantom(config: PhantomConfig, *, seed: int) -> PhantomCase:
    """Draw one phantom.

    Args:
        config: regions, size, spacing and optional tumour.
        seed: the case's seed; the same seed gives identical output.

    Returns:
        The label map ``(X, Y, Z)`` in MAISI IDs (body 200 on every body voxel without an organ),
        its affine and the placed tumours.

    Raises:
        TumorPlacementError: a tumour was requested but its host organ is not in the field of view.
    """
    seed = int(seed)
    rng = derive_rng(seed, "patient")
    scale_xy = float(rng.uniform(*PATIENT_SCALE_RANGE))
    scale_z = float(rng.uniform(*PATIENT_HEIGHT_SCALE_RANGE))
    offset_xy = rng.normal(0.0, 6.0, size=2)
    spans = [REGION_DEPTH_MM[r] for r in config.regions]
    depth_center = 0.5 * (min(s[0] for s in spans) + max(s[1] for s in spans))
    depth_center += float(np.clip(rng.normal(0.0, FOV_JITTER_MM), -2 * FOV_JITTER_MM, 2 * FOV_JITTER_MM))

    affine = affine_from_spacing(config.spacing_mm, config.output_size_vox)
    world = [affine[a, a] * np.arange(n) + affine[a, 3] for a, n in enumerate(config.output_size_vox)]
    canvas = anatomy.Canvas(
        shape=config.output_size_vox,
        x_body=((world[0] - offset_xy[0]) / scale_xy).astype(np.float32),
        y_body=((world[1] - offset_xy[1]) / scale_xy).astype(np.float32),
        depth_body=(depth_center - world[2] / scale_z).astype(np.float32),
    )
    anatomy.draw_anatomy(canvas, seed=seed)

    tumors: list[PlacedTumor] = []
    if config.tumor is not None:
        tumors.append(
            place_tumor(
                canvas.labels, affine, config.tumor.label_id, config.tumor.diameter_mm,
                rng=derive_rng(seed, "tumor"),
            )
        )
    logger.debug("phantom seed=%d regions=%s size=%s", seed, config.regions, config.output_size_vox)
    return PhantomCase(label_map=canvas.labels, affine=affine, tumors=tumors, regions=config.regions, seed=seed)


def place_tumor(
    label_map: np.ndarray,
    affine: np.ndarray,
    tumor_id: int,
    diameter_range_mm: Sequence[float],
    *,
    rng: np.random.Generator,
) -> PlacedTumor:
    """Paint a lumpy sphere of a tumour label into its host organ, in place.

    The centre is drawn among host voxels deep enough to hold the tumour (or, when none is, among
    the deepest ones); the sphere is clipped to the host, so the tumour never leaves it.

    Args:
        label_map: MAISI IDs ``(X, Y, Z)``; modified in place.
        affine: its ``(4, 4)`` diagonal voxel-to-world matrix.
        tumor_id: one of ``labels.TUMOR_IDS``.
        diameter_range_mm: ``(low, high)`` range of the nominal diameter.
        rng: the random stream to draw from.

    Returns:
        The placed tumour's record.

    Raises:
        TumorPlacementError: the label map holds no voxel of the host organ(s).
    """
    tumor_id = int(tumor_id)
    if tumor_id not in labels.TUMOR_HOSTS:
        raise ConfigError(
            f"place_tumor expects a tumour label from {list(labels.TUMOR_IDS)}, but got tumor_id={tumor_id}."
        )
    hosts = labels.TUMOR_HOSTS[tumor_id]
    host_mask = np.isin(label_map, hosts)
    name = labels.label_name(tumor_id)
    if not host_mask.any():
        raise TumorPlacementError(
            f"place_tumor expects the host organ of {name!r} (IDs {list(hosts)}) in the label map, but got "
            f"tumor_id={tumor_id} with no host voxel. Widen the field of view or pick a region that holds it."
        )
    spacing = np.abs(np.diag(np.asarray(affine, dtype=np.float64))[:3])
    diameter = float(rng.uniform(float(diameter_range_mm[0]), float(diameter_range_mm[1])))
    radius = diameter / 2.0

    lo = np.argwhere(host_mask).min(axis=0)
    hi = np.argwhere(host_mask).max(axis=0) + 1
    crop = host_mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    depth = ndimage.distance_transform_edt(np.pad(crop, 1), sampling=spacing)[1:-1, 1:-1, 1:-1]
    need = min(radius, 0.8 * float(depth.max()))
    candidates = np.argwhere(depth >= need)
    center = candidates[int(rng.integers(len(candidates)))] + lo

    ripple_k = rng.normal(0.0, 2.0, size=(3, 3))
    ripple_phase = rng.uniform(0.0, 2 * np.pi, size=3)
    reach = np.ceil(radius * (1 + TUMOR_RIPPLE) / spacing).astype(int) + 1
    box_lo = np.maximum(center - reach, 0)
    box_hi = np.minimum(center + reach + 1, label_map.shape)
    axes = [(np.arange(box_lo[a], box_hi[a]) - center[a]) * spacing[a] / radius for a in range(3)]
    u, v, w = np.meshgrid(*axes, indexing="ij", sparse=True)
    ripple = sum(np.sin(ripple_k[n, 0] * u + ripple_k[n, 1] * v + ripple_k[n, 2] * w + ripple_phase[n])
                 for n in range(3)) / 3.0
    inside = (u * u + v * v + w * w) <= (1.0 + TUMOR_RIPPLE * ripple) ** 2
    box = tuple(slice(box_lo[a], box_hi[a]) for a in range(3))
    inside &= host_mask[box]
    if not inside.any():  # smaller than a voxel: keep the centre voxel
        inside[tuple(center - box_lo)] = True
    label_map[box][inside] = tumor_id

    center_mm = np.asarray(affine, dtype=np.float64)[:3, :3] @ center + np.asarray(affine)[:3, 3]
    return PlacedTumor(
        label=tumor_id,
        name=name,
        host_ids=tuple(int(h) for h in hosts),
        center_vox=tuple(int(c) for c in center),  # type: ignore[arg-type]
        center_mm=tuple(float(c) for c in center_mm),  # type: ignore[arg-type]
        diameter_mm=diameter,
        volume_mm3=float(inside.sum() * np.prod(spacing)),
    )
