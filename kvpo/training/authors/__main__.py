"""``python -m kvpo.training.authors --markdown`` prints ``docs/authors-config.md``;
``python -m kvpo.training.authors FILE.yaml`` prints the mapping table of an authors' file."""

import sys

from kvpo.training.authors.report import check_table, markdown

if sys.argv[1:] == ["--markdown"]:
    print(markdown(), end="")
elif len(sys.argv) == 2:
    print(check_table(sys.argv[1]) or f"{sys.argv[1]} is not in the KVPO authors' format")
else:
    sys.exit("usage: python -m kvpo.training.authors (--markdown | FILE.yaml)")
