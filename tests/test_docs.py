"""Every ```python block of README.md and docs/*.md is a test (issue 14, item 1).

The blocks of one page run top to bottom in one shared namespace (a page is a tutorial: later
blocks use the names of earlier ones), one pytest item per block, named ``page.md:LINE`` after the
line of its opening fence. Warnings are errors, as in the rest of the suite (pyproject's
filterwarnings apply inside each item). Each page runs with the working directory set to its own
temporary directory (blocks that write files do not litter the repo) and matplotlib on Agg.

A block is excluded only by an HTML comment on the line right before its fence::

    <!-- doc-test: skip (REASON) -->

and is reported as skipped with that reason. When a block fails, the later blocks of its page are
skipped with "an earlier block failed" (running them would only repeat the first error as a
NameError). Selecting one block (``-k``) runs the page's earlier blocks first, silently.
Environment variables a block sets are undone after it. Where a page states what a block's
output does elsewhere (docs/cli.md's command on its problems.py), a check in ``_AFTER`` runs it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")
# The tutorial's long trainings read this and run a reduced configuration here, as their pages say.
os.environ.setdefault("IMPLICITDIFF_TUTORIAL_QUICK", "1")

ROOT = Path(__file__).resolve().parents[1]
TUTORIAL = ROOT / "docs" / "tutorial"
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted(TUTORIAL.glob("*.md"))]

_FENCE = re.compile(r"^(?P<indent>[ \t]*)```python\s*$")
_SKIP = re.compile(r"^\s*<!--\s*doc-test:\s*skip\s*\((?P<reason>.+)\)\s*-->\s*$")


@dataclass(frozen=True)
class Block:
    page: str       # path relative to the repo root
    line: int       # 1-based line of the opening fence
    code: str
    skip: str | None  # the reason, when the source marks the block skipped


def extract(path: Path, rel: str | None = None) -> list[Block]:
    """The ```python blocks of one markdown page, in order, dedented to their fence."""
    lines = path.read_text(encoding="utf-8").splitlines()
    rel = rel or path.relative_to(ROOT).as_posix()
    blocks, i = [], 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, start = m.group("indent"), i
        body = []
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i])
            i += 1
        if i == len(lines):
            raise ValueError(f"{rel}:{start + 1}: unclosed ```python fence")
        code = "\n".join(ln[len(indent):] if ln.startswith(indent) else ln.lstrip() for ln in body)
        prev = _SKIP.match(lines[start - 1]) if start > 0 else None
        blocks.append(Block(rel, start + 1, textwrap.dedent(code) + "\n",
                            prev.group("reason").strip() if prev else None))
        i += 1
    return blocks


BLOCKS = [b for p in PAGES for b in extract(p)]


@dataclass
class _Page:
    namespace: dict[str, Any] = field(default_factory=dict)
    done: set[int] = field(default_factory=set)  # lines of blocks already run (or skipped)
    failed: int | None = None                     # line of the first failed block
    cwd: Path | None = None


_pages: dict[str, _Page] = {}


def _check_cli_problems(block: Block, state: _Page) -> None:
    """docs/cli.md: the block is a file `problems.py`; the command the page gives passes on it."""
    from implicitdiff.cli._main import main

    (Path.cwd() / "problems.py").write_text(block.code, encoding="utf-8")
    assert main(["check", "./problems.py:cubic", "--backends", "numpy", "--rtol", "1e-8"]) == 0


# Pages that must run in a fresh interpreter: docs/scale.md sets XLA_FLAGS (4 CPU devices)
# before JAX starts, which in this process has long started with one device. Each of their
# blocks runs, with the page's earlier blocks, in `python -W error`.
_FRESH_PROCESS = {"docs/scale.md"}


def _exec_fresh(block: Block, state: _Page) -> None:
    lines: list[str] = []
    for b in BLOCKS:  # padded, so that tracebacks give the markdown file's line numbers
        if b.page == block.page and b.line <= block.line and b.skip is None:
            lines += [""] * (b.line - len(lines)) + b.code.splitlines()
    code = "\n".join(lines) + "\n"
    script = state.cwd / f"{Path(block.page).stem}_{block.line}.py"
    script.write_text(code, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([sys.executable, "-W", "error", str(script)], cwd=state.cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{block.page}:{block.line} failed:\n{proc.stderr[-4000:]}"


# Checks of what a page states about a block that the block itself cannot show, run after it
# (in its working directory), keyed by the page and the block's first line.
_AFTER = {("docs/cli.md", "# problems.py"): _check_cli_problems}


def _one_torch_thread(page: str) -> int | None:
    """The tutorial's small PyTorch models run on one intra-op thread (what its figure scripts
    do): on a 2-core runner, two torch threads beside XLA's make them several times slower. The
    previous count is returned, to be restored after the block."""
    if not page.startswith("docs/tutorial/"):
        return None
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    return before


def _exec(block: Block, state: _Page) -> None:
    if block.line in state.done:
        return
    state.done.add(block.line)
    if block.skip is not None:
        return
    assert state.cwd is not None
    old, env = os.getcwd(), dict(os.environ)
    os.chdir(state.cwd)
    threads = _one_torch_thread(block.page)
    try:
        # Padded so that line numbers in tracebacks are those of the markdown file.
        code = compile("\n" * block.line + block.code, str(ROOT / block.page), "exec")
        if block.page in _FRESH_PROCESS:
            _exec_fresh(block, state)
        else:
            exec(code, state.namespace)
        after = _AFTER.get((block.page, block.code.splitlines()[0].strip()))
        if after is not None:
            after(block, state)
    except BaseException:
        if state.failed is None:
            state.failed = block.line
        raise
    finally:
        os.chdir(old)
        if threads is not None:
            import torch

            torch.set_num_threads(threads)
        if os.environ != env:  # e.g. docs/scale.md's XLA_FLAGS: not for the rest of the suite
            os.environ.clear()
            os.environ.update(env)
        if "matplotlib.pyplot" in __import__("sys").modules:
            import matplotlib.pyplot as plt

            plt.close("all")


@pytest.mark.parametrize("block", BLOCKS, ids=[f"{b.page}:{b.line}" for b in BLOCKS])
def test_block(block: Block, tmp_path_factory: pytest.TempPathFactory) -> None:
    state = _pages.get(block.page)
    if state is None:
        state = _pages[block.page] = _Page(
            namespace={"__name__": f"doc_{re.sub(r'[^0-9A-Za-z]', '_', block.page)}"},
            cwd=tmp_path_factory.mktemp(Path(block.page).stem))
    if block.skip is not None:
        state.done.add(block.line)
        pytest.skip(f"marked in the source: {block.skip}")
    # Blocks before this one that have not run (a -k selection): run them first.
    for earlier in BLOCKS:
        if earlier.page == block.page and earlier.line < block.line and state.failed is None:
            try:
                _exec(earlier, state)
            except Exception:
                pass
    if state.failed is not None and state.failed != block.line:
        pytest.skip(f"an earlier block failed ({block.page}:{state.failed})")
    _exec(block, state)


def test_blocks_found() -> None:
    """The collector sees every page's blocks (a fence it misread would silently drop tests)."""
    assert len(BLOCKS) >= 25
    for path in PAGES:
        text = path.read_text(encoding="utf-8")
        assert len([b for b in BLOCKS if b.page == path.relative_to(ROOT).as_posix()]) == len(
            re.findall(r"^[ \t]*```python[ \t]*$", text, flags=re.M))
        for m in re.finditer(r"doc-test:", text):
            line = text[: m.start()].count("\n") + 1
            lines = text.splitlines()
            assert _SKIP.match(lines[line - 1]) and _FENCE.match(lines[line]), (
                f"{path.name}:{line}: a doc-test comment must be "
                "`<!-- doc-test: skip (REASON) -->` on the line right before a ```python fence")


def test_extract_skip_comment_and_indent(tmp_path: Path) -> None:
    md = tmp_path / "page.md"
    md.write_text("text\n<!-- doc-test: skip (needs a GPU) -->\n```python\nimport cupy\n```\n\n"
                  "- item:\n\n    ```python\n    x = 1\n\n    y = x\n    ```\n", encoding="utf-8")
    a, b = extract(md, "page.md")
    assert (a.line, a.skip, a.code) == (3, "needs a GPU", "import cupy\n")
    assert (b.line, b.skip, b.code) == (9, None, "x = 1\n\ny = x\n")


CHAPTERS = sorted(p for p in TUTORIAL.glob("[0-9][0-9]-*.md"))


@pytest.mark.parametrize("page", CHAPTERS, ids=[p.name for p in CHAPTERS])
def test_tutorial_chapter_in_both_frameworks(page: Path) -> None:
    """Issue 14: each chapter shows its models in JAX and PyTorch tabs, and its figures are made
    by a script the docs build runs (docs/hooks.py), never committed by hand."""
    text = page.read_text(encoding="utf-8")
    jax_tabs = re.findall(r'^=== "JAX"\s*$', text, flags=re.M)
    torch_tabs = re.findall(r'^=== "PyTorch"\s*$', text, flags=re.M)
    assert jax_tabs and len(jax_tabs) == len(torch_tabs), (
        f"{page.name}: {len(jax_tabs)} JAX tabs, {len(torch_tabs)} PyTorch tabs")
    assert [b for b in BLOCKS if b.page == f"docs/tutorial/{page.name}"], f"{page.name}: no code"
    scripts = "\n".join(p.read_text(encoding="utf-8")  # those docs/hooks.py runs
                        for p in (TUTORIAL / "figures").glob("*.py") if not p.name.startswith("_"))
    for name in re.findall(r"\(img/([\w.-]+\.png)\)", text):
        assert name in scripts, (
            f"{page.name}: img/{name} is made by no docs/tutorial/figures script")
