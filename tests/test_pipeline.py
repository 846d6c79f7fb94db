from __future__ import annotations

import json

import nbformat
import pytest

from fashionrec import config
from fashionrec.pipeline import notebooks as pipeline
from fashionrec.errors import FashionRecError


def _notebook(path, parameters: str, body: str):
    notebook = nbformat.v4.new_notebook()
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    cell = nbformat.v4.new_code_cell(parameters)
    cell.metadata["tags"] = ["parameters"]
    notebook.cells = [cell, nbformat.v4.new_code_cell(body)]
    nbformat.write(notebook, path)


@pytest.fixture
def notebook_dir(tmp_path, monkeypatch):
    directory = tmp_path / "notebooks"
    directory.mkdir()
    monkeypatch.setattr(pipeline, "NOTEBOOK_DIR", directory)
    return directory


def test_pipeline_passes_each_notebook_its_declared_parameters_defaults_included(notebook_dir, tmp_path, capfd):
    # The notebook's demo literals (max_per_class 40) must not reach a run whose file leaves the key out.
    _notebook(notebook_dir / "00-first.ipynb", "run_name = 'x'\nk = 1\nmax_per_class = 40",
              "import json, pathlib\npathlib.Path('seen.json').write_text(json.dumps("
              "{'run': run_name, 'k': k, 'max_per_class': max_per_class}))")
    params = tmp_path / "p.yaml"
    params.write_text("run_name: demo\ndataset: folder\nk: 7\npca_dims: [8]\n")
    assert pipeline.run_pipeline(params) == 0
    assert json.loads((notebook_dir / "seen.json").read_text()) == {"run": "demo", "k": 7, "max_per_class": None}
    assert (config.RESULTS_DIR / "demo" / "00-first.ipynb").exists()
    logged = capfd.readouterr().err   # the kernels' own stderr too
    assert "used by none of the notebooks run: ['dataset', 'pca_dims']" in logged
    assert "without encryption" not in logged   # kernels on Unix sockets: no TCP warning per notebook


def test_unknown_keys_and_notebooks_stop_the_run_before_any_notebook(notebook_dir, tmp_path):
    _notebook(notebook_dir / "00-first.ipynb", "run_name = 'x'", "raise RuntimeError('must not run')")
    params = tmp_path / "p.yaml"
    params.write_text("dataset: folder\nbackbone: colorhist\n")
    with pytest.raises(FashionRecError, match="unknown parameter 'backbone' \\(did you mean 'backbones'"):
        pipeline.run_pipeline(params)
    params.write_text("dataset: folder\nnotebooks: [00-frist]\n")
    with pytest.raises(FashionRecError, match="'00-frist' \\(did you mean '00-first'\\?\\) is not a pipeline notebook"):
        pipeline.run_pipeline(params)
    params.write_text("dataset: folder\nbackbones: [colorhsit]\nnotebooks: [00-first]\n")
    assert pipeline.run_pipeline(params) == 1   # 00 runs (and fails); the backbones are checked only for 01


def test_a_failing_notebook_stops_the_run_naming_notebook_and_cell(notebook_dir, tmp_path, capsys):
    _notebook(notebook_dir / "00-ok.ipynb", "run_name = 'x'", "print('fine')")
    _notebook(notebook_dir / "01-broken.ipynb", "run_name = 'x'", "raise ValueError('bad catalog')")
    _notebook(notebook_dir / "02-never.ipynb", "run_name = 'x'", "print('not reached')")
    params = tmp_path / "p.yaml"
    params.write_text("run_name: failing\ndataset: folder\n")
    assert pipeline.run_pipeline(params) == 1
    error = capsys.readouterr().err
    assert "FAILED in 01-broken.ipynb, cell" in error and "ValueError: bad catalog" in error
    executed = nbformat.read(config.RESULTS_DIR / "failing" / "01-broken.ipynb", as_version=4)
    assert any(output.get("ename") == "ValueError" for cell in executed.cells for output in cell.get("outputs", []))
    assert not (config.RESULTS_DIR / "failing" / "02-never.ipynb").exists()


def test_a_parameter_file_that_is_not_a_mapping_is_a_clear_error(tmp_path):
    params = tmp_path / "p.yaml"
    params.write_text("- just\n- a list\n")
    with pytest.raises(FashionRecError, match="p.yaml: a parameter file is a YAML mapping"):
        pipeline.read_params(params)
