"""``python -m flows`` is the ``ctfactory`` command."""

import sys

from flows.cli import main

sys.exit(main())
