"""Small fsspec helpers shared by verify, export and report: URIs, filesystems, hashing."""

from __future__ import annotations

import hashlib
import posixpath
from collections.abc import Mapping
from pathlib import Path

import fsspec

from catalog.errors import CatalogPathError

_CHUNK = 1 << 20


def is_remote(uri: str) -> bool:
    """Return True when ``uri`` has a scheme other than ``file://``."""
    return "://" in uri and not uri.startswith("file://")


def normalize_root(root_uri: str | Path) -> str:
    """Return ``root_uri`` without a trailing slash; local paths become absolute."""
    text = str(root_uri)
    if is_remote(text):
        return text.rstrip("/")
    if text.startswith("file://"):
        text = text[len("file://"):]
    return str(Path(text).expanduser().resolve())


def join_uri(root: str, *parts: str) -> str:
    """Join URI parts with ``/`` (works for local paths and ``s3://`` URIs)."""
    return "/".join([root.rstrip("/"), *(p.strip("/") for p in parts)])


def relative_path(relative: str, *, who: str = "relative_path") -> str:
    """``relative`` normalised, when it names a place under a root; the string half of :func:`resolve_inside`.

    Raises:
        CatalogPathError: ``relative`` is absolute, a URI, a drive path, uses backslashes, or climbs out with ``..``.
    """
    rel = str(relative)
    if "://" in rel or rel.startswith(("/", "\\")) or "\\" in rel or (len(rel) > 1 and rel[1] == ":"):
        raise CatalogPathError(f"{who} expects a relative path inside the output root, but got relative={rel!r}.")
    norm = posixpath.normpath(rel)
    if norm in (".", "..") or norm.startswith("../"):
        raise CatalogPathError(f"{who} expects a path that stays inside the output root, but got relative={rel!r}.")
    return norm


def resolve_inside(root: str, relative: str, *, who: str = "resolve_inside") -> str:
    """Join ``relative`` under ``root`` and check that the result stays inside the root.

    The one path rule of the project, for reading and for writing: a catalog row, an export or a case
    names files relative to the dataset root, never elsewhere. Local roots are resolved with symbolic
    links followed, so a link inside the root that points outside it is refused too.

    Raises:
        CatalogPathError: ``relative`` is absolute, a URI, uses backslashes, or climbs out with ``..``.
    """
    norm = relative_path(relative, who=who)
    if is_remote(root):
        return root.rstrip("/") + "/" + norm
    base = Path(root.removeprefix("file://")).expanduser().resolve()
    full = (base / norm).resolve()
    if not full.is_relative_to(base):
        raise CatalogPathError(f"{who} expects a path that stays inside {base}, but got relative={str(relative)!r} "
                               f"(resolves to {full}).")
    return str(full)


def resolve_uri(root: str, uri: str) -> str:
    """A file URI of a catalog row (relative to ``root``) as an absolute URI; see :func:`resolve_inside`."""
    return resolve_inside(root, uri, who="catalog")


def fsspec_options(storage_options: Mapping[str, str] | None) -> dict:
    """Translate deltalake-style ``AWS_*`` storage options into s3fs keyword arguments.

    Keys that are not ``AWS_*`` are passed through unchanged, so s3fs options work too.
    """
    out: dict = {}
    client: dict = {}
    for key, value in (storage_options or {}).items():
        upper = key.upper()
        if upper in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT"):
            client["endpoint_url"] = value
        elif upper == "AWS_ACCESS_KEY_ID":
            out["key"] = value
        elif upper == "AWS_SECRET_ACCESS_KEY":
            out["secret"] = value
        elif upper == "AWS_SESSION_TOKEN":
            out["token"] = value
        elif upper in ("AWS_REGION", "AWS_DEFAULT_REGION"):
            client["region_name"] = value
        elif upper.startswith("AWS_"):
            continue
        else:
            out[key] = value
    if client:
        out["client_kwargs"] = {**out.get("client_kwargs", {}), **client}
    return out


def filesystem(uri: str, storage_options: Mapping[str, str] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return the fsspec filesystem for ``uri`` and the path inside it."""
    options = fsspec_options(storage_options) if is_remote(uri) else {}
    fs, path = fsspec.core.url_to_fs(uri, **options)
    return fs, path


def sha256_and_size(fs: fsspec.AbstractFileSystem, path: str) -> tuple[str, int]:
    """Return the hex sha256 and byte size of one file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    size = 0
    with fs.open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size
