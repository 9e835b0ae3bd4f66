"""Every Python block of the README and of docs/ runs as written, their links stay inside the repository, and
the CLI reference is the one the parser renders."""

import re
from pathlib import Path

import pytest

from tuna_kernels.losses import LOSSES, REFERENCE_LOSSES
from tuna_train.cli_reference import render

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README] + sorted((ROOT / "docs").glob("*.md"))
BLOCKS = [(page, number, block) for page in PAGES for number, block in
          enumerate(re.findall(r"```python\n(.*?)```", page.read_text(encoding="utf-8"), flags=re.S), 1)]
README_LINES = 250


def test_the_readme_has_python_examples():
    assert sum(page == README for page, _, _ in BLOCKS) >= 2


def test_the_readme_is_short():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= README_LINES, f"README.md has {lines} lines (at most {README_LINES}: the rest goes in docs/)"


@pytest.mark.parametrize("page, number, block", BLOCKS, ids=[f"{p.relative_to(ROOT)}-{n}" for p, n, _ in BLOCKS])
def test_python_block_runs(page, number, block, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # blocks that write (runs/...) write here
    # a block that registers a loss (docs/losses.md) must not leave it to the other tests' choice lists
    losses, reference_losses = dict(LOSSES), set(REFERENCE_LOSSES)
    try:
        exec(compile(block, f"{page.relative_to(ROOT)} python block {number}", "exec"), {"__name__": "__docs__"})
    finally:
        LOSSES.clear(), LOSSES.update(losses)
        REFERENCE_LOSSES.clear(), REFERENCE_LOSSES.update(reference_losses)


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_links_stay_inside_the_repository(page):
    text = page.read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)]+)\)", text):
        assert not re.match(r"[a-z]+://", target), f"{page.name}: link out of the repository: {target}"
        assert (page.parent / target.split("#")[0]).exists(), f"{page.name}: link to a missing file: {target}"
    assert "../shared" not in text and "shared/" not in text


def test_every_docs_page_is_linked_from_the_readme():
    text = README.read_text(encoding="utf-8")
    missing = [p.name for p in PAGES[1:] if f"(docs/{p.name})" not in text]
    assert not missing, f"docs pages the README does not link: {missing}"


def test_the_cli_reference_is_in_sync_with_the_parser():
    assert (ROOT / "docs" / "cli.md").read_text(encoding="utf-8") == render(), \
        "docs/cli.md is stale: run `make docs`"
