"""The parameter-file schema: documented, complete, the CLI's defaults, and strict about what it accepts."""
from __future__ import annotations

import ast

import nbformat
import pytest

from fashionrec import config
from fashionrec.cli import build_parser
from fashionrec.errors import FashionRecError
from fashionrec.pipeline.notebooks import read_params
from fashionrec.pipeline.params import (BY_NAME, PARAMETERS, PIPELINE, RUNNER_PARAMETERS, resolve_params,
                                        schema_markdown)

from conftest import REPO

NOTEBOOKS = sorted((REPO / "notebooks").glob("[0-9][0-9]-*.ipynb"))


def _parameter_cell(notebook) -> dict:
    cell = next(cell for cell in nbformat.read(notebook, as_version=4).cells
                if "parameters" in cell.get("metadata", {}).get("tags", []))
    return {node.targets[0].id: ast.literal_eval(node.value) for node in ast.parse(cell.source).body}


def test_docs_parameters_md_is_the_schema():
    documented = (REPO / "docs" / "parameters.md").read_text()
    assert documented == schema_markdown(), "regenerate: python -m fashionrec params --markdown > docs/parameters.md"
    for parameter in PARAMETERS:
        assert f"| `{parameter.name}` |" in documented


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda path: path.stem)
def test_each_notebook_declares_schema_keys_with_the_schema_defaults_or_the_documented_demo_value(notebook):
    for name, value in _parameter_cell(notebook).items():
        assert name in BY_NAME or name in RUNNER_PARAMETERS, f"{notebook.name}: {name} is not in the schema"
        if name in RUNNER_PARAMETERS:
            continue
        parameter = BY_NAME[name]
        assert notebook.stem[:2] in parameter.notebooks, f"{name}: the schema does not list {notebook.stem}"
        expected = parameter.notebook_value if parameter.notebook_value is not None else parameter.default
        assert value == expected, f"{notebook.name}: {name} = {value!r}, the schema says {expected!r}"


def test_every_schema_key_is_declared_by_the_notebooks_the_schema_names():
    declared = {notebook.stem[:2]: set(_parameter_cell(notebook)) for notebook in NOTEBOOKS}
    for parameter in PARAMETERS:
        if parameter.notebooks == (PIPELINE,):
            assert not any(parameter.name in names for names in declared.values()), parameter.name
            continue
        for stem in parameter.notebooks:
            assert parameter.name in declared[stem], f"{parameter.name} is not declared by notebook {stem}"


# (parameter file key, CLI command, argparse dest)
SHARED_WITH_CLI = [
    ("data_dir", "evaluate", "data_dir"), ("max_per_class", "evaluate", "max_per_class"),
    ("split_seed", "evaluate", "split_seed"), ("category_map", "evaluate", "category_map"),
    ("k", "evaluate", "k"), ("metric", "evaluate", "metric"), ("batch_size", "embed", "batch_size"),
    ("num_workers", "embed", "workers"), ("threads", "embed", "threads"), ("runtime", "embed", "runtime"),
    ("finetune_time_budget_min", "evaluate", "time_budget"),
    ("finetune_trainable_blocks", "evaluate", "trainable_blocks"),
]


@pytest.mark.parametrize("key, command, dest", SHARED_WITH_CLI)
def test_parameter_defaults_are_the_command_line_defaults(key, command, dest):
    arguments = {"evaluate": ["evaluate", "--dataset", "x", "--backbone", "y"],
                 "embed": ["embed", "--dataset", "x", "--backbone", "y"]}[command]
    assert getattr(build_parser().parse_args(arguments), dest) == BY_NAME[key].default


def test_a_missing_key_takes_the_default_and_max_per_class_means_no_cap(tmp_path):
    resolved = resolve_params({"dataset": "clothing"}, tmp_path / "mine.yaml")
    assert resolved["max_per_class"] is None and resolved["k"] == 10
    assert resolved["run_name"] == "mine"
    assert set(resolved) == set(BY_NAME)
    assert resolve_params({"dataset": "clothing", "run_name": "x"}, tmp_path / "mine.yaml", "cli")["run_name"] == "cli"


@pytest.mark.parametrize("written, message", [
    ({"dataset": "clothing", "max_per_clas": 3},
     "unknown parameter 'max_per_clas' \\(did you mean 'max_per_class'\\?\\)"),
    ({}, "'dataset' is required"),
    ({"dataset": "clotihng"}, "dataset: 'clotihng' is not one of .* \\(did you mean 'clothing'\\?\\)"),
    ({"dataset": "clothing", "k": "10"}, "k must be an integer, got '10'"),
    ({"dataset": "clothing", "k": 0}, "k must be at least 1"),
    ({"dataset": "clothing", "finetune_level2": "yes"}, "finetune_level2 must be true or false"),
    ({"dataset": "clothing", "backbones": "colorhist"}, "backbones must be a list"),
    ({"dataset": "clothing", "finetune_losses": ["triplet"]}, "'triplet' is not one of proxy_anchor"),
    ({"dataset": "clothing", "split_seed": None}, "split_seed cannot be null"),
    ({"dataset": "folder", "data_dir": "no/such/shop"}, "data_dir: .*no/such/shop does not exist \\(relative paths "
                                                       "start at the repository root"),
])
def test_bad_parameter_files_are_one_clear_error_naming_file_and_key(tmp_path, written, message):
    with pytest.raises(FashionRecError, match=message) as raised:
        resolve_params(written, tmp_path / "mine.yaml")
    assert str(raised.value).startswith(str(tmp_path / "mine.yaml"))


def test_relative_paths_are_resolved_against_the_repository_root(tmp_path, monkeypatch):
    monkeypatch.setattr(config, "PROJECT_ROOT", tmp_path)
    (tmp_path / "shop").mkdir()
    (tmp_path / "params").mkdir()
    (tmp_path / "params" / "map.yaml").write_text("a: b\n")
    (tmp_path / "mine.py").write_text("")
    (tmp_path / "w.pt").write_bytes(b"")
    monkeypatch.chdir(tmp_path / "params")   # the working directory plays no part
    resolved = resolve_params({"dataset": "folder", "data_dir": "shop", "category_map": "params/map.yaml",
                               "backbone_modules": ["mine.py", "some.installed.module"],
                               "weights_files": {"resnet50": "w.pt"}}, tmp_path / "params" / "p.yaml")
    assert resolved["data_dir"] == str(tmp_path / "shop")
    assert resolved["category_map"] == str(tmp_path / "params" / "map.yaml")
    assert resolved["backbone_modules"] == [str(tmp_path / "mine.py"), "some.installed.module"]
    assert resolved["weights_files"] == {"resnet50": str(tmp_path / "w.pt")}


@pytest.mark.parametrize("params_file", sorted((REPO / "params").glob("*.yaml")), ids=lambda path: path.name)
def test_the_shipped_parameter_files_follow_the_schema(params_file):
    resolve_params(read_params(params_file), params_file)

