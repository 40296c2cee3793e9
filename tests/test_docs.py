"""The README and docs/ as a user meets them: every relative link and repository path they name
exists, and every Python block runs as pasted."""
from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TOP = ("nsa", "docs", "tests", "benchmarks", "results")
FENCE = re.compile(r"```(\w*)\n(.*?)```", re.S)


def _slug(heading: str) -> str:
    """The anchor GitHub gives a heading."""
    s = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return s.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    return {_slug(m.group(1)) for m in re.finditer(r"^#+ (.*)$", page.read_text(), re.M)}


def _expand(path: str) -> list[str]:
    """a/{b,c}.json -> a/b.json, a/c.json."""
    parts = re.split(r"\{([^{}]*)\}", path)
    fixed, choices = parts[0::2], [p.split(",") for p in parts[1::2]]
    return ["".join(x for pair in itertools.zip_longest(fixed, combo, fillvalue="") for x in pair)
            for combo in itertools.product(*choices)]


def _links(page: Path):
    """(target, anchor) of every relative markdown link and image."""
    for m in re.finditer(r"\]\(([^)\s]+)\)", page.read_text()):
        target = m.group(1)
        if re.match(r"[a-z]+://", target) or target.startswith("mailto:"):
            continue
        path, _, anchor = target.partition("#")
        yield path, anchor


def _repo_paths(page: Path):
    """Repository paths the page names in code spans and blocks (nsa/..., docs/..., ...)."""
    pattern = re.compile(r"(?<![\w./-])((?:%s)/[\w./{},-]*[\w}/])" % "|".join(TOP))
    for m in pattern.finditer(page.read_text()):
        if "<" not in m.group(1):
            yield from _expand(m.group(1))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_links_and_paths_exist(page):
    missing = []
    for path, anchor in _links(page):
        target = (page.parent / path).resolve() if path else page
        if not target.exists():
            missing.append(f"link {path}")
        elif anchor and target.suffix == ".md" and anchor not in _anchors(target):
            missing.append(f"anchor {path}#{anchor}")
    missing += [f"path {p}" for p in _repo_paths(page) if not (ROOT / p).exists()]
    assert not missing, f"{page.name} names what does not exist: {missing}"


def test_path_finder_sees_what_it_must():
    """The checks above would pass on an empty list: show they find links and paths."""
    readme = ROOT / "README.md"
    assert ("docs/semantics.md", "") in set(_links(readme))
    assert "benchmarks/bench_train.py" in set(_repo_paths(readme))
    assert _expand("r/{a,b}.json") == ["r/a.json", "r/b.json"]
    assert _slug("## 3. Selection".lstrip("# ")) == "3-selection"


def _python_blocks():
    for page in PAGES:
        for i, m in enumerate(b for b in FENCE.finditer(page.read_text()) if b.group(1) == "python"):
            yield pytest.param(m.group(2), id=f"{page.name}-{i}")


@pytest.mark.parametrize("code", list(_python_blocks()))
def test_python_block_runs_as_pasted(code, monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)   # blocks that write files write them here
    torch.manual_seed(0)
    exec(compile(code, "<block>", "exec"), {"__name__": "__docs__"})
