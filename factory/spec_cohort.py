"""The cohort half of the dataset spec: cohorts, their tumours, mask sources and quality-check settings.

Pydantic v2 models, ``extra="forbid"`` and frozen (:class:`StrictModel`). :mod:`factory.spec` puts them
together with the model reference, runtime and schedule into a :class:`~factory.spec.DatasetSpec`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from maisi_core.anatomy.labels import TUMOR_TYPES
from maisi_core.anatomy.mask_types import FolderOptions, GeneratorOptions, UserOptions, option_default

MAX_OUTPUT_VOX = 1024  # per axis: beyond any model's geometry, and 1024^3 float32 is already 4 GB
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"

TumorName = Literal[tuple(TUMOR_TYPES)]  # type: ignore[valid-type]  # the names of maisi_core.anatomy.labels.TUMOR_TYPES


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _as_mask_source(value: Any) -> Any:
    return {"type": value} if isinstance(value, str) else value


def _as_region_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


def _none_pathology(value: Any) -> Any:
    return None if value is None or (isinstance(value, str) and value.strip().lower() == "none") else value


class Tumor(StrictModel):
    """A tumour to place in its host organ."""

    type: TumorName
    size_mm: tuple[float, float] = Field(description="[min, max] diameter in mm")
    host_organ: str | None = Field(None, description="implied by type; when given it must match")

    @model_validator(mode="after")
    def _check(self) -> Tumor:
        lo, hi = self.size_mm
        if not 0 < lo <= hi <= 300:
            raise ValueError(f"Tumor expects size_mm [min, max] with 0 < min <= max <= 300, but got "
                             f"size_mm={list(self.size_mm)}.")
        hosts = TUMOR_TYPES[self.type].host_organs
        if self.host_organ is not None and self.host_organ not in hosts:
            raise ValueError(f"Tumor expects host_organ in {list(hosts)} for type={self.type!r}, but got "
                             f"host_organ={self.host_organ!r}. Leave it out: the host is implied by the type.")
        return self

    @property
    def label_id(self) -> int:
        """The tumour's MAISI label ID."""
        return TUMOR_TYPES[self.type].label_id


class PhantomMasks(StrictModel):
    """Masks drawn by the procedural phantom (the default)."""

    type: Literal["phantom"] = "phantom"


class FolderMasks(StrictModel):
    """Candidate masks from a local folder (the closest by geometry, drawn per case by seed)."""

    type: Literal["folder"]
    path: str = Field(min_length=1, description="folder of NIfTI label maps (with or without mask_index.json)")
    required_labels: list[int | str] = Field(default_factory=list, description="IDs or names a candidate must hold")
    top_k: int = Field(option_default(FolderOptions, "top_k"), ge=1, le=1000,
                       description="draw among the k best candidates")


class UserMasks(StrictModel):
    """User label maps (one local NIfTI file, or a folder: case i takes file i mod n in name order)."""

    type: Literal["user"]
    path: str = Field(min_length=1)
    label_mapping: dict[int, int | str] | Literal["maisi", "totalsegmentator"] = Field(
        description="source ID -> MAISI ID or name; 'totalsegmentator' (v2 total task) or 'maisi' (already MAISI IDs)")
    unmapped: Literal["error", "background", "body"] = option_default(UserOptions, "unmapped")
    add_body: bool = Field(option_default(UserOptions, "add_body"),
                           description="add body label 200 around the labelled structures")


class GeneratorMasks(StrictModel):
    """Masks from MAISI's mask generator (released checkpoints, or ``preset: tiny`` random weights for tests)."""

    type: Literal["maisi_mask_generator"]
    autoencoder_path: str | None = None
    diffusion_path: str | None = None
    preset: Literal["tiny", "official"] = "official"
    size_vector: list[float] | None = Field(None, min_length=10, max_length=10)
    num_inference_steps: int = Field(option_default(GeneratorOptions, "num_inference_steps"), ge=1, le=1000)

    @model_validator(mode="after")
    def _check(self) -> GeneratorMasks:
        if self.preset == "official" and not (self.autoencoder_path and self.diffusion_path):
            raise ValueError("GeneratorMasks expects autoencoder_path and diffusion_path with preset 'official', "
                             f"but got autoencoder_path={self.autoencoder_path!r}, "
                             f"diffusion_path={self.diffusion_path!r}. Give both released checkpoints.")
        return self


MaskSource = Annotated[
    PhantomMasks | FolderMasks | UserMasks | GeneratorMasks,
    Field(discriminator="type"),
    BeforeValidator(_as_mask_source, json_schema_input_type=str | dict),
]


class QCSettings(StrictModel):
    """Quality-check settings of a cohort."""

    thresholds_hu: dict[str, tuple[float, float]] = Field(
        default_factory=dict, description="organ -> [low, high] median HU overriding MAISI's reference range")
    organ_hu_check: bool = Field(True, description="false: the image is not expected to be CT (random or untrained "
                                                   "weights, stub generators): organ median-HU ranges and the checks "
                                                   "that read the image against the labels (image orientation, "
                                                   "tumour contrast, label agreement) are skipped; sanity and "
                                                   "label-map checks still run")
    orientation_check: bool = Field(True, description="left/right: lateral structures on the side their names say "
                                                      "(world x, RAS+), and the image not mirrored against the labels")
    tumor_check: bool = Field(True, description="a requested tumour is visible against its host (per-type HU "
                                                "contrast) and its diameter matches the requested size_mm")
    agreement_check: bool = Field(True, description="labelled structures show their tissue's HU (air, bone, soft "
                                                    "tissue, vessel) in at least half their voxels")
    max_retries: int = Field(2, ge=0, le=10, description="re-tries on derived seeds after a failed attempt")

    @model_validator(mode="after")
    def _check(self) -> QCSettings:
        from maisi_core.evaluation.qc import ORGAN_LABEL_IDS
        from maisi_core.errors import did_you_mean

        for organ, (low, high) in self.thresholds_hu.items():
            if organ not in ORGAN_LABEL_IDS:
                raise ValueError(f"QCSettings expects thresholds_hu organs from {sorted(ORGAN_LABEL_IDS)}, but "
                                 f"got organ={organ!r}.{did_you_mean(organ, ORGAN_LABEL_IDS)}")
            if not low < high:
                raise ValueError(f"QCSettings expects thresholds_hu [low, high] with low < high, but got "
                                 f"{organ}={[low, high]}.")
        return self


class Cohort(StrictModel):
    """A group of cases sharing region, pathology, geometry and mask source."""

    name: str = Field(pattern=NAME_PATTERN)
    count: int = Field(ge=1, le=1_000_000, strict=True)  # strict: `count: true` is not 1
    body_region: Annotated[list[str], BeforeValidator(_as_region_list, json_schema_input_type=str | list[str])]
    pathology: Annotated[Tumor | None, BeforeValidator(_none_pathology, json_schema_input_type=Literal["none"] | dict)] = None
    output_size: tuple[int, int, int] | None = Field(None, description="(x, y, z) voxels; region default if absent")
    spacing_mm: tuple[float, float, float] | None = Field(None, description="(x, y, z) mm; region default if absent")
    mask_source: MaskSource = Field(default_factory=PhantomMasks)
    qc: QCSettings = Field(default_factory=QCSettings)
    num_inference_steps: int | None = Field(None, ge=1, le=1000, description="model default if absent")

    @field_validator("body_region")
    @classmethod
    def _normalise_regions(cls, value: list[str]) -> list[str]:
        from maisi_core.errors import LabelNameError
        from maisi_core.anatomy.labels import BODY_REGIONS, normalize_region

        out = []
        for r in value:
            try:
                out.append(normalize_region(str(r)))
            except LabelNameError as exc:
                raise ValueError(str(exc).replace("normalize_region", "Cohort.body_region")) from None
        if not out:
            raise ValueError(f"Cohort expects at least one body_region from {list(BODY_REGIONS)}, but got "
                             "body_region=[].")
        return [r for r in BODY_REGIONS if r in out]

    @model_validator(mode="after")
    def _check(self) -> Cohort:
        if self.pathology is not None:
            regions = TUMOR_TYPES[self.pathology.type].regions
            if not set(regions) & set(self.body_region):
                raise ValueError(f"Cohort expects a body_region containing the {self.pathology.type}'s host "
                                 f"({' or '.join(regions)}), but got body_region={self.body_region}. "
                                 f"Add {regions[0]!r} to body_region.")
        for name in ("output_size", "spacing_mm"):
            value = getattr(self, name)
            if value is not None and any(v <= 0 for v in value):
                raise ValueError(f"Cohort expects positive {name}, but got {name}={list(value)}.")
        if self.output_size is not None and max(self.output_size) > MAX_OUTPUT_VOX:
            raise ValueError(f"Cohort expects output_size of at most {MAX_OUTPUT_VOX} voxels per axis (MAISI's "
                             f"largest is 512x512x768), but got output_size={list(self.output_size)}.")
        return self

    @property
    def pathology_name(self) -> str:
        """``none`` or the tumour type."""
        return "none" if self.pathology is None else self.pathology.type
