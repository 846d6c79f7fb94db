"""The index folder on disk: complete versions and a CURRENT pointer, replaced atomically.

    OUTDIR/
      CURRENT          the name of the version to load, e.g. "v000003" (as LevelDB's CURRENT file)
      v000003/         build.json, index.faiss (+ .json), ids.parquet, embeddings.npy, query.onnx, ...
      v000002/         the version before, kept for a reader that opened it just before the swap
      .lock            held by whoever writes (a build or an update), released by the OS if it dies

A build or an update writes a new version under a temporary name (``.partial-*``), flushes
every file to disk, renames the folder to its final name, and only then points CURRENT at it
(a temporary file, fsync, ``os.replace``, fsync of the folder). A process killed at any moment
therefore leaves CURRENT naming a complete version, the previous one or the new one; the
next writer removes what a killed one left behind. Readers never lock: they read CURRENT once
and open that version's files. Folders and files follow the umask (under umask 022, a web
server running as another user can read them).
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import IndexFolderError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; a single writer at a time is then the user's business
    fcntl = None

CURRENT = "CURRENT"
LOCK = ".lock"
PARTIAL_PREFIX = ".partial-"
BUILD_INFO = "build.json"
ITEMS_FILE = "ids.parquet"
ATTRIBUTES_FILE = "attributes.parquet"
EMBEDDINGS_FILE = "embeddings.npy"
COLOUR_FILE = "colour.npy"
ITEM_COLUMNS = ["id", "path", "label", "digest", "deleted", "label_probability"]
_VERSION = re.compile(r"^v(\d{6,})$")
BUILD_HINT = ("build one with `python -m fashionrec index --dataset NAME [--data-dir DIR] --backbone BACKBONE "
              "--out {outdir}`")


def versions(outdir: Path) -> list[str]:
    """Names of the complete-looking version folders, oldest first."""
    if not outdir.is_dir():
        return []
    return sorted((p.name for p in outdir.iterdir() if p.is_dir() and _VERSION.match(p.name)),
                  key=lambda name: int(_VERSION.match(name).group(1)))


def current_version(outdir) -> Path:
    """The folder of the version CURRENT names; IndexFolderError (saying how to build one) otherwise."""
    outdir = Path(outdir)
    hint = BUILD_HINT.format(outdir=outdir)
    if not outdir.exists():
        raise IndexFolderError(f"{outdir}: no such index folder; {hint}")
    if not outdir.is_dir():
        raise IndexFolderError(f"{outdir}: not a folder; {hint}")
    pointer = outdir / CURRENT
    if not pointer.is_file():
        detail = ("a build was interrupted before it finished" if any(p.name.startswith(PARTIAL_PREFIX)
                                                                     for p in outdir.iterdir())
                  else "it has no CURRENT file")
        raise IndexFolderError(f"{outdir}: not a complete index folder ({detail}); {hint}")
    name = pointer.read_text().strip()
    version = outdir / name
    if not _VERSION.match(name) or not (version / BUILD_INFO).is_file():
        raise IndexFolderError(f"{outdir}: CURRENT names {name!r}, which is not a complete version; {hint}")
    return version


def read_items(version: Path) -> pd.DataFrame:
    """A version's id map with its attribute columns (a folder without ``label_probability`` gets it, missing)."""
    items = pd.read_parquet(version / ITEMS_FILE)
    if "label_probability" not in items.columns:
        items["label_probability"] = np.nan
    if (version / ATTRIBUTES_FILE).is_file():
        attributes = pd.read_parquet(version / ATTRIBUTES_FILE)
        if len(attributes) != len(items):
            raise ValueError(f"{ATTRIBUTES_FILE} has {len(attributes)} rows, the id map {len(items)}")
        items = pd.concat([items, attributes], axis=1)
    return items


def is_index_folder(path) -> bool:
    return (Path(path) / CURRENT).is_file()


def check_output_folder(outdir) -> None:
    """Refuses to build into a folder that holds something other than an index (or nothing)."""
    outdir = Path(outdir)
    if not outdir.exists():
        return
    if not outdir.is_dir():
        raise IndexFolderError(f"{outdir}: exists and is not a folder; choose another --out")
    entries = [p.name for p in outdir.iterdir()]
    ours = {CURRENT, LOCK}
    strangers = [name for name in entries
                 if name not in ours and not _VERSION.match(name) and not name.startswith(PARTIAL_PREFIX)]
    if strangers:
        listed = ", ".join(sorted(strangers)[:3]) + (", ..." if len(strangers) > 3 else "")
        raise IndexFolderError(f"{outdir}: holds other files ({listed}), not an index "
                               "folder; choose another --out (an index folder is replaced atomically, anything "
                               "else is never overwritten)")


@contextlib.contextmanager
def _locked(outdir: Path):
    outdir.mkdir(parents=True, exist_ok=True)
    with open(outdir / LOCK, "a+") as handle:
        if fcntl is not None:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


@dataclass
class Staging:
    """A version being written: ``path`` (a temporary folder); ``version`` is set once it is CURRENT."""

    path: Path
    version: str | None = None


@contextlib.contextmanager
def new_version(outdir, expected_current: str | None = None, keep_previous: bool = True):
    """Yields a :class:`Staging` folder; on a normal exit it becomes the new CURRENT version.

    ``expected_current``: the version the caller's in-memory state came from; if another
    writer has moved CURRENT since, nothing is written and IndexFolderError says so (an
    update is never silently lost). Versions older than the previous one are removed
    afterwards, as are partial folders a killed writer left.
    """
    outdir = Path(outdir)
    check_output_folder(outdir)
    with _locked(outdir):
        now = (outdir / CURRENT).read_text().strip() if (outdir / CURRENT).is_file() else None
        if expected_current is not None and now != expected_current:
            raise IndexFolderError(f"{outdir}: changed on disk since it was loaded (now {now}, loaded "
                                   f"{expected_current}); load it again and repeat the update")
        _remove_partials(outdir)
        staging = Staging(Path(tempfile.mkdtemp(dir=outdir, prefix=PARTIAL_PREFIX)))
        os.chmod(staging.path, 0o777 & ~current_umask())   # mkdtemp makes it private (0700)
        try:
            yield staging
            existing = versions(outdir)
            number = int(_VERSION.match(existing[-1]).group(1)) + 1 if existing else 1
            name = f"v{number:06d}"
            _fsync_tree(staging.path)
            os.replace(staging.path, outdir / name)
            _fsync_directory(outdir)
            _write_pointer(outdir, name)
            staging.version = name
        except BaseException:
            shutil.rmtree(staging.path, ignore_errors=True)
            raise
        keep = {name} | ({now} if keep_previous and now else set())
        for old in versions(outdir):
            if old not in keep:
                shutil.rmtree(outdir / old, ignore_errors=True)


def _write_pointer(outdir: Path, name: str) -> None:
    handle, temporary = tempfile.mkstemp(dir=outdir, prefix=PARTIAL_PREFIX + "CURRENT-")
    os.chmod(temporary, 0o666 & ~current_umask())   # mkstemp makes it private (0600)
    with os.fdopen(handle, "w") as stream:
        stream.write(name + "\n")
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(temporary, outdir / CURRENT)
    _fsync_directory(outdir)


def current_umask() -> int:
    """The process's umask (reading it means setting it: set it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _remove_partials(outdir: Path) -> None:
    for leftover in outdir.glob(PARTIAL_PREFIX + "*"):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as stream:
                os.fsync(stream.fileno())
    for directory in [root, *(p for p in root.rglob("*") if p.is_dir())]:
        _fsync_directory(directory)


def _fsync_directory(directory: Path) -> None:
    if os.name != "posix":
        return
    handle = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)
