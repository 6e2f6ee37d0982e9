"""docs/plugins.md documents every hook in robnet_svc/hookspecs.py (datasette's meta-test):
each hook has its own section that names its arguments, and the environment variables and
base classes a plugin author needs are there too."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from robnet_svc import hookspecs, plugins

DOCS = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"


def hook_specs() -> dict[str, inspect.Signature]:
    """Every function in hookspecs marked with ``@hookspec`` (pluggy sets ``<project>_spec``)."""
    return {name: inspect.signature(fn) for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
            if hasattr(fn, "robnet_svc_spec")}


def sections(text: str) -> dict[str, str]:
    """``### `name` `` headings -> the text up to the next heading."""
    parts = re.split(r"^#{2,3} ", text, flags=re.M)
    out = {}
    for part in parts[1:]:
        title, _, body = part.partition("\n")
        out[title.strip().strip("`")] = body
    return out


def test_hookspecs_are_found():
    assert set(hook_specs()) == {k.hook for k in plugins.kinds()}


@pytest.mark.parametrize("hook", sorted(hook_specs()))
def test_every_hook_has_a_documented_section_naming_its_arguments(hook):
    docs = sections(DOCS.read_text(encoding="utf-8"))
    assert hook in docs, f"docs/plugins.md has no section '### `{hook}`'"
    for arg in hook_specs()[hook].parameters:
        assert f"`{arg}" in docs[hook], f"the section of {hook} does not document its argument {arg!r}"


def test_docs_name_every_hook_only_once_as_a_section():
    titles = re.findall(r"^### `(robnet_\w+)`", DOCS.read_text(encoding="utf-8"), flags=re.M)
    assert sorted(titles) == sorted(hook_specs()), "a documented hook does not exist (renamed?) or is listed twice"


@pytest.mark.parametrize("needle", [
    plugins.GROUP, plugins.ENV_ALLOW, plugins.ENV_TRACE,
    "Perturbation", "AffineSet", "DenseAffineSet", "BoundMethod", "margin_lower(net, aset, labels)",
    "Dataset", "load(image_shape, reporter=SILENT) -> Splits", "Splits", "AffineRule", "ActivationRule",
    "OpCall", "Relaxation", "abs_linear", "transpose", "needs_dense", "check(perturbation, image_shape)",
    "supports_dense", "Bounder",
])
def test_docs_cover_the_contracts(needle):
    assert needle in DOCS.read_text(encoding="utf-8")
