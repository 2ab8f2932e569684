"""The user documentation stands on its own in a fresh clone.

- Every relative link in README.md and docs/*.md (``[text](path)``, ``[text](path#anchor)``,
  images and reference definitions ``[ref]: path``) names a file or directory of the repository.
  Web links (http, https, mailto) and pure ``#anchor`` links are not checked; links in code blocks
  and code spans are not links.
- No file of the repository points at the developers' notes kept outside it.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [ROOT / "README.md", *DOCS]
# Spelled in pieces so that this file does not match itself.
OUTSIDE_NOTES = (".." + "/shared", "shared" + "/docs")
MIN_LINKS = 12  # the pages link to each other and to the code; far fewer means the parser broke

FENCE = re.compile(r"^( {0,3})(```|~~~).*?^\1\2[ \t]*$", re.M | re.S)
CODE_SPAN = re.compile(r"(`+)(?!`).+?(?<!`)\1(?!`)", re.S)
INLINE = re.compile(
    r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*(<[^>]*>|[^()\s]*(?:\([^()\s]*\)[^()\s]*)*)"
)
DEFINITION = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)", re.M)
EXTERNAL = re.compile(r"^(?:[a-zA-Z][a-zA-Z0-9+.-]*:|//)")  # http:, https:, mailto:, ...


def strip_code(text: str) -> str:
    """The Markdown text without fenced code blocks and code spans."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def links(text: str) -> list[str]:
    """Link targets of a Markdown text (inline links, images, reference definitions)."""
    prose = strip_code(text)
    found = INLINE.findall(prose) + DEFINITION.findall(prose)
    return [target.strip("<>").strip() for target in found]


def relative_links(page: Path) -> list[tuple[str, Path]]:
    """``(target, resolved path)`` of each relative link of ``page`` (anchors dropped)."""
    out = []
    for target in links(page.read_text(encoding="utf-8")):
        if not target or target.startswith("#") or EXTERNAL.match(target):
            continue
        path = target.split("#", 1)[0].split("?", 1)[0]
        out.append((target, (page.parent / path).resolve()))
    return out


def test_link_parser_finds_links_and_skips_code():
    text = (
        "See [a](a.md), [b](docs/b.md#part), ![img](img.png), [web](https://x.org/y),\n"
        "[top](#top).\n"
        "`[not](code.md)`\n```\n[neither](block.md)\n```\n[ref]: ref.md\n"
    )
    assert links(text) == ["a.md", "docs/b.md#part", "img.png", "https://x.org/y", "#top", "ref.md"]


def test_docs_exist():
    names = {p.name for p in DOCS}
    assert {"method.md", "architecture.md", "kernels.md", "rewards.md"} <= names, names


def test_relative_links_resolve():
    checked, broken = 0, []
    for page in PAGES:
        for target, path in relative_links(page):
            checked += 1
            where = f"{page.relative_to(ROOT)}: ({target})"
            if not path.is_relative_to(ROOT):
                broken.append(f"{where} points outside the repository")
            elif not path.exists():
                broken.append(f"{where} -> {path.relative_to(ROOT)} does not exist")
    assert not broken, "broken links:\n" + "\n".join(broken)
    assert checked >= MIN_LINKS, f"only {checked} relative links found in {len(PAGES)} pages"


def test_readme_links_to_the_docs():
    targets = {path for _, path in relative_links(ROOT / "README.md")}
    linked = [p for p in DOCS if p.resolve() in targets]
    assert linked, "README.md links to no page of docs/"


def _repository_files() -> list[Path]:
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT, capture_output=True, check=True,
        ).stdout.decode()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: cannot list the repository's files")
    return [ROOT / name for name in listed.split("\0") if name]


def test_nothing_points_at_notes_outside_the_repository():
    files = [f for f in _repository_files() if f.is_file()]
    assert len(files) > 50, f"only {len(files)} files listed"
    read, offenders = 0, []
    for path in files:
        data = path.read_bytes()
        if b"\0" in data[:8192]:
            continue  # binary (weights, images)
        read += 1
        text = data.decode("utf-8", errors="replace")
        for needle in OUTSIDE_NOTES:
            for number, line in enumerate(text.splitlines(), 1):
                if needle in line:
                    offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert read > 50, f"only {read} text files read"
    assert not offenders, "references to notes outside the repository:\n" + "\n".join(offenders)
