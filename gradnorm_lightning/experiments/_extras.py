"""The ``[experiments]`` extra: its packages are imported on use, with the fix in the error.

The library (:mod:`gradnorm_lightning` outside :mod:`gradnorm_lightning.experiments`) needs
only torch, Lightning, torchmetrics and Hydra. The tooling's figure (matplotlib), the digits
experiment (scikit-learn) and the TensorBoard logger (tensorboard) come with
``pip install "gradnorm-lightning[experiments]"``; each is imported where it is used, so a
lean install imports none of them, and a missing one is named with that command.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

__all__ = ["INSTALL_HINT", "has_module", "require"]

#: The command that installs every package the tooling uses.
INSTALL_HINT = (
    'pip install "gradnorm-lightning[experiments]" '
    '(from a clone of the repository: pip install -e ".[experiments]")'
)


def has_module(name: str) -> bool:
    """Whether the top-level module ``name`` can be imported (without importing it).

    Args:
        name: A module name, e.g. ``"tensorboard"``.

    Returns:
        ``True`` if an import of ``name`` would find it.
    """
    return importlib.util.find_spec(name) is not None


def require(module: str, purpose: str, distribution: str | None = None) -> ModuleType:
    """Import ``module``, or raise an error that names the ``pip install`` that provides it.

    Args:
        module: The module to import, e.g. ``"matplotlib.pyplot"``.
        purpose: What needs it, completing "<purpose> needs ...", e.g. ``"The figure"``.
        distribution: The package to install, when its name differs from the module's top
            level (``"scikit-learn"`` for ``sklearn``).

    Returns:
        The imported module.

    Raises:
        ModuleNotFoundError: If ``module`` is not installed; the message names the package
            and :data:`INSTALL_HINT`.
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        top = module.split(".")[0]
        if err.name is not None and err.name.split(".")[0] != top:
            raise  # the module is there but one of its own dependencies is not
        package = distribution or top
        raise ModuleNotFoundError(
            f"{purpose} needs {package}, which is not installed. It comes with the tooling's "
            f"extra: {INSTALL_HINT}.",
            name=err.name,
        ) from err
