"""Serving never unpickles, as a rule over its source: no pickle-capable loader is imported or called in
serve_app/, and every numpy load says `allow_pickle=False` out loud.

A bundle comes from the registry's artifact store; pickle from there is code from there. The loaders'
behaviour on a trapped object array is tested in test_bundle.py; this test keeps a new code path from
bringing a pickle-capable loader back (the TorchScript tower once did: `torch.jit.load`).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SERVE_APP = Path(__file__).resolve().parents[2] / "serve_app"
# Modules whose loaders unpickle (torch.load and torch.jit.load included: torch is not imported at all).
PICKLING_MODULES = {
    "pickle",
    "_pickle",
    "cPickle",
    "cloudpickle",
    "dill",
    "joblib",
    "shelve",
    "torch",
}
# Loader names that unpickle whatever their module, or do unless told not to.
ALWAYS_PICKLE = {"read_pickle", "unsafe_load", "full_load"}
NUMPY_LOADS = {"load", "read_array"}  # np.load, np.lib.format.read_array


def sources() -> list[Path]:
    return sorted(SERVE_APP.rglob("*.py"))


def dotted(node: ast.expr) -> str:
    """`np.lib.format.read_array` for the call's function, "" when it is not a plain name chain."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return ""


def is_false(node: ast.expr) -> bool:
    return isinstance(node, ast.Constant) and node.value is False


def violations(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    where = path.relative_to(SERVE_APP.parent) if path.is_relative_to(SERVE_APP) else path.name
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [
                f"{where}:{node.lineno}: import {alias.name}"
                for alias in node.names
                if alias.name.split(".")[0] in PICKLING_MODULES
            ]
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.split(".")[0] in PICKLING_MODULES:
                found.append(f"{where}:{node.lineno}: from {node.module} import ...")
        elif isinstance(node, ast.Call):
            name = dotted(node.func)
            last = name.rsplit(".", 1)[-1]
            keywords = {k.arg: k.value for k in node.keywords if k.arg}
            if "allow_pickle" in keywords and not is_false(keywords["allow_pickle"]):
                found.append(f"{where}:{node.lineno}: {name}(allow_pickle=<not False>)")
            elif last in ALWAYS_PICKLE:
                found.append(f"{where}:{node.lineno}: {name}()")
            elif last in NUMPY_LOADS and name.split(".")[0] in ("np", "numpy"):
                if "allow_pickle" not in keywords:
                    found.append(f"{where}:{node.lineno}: {name}() without allow_pickle=False")
            elif name in ("yaml.load", "yaml.load_all"):
                found.append(f"{where}:{node.lineno}: {name}() (use yaml.safe_load)")
    return found


def test_serve_app_has_sources_to_check() -> None:
    assert len(sources()) > 30  # the path is right: a wrong one would make the rule pass vacuously


def test_no_serving_module_imports_or_calls_a_pickle_capable_loader() -> None:
    found = [line for path in sources() for line in violations(path)]
    assert found == [], "\n".join(found)


@pytest.mark.parametrize(
    "code",
    [
        "import torch\ntorch.jit.load('user_tower.pt')",
        "from torch import jit",
        "import pickle",
        "import joblib.numpy_pickle",
        "import numpy as np\nnp.load('a.npy')",
        "import numpy as np\nnp.load('a.npy', allow_pickle=True)",
        "import numpy as np\nnp.lib.format.read_array(handle)",
        "import pandas as pd\npd.read_pickle('x')",
        "import yaml\nyaml.load(text, Loader=yaml.Loader)",
    ],
)
def test_the_rule_catches_each_way_back_to_pickle(code: str, tmp_path: Path) -> None:
    path = tmp_path / "probe.py"
    path.write_text(code + "\n")
    assert violations(path) != []


def test_the_rule_accepts_the_safe_forms(tmp_path: Path) -> None:
    path = tmp_path / "probe.py"
    path.write_text(
        "import numpy as np\nimport yaml\n"
        "np.load('a.npy', mmap_mode='r', allow_pickle=False)\n"
        "np.lib.format.read_array(member, allow_pickle=False)\n"
        "yaml.safe_load(text)\n"
    )
    assert violations(path) == []
