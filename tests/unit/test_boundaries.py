"""The import boundaries between the rings (DESIGN.md §2, style.md habit 1).

Walks every ``.py`` file under ``fed_dfkd/``, ``server/`` and ``client/`` with ``ast`` (imports
inside functions and ``importlib.import_module("...")`` with a literal name included) and checks:

* ``flwr`` only in ``fed_dfkd/transport``, ``fed_dfkd/engine``, ``server/``, ``client/``;
* ``opacus`` only in ``fed_dfkd/privacy``;
* ``server/`` never imports ``client`` and ``client/`` never imports ``server``;
* ``fed_dfkd`` outside ``transport``/``engine`` never imports ``server`` or ``client``.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("fed_dfkd", "server", "client")
FLOWER_ALLOWED = ("fed_dfkd/transport", "fed_dfkd/engine", "server", "client")
OPACUS_ALLOWED = ("fed_dfkd/privacy",)
ADAPTERS = ("fed_dfkd/transport", "fed_dfkd/engine")


@dataclass(frozen=True)
class Import:
    file: str  # relative to the root, with forward slashes
    line: int
    module: str  # absolute dotted name

    @property
    def top(self) -> str:
        return self.module.split(".")[0]


def _module_name(relative: Path) -> list[str]:
    parts = list(relative.with_suffix("").parts)
    return parts[:-1] if parts[-1] == "__init__" else parts


def _resolve_relative(relative: Path, level: int, module: str | None) -> str:
    # `from . import x` in pkg/a/b.py means pkg.a; in pkg/a/__init__.py it means pkg.a too.
    package = list(relative.parent.parts)
    base = package[: len(package) - (level - 1)] if level > 1 else package
    return ".".join(base + ([module] if module else []))


def imports_in(path: Path, root: Path) -> list[Import]:
    relative = path.relative_to(root)
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    name = relative.as_posix()
    found: list[Import] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [Import(name, node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                module = _resolve_relative(relative, node.level, node.module)
            else:
                module = node.module or ""
            found.append(Import(name, node.lineno, module))
            # `from . import server` style: the names may be modules themselves.
            if node.level and not node.module:
                found += [Import(name, node.lineno, f"{module}.{alias.name}") for alias in node.names]
        elif isinstance(node, ast.Call):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if called in ("import_module", "__import__") and node.args:
                first = node.args[0]
                if isinstance(first, ast.Constant) and isinstance(first.value, str):
                    found.append(Import(name, node.lineno, first.value))
    return found


def walk_imports(root: Path) -> list[Import]:
    result: list[Import] = []
    for package in PACKAGES:
        folder = root / package
        if folder.is_dir():
            for path in sorted(folder.rglob("*.py")):
                result += imports_in(path, root)
    return result


def _under(file: str, prefixes: tuple[str, ...]) -> bool:
    return any(file == p or file.startswith(p + "/") for p in prefixes)


def violations(root: Path) -> list[str]:
    problems = []
    for imp in walk_imports(root):
        where = f"{imp.file}:{imp.line} imports {imp.module}"
        if imp.top == "flwr" and not _under(imp.file, FLOWER_ALLOWED):
            problems.append(f"{where}: flwr outside {', '.join(FLOWER_ALLOWED)}")
        if imp.top == "opacus" and not _under(imp.file, OPACUS_ALLOWED):
            problems.append(f"{where}: opacus outside {', '.join(OPACUS_ALLOWED)}")
        if _under(imp.file, ("server",)) and imp.top == "client":
            problems.append(f"{where}: server/ must not import client")
        if _under(imp.file, ("client",)) and imp.top == "server":
            problems.append(f"{where}: client/ must not import server")
        if (_under(imp.file, ("fed_dfkd",)) and not _under(imp.file, ADAPTERS)
                and imp.top in ("server", "client")):
            problems.append(f"{where}: the core must not import the apps")
    return problems


# --------------------------------------------------------------------------------------------
# The real tree
# --------------------------------------------------------------------------------------------


def test_the_walker_sees_the_real_tree():
    found = walk_imports(REPO)
    files = {imp.file for imp in found}
    # An empty or broken walk must not pass the boundary test below.
    assert any(imp.file == "fed_dfkd/config.py" and imp.module == "yaml" for imp in found)
    assert any(imp.file == "fed_dfkd/synthesis/base.py" and imp.module == "torch" for imp in found)
    assert len(files) >= 40
    # Lazy imports inside functions count too (config.py imports the registries lazily).
    assert any(imp.file == "fed_dfkd/config.py" and imp.module == "fed_dfkd.synthesis" for imp in found)


def test_the_import_boundaries_hold():
    problems = violations(REPO)
    assert problems == [], "\n".join(problems)


# --------------------------------------------------------------------------------------------
# The checker itself, on a planted tree
# --------------------------------------------------------------------------------------------


def _plant(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


@pytest.mark.parametrize(
    "name, text, rule",
    [
        ("fed_dfkd/distill.py", "import flwr\n", "flwr outside"),
        ("fed_dfkd/models/x.py", "def f():\n    from flwr.common import Context\n", "flwr outside"),
        ("fed_dfkd/aggregation.py", "import importlib\nimportlib.import_module('flwr.app')\n", "flwr outside"),
        ("fed_dfkd/transport/codec.py", "import opacus\n", "opacus outside"),
        ("server/app.py", "from opacus.accountants import RDPAccountant\n", "opacus outside"),
        ("server/app.py", "from client.app import handle\n", "server/ must not import client"),
        ("client/app.py", "import server.state\n", "client/ must not import server"),
        ("fed_dfkd/centralized.py", "from server import state\n", "the core must not import the apps"),
    ],
)
def test_the_checker_catches_each_kind_of_violation(tmp_path, name, text, rule):
    _plant(tmp_path, {"fed_dfkd/__init__.py": "", "server/__init__.py": "", "client/__init__.py": "",
                      name: text})
    problems = violations(tmp_path)
    assert len(problems) == 1 and rule in problems[0] and name in problems[0], problems


def test_the_checker_allows_what_the_design_allows(tmp_path):
    _plant(tmp_path, {
        "fed_dfkd/transport/records.py": "import flwr\nfrom flwr.app import ArrayRecord\n",
        "fed_dfkd/engine/simulation.py": "import flwr\nfrom server.app import app\nimport client\n",
        "fed_dfkd/privacy/accountants.py": "from opacus.accountants import RDPAccountant\n",
        "server/app.py": "import flwr\nfrom fed_dfkd import config\n",
        "client/app.py": "from flwr.clientapp import ClientApp\nfrom . import guard\n",
        "fed_dfkd/transportation.py": "import torch\n",  # a prefix is not a folder
    })
    assert violations(tmp_path) == []


def test_relative_imports_are_resolved(tmp_path):
    _plant(tmp_path, {"client/app.py": "from ..server import state\n",
                      "fed_dfkd/cli/run.py": "from .. import server\n"})
    found = {(imp.file, imp.module) for imp in walk_imports(tmp_path)}
    assert ("client/app.py", "server") in found
    assert ("fed_dfkd/cli/run.py", "fed_dfkd.server") in found
    assert any("client/ must not import server" in p for p in violations(tmp_path))
