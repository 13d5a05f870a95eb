"""The method notes under docs/ are the project's own reference: code, presets, tests and the README cite them by
file and heading (``docs/methods/owl.md#outlier-ratio``). These tests keep every such citation pointing at a
heading that exists, keep the notes' own links working, and keep citations of the notes file that lived outside
the repository (``OLD_NOTES`` below, in ../shared/, cited by section number) from coming back."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"

# Where citations of the notes are looked for: folders (searched recursively) and single files.
CITING = ("ebft_engine", "lab", "bench", "assets", "tests", "scripts", "README.md", "app.py")
OLD_NOTES = "REFERENCE" + ".md"  # spelt in two parts so that this file does not cite it either
# Where OLD_NOTES must no longer be cited: the above, the notes themselves, and the project's set-up files.
NO_REFERENCE_MD = CITING + ("docs", "pyproject.toml", "requirements.txt", "requirements-dev.txt", ".ci")
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".txt", ".json", ".toml", ".sh", ".css", ".svg", ""}
SKIP_DIRS = {"__pycache__", ".pytest_cache", ".hypothesis", "node_modules"}

# Files still allowed to cite OLD_NOTES, each with the reason. Drop an entry once its file cites docs/.
REFERENCE_MD_ALLOWED: set[str] = set()  # every citation now resolves inside the repository

DOC_REF = re.compile(r"\bdocs/[\w./-]+?\.md(?:#[\w-]+)?")
MD_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$")
FENCE = re.compile(r"^ {0,3}(```|~~~)")


def _files(entries: tuple[str, ...]) -> list[Path]:
    out = []
    for entry in entries:
        path = ROOT / entry
        if path.is_file():
            out.append(path)
        elif path.is_dir():
            out += [p for p in sorted(path.rglob("*")) if p.is_file() and p.suffix in TEXT_SUFFIXES
                    and not SKIP_DIRS & set(p.relative_to(ROOT).parts)]
    return out


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: its rendered text lower-cased, every character other than a letter,
    digit, underscore, hyphen or space dropped, spaces turned into hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link shows its text
    text = text.replace("`", "").replace("*", "")
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    """Every heading anchor of a markdown text (a repeated heading gets -1, -2, ... as on GitHub); headings
    inside fenced code blocks do not count."""
    seen: dict[str, int] = {}
    out, fenced = set(), False
    for line in markdown.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        m = None if fenced else HEADING.match(line)
        if m:
            base = github_anchor(m.group(2))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def broken(target: Path, anchor: str | None) -> str | None:
    """Why a citation of ``target`` (and ``anchor``) does not resolve, or None when it does."""
    if not target.is_file():
        return "no such file"
    if anchor is not None and anchor not in anchors(target.read_text(encoding="utf-8")):
        return f"no heading with anchor #{anchor}"
    return None


def _doc_citations() -> list[tuple[str, str]]:
    cites = []
    for path in _files(CITING):
        text = path.read_text(encoding="utf-8", errors="replace")
        for lineno, line in enumerate(text.splitlines(), 1):
            cites += [(f"{path.relative_to(ROOT)}:{lineno}", m.group(0)) for m in DOC_REF.finditer(line)]
    return cites


def test_the_notes_exist_and_are_cited():
    assert (DOCS / "README.md").is_file()
    assert len(_doc_citations()) >= 25  # the code, presets, tests and README cite the notes throughout


def test_every_citation_of_the_notes_resolves():
    failures = []
    for where, ref in _doc_citations():
        path, _, anchor = ref.partition("#")
        why = broken(ROOT / path, anchor or None)
        if why:
            failures.append(f"{where}: {ref}: {why}")
    assert not failures, "citations of docs/ that do not resolve:\n" + "\n".join(failures)


def test_the_notes_own_links_resolve():
    failures = []
    for page in sorted(DOCS.rglob("*.md")):
        text = page.read_text(encoding="utf-8")
        for m in MD_LINK.finditer(text):
            link = m.group(1)
            if re.match(r"[a-z]+:", link):  # http:, https:, mailto:
                continue
            path, _, anchor = link.partition("#")
            target = (page.parent / path).resolve() if path else page
            why = broken(target, anchor or None)
            if why:
                failures.append(f"{page.relative_to(ROOT)}: ({link}): {why}")
    assert not failures, "links in docs/ that do not resolve:\n" + "\n".join(failures)


def test_nothing_cites_reference_md_any_more():
    offenders = []
    for path in _files(NO_REFERENCE_MD):
        rel = path.relative_to(ROOT).as_posix()
        if rel in REFERENCE_MD_ALLOWED:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        offenders += [f"{rel}:{n}" for n, line in enumerate(text.splitlines(), 1) if OLD_NOTES in line]
    assert not offenders, (f"cite the notes under docs/ (e.g. docs/methods/owl.md#outlier-ratio) instead of "
                           f"{OLD_NOTES}, a file outside the repository:\n" + "\n".join(offenders))


def test_the_allow_list_names_files_that_exist():
    for rel in REFERENCE_MD_ALLOWED:
        assert (ROOT / rel).is_file(), f"{rel} is allowed to cite {OLD_NOTES} but does not exist: drop it"


@pytest.mark.parametrize("heading,anchor", [
    ("Global propagation (EBFT-GP)", "global-propagation-ebft-gp"),
    ("N:M sparsity", "nm-sparsity"),
    ("The `sparsegpt-mask` variant", "the-sparsegpt-mask-variant"),
    ("Keep first and last blocks", "keep-first-and-last-blocks"),
    ("EBFT: block-wise reconstruction", "ebft-block-wise-reconstruction"),
    ("Links [in](x.md) headings", "links-in-headings"),
])
def test_github_anchor(heading, anchor):
    assert github_anchor(heading) == anchor


def test_a_broken_citation_is_caught():
    text = "# Title\n## Same\n```\n# not a heading\n```\n## Same\n"
    assert anchors(text) == {"title", "same", "same-1"}
    owl = DOCS / "methods" / "owl.md"
    assert broken(owl, "outlier-ratio") is None
    assert broken(owl, "no-such-heading") == "no heading with anchor #no-such-heading"
    assert broken(DOCS / "methods" / "no-such-note.md", None) == "no such file"
