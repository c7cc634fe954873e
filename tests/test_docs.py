"""The README is a front page and docs/ holds the rest: every relative link and #anchor in README.md
and docs/*.md resolves, the README stays under 300 lines and keeps the quick start that CI runs,
links every docs page, and every `uta` command registered in the app has a docs page with a heading
naming it. No torch: reading the commands imports only the Typer app."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]

QUICK_START = (
    "pip install -e . && uta pretrain",
    'pip install -e ".[test]" && pytest -n auto --dist loadfile',
)
MAX_README_LINES = 300

FENCE = re.compile(r"^ {0,3}(```|~~~).*?^ {0,3}\1[^\n]*$", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$", re.M)


def prose(text: str) -> str:
    """The text without fenced code blocks or inline code: links there are not links."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def headings(text: str) -> list[str]:
    return [m.group(2) for m in HEADING.finditer(FENCE.sub("", text))]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: link text kept, formatting and punctuation dropped,
    lower case, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for h in headings(path.read_text(encoding="utf-8")):
        base = slug(h)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def broken_links(path: Path) -> list[str]:
    """Each relative link of a page that names a missing file or a missing heading."""
    bad = []
    for target in LINK.findall(prose(path.read_text(encoding="utf-8"))):
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith("//"):
            continue  # http:, https:, mailto: ... are not this repository's files
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            bad.append(f"{target}: no file {file_part} beside {path.name}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target}: no heading with anchor #{anchor} in {dest.name}")
    return bad


def registered_commands() -> list[str]:
    """The `uta` commands as the Typer app registers them (groups included), so a new command
    counts without touching this test."""
    import typer.main

    from uta_cli.app import app

    return sorted(typer.main.get_command(app).commands)


def undocumented(commands: list[str], pages: list[Path]) -> list[str]:
    """Commands that no docs page names in a heading as `uta COMMAND`."""
    heads = [h for p in pages for h in headings(p.read_text(encoding="utf-8"))]
    return [c for c in commands
            if not any(re.search(rf"\buta {re.escape(c)}(?![\w-])", h) for h in heads)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    assert broken_links(page) == []


def test_link_check_can_fail(tmp_path):
    """The checker sees a missing file, a missing anchor, and ignores code and web links."""
    (tmp_path / "b.md").write_text("# Some `code` title: yes\n\ntext\n")
    page = tmp_path / "a.md"
    page.write_text("[ok](b.md#some-code-title-yes) [web](https://x.org/missing.md)\n"
                    "`[c](none.md)`\n```\n[fenced](none.md)\n```\n"
                    "[gone](none.md) ![img](b.md#nope)\n")
    assert [b.split(":")[0] for b in broken_links(page)] == ["none.md", "b.md#nope"]


def test_readme_is_a_front_page():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines; move detail to docs/"


def test_readme_quick_start_holds_the_two_commands():
    text = README.read_text(encoding="utf-8")
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = FENCE.search(section)
    assert block, "the quick start has no code block"
    commands = [line.split("#", 1)[0].strip() for line in block.group(0).splitlines()[1:-1]]
    assert commands == list(QUICK_START)
    # CI runs the README's test command, exactly (.ci/run)
    assert QUICK_START[1] in (ROOT / ".ci" / "run").read_text(encoding="utf-8")


def test_readme_links_every_docs_page():
    linked = {(README.parent / t.partition("#")[0]).resolve()
              for t in LINK.findall(prose(README.read_text(encoding="utf-8")))}
    assert [p.name for p in DOCS if p.resolve() not in linked] == []


@pytest.mark.parametrize("page", DOCS, ids=lambda p: p.name)
def test_docs_page_opens_with_what_it_covers(page):
    """A title, then a paragraph of prose (not code, a table, a list or another heading)."""
    lines = [line for line in page.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert lines[0].startswith("# "), f"{page.name} does not open with a title"
    assert not re.match(r"\s*(#|```|~~~|\||!\[|[-*+] |\d+\. |<)", lines[1]), \
        f"{page.name}: say what the page covers right under the title"


def test_every_command_has_a_docs_page():
    commands = registered_commands()
    assert {"pretrain", "zeroshot", "export"} <= set(commands)  # the app was read
    assert undocumented(commands, DOCS) == []


def test_command_check_can_fail():
    assert undocumented(["pretrain", "no-such-command", "inspect"], DOCS) == \
        ["no-such-command", "inspect"]  # `uta inspect-mask` does not document `uta inspect`
