"""Memory sizes as people write them: ``80GiB``, ``141GB``, ``512MiB``, ``1.5TiB``, ``85520809984``.

Binary units (``KiB``, ``MiB``, ``GiB``, ``TiB``) are powers of 1024, decimal units (``KB``,
``MB``, ``GB``, ``TB``) powers of 1000, as GPU data sheets use them (an "H100 80 GB" has 80 GiB,
an "H200 141 GB" about 140 GiB). A plain number is bytes.
"""

from __future__ import annotations

import re

UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]*)\s*$")


class SizeError(ValueError):
    """A memory size that cannot be read."""


def parse_size(text: str | int | float) -> int:
    """Bytes of ``text`` (``"80GiB"`` -> 85899345920); raises :class:`SizeError`."""
    if isinstance(text, bool):
        raise SizeError(f"a memory size must be a number with a unit, got {text!r}")
    if isinstance(text, int | float):
        value, unit = float(text), ""
    else:
        match = _SIZE.match(str(text))
        if not match:
            raise SizeError(
                f"cannot read the memory size {text!r}: expected a number and a unit, e.g. "
                f"80GiB, 141GB, 512MiB (units: {', '.join(u for u in _unit_names())})"
            )
        value, unit = float(match[1]), match[2]
    factor = UNITS.get(unit.upper())
    if factor is None:
        raise SizeError(
            f"unknown memory unit {unit!r} in {text!r}; units: {', '.join(_unit_names())}"
        )
    if value <= 0:
        raise SizeError(f"a memory size must be positive, got {text!r}")
    return int(value * factor)


def _unit_names() -> list[str]:
    return ["B", "KB", "MB", "GB", "TB", "KiB", "MiB", "GiB", "TiB"]


def gib(n: float) -> str:
    """``n`` bytes in GiB with two decimals (``"72.59 GiB"``)."""
    return f"{n / 2**30:.2f} GiB"
