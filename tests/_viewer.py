"""The volume browser served in a thread, for its fast and browser tests (no tests here)."""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path

from catalog.root import DatasetRoot
from catalog.viewer import build_viewer_server


@contextlib.contextmanager
def serving(root: Path | str, **kwargs):
    """Serve the viewer of ``root`` in a thread on a free port; stop it afterwards."""
    server = build_viewer_server(DatasetRoot.of(root), **kwargs)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
