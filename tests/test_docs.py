"""The documentation: every design note the code points to is in the repository (references name
`docs/<file>.md#<section>`, and the file and the section exist), every link into the repository resolves, every
Python snippet of a page runs, and the study page's results are the committed report's."""

import re
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SCANNED = ("src", "scripts", "benchmarks", "study", "tools", "tests", "demo", "docs")  # model_cards/ links into src
TOP_LEVEL = ("README.md", "CONTRIBUTING.md")
# Links to this repository on GitHub (the README is also the PyPI page, where links must be absolute).
REPOSITORY_LINK = re.compile(
    r"https://(?:github\.com/hf-hypervq/hf-hypervq/(?:blob|tree)/main|raw\.githubusercontent\.com/hf-hypervq/hf-hypervq/main)"
    r"/([\w./-]+?)/?(?:#([\w-]+))?(?=[)\s\"'>]|$)"
)
SKIPPED_PARTS = {"__pycache__", ".pytest_cache", ".hypothesis"}
# Notes that were never part of the repository, and the folder they lived in; the names are built here so that this
# file does not mention them itself.
PRIVATE_NOTES = [name + ".md" for name in ("METHOD", "PERF-NOTES", "STYLE", "DESIGN", "HF-NOTES")] + [
    "shared" + "/docs"
]
# `docs/<name>.md` and an optional `#anchor`, anywhere in a file; in docs/ itself, relative Markdown links too.
DOCS_REFERENCE = re.compile(r"(?<![\w/.-])docs/(\w[\w.-]*\.md)(?:#([\w-]+))?")
RELATIVE_LINK = re.compile(r"\]\((\w[\w.-]*\.md)?(?:#([\w-]+))?\)")


def text_files():
    """(path relative to the root, text) of every readable text file in the scanned folders, the README and
    CONTRIBUTING.md."""
    paths = [ROOT / name for name in TOP_LEVEL]
    for folder in SCANNED:
        paths += sorted(p for p in (ROOT / folder).rglob("*") if p.is_file())
    for path in paths:
        relative = path.relative_to(ROOT)
        if SKIPPED_PARTS & set(relative.parts) or any(part.endswith(".egg-info") for part in relative.parts):
            continue
        try:
            yield relative.as_posix(), path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):  # images, example files
            continue


def slugify(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading: lowercase, punctuation removed, spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    """The anchors of every heading outside code blocks, with GitHub's `-1`, `-2` suffixes for repeated ones."""
    found, seen = set(), {}
    in_code = False
    for line in markdown.splitlines():
        if line.lstrip().startswith("```"):
            in_code = not in_code
            continue
        match = None if in_code else re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            slug = slugify(match.group(1))
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def test_slugify_follows_github():
    assert slugify("Gumbel temperature") == "gumbel-temperature"
    assert slugify("VQ-SA") == "vq-sa"
    assert slugify("Baselines, and: ablations (as implemented)!") == "baselines-and-ablations-as-implemented"
    assert slugify("The `project` margin") == "the-project-margin"
    assert anchors("# A\n## A\n```\n# not a heading\n```\n") == {"a", "a-1"}


def test_no_reference_to_notes_outside_the_repository():
    offenders = [f"{path}: {note}" for path, text in text_files() for note in PRIVATE_NOTES if note in text]
    assert not offenders, "references to notes that are not in the repository:\n" + "\n".join(offenders)


def references():
    """(where, file name, anchor or None) of every `docs/<name>.md` reference and of every link inside docs/."""
    for path, text in text_files():
        for match in DOCS_REFERENCE.finditer(text):
            yield path, match.group(1), match.group(2)
    for doc in sorted(DOCS.glob("*.md")):
        for match in RELATIVE_LINK.finditer(doc.read_text(encoding="utf-8")):
            if match.group(1) or match.group(2):
                yield f"docs/{doc.name}", match.group(1) or doc.name, match.group(2)


def test_docs_exist():
    assert sorted(p.name for p in DOCS.glob("*.md")), "docs/ holds no Markdown file"
    assert any(name for _, name, _ in references()), "nothing refers to docs/"


@pytest.mark.parametrize("where, name, anchor", sorted(set(references()), key=str))
def test_docs_reference_resolves(where, name, anchor):
    target = DOCS / name
    assert target.is_file(), f"{where} refers to docs/{name}, which does not exist"
    if anchor is not None:
        known = anchors(target.read_text(encoding="utf-8"))
        assert anchor in known, f"{where} refers to docs/{name}#{anchor}; its sections are {sorted(known)}"


def repository_links():
    """(where, path, anchor or None) of every absolute link into this repository."""
    for path, text in text_files():
        for match in REPOSITORY_LINK.finditer(text):
            yield path, match.group(1), match.group(2)


def test_the_readme_links_into_the_repository():
    assert any(where == "README.md" for where, _, _ in repository_links())


@pytest.mark.parametrize("where, target, anchor", sorted(set(repository_links()), key=str))
def test_repository_link_resolves(where, target, anchor):
    path = ROOT / target
    assert path.exists(), f"{where} links to {target}, which is not in the repository"
    if anchor is not None and path.suffix == ".md":
        known = anchors(path.read_text(encoding="utf-8"))
        assert anchor in known, f"{where} links to {target}#{anchor}; its sections are {sorted(known)}"


PAGES_WITH_CODE = sorted(p.name for p in DOCS.glob("*.md") if "```python\n" in p.read_text(encoding="utf-8"))


def test_the_pages_show_code():
    assert {"quantizers.md", "models.md", "metrics.md"} <= set(PAGES_WITH_CODE)


@pytest.mark.parametrize("page", PAGES_WITH_CODE)
def test_page_python_snippets_run_in_order(page, tmp_path, monkeypatch):
    """A page's snippets tell one story (a model saved in one is loaded in the next): run them in order, in one
    folder and one namespace, as a reader would paste them."""
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": f"__docs_{page}__"}
    blocks = re.findall(r"```python\n(.*?)```", (DOCS / page).read_text(encoding="utf-8"), flags=re.DOTALL)
    for index, block in enumerate(blocks):
        try:
            exec(compile(block, f"docs/{page} python block {index}", "exec"), namespace)
        except Exception as error:
            raise AssertionError(f"docs/{page} python block {index} failed:\n{block}") from error


def test_study_results_table_is_the_committed_report():
    """The study page's results are copied from results/REPORT.md, never typed: each row must stand in the report."""
    section = (DOCS / "study.md").read_text(encoding="utf-8").split("## Results")[1].split("\n## ")[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    report = (ROOT / "results" / "REPORT.md").read_text()
    assert len(rows) >= 10  # the header, five quantizers, three with the diversity term, the anchor
    assert all(row in report for row in rows)


API_ENTRY = re.compile(r"^::: ([\w.]+)\s*$", flags=re.MULTILINE)


def api_entries():
    """(page, dotted path) of every API-reference entry mkdocstrings renders."""
    for page in sorted(DOCS.glob("*.md")):
        for match in API_ENTRY.finditer(page.read_text(encoding="utf-8")):
            yield page.name, match.group(1)


def test_the_api_reference_has_entries():
    assert {page for page, _ in api_entries()} >= {"quantizers.md", "models.md"}


@pytest.mark.parametrize("page, path", sorted(api_entries()))
def test_api_reference_entry_exists(page, path):
    """What `mkdocs build --strict` would fail on, found without building the site: an object renamed or removed."""
    import importlib

    module_name, _, attribute = path.rpartition(".")
    while module_name:
        try:
            target = importlib.import_module(module_name)
            break
        except ModuleNotFoundError:
            module_name, _, parent = module_name.rpartition(".")
            attribute = f"{parent}.{attribute}"
    else:
        raise AssertionError(f"docs/{page}: `::: {path}` names no module")
    for name in attribute.split(".") if attribute else []:
        assert hasattr(target, name), f"docs/{page}: `::: {path}`: {target.__name__} has no {name}"
        target = getattr(target, name)
