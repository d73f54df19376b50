"""The documentation is executable: every code block of README.md, examples/README.md and docs/ runs here.

As torchjd's ``tests/doc`` does for its pages, so that the docs cannot drift from the code.

* ```` ```python ```` blocks run, in page order, in one namespace per page (a page's later
  blocks use what its earlier ones built), in a fresh working directory.
* ```` ```bash ```` blocks: each command line is handled by its program, and nothing else is
  accepted (an unknown program fails the test, so a new kind of command must be classified
  here first):

  - ``gradnorm-plot``: **run** (on the runs the block's earlier lines made);
  - ``gradnorm-train``: **composed** with the same overrides (config groups, keys and values
    are checked by Hydra), then **run** for 2 steps on the shrunk data of
    ``tests/conftest.py`` (``shrink``), writing where ``hydra.run.dir`` says. Only composed:
    ``trainer=ddp`` (several processes), ``ckpt_path=...`` (needs an earlier run's
    checkpoint) and ``--multirun`` sweeps (each combination is composed);
  - ``examples/hydra_project/train.py``: composed with the same overrides (its run is
    ``tests/test_examples.py``'s);
  - ``gradnorm-compare``, ``examples/*.py`` and ``benchmarks/*.py``: **only parsed** by the
    program's own argument parser (it stops right after parsing); the examples are run by
    ``tests/test_examples.py``, the benchmarks take minutes and their outputs are the
    committed ``benchmarks/*.md``;
  - ``pytest``: the test files it names exist (not run: it would run the suite again);
  - ``pip install`` and ``python3 -m venv``: not run; the extras they name exist in
    ``pyproject.toml``. README's two set-up commands are run by ``.ci/run`` (the test
    command) and, from a fresh clone, by hand before a release;
  - ``mkdocs build --strict``: run by ``.ci/run``, not here;
  - ``tensorboard``: not run (it serves until stopped).

* ```` ```text ````, ```` ```yaml ```` and other blocks are not code and are not run.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import shlex
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from tests.conftest import compose_train_config, shrink

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, ROOT / "examples" / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
#: the installed package's extras (its metadata is pyproject.toml's, as of the last install)
EXTRAS = set(metadata.metadata("gradnorm-lightning").get_all("Provides-Extra") or [])
FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```\s*$", re.S | re.M)


@dataclass(frozen=True)
class Block:
    """One fenced code block of a page."""

    page: Path
    line: int
    lang: str
    code: str

    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path, lang: str | None = None) -> list[Block]:
    """The fenced blocks of ``page`` (of language ``lang``), in order."""
    text = page.read_text()
    found = [
        Block(page, text.count("\n", 0, m.start()) + 1, m.group(1), m.group(2))
        for m in FENCE.finditer(text)
    ]
    return [b for b in found if lang is None or b.lang == lang]


def _ids(pages: list[Path]) -> list[str]:
    return [str(p.relative_to(ROOT)) for p in pages]


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, restore_globals: None) -> Iterator[None]:
    """Each page runs in its own folder, seeded, with the thread count and seed env restored."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GRADNORM_LOG_DIR", str(tmp_path / "logs"))
    torch.manual_seed(0)
    yield
    GlobalHydra.instance().clear()


# ---------------------------------------------------------------------------- python blocks
PYTHON_PAGES = [p for p in PAGES if blocks(p, "python")]


@pytest.mark.parametrize("page", PYTHON_PAGES, ids=_ids(PYTHON_PAGES))
def test_python_blocks_run(page: Path) -> None:
    namespace: dict[str, Any] = {"__name__": f"doc_{page.stem.replace('-', '_')}"}
    for block in blocks(page, "python"):
        try:
            exec(compile(block.code, block.where(), "exec"), namespace)
        except Exception as err:
            raise AssertionError(f"The block at {block.where()} failed: {err!r}") from err


def test_every_page_with_code_is_found() -> None:
    """The fence pattern sees every block (an indented or unclosed fence would be missed)."""
    for page in PAGES:
        text = page.read_text()
        assert text.count("```") == 2 * len(blocks(page)), page
        assert not re.search(r"^[ \t]+```", text, re.M), f"indented fence in {page}"


# ---------------------------------------------------------------------------- bash blocks
class _Parsed(Exception):
    """Raised by the patched ``parse_args``: the arguments were accepted."""


def _parse_only(main: Any, argv: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Call a program's ``main(argv)`` and stop right after its parser accepted ``argv``."""
    original = argparse.ArgumentParser.parse_args

    def parse(self: argparse.ArgumentParser, args: Any = None, namespace: Any = None) -> Any:
        original(self, args, namespace)
        raise _Parsed

    with monkeypatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_args", parse)
        with pytest.raises(_Parsed):
            main(argv)


def _load_script(path: Path) -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_doc_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (a dataclass of the script looks its module up there)
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(spec.name, None)
    return module


def commands(block: Block) -> list[list[str]]:
    """The block's commands as argument lists (continuations joined, comments and ``&&`` split)."""
    text = block.code.replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        words = shlex.split(line, comments=True)
        current: list[str] = []
        for word in [*words, "&&"]:
            if word == "&&":
                if current:
                    out.append(current)
                current = []
            else:
                current.append(word)
    return out


def _sweeps(overrides: list[str]) -> list[list[str]]:
    """Expand ``key=a,b`` multirun overrides into every combination."""
    options = []
    for item in overrides:
        key, _, value = item.partition("=")
        values = value.split(",") if "," in value and not value.startswith("[") else [value]
        options.append([f"{key}={v}" for v in values])
    return [list(c) for c in itertools.product(*options)]


def _gradnorm_train(args: list[str], cwd: Path) -> str:
    from gradnorm_lightning.experiments.train import train

    if "--multirun" in args or "-m" in args:
        overrides = [a for a in args if a not in ("--multirun", "-m")]
        for combination in _sweeps(overrides):
            compose_train_config(combination)
        return "composed (multirun)"
    cfg = compose_train_config(args)  # every override checked by Hydra
    if any(a.startswith(("trainer=ddp", "ckpt_path=")) for a in args):
        return "composed"
    if any(a.startswith("hydra.run.dir=") for a in args):
        run_dir = cwd / str(cfg.hydra.run.dir)
    else:
        run_dir = cwd / "doc_runs" / str(sum(1 for _ in cwd.glob("doc_runs/*")))
    cfg = shrink(cfg, run_dir, steps=2)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.seed = 0
    summary = train(cfg)
    assert 1 <= summary["total_steps"] <= 2  # debug=fdr (fast_dev_run) takes one
    return "run (2 steps)"


def _hydra_project(args: list[str]) -> str:
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "examples" / "hydra_project" / "conf")):
        compose(config_name="config", overrides=args)
    return "composed"


def _pip(args: list[str]) -> str:
    for word in args:
        for named in re.findall(r"\[([\w,-]+)\]", word):
            assert set(named.split(",")) <= EXTRAS, f"{word}: unknown extra"
    return "not run (installs)"


def run_command(args: list[str], cwd: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Handle one documented command (see the module docstring); return what was done."""
    program = args[0].removeprefix(".venv/bin/")
    rest = args[1:]
    if program in ("python", "python3") and rest[:2] == ["-m", "venv"]:
        return "not run (creates a venv)"
    if program in ("python", "python3") and rest[:2] == ["-m", "pytest"]:
        program, rest = "pytest", rest[2:]
    if program == "gradnorm-train":
        return _gradnorm_train(rest, cwd)
    if program == "gradnorm-plot":
        from gradnorm_lightning.experiments.plotting import main

        main(rest)
        return "run"
    if program == "gradnorm-compare":
        from gradnorm_lightning.experiments.compare import main as compare_main

        _parse_only(compare_main, rest, monkeypatch)
        return "parsed"
    if program in ("python", "python3"):
        script = ROOT / rest[0]
        assert script.is_file(), f"{rest[0]} does not exist"
        if script == ROOT / "examples" / "hydra_project" / "train.py":
            return _hydra_project(rest[1:])
        assert script.parent.name in ("examples", "benchmarks"), script
        with monkeypatch.context() as patch:
            patch.syspath_prepend(str(ROOT))
            _parse_only(_load_script(script).main, rest[1:], monkeypatch)
        return "parsed"
    if program == "pytest":
        for word in rest:
            if not word.startswith("-"):
                assert (ROOT / word.split("::")[0]).exists(), f"{word} does not exist"
        return "checked (paths)"
    if program == "pip":
        return _pip(rest)
    if program == "mkdocs":
        assert rest == ["build", "--strict"], rest
        return "not run (.ci/run builds the docs)"
    if program == "tensorboard":
        return "not run (a server)"
    raise AssertionError(f"Unclassified command {' '.join(args)!r}: add it to tests/test_docs.py")


BASH_PAGES = [p for p in PAGES if blocks(p, "bash")]


@pytest.mark.parametrize("page", BASH_PAGES, ids=_ids(BASH_PAGES))
def test_bash_blocks_are_valid(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    done = []
    for block in blocks(page, "bash"):
        for args in commands(block):
            try:
                done.append((" ".join(args), run_command(args, tmp_path, monkeypatch)))
            except Exception as err:
                raise AssertionError(f"{block.where()}: {' '.join(args)!r} failed: {err!r}") from err
    assert done


# ---------------------------------------------------------------------------- README and CI
README_TEXT = README.read_text()


def test_readme_is_a_front_page() -> None:
    assert len(README_TEXT.splitlines()) <= 150
    for link in re.findall(r"\]\((docs/[^)#]+)", README_TEXT):
        assert (ROOT / link).is_file(), link


def test_readme_has_exactly_two_setup_commands() -> None:
    """The main job and the tests, each doing all the set-up on a fresh machine."""
    setup = [b for b in blocks(README, "bash") if b.code.startswith("python3 -m venv .venv")]
    assert len(setup) == 2
    main_job, tests = (commands(b) for b in setup)
    assert main_job[0] == ["python3", "-m", "venv", ".venv"]
    assert main_job[1][-1] == "torch==2.13.0" and tests[1][-1] == "torch==2.13.0"  # torch first
    assert main_job[-1] == [".venv/bin/gradnorm-train"]
    assert main_job[-2][-1] == ".[experiments]"
    assert tests[-1][:3] == [".venv/bin/python", "-m", "pytest"]


def test_ci_runs_the_readme_test_command() -> None:
    marker = README_TEXT.index("<!-- test-command -->")
    command = README_TEXT[marker:].split("```bash\n", 1)[1].split("\n", 1)[0]
    assert "pytest" in command and '".[dev]"' in command
    requires = metadata.requires("gradnorm-lightning") or []
    assert 'gradnorm-lightning[experiments]; extra == "dev"' in requires  # the tests get the tooling
    ci = (ROOT / ".ci" / "run").read_text()
    assert "<!-- test-command -->" in ci
    assert "mkdocs build --strict" in ci
    assert os.access(ROOT / ".ci" / "run", os.X_OK)


def test_the_command_parser_splits_chains() -> None:
    block = Block(README, 1, "bash", "a b && c \\\n  d  # note\ne 'f g'\n")
    assert commands(block) == [["a", "b"], ["c", "d"], ["e", "f g"]]
    assert _sweeps(["a=1,2", "b=x"]) == [["a=1", "b=x"], ["a=2", "b=x"]]
    with pytest.raises(AssertionError, match="Unclassified"):
        run_command(["rm", "-rf", "x"], ROOT, pytest.MonkeyPatch())
    with pytest.raises(AssertionError, match="unknown extra"):
        _pip([".[nonexistent]"])


def test_the_reference_shows_sphinx_roles_as_code() -> None:
    """docs/griffe_sphinx_roles.py (mkdocs.yml's griffe extension) rewrites the docstrings' roles."""
    rewrite = _load_script(ROOT / "docs" / "griffe_sphinx_roles.py").rewrite
    assert rewrite("see :class:`~gradnorm_lightning.GradNorm` and ``x``") == "see `GradNorm` and `x`"
    assert rewrite(":func:`gradnorm_lightning.zero_nonfinite_grads_`") == "`gradnorm_lightning.zero_nonfinite_grads_`"
