"""A griffe extension for the API reference: Sphinx roles in the docstrings read as code.

The docstrings use Sphinx cross-reference roles (``:class:`~gradnorm_lightning.GradNorm```),
which MkDocs would show literally. This rewrites each role to its target in backticks, the
``~`` form to the last component (as Sphinx shows it), and ``double backticks`` to single ones.
"""

from __future__ import annotations

import re
from typing import Any

try:
    from griffe import Extension
except ModuleNotFoundError:  # the tests check `rewrite` without the docs extra installed
    Extension = object  # type: ignore[assignment,misc]

_ROLE = re.compile(r":(?:class|func|meth|mod|data|attr|obj|exc):`(~?)([^`]+)`")


def _code(match: re.Match[str]) -> str:
    short, target = match.group(1), match.group(2)
    return f"`{target.rsplit('.', 1)[-1] if short else target}`"


def rewrite(text: str) -> str:
    """Replace Sphinx roles and double backticks by Markdown code spans.

    Args:
        text: A docstring.

    Returns:
        The docstring with ``:role:`target``` as `target` and ````x```` as `x`.
    """
    return re.sub(r"``([^`]+)``", r"`\1`", _ROLE.sub(_code, text))


class SphinxRoles(Extension):
    """Rewrite every docstring griffe loads (see :func:`rewrite`)."""

    def on_instance(self, *, obj: Any, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rewrite(obj.docstring.value)
