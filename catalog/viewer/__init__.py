"""A read-only web viewer of one catalog: a filterable case list and an interactive 3D view of each case.

``ctfactory view ROOT`` serves it (see :mod:`flows.cli_view`). :mod:`catalog.viewer.server` holds the
HTTP server (standard library only), :mod:`catalog.viewer.cases` the catalog side (case list, filters,
volume files through the one path rule) and :mod:`catalog.viewer.display` the CT window presets and the
MAISI label colour map. The page in ``static/`` draws volumes with NiiVue (BSD-2-Clause; version and
licences next to its bundle), shipped with the package: nothing is loaded from elsewhere at run time.
"""

from __future__ import annotations

from catalog.viewer.cases import CaseIndex, CaseSnapshot
from catalog.viewer.display import WINDOW_PRESETS, WindowPreset, build_label_colormap
from catalog.viewer.server import NIIVUE_VERSION, ViewerServer, build_viewer_server

__all__ = [
    "NIIVUE_VERSION",
    "WINDOW_PRESETS",
    "CaseIndex",
    "CaseSnapshot",
    "ViewerServer",
    "WindowPreset",
    "build_label_colormap",
    "build_viewer_server",
]
