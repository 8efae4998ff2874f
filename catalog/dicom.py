"""DICOM export: each passing case as a CT image series (one instance per slice) plus a DICOM SEG of its labels.

Layout: ``DEST/<case>/CT/0001.dcm ...`` (CT Image Storage, one file per slice, explicit VR little endian),
``DEST/<case>/SEG/seg.dcm`` (binary Segmentation Storage referencing the CT instances) and
``DEST/dicom_export.json`` (per case: sample_id, folder, UIDs, instance counts, MAISI IDs; no local paths).
Slices are read and written one at a time; only the label map is held whole (the SEG is built from it).

Coordinates. NIfTI world coordinates are RAS+ (nibabel's convention, kept throughout ctfactory): +x toward
the patient's Right, +y Anterior, +z Superior. DICOM's patient coordinate system (PS3.3 C.7.6.2.1.1) is
LPS: +x toward the patient's Left, +y Posterior, +z Head. The two differ in the sign of x and y only, so
the voxel-to-LPS affine is ``diag(-1, -1, 1, 1) @ affine_ras``. A structure on the patient's right (the
liver) has the larger x in RAS and the smaller x in LPS.

Pixel layout. Slices are the volume's third voxel axis ``k`` (instance ``k + 1``); within a slice the
columns run along ``i`` and the rows along ``j``. Where the LPS direction of ``i`` (or ``j``) points mostly
toward negative x (or y), that axis is reversed, so a RAS volume shows in the usual radiological way (patient
right on the image's left, anterior at the top); the origin moves with the flip, so world positions stay
exact. Image Orientation (Patient) holds the unit directions of columns then rows, Pixel Spacing the row
then column spacing, Image Position (Patient) the LPS position of each slice's first pixel centre, and
Slice Thickness = Spacing Between Slices the distance between slice planes. Affines with shear are refused.

Values. CT pixels are signed 16-bit HU (Rescale Slope 1, Intercept 0); float volumes are rounded to the
nearest HU, and values outside int16 are refused.

Provenance. Every object has Synthetic Data (0008,001C) = YES and one Contributing Equipment item whose
Purpose of Reference is (109100, DCM, "Synthesizing Equipment"): Manufacturer ``ctfactory``, Manufacturer's
Model Name = the catalog's ``model_name``, Software Versions = ``code_version``, Device Serial Number =
``model_digest`` (when it fits 64 characters), and a Contribution Description naming all of them with the
sample_id, spec_id and seed. The ``sample_id`` is the Patient ID (0010,0020) verbatim; Patient's Name is
``SYNTHETIC^<dataset>``. UIDs (study, series, SOP instances, frame of reference) come from
``pydicom.uid.generate_uid(entropy_srcs=["ctfactory", sample_id, role])``: the same case always gets the
same UIDs. Study, content and instance-creation date and time are the row's ``created_at`` (UTC), so the
same export twice writes identical files.

Segments. One segment per non-background MAISI label present, numbered in ascending MAISI ID; the Segment
Label is the MAISI name and the Segment Description ``MAISI label <id>: <name>``. Property types are SNOMED CT
concepts from pydicom's DICOM code dictionary (PS3.16), with laterality as a Segmented Property Type Modifier
(Left 7771000 / Right 24028007); tumours, cysts and the bone lesion are Morphologically Abnormal Structures
(Neoplasm, Cyst, Lesion) with their host organ as Anatomic Region. Structures without a standard concept in
that dictionary use the private coding scheme ``99MAISI`` (code value = MAISI ID, meaning = MAISI name),
declared in the Coding Scheme Identification Sequence: see :data:`FALLBACK_NAMES`.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from catalog import fs as _fs
from catalog.errors import ExportError
from catalog.export import ExportResult, case_name, load_nifti, passing_rows, prepare_destination
from catalog.store import Catalog

logger = logging.getLogger(__name__)

MANIFEST = "dicom_export.json"
MANUFACTURER = "ctfactory"
PRIVATE_SCHEME = "99MAISI"
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
_TOLERANCE = 1e-4  # largest |cosine| between voxel axes still called orthogonal
_LO_MAX = 64  # characters of a DICOM LO value (Patient ID, Manufacturer's Model Name, ...)

# MAISI name -> SNOMED CT keyword of pydicom's code dictionary (PS3.16), for anatomy without laterality...
_UNPAIRED: dict[str, str] = {
    "liver": "Liver", "spleen": "Spleen", "pancreas": "Pancreas", "aorta": "Aorta",
    "inferior vena cava": "InferiorVenaCava", "gallbladder": "Gallbladder", "esophagus": "Esophagus",
    "stomach": "Stomach", "duodenum": "Duodenum", "bladder": "Bladder", "small bowel": "SmallIntestine",
    "brain": "Brain", "right lung middle lobe": "MiddleLobeOfRightLung", "trachea": "Trachea", "colon": "Colon",
    "sacrum": "Sacrum", "brachiocephalic trunk": "BrachiocephalicTrunk", "costal cartilages": "CostalCartilage",
    "heart": "Heart", "prostate": "Prostate", "pulmonary vein": "PulmonaryVein", "skull": "Skull",
    "spinal cord": "SpinalCord", "sternum": "Sternum", "left subclavian artery": "LeftSubclavianArtery",
    "right subclavian artery": "RightSubclavianArtery", "superior vena cava": "SuperiorVenaCava",
    "thyroid gland": "Thyroid", "airway": "AirwayStructure",
} | {f"vertebrae {v}": f"{v}Vertebra" for v in [f"C{n}" for n in range(1, 8)] + [f"T{n}" for n in range(1, 13)]
     + [f"L{n}" for n in range(1, 6)]}
# ... and for "left X" / "right X", coded as X with the laterality modifier (ribs keep their number in the label).
_PAIRED: dict[str, str] = {
    "kidney": "Kidney", "adrenal gland": "AdrenalGland", "lung upper lobe": "UpperLobeOfLung",
    "lung lower lobe": "LowerLobeOfLung", "iliac artery": "CommonIliacArtery", "iliac vena": "CommonIliacVein",
    "humerus": "Humerus", "scapula": "Scapula", "clavicula": "Clavicle", "femur": "Femur",
    "brachiocephalic vein": "BrachiocephalicVein", "common carotid artery": "CommonCarotidArtery",
} | {f"rib {n}": "Rib" for n in range(1, 13)}
# MAISI name -> (SNOMED CT keyword, laterality "L"/"R" or None).
_ANATOMY: dict[str, tuple[str, str | None]] = {name: (kw, None) for name, kw in _UNPAIRED.items()} | {
    f"{side} {name}": (kw, side[0].upper()) for side in ("left", "right") for name, kw in _PAIRED.items()}
# MAISI name -> (abnormality keyword, host region keyword): morphologically abnormal structures.
_ABNORMAL: dict[str, tuple[str, str]] = {
    "lung tumor": ("Neoplasm", "Lung"), "pancreatic tumor": ("Neoplasm", "Pancreas"),
    "hepatic tumor": ("Neoplasm", "Liver"), "colon cancer primaries": ("Neoplasm", "Colon"),
    "left kidney cyst": ("Cyst", "Kidney"), "right kidney cyst": ("Cyst", "Kidney"), "bone lesion": ("Lesion", "Bone"),
}
# Named MAISI structures with no concept in pydicom's SNOMED CT dictionary: coded in PRIVATE_SCHEME.
FALLBACK_NAMES: tuple[str, ...] = (
    "portal vein and splenic vein", "hepatic vessel", "vertebrae S1", "left hip", "right hip",
    "left gluteus maximus", "right gluteus maximus", "left gluteus medius", "right gluteus medius",
    "left gluteus minimus", "right gluteus minimus", "left autochthon", "right autochthon",
    "left iliopsoas", "right iliopsoas", "left atrial appendage", "body",
)
_LATERALITY = {"L": codes.SCT.Left, "R": codes.SCT.Right}
# Mask source -> the algorithm family (CID 7162) that made the label map.
_MASK_FAMILY = {"maisi_mask_generator": codes.cid7162.ArtificialIntelligence}


@dataclasses.dataclass(frozen=True)
class DicomGeometry:
    """Where a volume's slices lie in DICOM's LPS frame, and how to turn ``data[:, :, k]`` into pixels.

    Attributes:
        lps_affine: voxel ``(i, j, k)`` -> LPS mm, after the flips below.
        flip: whether the ``i`` and the ``j`` axis are reversed before writing.
        shape: the volume's ``(X, Y, Z)`` size in voxels.
    """

    lps_affine: np.ndarray
    flip: tuple[bool, bool]
    shape: tuple[int, int, int]

    @property
    def orientation(self) -> list[float]:
        """Image Orientation (Patient): the unit direction of a row (along ``i``) then of a column (along ``j``)."""
        axes = self.lps_affine[:3, :2] / np.linalg.norm(self.lps_affine[:3, :2], axis=0)
        return [_ds(v) for v in np.concatenate([axes[:, 0], axes[:, 1]])]

    @property
    def pixel_spacing(self) -> list[float]:
        """Pixel Spacing: between rows (along ``j``), then between columns (along ``i``), in mm."""
        spacing = np.linalg.norm(self.lps_affine[:3, :3], axis=0)
        return [_ds(spacing[1]), _ds(spacing[0])]

    @property
    def slice_spacing_mm(self) -> float:
        """The distance between neighbouring slice planes, in mm."""
        return float(np.linalg.norm(self.lps_affine[:3, 2]))

    def position(self, k: int) -> list[float]:
        """Image Position (Patient) of slice ``k``: the LPS centre of its first pixel, in mm."""
        return [_ds(v) for v in self.lps_affine[:3] @ np.array([0.0, 0.0, float(k), 1.0])]

    def frame(self, plane: np.ndarray) -> np.ndarray:
        """Return the pixel array ``(rows, columns)`` of one slice ``plane`` ``(X, Y)``."""
        if self.flip[0]:
            plane = plane[::-1, :]
        if self.flip[1]:
            plane = plane[:, ::-1]
        return np.ascontiguousarray(plane.T)


def plan_geometry(affine: np.ndarray, shape: tuple[int, ...]) -> DicomGeometry:
    """Return the DICOM geometry of a RAS+ NIfTI volume of ``shape`` ``(X, Y, Z)``.

    Raises:
        ExportError: When the affine has shear (its voxel axes are not orthogonal) or a zero-length axis.
    """
    lps = RAS_TO_LPS @ np.asarray(affine, dtype=np.float64)
    lengths = np.linalg.norm(lps[:3, :3], axis=0)
    if np.any(lengths <= 0) or len(shape) != 3:
        raise ExportError(f"export_dicom expects a 3D volume with non-zero voxel spacing, but got "
                          f"spacing={lengths.round(6).tolist()}, shape={tuple(shape)}.")
    unit = lps[:3, :3] / lengths
    cosines = np.abs(unit.T @ unit - np.eye(3))
    if cosines.max() > _TOLERANCE:
        raise ExportError(f"export_dicom expects an affine with orthogonal voxel axes, but got a largest "
                          f"|cosine|={cosines.max():.4g} between axes. Resample the volume without shear first.")
    flip = []
    for axis in (0, 1):
        direction = lps[:3, axis].copy()
        reverse = bool(direction[int(np.argmax(np.abs(direction)))] < 0)
        if reverse:
            lps[:3, 3] += direction * (shape[axis] - 1)
            lps[:3, axis] = -direction
        flip.append(reverse)
    return DicomGeometry(lps, (flip[0], flip[1]), tuple(int(s) for s in shape))


def case_uid(sample_id: str, role: str) -> str:
    """Return the UID of ``role`` (``study``, ``ct-series``, ``ct-3``, ...) of a case: the same on every export."""
    return str(generate_uid(entropy_srcs=["ctfactory", str(sample_id), role]))


def segment_description(number: int, label_id: int, name: str, *, mask_source: str | None,
                        code_version: str) -> hd.seg.SegmentDescription:
    """Return the SEG segment ``number`` for MAISI label ``label_id`` (see the module docstring for the codes)."""
    family = _MASK_FAMILY.get(mask_source or "", codes.cid7162.MorphologicalOperations)
    algorithm = hd.AlgorithmIdentificationSequence(name=f"ctfactory mask ({mask_source or 'unknown'})"[:_LO_MAX],
                                                   family=family, version=str(code_version)[:_LO_MAX])
    category, kind, modifier, regions = codes.SCT.AnatomicalStructure, None, None, None
    if name in _ANATOMY:
        keyword, side = _ANATOMY[name]
        kind, modifier = getattr(codes.SCT, keyword), _LATERALITY.get(side)
    elif name in _ABNORMAL:
        keyword, host = _ABNORMAL[name]
        category, kind, regions = codes.SCT.MorphologicallyAbnormalStructure, getattr(codes.SCT, keyword), \
            [getattr(codes.SCT, host)]
    else:
        kind = hd.sr.CodedConcept(str(label_id), PRIVATE_SCHEME, name)
    description = hd.seg.SegmentDescription(
        segment_number=number, segment_label=name, segmented_property_category=category,
        segmented_property_type=kind, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm, anatomic_regions=regions)
    description.SegmentDescription = f"MAISI label {label_id}: {name}"
    if modifier is not None:
        description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = \
            DicomSequence([hd.sr.CodedConcept(modifier.value, modifier.scheme_designator, modifier.meaning)])
    return description


def export_dicom(catalog: Catalog, dest: str | Path, *, as_of: int | None = None,
                 overwrite: bool = False) -> ExportResult:
    """Write ``dest/<case>/CT/NNNN.dcm`` (one CT instance per slice), ``dest/<case>/SEG/seg.dcm`` and a manifest.

    Every case is written into a temporary folder inside ``dest`` and moved into place only when all cases
    succeeded; on an error nothing of this export stays behind.

    Args:
        catalog: The catalog to export (passing CT rows only).
        dest: The folder to write into (empty or new, unless ``overwrite``).
        as_of: A ``samples`` version; latest when None.
        overwrite: Replace an existing export in ``dest``.

    Returns:
        An :class:`ExportResult` whose ``label_ids`` maps each MAISI ID present to itself.

    Raises:
        ExportError: A row that is not CT, a missing image or label file, a label ID outside MAISI's
            dictionary, a sheared affine, image and label grids that differ, or HU outside int16.
    """
    version, rows = passing_rows(catalog, as_of=as_of)
    _check_rows(catalog, rows)
    existed = Path(dest).exists()
    folder = prepare_destination(dest, overwrite=overwrite)
    staging = Path(tempfile.mkdtemp(prefix=".dicom-export-", dir=folder))
    try:
        cases = [write_dicom_case(catalog, row, staging / case_name(row["sample_id"])) for row in rows]
        _replace_export(folder, staging, cases, version)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if not existed and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
        raise
    shutil.rmtree(staging, ignore_errors=True)
    present = sorted({lid for case in cases for lid in case["maisi_label_ids"]})
    logger.info("export_dicom: %d cases to %s", len(rows), folder)
    return ExportResult("dicom", folder, version, len(rows), {i: i for i in present})


def write_dicom_case(catalog: Catalog, row: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Write one case's CT series and SEG under ``folder``; return its manifest entry (relative paths only)."""
    image = _open_image(catalog, row["image_uri"])
    label = load_nifti(catalog, row["label_uri"])
    if tuple(image.shape) != tuple(label.shape) or not np.allclose(image.affine, label.affine, atol=1e-4):
        raise ExportError(f"export_dicom expects image and label on the same grid, but got image shape="
                          f"{tuple(image.shape)} and label shape={tuple(label.shape)} (or different affines) for "
                          f"sample_id={row['sample_id']!r}.")
    label_map = np.asanyarray(label.dataobj)
    ids = _check_label_ids(label_map, row["sample_id"])
    if not ids:
        raise ExportError(f"export_dicom expects at least one labelled voxel (a SEG needs a segment), but got an "
                          f"all-background label map for sample_id={row['sample_id']!r}.")
    geometry = plan_geometry(image.affine, image.shape)
    headers = write_ct_series(image, geometry, row, folder / "CT")
    seg = build_segmentation(label_map, ids, geometry, headers, row)
    (folder / "SEG").mkdir(parents=True)
    seg.save_as(folder / "SEG" / "seg.dcm", enforce_file_format=True)
    return {
        "sample_id": row["sample_id"], "folder": folder.name, "study_instance_uid": case_uid(row["sample_id"], "study"),
        "ct_series_instance_uid": case_uid(row["sample_id"], "ct-series"), "ct_instances": len(headers),
        "seg_series_instance_uid": case_uid(row["sample_id"], "seg-series"), "seg_instances": 1,
        "maisi_label_ids": ids,
    }


def write_ct_series(image, geometry: DicomGeometry, row: dict[str, Any], folder: Path) -> list[Dataset]:
    """Write one CT instance per slice, reading one slice at a time; return the headers without pixel data.

    Args:
        image: The NIfTI image (its ``dataobj`` is read slice by slice).
        geometry: From :func:`plan_geometry`.
        row: The catalog row (provenance and UIDs).
        folder: Where ``0001.dcm``, ``0002.dcm``, ... go.
    """
    folder.mkdir(parents=True)
    ds = _ct_template(row, geometry)  # one dataset; only the per-slice elements change
    headers = []
    for k in range(geometry.shape[2]):
        uid = case_uid(row["sample_id"], f"ct-{k + 1}")
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = geometry.position(k)
        headers.append(copy.deepcopy(ds))
        ds.PixelData = _hu_frame(np.asanyarray(image.dataobj[:, :, k]), geometry, row["sample_id"]).tobytes()
        ds.save_as(folder / f"{k + 1:04d}.dcm", enforce_file_format=True)
        del ds.PixelData
    return headers


def build_segmentation(label_map: np.ndarray, ids: list[int], geometry: DicomGeometry,
                       headers: list[Dataset], row: dict[str, Any]) -> hd.seg.Segmentation:
    """Return the binary DICOM SEG of ``label_map`` ``(X, Y, Z)``, one segment per MAISI ID in ``ids``.

    Args:
        label_map: MAISI IDs on the CT grid.
        ids: The non-background IDs present, ascending (segment ``n`` is ``ids[n - 1]``).
        geometry: The CT series' geometry.
        headers: The CT instances without pixel data, in slice order (the SEG's source images).
        row: The catalog row.
    """
    from maisi_core.anatomy.labels import label_name

    lut = np.zeros(int(label_map.max()) + 1, dtype=np.uint8 if len(ids) < 256 else np.uint16)
    for number, lid in enumerate(ids, start=1):
        lut[lid] = number
    numbers = lut[label_map]  # unsigned IDs index directly: no int64 copy of a large map
    frames = np.stack([geometry.frame(numbers[:, :, k]) for k in range(geometry.shape[2])])
    descriptions = [segment_description(n, lid, label_name(lid), mask_source=row.get("mask_source"),
                                        code_version=row["code_version"]) for n, lid in enumerate(ids, start=1)]
    seg = hd.seg.Segmentation(
        source_images=headers, pixel_array=frames, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=case_uid(row["sample_id"], "seg-series"),
        series_number=2, sop_instance_uid=case_uid(row["sample_id"], "seg-1"), instance_number=1,
        manufacturer=MANUFACTURER, manufacturer_model_name=_lo(row["model_name"]),
        software_versions=_lo(row["code_version"]), device_serial_number=_lo(row.get("model_digest")) or "none",
        series_description="MAISI labels (synthetic)", content_label="MAISI_LABELS",
        content_description=f"MAISI label map of {row['sample_id']}"[:_LO_MAX],
        contributing_equipment=[_synthesizing_equipment(row)])
    seg.SyntheticData = "YES"
    if any(label_name(lid) in FALLBACK_NAMES for lid in ids):
        scheme = Dataset()
        scheme.CodingSchemeDesignator = PRIVATE_SCHEME
        scheme.CodingSchemeName = "MAISI CT label dictionary (maisi-ct-132)"
        scheme.CodingSchemeResponsibleOrganization = "ctfactory (label IDs of NVIDIA MAISI)"
        seg.CodingSchemeIdentificationSequence = DicomSequence([scheme])
    _make_deterministic(seg, row)
    return seg


def _make_deterministic(seg: hd.seg.Segmentation, row: dict[str, Any]) -> None:
    """Replace highdicom's export-time values (random dimension UID, timestamps) with ones fixed by the case."""
    dimension_uid = case_uid(row["sample_id"], "seg-dimension-organization")
    seg.DimensionOrganizationSequence[0].DimensionOrganizationUID = dimension_uid
    for index in seg.DimensionIndexSequence:
        index.DimensionOrganizationUID = dimension_uid
    for item in seg.ContributingEquipmentSequence:
        if "ContributionDateTime" in item:  # type 3; highdicom stamps the export time
            del item.ContributionDateTime
    if row.get("created_at"):  # the case's creation time, not the export's
        seg.ContentDate = seg.InstanceCreationDate = row["created_at"].strftime("%Y%m%d")
        seg.ContentTime = seg.InstanceCreationTime = row["created_at"].strftime("%H%M%S")


def _check_rows(catalog: Catalog, rows: list[dict[str, Any]]) -> None:
    """Refuse non-CT rows, non-NIfTI files and missing files before anything is written."""
    for row in rows:
        modality = row.get("modality") or "CT"
        if modality != "CT":
            raise ExportError(f"export_dicom expects CT rows (it writes CT Image Storage), but got modality="
                              f"{modality!r} for sample_id={row['sample_id']!r}. Export MR rows as nnunet or msd.")
        if len(str(row["sample_id"])) > _LO_MAX:
            raise ExportError(f"export_dicom expects a sample_id of at most {_LO_MAX} characters (it is the Patient "
                              f"ID), but got sample_id={row['sample_id']!r}.")
        for key in ("image_uri", "label_uri"):
            uri = row.get(key)
            source = _fs.resolve_uri(catalog.root_uri, uri) if uri else None
            if source is None or not _exists(catalog, source):
                raise ExportError(f"export_dicom expects the {key.split('_')[0]} file of every passing case, but "
                                  f"got {key}={uri!r} missing for sample_id={row['sample_id']!r}. "
                                  "Run ctfactory catalog verify ROOT.")


def _exists(catalog: Catalog, source: str) -> bool:
    if not _fs.is_remote(source):
        return Path(source).is_file()
    fs, path = _fs.filesystem(source, catalog.storage_options)
    return bool(fs.exists(path))


def _open_image(catalog: Catalog, uri: str) -> nib.Nifti1Image:
    """Open a NIfTI image for slice reads: a local file stays open, so each ``.nii.gz`` slice read continues
    the decompression instead of starting over (remote files are fetched whole by :func:`load_nifti`)."""
    source = _fs.resolve_uri(catalog.root_uri, uri)
    return load_nifti(catalog, uri) if _fs.is_remote(source) else nib.load(source, keep_file_open=True)


def _check_label_ids(label_map: np.ndarray, sample_id: str) -> list[int]:
    """Return the non-background IDs of ``label_map``; refuse any outside MAISI's dictionary."""
    from maisi_core.anatomy.labels import known_ids

    if not np.issubdtype(label_map.dtype, np.integer):
        raise ExportError(f"export_dicom expects integer label IDs, but got dtype={label_map.dtype} for "
                          f"sample_id={sample_id!r}.")
    ids = [int(v) for v in np.unique(label_map)]
    unknown = sorted(set(ids) - set(known_ids()))
    if unknown:
        raise ExportError(f"export_dicom expects label IDs of the MAISI dictionary, but got label={unknown[:10]} "
                          f"for sample_id={sample_id!r}. See maisi_core.anatomy.labels.label_dict().")
    return [i for i in ids if i != 0]


def _hu_frame(plane: np.ndarray, geometry: DicomGeometry, sample_id: str) -> np.ndarray:
    """Return one slice as int16 HU pixels ``(rows, columns)``; floats are rounded to the nearest HU."""
    values = np.rint(plane) if np.issubdtype(plane.dtype, np.floating) else plane
    if values.size and (values.min() < -32768 or values.max() > 32767 or not np.all(np.isfinite(values))):
        raise ExportError(f"export_dicom expects HU within int16 [-32768, 32767], but got range=[{values.min()}, "
                          f"{values.max()}] for sample_id={sample_id!r}.")
    return geometry.frame(values.astype("<i2"))


def _ct_template(row: dict[str, Any], geometry: DicomGeometry) -> Dataset:
    """Return the attributes every CT instance of a case shares (no per-slice UID, position or pixels)."""
    sample_id = row["sample_id"]
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = CTImageStorage
    ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
    _set_common(ds, row)
    ds.Modality = "CT"
    ds.SeriesInstanceUID = case_uid(sample_id, "ct-series")
    ds.SeriesNumber = 1
    ds.SeriesDescription = "Synthetic CT (ctfactory)"
    ds.Laterality = ""  # type 2C: the series covers a body region, not one of a paired structure
    ds.PatientPosition = "HFS"  # head first, supine: the frame the RAS+ volumes are defined in
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = _lo(row["model_name"])
    ds.SoftwareVersions = _lo(row["code_version"])
    ds.ContentDate, ds.ContentTime = ds.StudyDate, ds.StudyTime
    ds.AcquisitionNumber = 1
    ds.KVP = ""
    ds.ImageOrientationPatient = geometry.orientation
    ds.PixelSpacing = geometry.pixel_spacing
    ds.SliceThickness = ds.SpacingBetweenSlices = _ds(geometry.slice_spacing_mm)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(geometry.shape[1]), int(geometry.shape[0])
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "0", "1", "HU"
    ds.WindowCenter, ds.WindowWidth = "40", "400"
    ds.ContributingEquipmentSequence = DicomSequence([_synthesizing_equipment(row)])
    return ds


def _set_common(ds: Dataset, row: dict[str, Any]) -> None:
    """Set the patient, study and frame-of-reference attributes (the SEG copies them from the CT)."""
    sample_id = row["sample_id"]
    created = row.get("created_at")
    ds.SyntheticData = "YES"
    ds.PatientName = f"SYNTHETIC^{row.get('dataset') or 'ctfactory'}"[:_LO_MAX]
    ds.PatientID = sample_id
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.StudyInstanceUID = case_uid(sample_id, "study")
    ds.StudyDate = created.strftime("%Y%m%d") if created else ""
    ds.StudyTime = created.strftime("%H%M%S") if created else ""
    ds.StudyID = hashlib.sha256(sample_id.encode()).hexdigest()[:16]
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = f"Synthetic CT {row.get('dataset') or ''} (ctfactory)"[:_LO_MAX]
    ds.FrameOfReferenceUID = case_uid(sample_id, "frame-of-reference")
    ds.PositionReferenceIndicator = ""


def _synthesizing_equipment(row: dict[str, Any]) -> hd.ContributingEquipment:
    """The Contributing Equipment item naming ctfactory, the model and its digest as Synthesizing Equipment."""
    digest = str(row.get("model_digest") or "")
    text = (f"Synthesized by ctfactory {row['code_version']} with model {row['model_name']} "
            f"(digest {digest or 'none'}); sample_id={row['sample_id']}; spec_id={row.get('spec_id')}; "
            f"seed={row.get('seed')}")
    return hd.ContributingEquipment(
        manufacturer=MANUFACTURER, purpose_of_reference=codes.DCM.SynthesizingEquipment,
        manufacturer_model_name=_lo(row["model_name"]), software_versions=_lo(row["code_version"]),
        device_serial_number=digest if 0 < len(digest) <= _LO_MAX else None, contribution_description=text[:1024])


def _replace_export(folder: Path, staging: Path, cases: list[dict[str, Any]], version: int) -> None:
    """Move the staged case folders into ``folder`` (replacing an earlier export's) and write the manifest."""
    old = folder / MANIFEST
    if old.is_file():
        for entry in json.loads(old.read_text()).get("cases", []):
            stale = folder / Path(str(entry.get("folder", ""))).name
            if stale.name and stale.is_dir() and stale != staging:
                shutil.rmtree(stale)
    for case in cases:
        target = folder / case["folder"]
        if target.exists():
            shutil.rmtree(target)
        (staging / case["folder"]).rename(target)
    manifest = {"format": "dicom", "catalog_version": version, "synthetic": True,
                "uid_rule": "pydicom generate_uid(entropy_srcs=['ctfactory', sample_id, role])", "cases": cases}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))


def _lo(value: Any) -> str:
    return str(value or "")[:_LO_MAX]


def _ds(value: float) -> pydicom.valuerep.DSfloat:
    """``value`` as a Decimal String of at most 16 characters (as many digits as fit)."""
    return pydicom.valuerep.DSfloat(float(value) + 0.0, auto_format=True)  # + 0.0 turns -0.0 into 0.0
