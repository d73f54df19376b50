"""A lean install (``pip install gradnorm-lightning``, no extra) runs the library, and says what is missing.

The test builds that install from the installed packages' own metadata: the distributions
``gradnorm-lightning`` requires without extras, and what they require in turn, linked into a
folder that a Python started without ``site`` (``-I -S``) takes as its only site-packages.
Every other package of the test environment (matplotlib, scikit-learn, TensorBoard, pytest,
...) is then absent, as after a real ``pip install`` without the extra.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
#: the extra's packages, by distribution and by top-level module
EXTRA_DISTRIBUTIONS = ("matplotlib", "scikit-learn", "tensorboard")
EXTRA_MODULES = ("matplotlib", "sklearn", "tensorboard", "tensorboardX")
HINT = 'pip install "gradnorm-lightning[experiments]"'


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def lean_distributions(root: str = "gradnorm-lightning") -> dict[str, metadata.Distribution]:
    """The installed distributions a plain ``pip install root`` brings in (no extras), by name."""
    found: dict[str, metadata.Distribution] = {}
    todo = [(root, frozenset[str]())]
    while todo:
        name, extras = todo.pop()
        key = _canonical(name)
        if key in found and not extras:
            continue
        dist = metadata.distribution(name)
        found[key] = dist
        for text in dist.requires or []:
            req = Requirement(text)
            envs = [{"extra": e} for e in extras] or [{"extra": ""}]
            if req.marker is None or any(req.marker.evaluate(env) for env in envs):
                todo.append((req.name, frozenset(req.extras)))
    return found


def make_lean_site(folder: Path) -> Path:
    """Link every top-level file of the lean distributions into ``folder``; return it."""
    folder.mkdir(parents=True, exist_ok=True)
    for dist in lean_distributions().values():
        for file in dist.files or []:
            top = file.parts[0]
            if top in ("..", "/") or (folder / top).exists():
                continue
            source = Path(str(dist.locate_file(top)))
            if source.exists():
                (folder / top).symlink_to(source)
    return folder


def run_lean(site: Path, code: str, timeout: float = 240) -> str:
    """Run ``code`` in a Python that sees only ``site``; return its stdout (fail on an error)."""
    prelude = f"import site, sys\nsite.addsitedir({str(site)!r})\n"
    result = subprocess.run(
        [sys.executable, "-I", "-S", "-c", prelude + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=site,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


@pytest.fixture(scope="module")
def lean_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_lean_site(tmp_path_factory.mktemp("lean") / "site-packages")


def test_the_extra_is_not_part_of_the_plain_install() -> None:
    lean = lean_distributions()
    assert {"torch", "lightning", "torchmetrics", "hydra-core"} <= set(lean)
    assert not set(map(_canonical, EXTRA_DISTRIBUTIONS)) & set(lean)
    # and the test environment does have them, so the lean site really leaves them out
    for name in EXTRA_DISTRIBUTIONS:
        assert metadata.distribution(name) is not None


def test_the_library_imports_and_trains_without_the_extra(lean_site: Path) -> None:
    out = run_lean(
        lean_site,
        f"""
        import importlib.util, json
        assert all(importlib.util.find_spec(m) is None for m in {EXTRA_MODULES!r}), "not lean"
        import gradnorm_lightning
        from gradnorm_lightning import GradNorm, GradNormCallback, GradNormMixin
        import lightning as L
        import torch
        from torch import nn

        class Net(GradNormMixin, L.LightningModule):
            task_names = ("a", "b")
            def __init__(self):
                super().__init__()
                self.trunk = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
                self.heads = nn.ModuleDict({{t: nn.Linear(8, 1) for t in self.task_names}})
            def shared_layer(self):
                return self.trunk[0]
            def training_step(self, batch, batch_idx):
                x, y = batch
                z = self.trunk(x)
                return self.combine_task_losses(
                    {{t: ((h(z).squeeze(1) - y[:, i]) ** 2).mean() for i, (t, h) in enumerate(self.heads.items())}})
            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.01)

        data = torch.utils.data.TensorDataset(torch.randn(32, 4), torch.randn(32, 2))
        trainer = L.Trainer(max_steps=2, callbacks=[GradNormCallback()], logger=False,
                            enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False)
        model = Net()
        trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=16))
        import sys
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in {EXTRA_MODULES!r})
        print(json.dumps({{"loaded": loaded, "sum": float(sum(model.task_weights.values()))}}))
        """,
    )
    result = json.loads(out.strip().splitlines()[-1])
    assert result["loaded"] == []
    assert result["sum"] == pytest.approx(2.0, rel=1e-5)


def test_the_tooling_names_the_install_that_fixes_it(lean_site: Path) -> None:
    configs = ROOT / "gradnorm_lightning" / "experiments" / "configs"
    out = run_lean(
        lean_site,
        f"""
        import json
        from hydra import compose, initialize_config_dir
        from gradnorm_lightning.experiments.plotting import plot_runs
        from gradnorm_lightning.experiments.tasks.digits import DigitsDataModule
        from gradnorm_lightning.experiments.train import check_extras

        messages = {{}}
        def record(name, call):
            try:
                call()
            except ModuleNotFoundError as err:
                messages[name] = str(err)

        record("plot", lambda: plot_runs(["nowhere"], "x.png"))
        record("digits", lambda: DigitsDataModule().setup("fit"))
        with initialize_config_dir(version_base="1.3", config_dir={str(configs)!r}):
            record("train", lambda: check_extras(compose("train")))
            record("tensorboard", lambda: check_extras(
                compose("train", overrides=["logger=tensorboard", "plot=false"])))
            check_extras(compose("train", overrides=["plot=false"]))  # csv logger, no figure: fine
        print(json.dumps(messages))
        """,
    )
    messages = json.loads(out.strip().splitlines()[-1])
    assert set(messages) == {"plot", "digits", "train", "tensorboard"}
    assert all(HINT in message for message in messages.values()), messages
    assert "needs matplotlib" in messages["plot"]
    assert "needs scikit-learn" in messages["digits"]
    assert "needs matplotlib" in messages["train"] and "plot=false" in messages["train"]
    assert "needs tensorboard" in messages["tensorboard"]
