"""Where a case's conditioning mask comes from: the spec's mask source turned into ``maisi_core`` mask options.

:func:`make_case_mask` is what :func:`factory.case.run_cases` calls for each attempt (a phantom, a user's
file, a folder of masks or the mask generator, built once per process).
"""

from __future__ import annotations

import threading
from typing import Any

from factory.plan import CaseRequest, derive_seed
from factory.spec_cohort import FolderMasks, GeneratorMasks, UserMasks

_locks_guard = threading.Lock()
DEFAULT_TUMOR_SIZE_MM = (10.0, 30.0)  # diameter range when the spec's pathology gives none


def requested_tumor_size_mm(request: CaseRequest) -> tuple[float, float]:
    """The (low, high) tumour diameter a case asks for: the spec's ``size_mm`` or the default."""
    return tuple(float(v) for v in (request.tumor_size_mm or DEFAULT_TUMOR_SIZE_MM))  # type: ignore[return-value]

_mask_generators: dict[tuple, Any] = {}


def _load_mask_generator(source: GeneratorMasks) -> Any:
    """The mask generator a source names, built once per process (released checkpoints or seeded preset)."""
    from maisi_core.anatomy.mask_generator import MaskGenerator, MaskGeneratorConfig

    key = (source.preset, source.autoencoder_path, source.diffusion_path)
    with _locks_guard:
        if key not in _mask_generators:
            if source.autoencoder_path:
                cfg = MaskGeneratorConfig.tiny() if source.preset == "tiny" else MaskGeneratorConfig.official()
                gen = MaskGenerator.from_checkpoints(cfg, autoencoder_path=source.autoencoder_path,
                                                     diffusion_path=source.diffusion_path)
            else:
                gen = MaskGenerator.from_config(source.preset, seed=0)
            _mask_generators[key] = gen
        return _mask_generators[key]


def user_mask_file(path: str, index: int) -> str:
    """The file case ``index`` of a ``user`` source reads: the file itself, or file ``index mod n`` of a folder."""
    from factory.preflight import user_mask_candidates

    files = user_mask_candidates(path, who="make_case_mask")
    return files[index % len(files)]


def mask_options(request: CaseRequest) -> Any:
    """The ``maisi_core.anatomy.mask_types`` options of the request's (typed) mask source."""
    from maisi_core.anatomy.mask_types import FolderOptions, GeneratorOptions, PhantomOptions, UserOptions

    source = request.mask_source
    if isinstance(source, FolderMasks):
        return FolderOptions(source.path, required_labels=tuple(source.required_labels), top_k=source.top_k)
    if isinstance(source, UserMasks):
        return UserOptions(user_mask_file(source.path, request.case_index), mapping=source.label_mapping,
                           unmapped=source.unmapped, add_body=source.add_body)
    if isinstance(source, GeneratorMasks):
        return GeneratorOptions(_load_mask_generator(source), num_inference_steps=source.num_inference_steps,
                                size_vector=None if source.size_vector is None else tuple(source.size_vector))
    return PhantomOptions()


def make_case_mask(request: CaseRequest, seed: int) -> Any:
    """Make the conditioning mask of one attempt (``maisi_core.anatomy.masks.make_mask``)."""
    from maisi_core.anatomy.mask_types import MaskRequest
    from maisi_core.anatomy.masks import make_mask
    from maisi_core.anatomy.phantom import TumorSpec

    tumor = None
    if request.tumor_label is not None:
        tumor = TumorSpec(request.tumor_label, requested_tumor_size_mm(request))
    return make_mask(MaskRequest(
        mask_options(request), regions=request.body_region, output_size_vox=request.output_size,
        spacing_mm=request.spacing_mm, tumor=tumor, seed=derive_seed("mask", seed),
    ))
