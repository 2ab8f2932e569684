"""``python -m kvpo.study``: see :mod:`kvpo.study.command`."""

import sys

from kvpo.study.command import main

sys.exit(main())
