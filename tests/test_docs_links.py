"""Every relative link in README.md, docs/ (every .md) and infra/README.md points to a file that exists, and every
`#anchor` into a markdown file to one of its headings (GitHub's heading ids). External links are not fetched."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import REPO_ROOT

PAGES = sorted([REPO_ROOT / "README.md", REPO_ROOT / "infra" / "README.md", *(REPO_ROOT / "docs").rglob("*.md")])
FENCE = re.compile(r"^\s*(```|~~~)")
CODE_SPAN = re.compile(r"(`+).*?\1")
# [text](target) and ![alt](target); the target ends at whitespace (an optional "title" follows) or ")"
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)  # http:, https:, mailto:, ...


def links(page: Path) -> list[tuple[int, str]]:
    """(line number, target) of every markdown link outside code blocks and code spans."""
    out, fenced = [], False
    for n, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out += [(n, m.group(1)) for m in LINK.finditer(CODE_SPAN.sub("", line))]
    return out


def slug(heading: str) -> str:
    """GitHub's id for a heading: lowercased, punctuation dropped (word characters, spaces and hyphens kept),
    spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())  # a link in a heading: its text
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """The heading ids of a markdown page, with GitHub's -1, -2 ... for repeated headings."""
    ids: set[str] = set()
    counts: dict[str, int] = {}
    fenced = False
    for line in page.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m and not fenced:
            base = slug(m.group(1))
            ids.add(f"{base}-{counts[base]}" if base in counts else base)
            counts[base] = counts.get(base, 0) + 1
    return ids


def broken_links(page: Path, root: Path = REPO_ROOT) -> list[str]:
    problems = []
    for n, target in links(page):
        if EXTERNAL.match(target):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        where = f"{page.relative_to(root)}:{n}: {target}"
        if not dest.exists():
            problems.append(f"{where}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{where}: no heading with id '{anchor}' in {dest.name}")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_relative_links_resolve(page):
    assert page.exists()
    assert not broken_links(page), "broken links:\n  " + "\n  ".join(broken_links(page))


def test_the_checker_finds_a_broken_link(tmp_path):
    """The check itself: a missing file and a missing heading are reported; code, external links and good
    links are not."""
    (tmp_path / "other.md").write_text("# Other page\n\n## Serving (2-core AMD EPYC, AVX-512, 2026-12-02)\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n[ok](other.md) [ok](other.md#serving-2-core-amd-epyc-avx-512-2026-12-02) [self](#page)\n"
        "[gone](missing.md) [bad anchor](other.md#nowhere) [web](https://example.com/x.md)\n"
        "`[in code](nope.md)`\n```\n[in a block](nope.md)\n```\n"
    )
    problems = broken_links(page, root=tmp_path)
    assert len(problems) == 2, problems
    assert "missing.md: no such file" in problems[0] and "no heading with id 'nowhere'" in problems[1]
