"""Where the ControlNet's mask comes from: the phantom, a user's label map, a folder of candidate masks,
or MAISI's own mask generator, all behind one call shape.

``make_mask(MaskRequest(options=...))`` runs the source its options name (:data:`MASK_SOURCES`) and
returns a :class:`~maisi_core.anatomy.mask_types.MaskResult` (label map in MAISI IDs, affine, source name,
deterministic ``mask_id`` and the placed tumours). Every source returns a map of ``output_size_vox`` at
``spacing_mm`` with a diagonal RAS affine centred on the volume. The options classes are in
:mod:`maisi_core.anatomy.mask_types`; remapping and resampling in :mod:`maisi_core.anatomy.mask_remap`; the folder
index in :mod:`maisi_core.anatomy.mask_folder`; the generator in :mod:`maisi_core.anatomy.mask_generator`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from maisi_core.digest import sha256_file
from maisi_core.anatomy.mask_folder import retrieve_mask
from maisi_core.anatomy.mask_remap import load_user_mask
from maisi_core.anatomy.mask_types import MaskRequest, MaskResult, UserOptions, place_requested_tumor
from maisi_core.anatomy.phantom import generate_phantom


def _phantom_source(request: MaskRequest) -> MaskResult:
    case = generate_phantom(request.phantom_config(), seed=request.seed)
    return MaskResult(case.label_map, case.affine, "phantom", f"phantom:{request.seed}", case.tumors)


def _user_source(request: MaskRequest) -> MaskResult:
    opts: UserOptions = request.options  # type: ignore[assignment]
    label_map, affine = load_user_mask(
        opts.path, spacing_mm=request.spacing_mm, output_size_vox=request.output_size_vox,
        mapping=opts.mapping if isinstance(opts.mapping, str) else dict(opts.mapping),
        class_names=opts.class_names, unmapped=opts.unmapped, add_body=opts.add_body,
    )
    tumors = place_requested_tumor(label_map, affine, request)
    mask_id = f"user:{Path(opts.path).name}:{sha256_file(opts.path)[:16]}"
    return MaskResult(label_map, affine, "user", mask_id, tumors)


def _generator_source(request: MaskRequest) -> MaskResult:
    from maisi_core.anatomy.mask_generator import generate_mask_for_request  # torch and MONAI load only here

    return generate_mask_for_request(request)


MASK_SOURCES: dict[str, Callable[[MaskRequest], MaskResult]] = {
    "phantom": _phantom_source,
    "folder": retrieve_mask,
    "user": _user_source,
    "maisi_mask_generator": _generator_source,
}


def make_mask(request: MaskRequest) -> MaskResult:
    """Make the mask a request asks for, with the source its options name."""
    return MASK_SOURCES[request.source](request)
