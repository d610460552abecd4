"""Every link of the README, of every page in docs/ and of recipes/README.md resolves: a relative link names a file or
folder that exists, and a `#anchor` names a heading of the page it points to (GitHub's slugs). docs/index.md lists
every page, and the README links every page directly, so each subject is one click from the front door."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted((ROOT / "docs").glob("*.md"))
FILES = [ROOT / "README.md", ROOT / "recipes" / "README.md", *PAGES]

# [text](target) and ![alt](target); the text may hold backticks or brackets one level deep
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(([^()\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^(```|~~~)")


def prose(text: str) -> str:
    """The text outside fenced code blocks and inline code, where a link is a link."""
    lines, inside = [], False
    for line in text.splitlines():
        if FENCE.match(line.lstrip()):
            inside = not inside
            continue
        lines.append("" if inside else re.sub(r"`[^`]*`", "``", line))
    return "\n".join(lines)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (hyphens and underscores kept), spaces to '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())  # a link in a heading counts by its text
    text = text.lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found, seen, inside = set(), {}, False
    for line in page.read_text().splitlines():
        if FENCE.match(line.lstrip()):
            inside = not inside
            continue
        match = None if inside else re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            base = slug(match.group(1))
            count = seen.get(base, 0)
            found.add(base if count == 0 else f"{base}-{count}")
            seen[base] = count + 1
    return found


def links(page: Path) -> list[str]:
    return LINK.findall(prose(page.read_text()))


def broken(page: Path) -> list[str]:
    problems = []
    for target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            problems.append(f"{target}: no such file or folder")
        elif anchor:
            if resolved.suffix != ".md":
                problems.append(f"{target}: an anchor into a file that is not a page")
            elif anchor not in anchors(resolved):
                problems.append(f"{target}: no heading with that anchor in {resolved.name}")
    return problems


@pytest.mark.parametrize("page", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_resolves(page):
    problems = broken(page)
    assert not problems, f"{page.relative_to(ROOT)}:\n" + "\n".join(problems)


def linked_pages(page: Path) -> set[Path]:
    found = set()
    for target in links(page):
        path = target.partition("#")[0]
        if path and not re.match(r"^[a-z][a-z0-9+.-]*:", path):
            found.add((page.parent / path).resolve())
    return found


def test_the_index_lists_every_page_and_the_readme_links_each_one():
    pages = {p.resolve() for p in PAGES} - {(ROOT / "docs" / "index.md").resolve()}
    names = lambda paths: sorted(str(p.relative_to(ROOT)) for p in paths)  # noqa: E731
    assert not pages - linked_pages(ROOT / "docs" / "index.md"), names(
        pages - linked_pages(ROOT / "docs" / "index.md")
    )
    from_readme = linked_pages(ROOT / "README.md")
    assert not (pages | {(ROOT / "docs" / "index.md").resolve()}) - from_readme, names(pages - from_readme)


def test_the_checker_finds_what_it_should(tmp_path):
    page = tmp_path / "page.md"
    (tmp_path / "other.md").write_text(
        "# The `trl-nca` command\n\n## Step time: `benchmarks/step_time.py`\n## Ties\n## Ties\n"
    )
    page.write_text(
        "# Title\n\n[ok](other.md#the-trl-nca-command) [ok](other.md#step-time-benchmarksstep_timepy) "
        "[ok](other.md#ties-1) [ok](#title) [web](https://example.com/x#y) ![img](other.md) [`code` text](other.md)\n"
        "[gone](missing.md) [bad anchor](other.md#nope) [self](#nothing)\n\n"
        "```bash\n[not a link](missing2.md)\n```\n`[inline](missing3.md)`\n"
    )
    assert len(links(page)) == 10
    assert broken(page) == [
        "missing.md: no such file or folder",
        "other.md#nope: no heading with that anchor in other.md",
        "#nothing: no heading with that anchor in page.md",
    ]
