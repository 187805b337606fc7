"""The documentation's shape: every relative link resolves, and the README stays short."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 260  # the README is also the package's long description: the rest lives in docs/

# [text](target) with an optional "title"; images too. Code spans are removed first: `[x](y)` in code is not a link.
LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
CODE_BLOCK = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
CODE_SPAN = re.compile(r"`[^`\n]*`")
EXTERNAL = ("http://", "https://", "mailto:", "#")


def documents() -> list[Path]:
    found = [ROOT / "README.md", ROOT / "params" / "README.md", *sorted((ROOT / "docs").glob("*.md")),
             *sorted((ROOT / "outputs").glob("*/README.md"))]
    if (ROOT / "outputs" / "README.md").is_file():
        found.append(ROOT / "outputs" / "README.md")
    return [p for p in found if p.is_file()]


def relative_links(text: str) -> list[str]:
    text = CODE_SPAN.sub("", CODE_BLOCK.sub("", text))
    return [t for t in LINK.findall(text) if not t.startswith(EXTERNAL)]


def anchors(text: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#{1,6}\s+(.+?)\s*$", CODE_BLOCK.sub("", text), re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def test_relative_links_resolve() -> None:
    broken = []
    for doc in documents():
        text = doc.read_text(encoding="utf-8")
        for target in relative_links(text) + [t for t in LINK.findall(CODE_SPAN.sub("", CODE_BLOCK.sub("", text)))
                                              if t.startswith("#")]:
            path, _, anchor = target.partition("#")
            resolved = doc.parent / path if path else doc
            if not resolved.exists():
                broken.append(f"{doc.relative_to(ROOT)}: {target}")
            elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved.read_text(encoding="utf-8")):
                broken.append(f"{doc.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "broken relative links:\n" + "\n".join(broken)


def test_readme_is_short() -> None:
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail to docs/ (at most {README_MAX_LINES})"


@pytest.mark.parametrize("text, expected", [
    ("see [a](docs/a.md) and [b](https://x.org) and ![f](fig.png)", ["docs/a.md", "fig.png"]),
    ("`[not](a link)` then [yes](b.md#part)", ["b.md#part"]),
    ("```\n[in](code.md)\n```\n[out](c.md)", ["c.md"]),
    ("[anchor](#here)", []),
])
def test_link_extraction(text: str, expected: list[str]) -> None:
    assert relative_links(text) == expected


def test_anchors() -> None:
    assert anchors("# A student's evaluation\n## Scale-out: several, once (`x_y: z`)\n") == {
        "a-students-evaluation", "scale-out-several-once-x_y-z"}
