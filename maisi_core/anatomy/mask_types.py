"""What a mask source is asked for and what it returns: one typed options class per source.

:class:`MaskRequest` carries the geometry (regions, size, spacing), the tumour to place, the seed and
the source's options; the options' class names the source. Defaults live here only: the dataset spec
(``factory.spec``) reads them from these classes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np

from maisi_core.errors import MaskSourceError, did_you_mean

if TYPE_CHECKING:  # the phantom (scipy) loads when a request is made, not when a spec names a source
    from maisi_core.anatomy.phantom import PhantomConfig, PlacedTumor, TumorSpec

INDEX_NAME = "mask_index.json"
UNMAPPED_POLICIES = ("error", "background", "body")
LABEL_MAPPINGS = ("maisi", "totalsegmentator")  # named mappings of the ``user`` source


@dataclass(frozen=True)
class PhantomOptions:
    """The ``phantom`` source: a procedural phantom drawn from the request's seed (no options)."""

    SOURCE: ClassVar[str] = "phantom"


@dataclass(frozen=True)
class UserOptions:
    """The ``user`` source: one NIfTI label map from another segmenter, remapped to MAISI IDs.

    Attributes:
        path: the label map file.
        mapping: source ID -> MAISI ID or name, or ``"totalsegmentator"`` (v2 ``total`` class map, or
            ``class_names``) or ``"maisi"`` (already MAISI IDs).
        class_names: source ID -> TotalSegmentator name, for other tasks or versions.
        unmapped: source IDs the mapping lacks: ``"error"``, ``"background"`` or ``"body"``.
        add_body: add body label 200 around the labelled structures when it is missing.
    """

    SOURCE: ClassVar[str] = "user"
    path: str
    mapping: Mapping[int, int | str] | Literal["maisi", "totalsegmentator"] = "maisi"
    class_names: Mapping[int, str] | None = None
    unmapped: Literal["error", "background", "body"] = "error"
    add_body: bool = True

    def __post_init__(self) -> None:
        if not str(self.path):
            raise MaskSourceError("UserOptions expects the path of a NIfTI label map, but got path=''.")
        if self.unmapped not in UNMAPPED_POLICIES:
            raise MaskSourceError(f"UserOptions expects unmapped in {list(UNMAPPED_POLICIES)}, but got "
                                  f"unmapped={self.unmapped!r}.{did_you_mean(str(self.unmapped), UNMAPPED_POLICIES)}")
        if isinstance(self.mapping, str) and self.mapping not in LABEL_MAPPINGS:
            raise MaskSourceError(f"UserOptions expects mapping to be a dict or one of {list(LABEL_MAPPINGS)}, but "
                                  f"got mapping={self.mapping!r}.{did_you_mean(self.mapping, LABEL_MAPPINGS)}")
        if not isinstance(self.mapping, str):
            object.__setattr__(self, "mapping", MappingProxyType({int(k): v for k, v in self.mapping.items()}))


@dataclass(frozen=True)
class FolderOptions:
    """The ``folder`` source: the candidate label map closest to the request's geometry.

    Attributes:
        folder: the folder of NIfTI label maps (MAISI IDs).
        required_labels: IDs or names a candidate must hold after resampling.
        top_k: the seed draws among the ``top_k`` best candidates.
        index_name: the index file in the folder (scanned on the fly when absent).
    """

    SOURCE: ClassVar[str] = "folder"
    folder: str
    required_labels: tuple[int | str, ...] = ()
    top_k: int = 1
    index_name: str = INDEX_NAME

    def __post_init__(self) -> None:
        if not str(self.folder):
            raise MaskSourceError("FolderOptions expects a folder of label maps, but got folder=''.")
        if int(self.top_k) < 1:
            raise MaskSourceError(f"FolderOptions expects top_k >= 1, but got top_k={self.top_k}.")
        object.__setattr__(self, "required_labels", tuple(self.required_labels))


@dataclass(frozen=True)
class GeneratorOptions:
    """The ``maisi_mask_generator`` source: MAISI's mask generator at 1.5 mm, resampled to the request.

    Attributes:
        generator: a :class:`maisi_core.anatomy.mask_generator.MaskGenerator`.
        size_vector: 10 values (MAISI.md 4.1); None uses the generator's middle sizes.
        num_inference_steps: DDPM steps.
        latent_shape: override of the latent shape (tests).
    """

    SOURCE: ClassVar[str] = "maisi_mask_generator"
    generator: Any = field(compare=False)
    size_vector: tuple[float, ...] | None = None
    num_inference_steps: int = 1000
    latent_shape: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.generator is None:
            raise MaskSourceError("GeneratorOptions expects a MaskGenerator, but got generator=None. "
                                  "Build one with MaskGenerator.from_config or from_checkpoints.")
        if int(self.num_inference_steps) < 1:
            raise MaskSourceError(f"GeneratorOptions expects num_inference_steps >= 1, but got "
                                  f"num_inference_steps={self.num_inference_steps}.")


MaskOptions = PhantomOptions | UserOptions | FolderOptions | GeneratorOptions
OPTION_CLASSES: dict[str, type] = {c.SOURCE: c for c in (PhantomOptions, UserOptions, FolderOptions, GeneratorOptions)}


def option_default(cls: type, name: str) -> Any:
    """The default of option ``name`` of ``cls`` (so the dataset spec states no default of its own)."""
    return cls.__dataclass_fields__[name].default


@dataclass(frozen=True)
class MaskRequest:
    """What mask to make.

    Attributes:
        options: the source and its options (:data:`MaskOptions`); the phantom by default.
        regions: body regions (see :class:`maisi_core.anatomy.phantom.PhantomConfig`).
        output_size_vox: size ``(X, Y, Z)`` of the returned map.
        spacing_mm: its voxel size in mm.
        tumor: an optional tumour to place (or to find, for the folder source).
        seed: the case's seed.
    """

    options: MaskOptions = field(default_factory=PhantomOptions)
    regions: tuple[str, ...] | str = ("chest", "abdomen")
    output_size_vox: tuple[int, int, int] = (64, 64, 64)
    spacing_mm: tuple[float, float, float] = (6.0, 6.0, 6.0)
    tumor: TumorSpec | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        from maisi_core.anatomy.phantom import PhantomConfig

        if type(self.options) not in OPTION_CLASSES.values():
            raise MaskSourceError(f"MaskRequest expects options of one of {sorted(c.__name__ for c in OPTION_CLASSES.values())}, "
                                  f"but got options={type(self.options).__name__}.")
        geometry = PhantomConfig(self.regions, self.output_size_vox, self.spacing_mm, self.tumor)
        object.__setattr__(self, "regions", geometry.regions)
        object.__setattr__(self, "output_size_vox", geometry.output_size_vox)
        object.__setattr__(self, "spacing_mm", geometry.spacing_mm)

    @property
    def source(self) -> str:
        """The source's name (``phantom``, ``user``, ``folder``, ``maisi_mask_generator``)."""
        return self.options.SOURCE

    def phantom_config(self) -> PhantomConfig:
        """The request as a phantom configuration."""
        from maisi_core.anatomy.phantom import PhantomConfig

        return PhantomConfig(self.regions, self.output_size_vox, self.spacing_mm, self.tumor)


@dataclass(frozen=True, eq=False)
class MaskResult:
    """A mask ready for the ControlNet.

    Attributes:
        label_map: MAISI IDs ``(X, Y, Z)`` (uint8).
        affine: ``(4, 4)`` diagonal RAS matrix.
        mask_source: the source's name.
        mask_id: a deterministic identifier (seed, file name and content hash, ...).
        tumors: tumours placed by the source.
    """

    label_map: np.ndarray
    affine: np.ndarray
    mask_source: str
    mask_id: str
    tumors: list[PlacedTumor] = field(default_factory=list)


def place_requested_tumor(label_map: np.ndarray, affine: np.ndarray, request: MaskRequest) -> list[PlacedTumor]:
    """Place the requested tumour in ``label_map`` (in place) unless the map already holds it."""
    from maisi_core.anatomy.body import derive_rng
    from maisi_core.anatomy.phantom import place_tumor

    if request.tumor is None or np.any(label_map == request.tumor.label_id):
        return []
    return [place_tumor(label_map, affine, request.tumor.label_id, request.tumor.diameter_mm,
                        rng=derive_rng(request.seed, "tumor"))]
