"""Every relative link in README.md and docs/*.md points at a file that exists and, with `#anchor`, at a heading
of that file (GitHub's anchor rules). Offline, no imports from dlm."""

import re
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
INLINE_CODE = re.compile(r"`[^`]*`")


def prose_lines(text):
    """(line number, line) for the lines outside fenced code blocks."""
    inside = False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            inside = not inside
        elif not inside:
            yield number, line


def github_anchor(heading):
    """GitHub's anchor for a heading: markup dropped, lowercase, punctuation dropped, spaces -> '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text stays
    text = re.sub(r"<[^>]+>", "", text).lower()
    kept = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LNM")
    return kept.replace(" ", "-")


def anchors(path):
    """Every anchor a page defines, duplicates numbered as GitHub does (`name`, `name-1`, ...)."""
    seen, found = {}, set()
    for _, line in prose_lines(path.read_text(encoding="utf-8")):
        match = HEADING.match(line)
        if match:
            slug = github_anchor(match.group(2))
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            found.add(slug if count == 0 else f"{slug}-{count}")
        found.update(re.findall(r"<a\s+(?:id|name)=\"([^\"]+)\"", line))
    return found


def links(path):
    for number, line in prose_lines(path.read_text(encoding="utf-8")):
        for target in LINK.findall(INLINE_CODE.sub("", line)):
            if not re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: are not checked
                yield number, target


def test_github_anchor_rules():
    assert github_anchor("Layout: network / process / sampler") == "layout-network--process--sampler"
    assert github_anchor("`dlm eval MODEL [MODEL...] [options]`") == "dlm-eval-model-model-options"
    assert github_anchor("On a CPU without bf16 instructions (2026-12-01)") == (
        "on-a-cpu-without-bf16-instructions-2026-12-01")
    assert github_anchor("Speed: `python bench/block_cache.py`") == "speed-python-benchblock_cachepy"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve(page):
    broken = []
    for line, target in links(page):
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        if not dest.exists():
            broken.append(f"line {line}: {target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"line {line}: {target} (no heading with anchor #{anchor} in {dest.name})")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def table_row(spec) -> str:
    """The row docs/samplers.md's table needs for a registered sampler (the third column, `for`, is the author's)."""
    aliases = f" ({', '.join(f'`{a}`' for a in spec.aliases)})" if spec.aliases else ""
    return f"| `{spec.name}`{aliases} | {spec.description} | (which processes) |"


def test_the_sampler_table_lists_every_registered_sampler():
    """docs/samplers.md's table names each sampler dlm registers (with its aliases) once, and nothing else; a
    sampler missing from it is reported with the exact row to add. (A plugin's samplers are documented by it.)"""
    from dlm.sampler import SAMPLERS

    text = (ROOT / "docs" / "samplers.md").read_text()
    table = text[text.index("| `--sampler` |"):].split("\n\n")[0]
    named = set()
    for row in table.splitlines()[2:]:
        named |= set(re.findall(r"`([a-z_0-9]+)`", row.split("|")[1]))
    own = [spec for spec in SAMPLERS.values() if getattr(spec.build, "__module__", "").startswith("dlm.")]
    missing = [spec for spec in own if not {spec.name, *spec.aliases} <= named]
    assert not missing, ("docs/samplers.md's sampler table (section Samplers) lacks registered samplers; add:\n" +
                         "\n".join(table_row(spec) for spec in missing))
    extra = named - {n for spec in own for n in (spec.name, *spec.aliases)}
    assert not extra, f"docs/samplers.md's sampler table names {sorted(extra)}, which no dlm sampler registers: remove them"


def test_a_missing_table_row_is_spelled_out():
    from dlm.sampler.registry import SamplerSpec

    spec = SamplerSpec("greedy", object, object, ("g",), "commit the most confident position per step")
    assert table_row(spec) == "| `greedy` (`g`) | commit the most confident position per step | (which processes) |"
