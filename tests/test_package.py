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


# The imports of the package's own modules that wait until a function runs, each for a stated reason.
DEFERRED_IMPORTS = {
    "__init__.py:__getattr__",            # the public names: `import fashionrec.config` stays free of torch
    "cli/__init__.py:build_parser",       # only the command asked for (`--help` imports none)
    "serving/recommender.py:_torch_side",  # building, adding items, eager models: PyTorch, only when needed
}


def test_the_package_defers_its_own_imports_only_where_it_says_why():
    found = set()
    for path in PACKAGE_DIR.rglob("*.py"):
        for function in (node for node in ast.walk(ast.parse(path.read_text()))
                         if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))):
            for node in ast.walk(function):
                if isinstance(node, ast.Call) and "import_module" in ast.unparse(node.func) and (
                        "__name__" in ast.unparse(node) or "__package__" in ast.unparse(node)):
                    found.add(f"{path.relative_to(PACKAGE_DIR).as_posix()}:{function.name}")
    assert found == set(DEFERRED_IMPORTS)


def test_the_reference_layout_names_every_module():
    """A newcomer finds every module of the package in docs/reference.md's layout table, in its layer."""
    reference = (PACKAGE_DIR.parents[1] / "docs" / "reference.md").read_text()
    rows = {line.split("|")[1].strip(" `/"): line for line in reference.splitlines() if line.startswith("| ")}
    missing = []
    for name in SUBMODULES:
        parts = name.split(".")[1:]
        if parts[-1] == "__main__" or (len(parts) == 1 and (PACKAGE_DIR / parts[0]).is_dir()):
            continue
        layer, module = parts if len(parts) == 2 else ("base", parts[0])
        if f"`{module}`" not in rows.get(layer, ""):
            missing.append(name)
    assert not missing, f"docs/reference.md's layout table does not name: {missing}"


REPO = PACKAGE_DIR.parents[1]
SCRIPTS = sorted([*(REPO / "app").glob("*.py"), *(REPO / "benchmarks").glob("*.py")])


def _contract_layers() -> list[set[str]]:
    import tomllib

    contracts = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    layers = next(contract for contract in contracts if contract["type"] == "layers")["layers"]
    return [{name.strip().removeprefix("fashionrec.") for name in layer.split("|")} for layer in layers]


def _docstring_layers() -> list[set[str]]:
    text = fashionrec.__doc__
    block = text[text.index("\n\n", text.index("is two towers")):].split("\n\n")[1]
    layers = []
    for line in block.splitlines():
        names = line.strip().split("  ")[0] if line.startswith("    ") and line[4] != " " else ""
        if names:
            layers.append({name.strip() for name in names.replace(",", "|").split("|")})
    return layers


def _table_layers(page: str, header: str) -> list[set[str]]:
    text = (REPO / page).read_text()
    table = text[text.index(header):].split("\n\n")[0]
    layers = []
    for line in table.splitlines()[2:]:
        first, modules = line.split("|")[1].strip(), line.split("|")[2]
        if first == "base":
            layers.append({name for name in ast.literal_eval(repr(modules)).split("`")[1::2]
                           if (PACKAGE_DIR / f"{name}.py").exists()})
        else:
            layers.append({first.strip("`/")})
    return layers


def test_the_readme_the_docstring_and_the_contract_say_the_same_layers():
    contract = _contract_layers()
    assert _docstring_layers() == contract
    rank = {name: position for position, layer in enumerate(contract) for name in layer}
    for page, header in (("README.md", "| layer | what it is |"), ("docs/reference.md", "| layer | modules |")):
        flattened = [name for layer in _table_layers(page, header) for name in sorted(layer)]
        assert sorted(flattened) == sorted(rank), f"{page}'s table names other layers than the contract"
        positions = [rank[name] for name in flattened]
        assert positions == sorted(positions), f"{page}'s table orders the layers otherwise: {flattened}"


def test_the_base_layer_holds_every_top_level_module():
    top_level = {name.split(".")[1] for name in SUBMODULES if name.count(".") == 1
                 and not (PACKAGE_DIR / name.split(".")[1]).is_dir() and not name.endswith("__main__")}
    assert top_level == _contract_layers()[-1]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: f"{path.parent.name}/{path.name}")
def test_the_app_and_benchmarks_import_the_installed_package_by_public_names(script):
    tree = ast.parse(script.read_text())
    edits = [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Attribute) and node.attr == "path"
             and isinstance(node.value, ast.Name) and node.value.id == "sys"]
    assert not edits, f"{script.name} touches sys.path (lines {edits}): it must import the installed package"
    private = [f"{node.module}.{alias.name}" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
               and (node.module or "").startswith("fashionrec") for alias in node.names
               if alias.name.startswith("_")]
    private += [node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute) and node.attr.startswith("_")
                and not node.attr.startswith("__") and isinstance(node.value, ast.Name)
                and node.value.id in _fashionrec_names(tree)]
    assert not private, f"{script.name} uses private names of the package: {private}"


def _fashionrec_names(tree) -> set[str]:
    """Names bound to modules or objects of the package in a script."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fashionrec"):
            names.update(alias.asname or alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names
                         if alias.name.startswith("fashionrec"))
    return names


def test_no_module_imports_another_modules_private_name():
    found = []
    for path in [*PACKAGE_DIR.rglob("*.py"), *SCRIPTS]:
        for node in ast.walk(ast.parse(path.read_text())):
            internal = isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("fashionrec"))
            if internal:
                found += [f"{path.relative_to(REPO)}:{node.lineno} {alias.name}" for alias in node.names
                          if alias.name.startswith("_") and not alias.name.startswith("__")]
    assert not found
