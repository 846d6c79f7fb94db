"""Runs the numbered notebooks in order with papermill, from one parameter file.

Each notebook receives only the parameters its ``parameters`` cell declares (papermill
warns about the others, and such a warning is a bug), plus ``run_name``. Executed
notebooks land in ``results/<run>/``; a failing notebook is kept there with its error,
and the run stops naming the notebook and the cell.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import yaml

from .. import config
from ..console import HEADLESS_ENV
from ..data.fetch import ensure_dataset
from ..errors import FashionRecError

NOTEBOOK_DIR = config.PROJECT_ROOT / "notebooks"


def read_params(path) -> dict:
    path = Path(path)
    if not path.exists():
        raise FashionRecError(f"{path}: parameter file not found")
    params = yaml.safe_load(path.read_text()) or {}
    if not isinstance(params, dict):
        raise FashionRecError(f"{path}: a parameter file is a YAML mapping of name -> value")
    return params


def pipeline_notebooks(selected=None) -> list[Path]:
    notebooks = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]-*.ipynb"))
    if selected:
        notebooks = [nb for nb in notebooks if nb.stem in selected or nb.name in selected]
    return notebooks


def run_pipeline(params_path, run_name: str | None = None) -> int:
    import papermill
    from papermill.exceptions import PapermillExecutionError

    params = read_params(params_path)
    run_name = run_name or params.get("run_name") or Path(params_path).stem
    params["run_name"] = run_name
    params["params_file"] = str(params_path)
    out_dir = config.RESULTS_DIR / run_name
    out_dir.mkdir(parents=True, exist_ok=True)
    notebooks = pipeline_notebooks(params.pop("notebooks", None))
    if params.get("dataset") and not params.get("data_dir"):
        ensure_dataset(params["dataset"])   # fetches what this parameter file needs, and only that
    os.environ[HEADLESS_ENV] = "1"   # the kernels inherit it: no progress bars in executed notebooks
    unused = set(params) - {"params_file"}
    for notebook in notebooks:
        declared = papermill.inspect_notebook(str(notebook))
        given = {name: value for name, value in params.items() if name in declared}
        unused -= set(given)
        print(f"[pipeline] {run_name}: {notebook.name}", file=sys.stderr, flush=True)
        try:
            papermill.execute_notebook(
                str(notebook), str(out_dir / notebook.name), parameters=given,
                cwd=str(NOTEBOOK_DIR), progress_bar=False, log_output=False, kernel_name="python3",
            )
        except PapermillExecutionError as error:
            print(f"[pipeline] FAILED in {notebook.name}, cell {error.exec_count} ({error.ename}: {error.evalue}); "
                  f"the executed notebook with the error is {out_dir / notebook.name}", file=sys.stderr)
            return 1
    if unused:
        print(f"[pipeline] warning: parameters used by no notebook: {sorted(unused)}", file=sys.stderr)
    print(f"[pipeline] {run_name}: done, results in {out_dir}", file=sys.stderr)
    return 0


CHECK_MARKER = "# NBVAL_CHECK_OUTPUT"


def keep_checked_outputs(path) -> None:
    """Output policy of the committed notebooks: only cells nbval checks keep their outputs.

    Those cells print stable, rounded summaries; every other output (plots, timings,
    progress bars) belongs to a run's executed copy under results/, not to the source.
    """
    import nbformat

    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code" and CHECK_MARKER not in cell.source:
            cell.outputs = []
            cell.execution_count = None
    nbformat.write(notebook, path)
