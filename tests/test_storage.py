"""factory.storage: publishing a volume over an orphan file left by a crashed run."""

from __future__ import annotations

import hashlib

import numpy as np

from catalog.root import DatasetRoot
from factory.storage import publish_volume, sha256_of
from maisi_core import io
from maisi_core.engine.geometry import affine_from_spacing


def test_publish_volume_writes_keeps_identical_and_replaces_different(tmp_path):
    uri = str(tmp_path / "case_image.nii.gz")
    affine = affine_from_spacing((4.0, 4.0, 4.0))
    image = np.full((8, 8, 8), 40, np.int16)
    first, action = publish_volume(io.save_image, uri, image, affine, root=DatasetRoot.of(tmp_path))
    assert action == "written"
    assert sha256_of(uri, {}) == first.sha256 == hashlib.sha256((tmp_path / "case_image.nii.gz").read_bytes()).hexdigest()
    again, action = publish_volume(io.save_image, uri, image, affine, root=DatasetRoot.of(tmp_path))
    assert (action, again.sha256) == ("kept", first.sha256)
    other, action = publish_volume(io.save_image, uri, image + 10, affine, root=DatasetRoot.of(tmp_path))
    assert action == "replaced" and other.sha256 != first.sha256
    assert sha256_of(uri, {}) == other.sha256
    np.testing.assert_array_equal(io.load_image(uri).array, image + 10)


def test_missing_files_on_s3_lists_each_folder_once(tmp_path):
    import fsspec
    from s3_server import local_s3_server

    from catalog.root import DatasetRoot
    from factory.dataset import missing_files

    with local_s3_server(bucket="missing-files") as s3:
        fs = fsspec.filesystem("s3", **s3.fsspec_options)
        for key in ("images/a.nii.gz", "labels/a.nii.gz", "images/b.nii.gz"):
            fs.pipe_file(f"missing-files/ds/{key}", b"x")
        root = DatasetRoot.of("s3://missing-files/ds", s3.delta_options)
        uris = ["images/a.nii.gz", "labels/a.nii.gz", "images/b.nii.gz", "labels/b.nii.gz", "images/c.nii.gz"]
        assert missing_files(root, uris) == {"labels/b.nii.gz", "images/c.nii.gz"}
        assert missing_files(root, ["masks/x.nii.gz"]) == {"masks/x.nii.gz"}  # a folder that does not exist
