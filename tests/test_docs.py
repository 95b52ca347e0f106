"""The documentation runs: every ```python block of README.md and docs/*.md, and its links resolve.

Each page's python blocks run in order in one fresh interpreter (later blocks may use names from
earlier ones, as a reader would), with a temporary folder as the working directory and the repository
root importable. A traceback points at the page and its line: each block is compiled under the page's
path with its own line numbers. Blocks that are not meant to run are fenced as ```bash or ```text.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# A fence opens at the start of a line with exactly ``` and an info string without backticks (its first
# word is the language), and closes with a bare ```; inline code such as ```` ```python ```` is no fence.
FENCE = re.compile(r"^```(?!`)([\w+-]*)[^\n`]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
INLINE_CODE = re.compile(r"(`+).*?\1", re.DOTALL)


def links(text: str) -> list[str]:
    """Targets of the markdown links of a page, outside code blocks and inline code."""
    return LINK.findall(INLINE_CODE.sub("", FENCE.sub("", text)))

RUNNER = r"""
import json, sys, traceback
page, blocks = json.load(open(sys.argv[1]))
namespace = {"__name__": "__main__"}
for number, (first_line, source) in enumerate(blocks, 1):
    try:
        # Padding with newlines makes tracebacks report the line of the page itself.
        exec(compile("\n" * (first_line - 1) + source, page, "exec"), namespace)
    except BaseException:
        print(f"DOCS-BLOCK-FAILED {page}: python block {number} (starting at line {first_line})",
              file=sys.stderr)
        traceback.print_exc()
        sys.exit(1)
print(f"DOCS-OK {len(blocks)} blocks")
"""


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(line number of the block's first code line, code) of each ```python block, in order."""
    blocks = []
    for m in FENCE.finditer(text):
        if m.group(1) == "python":
            blocks.append((text.count("\n", 0, m.start(2)) + 1, m.group(2)))
    return blocks


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


# Pages about an optional dependency: skipped (with the reason) where it is not installed.
NEEDS = {"transformers.md": "transformers"}


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_python_blocks_run(page: Path, tmp_path: Path):
    if page.name in NEEDS:
        pytest.importorskip(NEEDS[page.name], reason=f"{_rel(page)} needs {NEEDS[page.name]}")
    blocks = python_blocks(page.read_text())
    assert blocks, f"{_rel(page)} has no ```python example; every page needs at least one that runs"
    spec = tmp_path / "blocks.json"
    spec.write_text(json.dumps([_rel(page), blocks]))
    work = tmp_path / "cwd"
    work.mkdir()
    paths = [str(ROOT), os.environ.get("PYTHONPATH")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in paths if p))
    # The pages describe a plain user session: not the Triton interpreter the test suite turns on.
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", RUNNER, str(spec)], cwd=work, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and f"DOCS-OK {len(blocks)} blocks" in proc.stdout, (
        f"{_rel(page)}: a python block failed (exit {proc.returncode})\n"
        f"--- stderr (tail) ---\n{proc.stderr[-4000:]}\n--- stdout (tail) ---\n{proc.stdout[-2000:]}"
    )


def test_fence_parser_sees_only_python_blocks():
    text = ("a\n```python\nx = 1\n```\n```bash\nmake test\n```\n```text\nout\n```\n"
            "```` ```python ```` inline\n```python\ny = x\n```\n")
    assert python_blocks(text) == [(3, "x = 1\n"), (13, "y = x\n")]


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_relative_links_resolve(page: Path):
    broken = []
    for target in links(page.read_text()):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # web addresses and in-page anchors
        if not (page.parent / target.split("#")[0]).exists():
            broken.append(target)
    assert not broken, f"{_rel(page)} links to files that do not exist: {broken}"


def test_docs_index_lists_every_page():
    index = (ROOT / "docs" / "index.md").read_text()
    linked = {t.split("#")[0] for t in links(index)}
    pages = [p.name for p in PAGES if p.parent.name == "docs" and p.name != "index.md"]
    missing = [name for name in pages if name not in linked]
    assert not missing, f"docs/index.md does not link {missing}"


def test_readme_commands_are_what_ci_and_make_run():
    """The README's two commands exist as Makefile targets, and CI runs the README's test command."""
    readme = (ROOT / "README.md").read_text()
    shell = "\n".join(m.group(2) for m in FENCE.finditer(readme) if m.group(1) in ("bash", "sh"))
    commands = re.findall(r"^make (\w+)", shell, re.MULTILINE)
    assert commands[:2] == ["demo", "test"], \
        f"README's first commands are {commands[:2]}; expected make demo, then make test"
    makefile = (ROOT / "Makefile").read_text()
    for target in ("demo", "test"):
        assert re.search(rf"^{target}:", makefile, re.MULTILINE), f"Makefile has no '{target}' target"
    assert re.search(r"^make test\s*$", (ROOT / ".ci" / "run").read_text(), re.MULTILINE), \
        ".ci/run does not run `make test`, the README's test command"
