"""The README stays a front door and every page it sends a reader to is there (issue 20).

The README is kept short on purpose; everything else lives in docs/. A page renamed or a heading
reworded silently breaks the links into it, so every relative link of the README and of every
docs page is resolved here, anchors included.
"""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
README_MAX_LINES = 200
# [text](target): a target without a scheme is a path relative to the page (optionally #anchor).
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces as dashes."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    anchors, fenced = set(), False
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (match := re.match(r"^#{1,6} (.+)$", line)):
            anchors.add(_slug(match.group(1)))
    return anchors


def broken_links(page: Path) -> list[str]:
    """Relative links of ``page`` (outside code blocks) whose file, or heading, does not exist."""
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    broken = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(target)
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            broken.append(target)
    return broken


def test_the_readme_is_a_front_door():
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail into docs/"


def test_every_docs_page_the_readme_names_exists():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    named = set(re.findall(r"docs/[\w./-]+\.md", readme))
    assert named, "the README links no docs page"
    assert not [name for name in named if not (REPO / name).is_file()]
    # Every page of docs/ is reachable from the README.
    assert {f"docs/{p.name}" for p in (REPO / "docs").glob("*.md")} <= named


def test_every_relative_link_of_the_readme_and_docs_resolves():
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    broken = {str(p.relative_to(REPO)): b for p in pages if (b := broken_links(p))}
    assert not broken, f"links to nowhere: {broken}"


def test_the_link_check_finds_a_missing_page_and_a_missing_heading(tmp_path):
    (tmp_path / "there.md").write_text("# A page\n\n## Retention (streams and buckets)\n")
    page = tmp_path / "page.md"
    page.write_text("[ok](there.md) [ok](there.md#retention-streams-and-buckets) [ok](https://x.org/a.md)\n"
                    "[gone](missing.md) [bad anchor](there.md#no-such-heading)\n"
                    "```\n[in code](ignored.md)\n```\n")
    assert broken_links(page) == ["missing.md", "there.md#no-such-heading"]
