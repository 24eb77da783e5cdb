"""``python -m kombu_streams.cli``: the ``kombu-streams`` command without its console script."""

import sys

from . import main

sys.exit(main())
