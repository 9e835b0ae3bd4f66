"""Every Python block of the README runs as written, and the README links to nothing outside the repository."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_the_readme_has_python_examples():
    assert len(BLOCKS) >= 4


@pytest.mark.parametrize("number", range(len(BLOCKS)))
def test_readme_python_block_runs(number, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # blocks that write (runs/...) write here
    exec(compile(BLOCKS[number], f"README.md python block {number + 1}", "exec"), {"__name__": "__readme__"})


def test_readme_links_stay_inside_the_repository():
    text = README.read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)]+)\)", text)
    for target in targets:
        assert not re.match(r"[a-z]+://", target), f"link out of the repository: {target}"
        assert (README.parent / target.split("#")[0]).exists(), f"link to a missing file: {target}"
    assert "../shared" not in text and "shared/" not in text
