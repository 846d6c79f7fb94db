"""The package's shape: public names, one-way imports, no cycles."""
from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

import fashionrec

PACKAGE_DIR = Path(fashionrec.__file__).parent
SUBMODULES = sorted(info.name for info in pkgutil.walk_packages([str(PACKAGE_DIR)], "fashionrec."))


def test_no_public_name_is_also_a_submodule():
    top_level = {name.split(".")[1] for name in SUBMODULES}
    assert not set(fashionrec.__all__) & top_level


@pytest.mark.parametrize("preamble", ["", "import fashionrec.features.embed, fashionrec.experiment.evaluate",
                                      "import importlib, pkgutil, fashionrec\n"
                                      "for m in pkgutil.walk_packages(fashionrec.__path__, 'fashionrec.'):\n"
                                      "    if not m.name.endswith('__main__'): importlib.import_module(m.name)"])
def test_public_names_are_the_functions_they_say_however_submodules_were_imported(preamble):
    script = (f"{preamble}\nimport inspect, fashionrec\nfrom fashionrec import embed, prepare, evaluate_backbone\n"
              "assert all(inspect.isfunction(f) for f in (embed, prepare, evaluate_backbone)), (embed, prepare)\n"
              "for name in fashionrec.__all__:\n"
              "    value = getattr(fashionrec, name)\n"
              "    assert callable(value) and not inspect.ismodule(value), name\n")
    _runs_cleanly(script)


def test_the_command_line_imports_only_the_command_asked_for():
    """``--help`` and ``data`` answer without torch or faiss; every listed command still has its parser."""
    script = ("import sys\nfrom fashionrec.cli import build_parser, main\n"
              "from fashionrec.cli.commands import SUMMARIES\n"
              "for argv in (['--help'], ['data', '--help'], ['no-such-command']):\n"
              "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
              "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'faiss', 'onnxruntime'))\n"
              "assert not heavy, heavy[:5]\n"
              "parsers = build_parser()._subparsers._group_actions[0].choices\n"
              "assert list(parsers) == list(SUMMARIES) and all(parsers[name].get_default('handler') for name in parsers)\n")
    _runs_cleanly(script)


def _runs_cleanly(script: str) -> None:
    """Runs ``script`` in a fresh interpreter (nothing this test process imported) and expects exit 0."""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_the_package_has_no_import_cycles():
    graph = grimp.build_graph("fashionrec")
    cycles = []
    for module in SUBMODULES:
        for imported in graph.find_modules_directly_imported_by(module):
            if imported.startswith("fashionrec.") and graph.chain_exists(importer=imported, imported=module):
                cycles.append(f"{module} <-> {imported}")
    assert not cycles


def test_no_function_imports_from_the_package():
    """An import of the package inside a function is a sign of code on the wrong layer."""
    found = []
    for path in PACKAGE_DIR.rglob("*.py"):
        for function in (node for node in ast.walk(ast.parse(path.read_text()))
                         if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))):
            for node in ast.walk(function):
                internal = (isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith(
                    "fashionrec"))) or (isinstance(node, ast.Import) and any(
                        alias.name.startswith("fashionrec") for alias in node.names))
                if internal:
                    found.append(f"{path.relative_to(PACKAGE_DIR)}:{node.lineno} in {function.name}()")
    assert not found


def test_the_readme_layout_names_every_module():
    """A newcomer finds every module of the package in the README's layout table, in its layer."""
    readme = (PACKAGE_DIR.parents[1] / "README.md").read_text()
    rows = {line.split("|")[1].strip(" `/"): line for line in readme.splitlines() if line.startswith("| ")}
    missing = []
    for name in SUBMODULES:
        parts = name.split(".")[1:]
        if parts[-1] == "__main__" or (len(parts) == 1 and (PACKAGE_DIR / parts[0]).is_dir()):
            continue
        layer, module = parts if len(parts) == 2 else ("base", parts[0])
        if f"`{module}`" not in rows.get(layer, ""):
            missing.append(name)
    assert not missing, f"README.md's layout table does not name: {missing}"
