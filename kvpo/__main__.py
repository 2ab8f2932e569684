"""``python -m kvpo``: the ``kvpo`` command (:mod:`kvpo.cli`)."""

import sys

from kvpo.cli import main

sys.exit(main())
