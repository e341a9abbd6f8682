"""The documentation says what is there: README's shape, links that lead somewhere, names that exist.

README starts with the two commands a newcomer runs and fits on a screen; every
relative link in the Markdown files (README, CONTRIBUTING, CHANGELOG, docs/, ops/)
reaches a file, and its ``#anchor`` a heading there; every ``asyncflow.x.y`` a page
names can be imported; every setting has its row in the settings reference.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from pathlib import Path

import pytest

from asyncflow.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
TOP = ["README.md", "CONTRIBUTING.md", "CHANGELOG.md", "ops/README.md"]
PAGES = sorted([*(ROOT / name for name in TOP), *(ROOT / "docs").rglob("*.md")])
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
DOTTED = re.compile(r"(?<![\w/.-])asyncflow(?:\.[A-Za-z_]\w*)+(?![\w/-])")


def _ids(paths: list[Path]) -> list[str]:
    return [str(p.relative_to(ROOT)) for p in paths]


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+\s+(.*)$", page.read_text(encoding="utf-8"), flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_readme_starts_with_the_two_commands_and_fits_on_a_screen() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```bash\n(.*?)\n```", text, flags=re.DOTALL)
    assert blocks[0].endswith(".venv/bin/asyncflow demo")
    assert blocks[1].endswith(".venv/bin/python -m pytest")
    assert text.index(blocks[1]) < text.index("\n## ")  # before anything else
    assert len(text.splitlines()) <= 120


@pytest.mark.parametrize("page", PAGES, ids=_ids(PAGES))
def test_every_relative_link_reaches_a_file_and_its_heading(page: Path) -> None:
    broken = []
    for target in LINK.findall(page.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists() or (anchor and linked.suffix == ".md" and anchor not in _anchors(linked)):
            broken.append(target)
    assert broken == []


CURRENT = [p for p in PAGES if p.name != "CHANGELOG.md"]  # the changelog names what was


@pytest.mark.parametrize("page", CURRENT, ids=_ids(CURRENT))
def test_every_asyncflow_name_a_page_gives_exists(page: Path) -> None:
    missing = []
    for name in set(DOTTED.findall(page.read_text(encoding="utf-8"))):
        parts = name.split(".")
        for depth in range(len(parts), 0, -1):
            try:
                found: object = importlib.import_module(".".join(parts[:depth]))
            except ImportError:
                continue
            for attribute in parts[depth:]:
                found = getattr(found, attribute, missing)
            break
        if found is missing:
            missing.append(name)
    assert missing == []


def test_every_setting_is_in_the_settings_reference() -> None:
    reference = (ROOT / "docs" / "reference" / "settings.md").read_text(encoding="utf-8")
    fields = [f.name for f in dataclasses.fields(Settings)]
    assert [name for name in fields if f"`{name}`" not in reference] == []


@pytest.mark.parametrize("page", CURRENT, ids=_ids(CURRENT))
def test_every_file_a_page_names_is_there(page: Path) -> None:
    named = re.findall(
        r"`((?:asyncflow|tests|benchmarks|scripts|ops)/[\w./-]+\.(?:py|md|json|yaml|alloy))`",
        page.read_text(encoding="utf-8"),
    )
    assert [path for path in named if not (ROOT / path).exists()] == []


def test_contributing_maps_every_module_of_the_package() -> None:
    """CONTRIBUTING's "Where things are" names each module under its folder, and no other."""
    text = (ROOT / "CONTRIBUTING.md").read_text(encoding="utf-8")
    block = text[text.index("```\nasyncflow/\n") :].split("```")[1]
    mapped: dict[str, set[str]] = {}
    for line in block.splitlines()[2:]:
        where, _, names = line.strip().partition(" ")
        folder = "" if where == "top" else where.rstrip("/")
        mapped[folder] = {name.strip() for name in names.rpartition(":")[2].split(",")}
    package = ROOT / "asyncflow"
    found: dict[str, set[str]] = {}
    for path in package.rglob("*.py"):
        folder = path.parent.relative_to(package).as_posix().replace(".", "")
        if not path.name.startswith("_"):
            found.setdefault(folder, set()).add(path.stem)
    assert mapped == found
