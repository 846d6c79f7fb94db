"""What the workbench prints while it works: progress bars and library warnings.

Progress bars draw only where someone watches: on a terminal, or in an interactive
Jupyter kernel (as a widget). In a log file, a CI job or a headless pipeline run every
redraw would become a new line, so there they stay silent. ``make pipeline`` marks its
papermill kernels headless with the environment variable ``HEADLESS_ENV``.
A warning that would repeat is shown once per process.
"""
from __future__ import annotations

import os
import sys

from tqdm.auto import tqdm

_WARNED: set[str] = set()


HEADLESS_ENV = "FASHIONREC_HEADLESS"


def progress_enabled(progress: bool = True, stream=None) -> bool:
    """Whether to draw progress bars: asked for, and someone watches (see the module docstring)."""
    if not progress or os.environ.get(HEADLESS_ENV) or os.environ.get("CI"):
        return False
    if _in_jupyter_kernel():
        return True
    stream = sys.stderr if stream is None else stream
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # closed or replaced streams
        return False


def _in_jupyter_kernel() -> bool:
    shell = sys.modules.get("IPython") and sys.modules["IPython"].get_ipython()
    return type(shell).__name__ == "ZMQInteractiveShell"


def progress_bar(iterable=None, *, progress: bool = True, **options) -> tqdm:
    """``tqdm`` on stderr, drawn only when :func:`progress_enabled` says so."""
    options.setdefault("file", sys.stderr)
    return tqdm(iterable, disable=not progress_enabled(progress, options["file"]), **options)


def warn_once(message: str) -> None:
    """Print ``warning: <message>`` to stderr the first time this process meets it, and never again."""
    if message in _WARNED:
        return
    _WARNED.add(message)
    print(f"warning: {message}", file=sys.stderr, flush=True)
