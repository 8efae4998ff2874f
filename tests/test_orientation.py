"""Orientation end to end: what a case writes has the handedness of the mask that produced it (RAS+)."""

from __future__ import annotations

from typing import Any

import nibabel as nib
import numpy as np

from _specs import tiny_spec
from catalog.root import DatasetRoot
from factory.case import GeneratedVolume, run_case
from factory.plan import CaseRequest, plan_dataset
from maisi_core.anatomy.intensity import synthesize_ct


class IntensityGenerator:
    """A generator whose image is the intensity model's CT of the mask (a stand-in with real anatomy)."""

    model_name, model_digest, device = "intensity", "stub", "cpu"

    def __init__(self) -> None:
        self.masks: list[Any] = []
        self.images: list[np.ndarray] = []

    def generate(self, request: CaseRequest, mask: Any, *, seed: int) -> GeneratedVolume:
        self.masks.append(mask)
        image = synthesize_ct(mask.label_map, request.spacing_mm, seed=seed)
        self.images.append(image)
        return GeneratedVolume(image, mask.label_map, mask.affine, {})


def _world_x(label_map: np.ndarray, affine: np.ndarray, ids) -> float:
    idx = np.argwhere(np.isin(label_map, ids)).mean(axis=0)
    return float((affine[:3, :3] @ idx + affine[:3, 3])[0])


def test_run_case_writes_image_and_label_with_the_masks_handedness(tmp_path):
    spec = tiny_spec(tmp_path, name="handed", seed=3, cohort="abdomen", body_region="abdomen", size=(48, 48, 32),
                     steps=2)
    request = plan_dataset(spec).cases[0]
    generator = IntensityGenerator()
    record = run_case(request, generator, root=DatasetRoot.of(tmp_path))
    assert record.status == "passed", record.failure_reason
    mask = generator.masks[-1]
    image_nii = nib.load(str(tmp_path / record.image_uri))
    label_nii = nib.load(str(tmp_path / record.label_uri))
    for nii in (image_nii, label_nii):
        assert nib.aff2axcodes(nii.affine) == ("R", "A", "S")
        assert np.allclose(nii.affine, mask.affine)
    lab = np.asarray(label_nii.dataobj)
    img = np.asarray(image_nii.dataobj, dtype=np.float32)
    assert np.array_equal(lab, mask.label_map)
    # the patient's right (liver, right kidney) at larger world x than the left (spleen, left kidney)
    assert _world_x(lab, label_nii.affine, [1]) > _world_x(lab, label_nii.affine, [3]) + 60.0
    assert _world_x(lab, label_nii.affine, [5]) > _world_x(lab, label_nii.affine, [14])
    # the image agrees: the written voxels are the generated ones, liver tissue under the liver label
    assert np.allclose(img, generator.images[-1], atol=1.0)
    assert 20.0 < float(np.median(img[lab == 1])) < 100.0
