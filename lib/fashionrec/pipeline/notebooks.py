"""Runs the numbered notebooks in order with papermill, from one parameter file.

The file is read against the schema of :mod:`fashionrec.pipeline.params` (unknown keys,
wrong types and missing paths are errors before any notebook starts), and every notebook
receives every key its ``parameters`` cell declares, defaults included, so no literal of a
notebook leaks into a run. ``backbone_modules`` are loaded here (an unknown backbone name
fails now, not after 00-prepare-data) and handed to the kernels through
``FASHIONREC_BACKBONE_MODULES``. Executed notebooks land in ``results/<run>/``; a failing
notebook is kept there with its error, and the run stops naming the notebook and the cell.
A run that reaches past 05-report writes the report again at its end, so that it lists the
figures of 06 and 07 from this run, whatever an earlier run left in the folder.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import yaml

from .. import config
from ..console import HEADLESS_ENV
from ..data.fetch import ensure_dataset
from ..errors import FashionRecError, did_you_mean
from ..models.registry import BACKBONE_MODULES_ENV, check_backbone_name, load_backbone_modules
from .params import BY_NAME, resolve_params
from .report import write_report

NOTEBOOK_DIR = config.PROJECT_ROOT / "notebooks"


def unix_socket_kernel_manager() -> type:
    """A kernel manager whose kernels listen on Unix sockets in a private folder, removed with them.

    Nothing listens on a TCP port, so ipykernel has no unencrypted transport to warn about (it
    warns once per notebook over TCP).
    """
    from jupyter_client.manager import AsyncKernelManager   # imported with papermill, only by a run

    class UnixSocketKernelManager(AsyncKernelManager):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.transport = "ipc"
            self._socket_dir = tempfile.mkdtemp(prefix="fashionrec-kernel-")
            self.ip = os.path.join(self._socket_dir, "kernel")

        async def _async_cleanup_resources(self, restart: bool = False) -> None:
            await super()._async_cleanup_resources(restart)
            if not restart:
                shutil.rmtree(self._socket_dir, ignore_errors=True)

    return UnixSocketKernelManager


def read_params(path) -> dict:
    """The parameter file as written (a mapping); :func:`resolve_params` checks and completes it."""
    path = Path(path)
    if not path.exists():
        raise FashionRecError(f"{path}: parameter file not found")
    try:
        params = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise FashionRecError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(params, dict):
        raise FashionRecError(f"{path}: a parameter file is a YAML mapping of name -> value")
    return params


def pipeline_notebooks(selected=None, source="parameter file") -> list[Path]:
    """The numbered notebooks in order, or the ``selected`` ones (names with or without ``.ipynb``)."""
    notebooks = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]-*.ipynb"))
    if selected is None:
        return notebooks
    stems = [notebook.stem for notebook in notebooks]
    unknown = [name for name in selected if name.removesuffix(".ipynb") not in stems]
    if unknown:
        described = ", ".join(f"{name!r}{did_you_mean(name.removesuffix('.ipynb'), stems)}" for name in unknown)
        raise FashionRecError(f"{source}: notebooks: {described} is not a pipeline notebook; they are "
                              f"{', '.join(stems)}")
    return [notebook for notebook in notebooks if notebook.stem in selected or notebook.name in selected]


def use_backbone_modules(modules: list[str]) -> None:
    """Loads ``modules`` here and makes every kernel started from now on load them too."""
    if not modules:
        return
    load_backbone_modules(modules)
    inherited = [entry for entry in os.environ.get(BACKBONE_MODULES_ENV, "").split(os.pathsep) if entry]
    os.environ[BACKBONE_MODULES_ENV] = os.pathsep.join(dict.fromkeys([*inherited, *modules]))


def run_pipeline(params_path, run_name: str | None = None) -> int:
    import papermill
    from papermill.exceptions import PapermillExecutionError

    written = read_params(params_path)
    params = resolve_params(written, params_path, run_name)
    notebooks = pipeline_notebooks(params.pop("notebooks"), params_path)
    use_backbone_modules(params.pop("backbone_modules"))
    stems = {notebook.stem[:2] for notebook in notebooks}
    for name in params["backbones"] if "01" in stems else []:
        check_backbone_name(name)
    if "04" in stems:
        check_backbone_name(params["finetune_backbone"])
    run_name = params["run_name"]
    params["params_file"] = str(params_path)
    out_dir = config.RESULTS_DIR / run_name
    out_dir.mkdir(parents=True, exist_ok=True)
    if "00" in stems and not params["data_dir"]:
        ensure_dataset(params["dataset"])   # fetches what this parameter file needs, and only that
    os.environ[HEADLESS_ENV] = "1"   # the kernels inherit it: no progress bars in executed notebooks
    unused = {name for name in written if BY_NAME[name].notebooks != ("pipeline",)}
    kernel_manager = unix_socket_kernel_manager()
    for notebook in notebooks:
        declared = papermill.inspect_notebook(str(notebook))
        undeclared = set(declared) - set(params)
        if undeclared:
            raise FashionRecError(f"{notebook.name} declares parameters the schema does not know: {sorted(undeclared)}")
        given = {name: params[name] for name in declared}
        unused -= set(given)
        print(f"[pipeline] {run_name}: {notebook.name}", file=sys.stderr, flush=True)
        try:
            papermill.execute_notebook(
                str(notebook), str(out_dir / notebook.name), parameters=given,
                cwd=str(NOTEBOOK_DIR), progress_bar=False, log_output=False, kernel_name="python3",
                kernel_manager_class=kernel_manager,
            )
        except PapermillExecutionError as error:
            print(f"[pipeline] FAILED in {notebook.name}, cell {error.exec_count} ({error.ename}: {error.evalue}); "
                  f"the executed notebook with the error is {out_dir / notebook.name}", file=sys.stderr)
            return 1
    if "05" in stems and max(stems) > "05":
        # 06 and 07 write their figures after 05-report: list them now, as the next run's report would.
        write_report(run_name, params_file=params["params_file"])
    if unused:
        print(f"[pipeline] warning: parameters set in {params_path} but used by none of the notebooks run: "
              f"{sorted(unused)}", file=sys.stderr)
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
