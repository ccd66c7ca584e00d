"""The documentation ships with the repository and points only at what the repository holds.

Users get the repository: a link, a cited ``docs/`` page or a path named in the docs must exist
in it, and no file may send a reader to the project's private notes, which are not in it.
"""

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = sorted((REPO / "docs").glob("*.md"))
PAGES = [REPO / "README.md", *DOCS]
SOURCE_FOLDERS = ("benchmarks", "configs", "docker", "docs", "export", "indexer", "models")
SOURCE_FOLDERS += ("server", "tests", "training")
SOURCE_SUFFIXES = {".py", ".yaml", ".yml", ".md", ".sh", ".toml", ".js", ".html"}

MARKDOWN_LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
INLINE_CODE = re.compile(r"`([^`\n]+)`")
FENCED_BLOCK = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
CITED_FILE = re.compile(r"\b(?:docs/[\w.-]+\.md|configs/[\w/.-]+\.ya?ml)\b")
# The private notes lived in a folder named "shared" beside the repository (reference pages,
# papers, a design document); spelled in two parts so that this file does not match itself.
PRIVATE_NOTES = re.compile("shared" + r"/|(?<![\w/.-])design\.md")


def source_files() -> list[Path]:
    files = [REPO / "README.md", REPO / "Makefile", REPO / "docker-compose.yml"]
    for folder in SOURCE_FOLDERS:
        for path in (REPO / folder).rglob("*"):
            if path.is_file() and (path.suffix in SOURCE_SUFFIXES or "Dockerfile" in path.name):
                files.append(path)
    return files


def repository_paths(text: str) -> list[str]:
    """Inline code spans outside fenced blocks that name a file or folder of the repository."""
    prose = FENCED_BLOCK.sub("", text)
    spans = (span.split()[0].rstrip(",.:;") for span in INLINE_CODE.findall(prose) if span.strip())
    return [span for span in spans if span.split("/")[0] in SOURCE_FOLDERS and "/" in span]


def test_there_are_docs_to_check():
    names = {page.name for page in DOCS}
    assert {"evaluation.md", "datasets.md", "export.md", "model-zoo.md", "deploy.md"} <= names


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_relative_links_lead_to_files_of_the_repository(page: Path):
    for target in MARKDOWN_LINK.findall(page.read_text()):
        if "://" in target:
            continue
        assert (page.parent / target).exists(), f"{page.name} links to missing {target}"


@pytest.mark.parametrize("page", DOCS, ids=lambda page: page.name)
def test_repository_paths_named_in_the_docs_exist(page: Path):
    for path in repository_paths(page.read_text()):
        assert (REPO / path).exists(), f"{page.name} names {path}, which is not in the repository"


def test_cited_docs_pages_and_configs_exist():
    for path in source_files():
        for cited in CITED_FILE.findall(path.read_text(errors="replace")):
            assert (REPO / cited).is_file(), f"{path.relative_to(REPO)} cites missing {cited}"


def test_nothing_points_at_notes_outside_the_repository():
    offenders = [
        f"{path.relative_to(REPO)}:{number}: {line.strip()}"
        for path in source_files()
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1)
        if PRIVATE_NOTES.search(line)
    ]
    assert offenders == []
