"""``python -m daemon.cli``: the ``forensic-gender`` command."""

import sys

from daemon.cli import main

sys.exit(main())
