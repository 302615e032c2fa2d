"""The README stays short and the documentation's links hold: relative links name files that exist,
anchors name headings of the page they point at, and the README links every page under docs/."""

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def _prose(text: str) -> str:
    """The text without fenced code blocks (whose '#' lines are comments, not headings)."""
    return FENCE.sub("", text)


def _links(path: Path) -> list[str]:
    return LINK.findall(INLINE_CODE.sub("", _prose(path.read_text())))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation except '-' and '_' dropped, spaces to '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    text = "".join(ch for ch in text if ch.isalnum() or ch in " -_")
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found: set[str] = set()
    seen: dict[str, int] = {}
    for match in re.finditer(r"^ {0,3}#{1,6}[ \t]+(.+?)[ \t#]*$", _prose(path.read_text()), re.M):
        base = slug(match.group(1))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")  # GitHub numbers repeated headings
    return found


def _relative(target: str) -> bool:
    return not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target)  # http:, https:, mailto:, ...


def test_slug_follows_github():
    assert slug("Online re-compaction (one long sequence)") == "online-re-compaction-one-long-sequence"
    assert slug("Gemma-3-270M next-token KL") == "gemma-3-270m-next-token-kl"
    assert slug("`POST /am/documents` and snake_case") == "post-amdocuments-and-snake_case"
    assert slug("Set up") == "set-up"


def test_link_scanner_skips_code_and_finds_links(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# T\n\n[a](x.md#y) and ![img](../p.png) `[not](code.md)`\n\n```bash\n[no](z.md)\n# not a heading\n```\n")
    assert _links(page) == ["x.md#y", "../p.png"]
    assert anchors(page) == {"t"}


def test_readme_is_short():
    size = len(README.read_bytes())
    assert size <= 15 * 1024, f"README.md is {size} bytes; move reference material to docs/"


def test_docs_exist():
    assert DOCS, "docs/ has no pages"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    broken = []
    for target in _links(page):
        if not _relative(target):
            continue
        path_part = unquote(target.split("#", 1)[0])
        if not path_part:
            continue  # an anchor on the same page, checked below
        if not (page.parent / path_part).exists():
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)} links to missing files: {broken}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_anchors_match_headings(page):
    broken = []
    for target in _links(page):
        if not _relative(target) or "#" not in target:
            continue
        path_part, anchor = target.split("#", 1)
        linked = (page.parent / unquote(path_part)).resolve() if path_part else page
        if linked.suffix != ".md" or not linked.is_file() or ROOT not in linked.parents:
            continue  # a missing file is reported by test_relative_links_resolve
        if unquote(anchor).lower() not in anchors(linked):
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)} has anchors that match no heading: {broken}"


def test_readme_links_every_docs_page():
    linked = {
        (ROOT / unquote(target.split("#", 1)[0])).resolve()
        for target in _links(README)
        if _relative(target) and target.split("#", 1)[0]
    }
    missing = [str(page.relative_to(ROOT)) for page in DOCS if page.resolve() not in linked]
    assert not missing, f"README.md does not link {missing}"
