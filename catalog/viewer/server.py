"""The viewer's web server: a read-only HTTP view of one catalog, on the standard library's threading server.

Routes (every one GET or HEAD; any other method is answered 405 and nothing is ever written):

=====================================  ===========================================================
``/``                                  the page (``static/index.html``)
``/static/<name>``                     a file of ``static/`` (the page's script and style, NiiVue)
``/api/catalog``                       root, version, filter values, window presets (moves to the
                                       newest version first unless one was pinned)
``/api/samples?cohort=&body_region=``  the case list; filters ``cohort``, ``body_region``,
``&pathology=&qc=&status=``            ``pathology``, ``status``, ``qc`` (pass/fail), and ``limit``,
                                       ``offset``
``/api/samples/<sample_id>``           the case's full catalog row
``/api/labels``                        the discrete MAISI label colour map (NiiVue's form)
``/volumes/<sample_id>/image.nii.gz``  the case's image or label volume, found from its row through
``/volumes/<sample_id>/label.nii.gz``  the one path rule (:meth:`catalog.root.DatasetRoot.resolve`)
=====================================  ===========================================================

Errors are JSON ``{"error": "..."}``: 400 for a bad request (a ``..`` segment, an unknown filter), 404
for anything unknown or refused by the path rule, 503 when the catalog cannot be read. Bound to a
loopback address, the server answers only requests addressed to a loopback name (``Host`` header), so
a web page that points its own domain name at 127.0.0.1 (DNS rebinding) cannot read the data.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import socket
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote

from catalog.errors import CatalogError, CatalogNotFoundError, CatalogPathError, CatalogReadError, QueryError
from catalog.root import DatasetRoot
from catalog.viewer.cases import VOLUME_KINDS, CaseIndex, volume_suffix
from catalog.viewer.display import WINDOW_PRESETS, build_label_colormap

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).with_name("static")
NIIVUE_VERSION = "0.69.0"  # static/niivue.umd.js, from the npm package @niivue/niivue
ALLOWED_METHODS: tuple[str, ...] = ("GET", "HEAD")
CONTENT_TYPES: dict[str, str] = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".txt": "text/plain; charset=utf-8",
    ".json": "application/json",
}
VOLUME_CONTENT_TYPES: dict[str, str] = {".nii.gz": "application/gzip", ".nii": "application/octet-stream"}
LOOPBACK_HOSTS: frozenset[str] = frozenset({"127.0.0.1", "localhost", "::1"})
# Everything the page loads comes from this server; NiiVue draws into WebGL and makes blob: URLs.
SECURITY_HEADERS: dict[str, str] = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": ("default-src 'self'; img-src 'self' data: blob:; worker-src 'self' blob:; "
                                "connect-src 'self' blob: data:; style-src 'self' 'unsafe-inline'; "
                                "object-src 'none'; frame-ancestors 'none'"),
}
_CHUNK = 1 << 20
_PAGE = "index.html"


class ViewerServer(ThreadingHTTPServer):
    """The viewer's HTTP server over one :class:`CaseIndex` (one thread per request, read-only).

    Args:
        address: ``(host, port)``; port 0 picks a free port (see :attr:`url`).
        index: the catalog view requests are answered from.
        static_dir: the folder of the page's files.
    """

    daemon_threads = True
    block_on_close = False  # Ctrl-C must not wait for a browser's kept-alive connection

    def __init__(self, address: tuple[str, int], index: CaseIndex, *, static_dir: Path = STATIC_DIR) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, ViewerRequestHandler)
        self.index = index
        self.static_files = {p.name: p for p in sorted(Path(static_dir).iterdir()) if p.is_file()}
        self.label_colormap = build_label_colormap()

    @property
    def host(self) -> str:
        """The host the server is bound to."""
        return str(self.server_address[0])

    @property
    def port(self) -> int:
        """The port the server listens on (the one picked when 0 was asked)."""
        return int(self.server_address[1])

    @property
    def url(self) -> str:
        """The page's URL."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def accepts_host_header(self, value: str | None) -> bool:
        """True when a request's ``Host`` header names a loopback host (always, unless bound to loopback).

        Any port is accepted, so an SSH tunnel to another local port works (``ssh -L 9000:127.0.0.1:PORT``);
        a page on another domain that resolves to 127.0.0.1 sends its own name and is refused.
        """
        if self.host not in LOOPBACK_HOSTS or value is None:
            return True
        name = value.strip().lower()
        name = name[1:name.index("]")] if name.startswith("[") and "]" in name else name.partition(":")[0]
        return name in LOOPBACK_HOSTS

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Log an unexpected error of one request (the server keeps serving)."""
        logger.exception("viewer: request from %s failed", client_address[0])


def build_viewer_server(root: DatasetRoot, *, host: str = "127.0.0.1", port: int = 0,
                        as_of: int | None = None) -> ViewerServer:
    """Read the catalog of ``root`` and bind the viewer's server to ``host:port`` (not yet serving).

    Call ``serve_forever()`` on the result to serve, ``shutdown()`` from another thread to stop, and
    ``server_close()`` to release the port.

    Args:
        root: the dataset root and its storage options.
        host: the address to bind (default loopback only).
        port: the port; 0 picks a free one.
        as_of: a ``samples`` version to show; None shows the newest and follows new commits.

    Raises:
        CatalogNotFoundError: the root has no catalog, or ``as_of`` does not exist.
        CatalogReadError: the catalog cannot be read.
        OSError: the address cannot be bound (port in use, unknown host).
    """
    index = CaseIndex(root, as_of=as_of)
    return ViewerServer((host, port), index)


def _json_safe(value: Any) -> Any:
    """``value`` with NaN and infinities as None (JSON has neither)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


class ViewerRequestHandler(BaseHTTPRequestHandler):
    """Answers one connection's requests for a :class:`ViewerServer` (GET and HEAD only)."""

    server: ViewerServer
    _send_body = True  # False while answering a HEAD
    server_version = "ctfactory-viewer"
    sys_version = ""
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 - the name http.server dispatches to
        """Answer a GET."""
        self._answer(send_body=True)

    def do_HEAD(self) -> None:  # noqa: N802
        """Answer a HEAD: the GET's status and headers without the body."""
        self._answer(send_body=False)

    def __getattr__(self, name: str) -> Callable[[], None]:
        if name.startswith("do_"):  # every other method: POST, PUT, DELETE, PATCH, OPTIONS, made-up ones
            return self._refuse_method
        raise AttributeError(name)

    def _refuse_method(self) -> None:
        self.close_connection = True  # any request body is left unread
        self._send_body = True
        self._send_error(HTTPStatus.METHOD_NOT_ALLOWED, f"viewer expects a method in {list(ALLOWED_METHODS)} (it is "
                                                        f"read-only), but got method={self.command!r}.",
                         {"Allow": ", ".join(ALLOWED_METHODS)})

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        """One line per request on the module's logger (paths and statuses; storage options never appear)."""
        logger.info("%s %s", self.address_string(), format % args)

    # -- routing --------------------------------------------------------------------------------------
    def _answer(self, *, send_body: bool) -> None:
        self._send_body = send_body
        try:
            if not self.server.accepts_host_header(self.headers.get("Host")):
                return self._send_error(HTTPStatus.BAD_REQUEST, f"viewer expects requests addressed to "
                                        f"{' or '.join(sorted(LOOPBACK_HOSTS))} (it listens on loopback only), "
                                        f"but got Host={self.headers.get('Host')!r}.")
            self._route()
        except QueryError as exc:
            self._send_error(HTTPStatus.BAD_REQUEST, str(exc))
        except CatalogPathError as exc:
            logger.warning("viewer: refused a path: %s", exc)
            self._send_error(HTTPStatus.NOT_FOUND, str(exc))
        except (CatalogNotFoundError, CatalogReadError) as exc:
            self._send_error(HTTPStatus.SERVICE_UNAVAILABLE, str(exc))
        except CatalogError as exc:
            self._send_error(HTTPStatus.INTERNAL_SERVER_ERROR, str(exc))
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the browser went away mid-answer (a newer case was clicked)

    def _route(self) -> None:
        path, _, query = self.path.partition("?")
        parts = [unquote(p) for p in path.split("/")[1:]] if path.startswith("/") else []
        if not parts or any(p in (".", "..") or "/" in p or "\\" in p or "\0" in p for p in parts):
            return self._send_error(HTTPStatus.BAD_REQUEST, f"viewer expects a path of plain names without '.' or "
                                                            f"'..' segments, but got path={self.path!r}.")
        head, rest = parts[0], parts[1:]
        if head in ("", _PAGE) and not rest:
            return self._send_static(_PAGE)
        if head == "static" and len(rest) == 1:
            return self._send_static(rest[0])
        if head == "api" and rest == ["catalog"]:
            return self._send_json(HTTPStatus.OK, self._catalog_summary())
        if head == "api" and rest == ["labels"]:
            return self._send_json(HTTPStatus.OK, self.server.label_colormap)
        if head == "api" and rest == ["samples"]:
            params = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}
            return self._send_json(HTTPStatus.OK, self.server.index.list_cases(params))
        if head == "api" and len(rest) == 2 and rest[0] == "samples":
            return self._send_row(rest[1])
        if head == "volumes" and len(rest) == 2:
            return self._send_volume(rest[0], rest[1])
        self._send_error(HTTPStatus.NOT_FOUND, f"viewer expects a path of its routes (/, /static/..., /api/catalog, "
                                               f"/api/samples, /api/labels, /volumes/...), but got path={path!r}.")

    # -- answers --------------------------------------------------------------------------------------
    def _catalog_summary(self) -> dict[str, Any]:
        index = self.server.index
        snapshot = index.refresh()
        return {
            "root": index.root.uri,
            "version": snapshot.version,
            "pinned": index.as_of is not None,
            "total": len(snapshot.cases),
            "facets": snapshot.facets(),
            "windows": [w.to_dict() for w in WINDOW_PRESETS],
            "viewer": {"library": "niivue", "version": NIIVUE_VERSION},
        }

    def _send_unknown_case(self, sample_id: str) -> None:
        version = self.server.index.snapshot.version
        self._send_error(HTTPStatus.NOT_FOUND, f"viewer expects a sample_id of the catalog (version {version}), "
                                               f"but got sample_id={sample_id!r}. List them at /api/samples.")

    def _send_row(self, sample_id: str) -> None:
        row = self.server.index.read_row(sample_id)
        if row is None:
            return self._send_unknown_case(sample_id)
        self._send_json(HTTPStatus.OK, row)

    def _send_volume(self, sample_id: str, name: str) -> None:
        case = self.server.index.find_case(sample_id)
        if case is None:
            return self._send_unknown_case(sample_id)
        if not case.get("image_uri"):
            return self._send_error(HTTPStatus.NOT_FOUND, f"viewer expects a case with volume files, but got "
                                                          f"sample_id={sample_id!r} with status={case['status']!r}. "
                                                          "Failed cases have no files.")
        kind = next((k for k in VOLUME_KINDS if name.startswith(k)), None)
        uri = case.get(VOLUME_KINDS[kind]) if kind else None
        if not uri or name != f"{kind}{volume_suffix(uri)}":
            return self._send_error(HTTPStatus.NOT_FOUND, f"viewer expects a volume named image or label with the "
                                                          f"file's suffix, but got name={name!r} for "
                                                          f"sample_id={sample_id!r}.")
        resolved = self.server.index.volume_uri(case, kind)  # the one path rule: CatalogPathError -> 404
        etag = f'"{case.get(f"{kind}_sha256") or ""}"'
        if case.get(f"{kind}_sha256") and self.headers.get("If-None-Match") == etag:
            return self._send_headers(HTTPStatus.NOT_MODIFIED, {"ETag": etag})
        try:
            handle, size = self.server.index.open_volume(resolved)
        except FileNotFoundError:
            return self._send_error(HTTPStatus.NOT_FOUND, f"viewer expects the file of {kind}_uri={uri!r} under the "
                                                          "root, but got none. Run `ctfactory catalog verify ROOT`.")
        content_type = VOLUME_CONTENT_TYPES.get(volume_suffix(uri), "application/octet-stream")
        with handle:
            self._send_headers(HTTPStatus.OK, {"Content-Type": content_type, "Content-Length": str(size),
                                               "ETag": etag, "Cache-Control": "no-cache"})
            if self._send_body:
                shutil.copyfileobj(handle, self.wfile, _CHUNK)

    def _send_static(self, name: str) -> None:
        path = self.server.static_files.get(name)
        if path is None:
            return self._send_error(HTTPStatus.NOT_FOUND,
                                    f"viewer expects a file of its static folder, but got name={name!r}.")
        content_type = CONTENT_TYPES.get(path.suffix, "application/octet-stream")
        with path.open("rb") as handle:
            self._send_headers(HTTPStatus.OK, {"Content-Type": content_type,
                                               "Content-Length": str(path.stat().st_size),
                                               "Cache-Control": "no-cache"})
            if self._send_body:
                shutil.copyfileobj(handle, self.wfile, _CHUNK)

    def _send_error(self, status: HTTPStatus, message: str, extra: dict[str, str] | None = None) -> None:
        self._send_json(status, {"error": message}, extra)

    def _send_json(self, status: HTTPStatus, payload: Any, extra: dict[str, str] | None = None) -> None:
        body = json.dumps(_json_safe(payload), allow_nan=False).encode()
        self._send_headers(status, {"Content-Type": "application/json", "Content-Length": str(len(body)),
                                    "Cache-Control": "no-store", **(extra or {})})
        if self._send_body:
            self.wfile.write(body)

    def _send_headers(self, status: HTTPStatus, headers: dict[str, str]) -> None:
        self.send_response(status)
        for key, value in {**SECURITY_HEADERS, **headers}.items():
            self.send_header(key, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
