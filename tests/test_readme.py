"""README.md is executable documentation: its Python blocks run, its commands match CI."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README, flags=re.S)


def test_readme_python_blocks_run_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The quickstarts run as written; later fragments use the names earlier blocks define."""
    blocks = _python_blocks()
    assert len(blocks) >= 3
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "readme"}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    assert len(namespace["views"]) == 3  # type: ignore[arg-type]


def test_ci_runs_the_readme_test_command() -> None:
    marker = README.index("<!-- test-command -->")
    command = README[marker:].split("```bash\n", 1)[1].split("\n", 1)[0]
    assert "pytest" in command
    ci = (ROOT / ".ci" / "run").read_text()
    assert "<!-- test-command -->" in ci
    assert os.access(ROOT / ".ci" / "run", os.X_OK)


def test_readme_has_exactly_two_setup_commands() -> None:
    bash_blocks = re.findall(r"```bash\n(.*?)```", README.split("## Quickstart")[0], flags=re.S)
    assert len(bash_blocks) == 2
    assert all(block.startswith("python3 -m venv .venv") for block in bash_blocks)
    assert "gradnorm-train" in bash_blocks[0]
    assert "pytest" in bash_blocks[1]
