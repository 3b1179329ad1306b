"""yoso.nn, yoso.nnx and yoso.integrations moved to yoso-models: the old names say where, importing nothing."""

from __future__ import annotations

import subprocess
import sys

import pytest

import yoso


@pytest.mark.parametrize(
    "name, new", [("nn", "yoso_models.nn"), ("nnx", "yoso_models.nnx"), ("integrations", "yoso_models.transformers")]
)
def test_moved_submodules_say_where_they_went(name, new):
    with pytest.raises(AttributeError, match=rf"yoso\.{name} moved to {new}\b.*pip install yoso-models"):
        getattr(yoso, name)
    assert not hasattr(yoso, name)


def test_moved_names_import_nothing():
    # A fresh interpreter: this one may have imported torch, flax or yoso_models for other tests.
    heavy = ("yoso_models", "torch", "jax", "flax", "transformers")
    code = (
        "import sys, yoso\n"
        "for name in ('nn', 'nnx', 'integrations'):\n"
        "    try:\n"
        "        getattr(yoso, name)\n"
        "    except AttributeError:\n"
        "        pass\n"
        "    else:\n"
        "        raise SystemExit(f'yoso.{name} did not raise')\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {heavy!r}))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_other_missing_names_are_plain_attribute_errors():
    with pytest.raises(AttributeError, match="module 'yoso' has no attribute 'bogus'"):
        yoso.bogus  # noqa: B018
