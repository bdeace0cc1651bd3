"""The README and docs/ are part of the product: their commands copy-paste, their links resolve, their task and
method tables are the registries' (launch/catalogue.py), and the README stays short enough to read in five minutes."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import REPO

from launch import catalogue

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
BASH = re.compile(r"^```bash\n(.*?)^```", re.S | re.M)
LINK = re.compile(r"\]\(([^)#\s]+)(#[^)\s]*)?\)")
DOCS = (
    "usage",
    "tasks",
    "methods",
    "llms",
    "grids",
    "scaling",
    "plan",
    "performance",
    "reliability",
    "architecture",
    "contributing",
)


def bash_blocks(page: Path) -> list[str]:
    return BASH.findall(page.read_text(encoding="utf-8"))


def continuation_problems(block: str) -> list[str]:
    """Lines whose `\\` is not the last character: `cmd \\  # note` ends the command there when pasted."""
    return [line for line in block.splitlines() if re.search(r"\\\s+(#.*)?$", line)]


def test_the_readme_is_short_and_links_every_docs_page():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(text) < 15_000, len(text)
    for page in DOCS:
        assert (REPO / "docs" / f"{page}.md").is_file(), page
        assert f"(docs/{page}.md" in text, page


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name if p.parent == REPO else f"docs/{p.name}")
def test_every_bash_block_parses_and_continues_where_it_says(page):
    blocks = bash_blocks(page)
    for block in blocks:
        assert not continuation_problems(block), continuation_problems(block)
        if shutil.which("bash"):
            checked = subprocess.run(["bash", "-n"], input=block, text=True, capture_output=True)
            assert checked.returncode == 0, f"{checked.stderr}\n{block}"


def test_the_check_sees_a_comment_after_a_continuation():
    """The README bug this guards against: a `\\` then spaces and a comment."""
    pasted = "ftctl train --task sst2 \\   # the task\n    --method lora\n"
    assert continuation_problems(pasted) == ["ftctl train --task sst2 \\   # the task"]
    assert continuation_problems("ftctl train --task sst2 \\\n    --method lora\n") == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name if p.parent == REPO else f"docs/{p.name}")
def test_relative_links_resolve(page):
    text = page.read_text(encoding="utf-8")
    missing = [
        target
        for target, _ in LINK.findall(text)
        if not target.startswith(("http://", "https://", "mailto:")) and not (page.parent / target).exists()
    ]
    assert not missing, missing


def test_the_generated_tables_are_the_registries():
    """`make catalogue` rewrites them; a task or method added to a registry fails here until it does."""
    pages = [REPO / "README.md", REPO / "docs" / "tasks.md", REPO / "docs" / "methods.md"]
    sections = set()
    for page in pages:
        text = page.read_text(encoding="utf-8")
        sections |= {m.group(1) for m in catalogue.MARKER.finditer(text)}
        assert catalogue.update(text) == text, f"{page.name} is out of date: run `make catalogue`"
    assert sections == set(catalogue.BUILDERS)


def test_a_stale_table_is_seen():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    stale = text.replace("| lora |", "| lora_renamed |", 1)
    assert stale != text and catalogue.update(stale) == text


def test_the_catalogue_lists_every_registered_task_and_method():
    import methods
    import tasks

    tables = catalogue.markdown("presets") + catalogue.markdown("methods")
    for name in [*tasks.TASKS, *methods.METHODS]:
        assert f"| {name} |" in tables, name
