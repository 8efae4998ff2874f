"""Exceptions raised by maisi_core.

Every exception derives from :class:`MaisiError`; the specific ones also derive from the built-in
exception that fits, so callers may catch either. Messages follow the house pattern
``"<Who> expects <rule>, but got <name>=<value>. <hint>"``.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class MaisiError(Exception):
    """Raised when maisi_core cannot do what it was asked (base class)."""


class ConfigError(MaisiError, ValueError):
    """Raised when a network, scheduler or pipeline configuration is invalid."""


class GeometryError(MaisiError, ValueError):
    """Raised when an output size, spacing or field of view breaks the preset's geometry rules."""


class LabelMapError(MaisiError, ValueError):
    """Raised when a label map has unknown IDs, a wrong shape or dtype, or lacks the body label."""


class LabelNameError(MaisiError, KeyError):
    """Raised when a structure name or ID is not in the MAISI label dictionary."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it a plain line.
        return str(self.args[0]) if self.args else ""


class WeightsError(MaisiError, ValueError):
    """Raised when a model directory or checkpoint is malformed, altered or of the wrong architecture."""


class WeightsNotFoundError(MaisiError, FileNotFoundError):
    """Raised when a model directory, index or weight file does not exist."""


class UnsafeCheckpointError(WeightsError):
    """Raised when a checkpoint needs arbitrary pickled objects (it is refused, never unpickled)."""


class DeviceError(MaisiError, RuntimeError):
    """Raised when the requested device or precision is not available."""


def did_you_mean(value: object, choices: Iterable[object], *, n: int = 1) -> str:
    """Return ``" Did you mean 'x'?"`` for the closest choice, or ``""`` when none is close."""
    names = [str(c) for c in choices]
    close = difflib.get_close_matches(str(value), names, n=n, cutoff=0.6)
    if not close:
        return ""
    return " Did you mean " + " or ".join(repr(c) for c in close) + "?"


class ImageError(MaisiError, ValueError):
    """Raised when an image volume has the wrong dimensionality or dtype, or non-finite values."""


class AffineError(MaisiError, ValueError):
    """Raised when an affine is not a finite, invertible 4x4 matrix or two affines disagree."""


class OutputExistsError(MaisiError, FileExistsError):
    """Raised when a write would replace an existing file and ``overwrite=False``."""


class VolumeFileError(MaisiError, ValueError):
    """Raised when a file is not a readable 3D NIfTI volume of the expected kind."""


class VolumeNotFoundError(MaisiError, FileNotFoundError):
    """Raised when a volume file to read does not exist."""


class QCConfigError(MaisiError, ValueError):
    """Raised when QC thresholds name an unknown organ or give an invalid HU range."""


class FeatureError(MaisiError, ValueError):
    """Raised when feature sets or volumes passed to a metric have incompatible shapes or values."""


class MaskSourceError(MaisiError, ValueError):
    """Raised when a mask source cannot make the requested label map (bad options, unknown source)."""


class TumorPlacementError(MaskSourceError):
    """Raised when a tumour cannot be placed because its host organ is not in the label map."""


class UnmappedLabelError(MaskSourceError):
    """Raised when a user label map holds source labels that the declared mapping does not cover."""


class NoCandidateMaskError(MaskSourceError):
    """Raised when no mask in a candidate folder satisfies the request."""


class TrainingDataError(MaisiError, ValueError):
    """Raised when a training data folder holds no usable or unmatched image/label pairs."""


class TrainingDataNotFoundError(TrainingDataError, FileNotFoundError):
    """Raised when a training data folder does not exist."""


class CheckpointError(MaisiError, ValueError):
    """Raised when a training checkpoint folder is malformed or belongs to a different run."""
