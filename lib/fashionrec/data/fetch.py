"""Finding the named datasets on disk, and fetching the ones that are missing.

Each dataset is found or fetched on its own, so one unreachable source never blocks the
others. Raw data lands in ``data/raw`` and is never edited afterwards.

* Fashion-MNIST: ``/usr/share/datasets/fashion-mnist`` (Debian's ``dataset-fashion-mnist``)
  or ``data/raw/fashion-mnist``. Fetched by downloading that Debian package with
  ``apt-get download`` and unpacking its four files into ``data/raw`` (no root needed, the
  system is left untouched; as root, a missing package list is refreshed first), else by
  torchvision's download from the internet.
* The clothing photos: ``$FASHIONREC_CLOTHING_DIR``, ``data/raw/clothing-dataset`` or
  ``../shared/data/clothing-dataset``. Fetched from the public GitHub archive.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path

from .. import config
from ..errors import DatasetError

FASHION_MNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                       "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
FASHION_MNIST_DEBIAN_PACKAGE = "dataset-fashion-mnist"
CLOTHING_ARCHIVE_URL = "https://github.com/alexeygrigorev/clothing-dataset/archive/7ed86a9.tar.gz"
FETCH_TIMEOUT_S = 300
FETCHABLE = ("fashion-mnist", "clothing")


def fashion_mnist_dirs() -> list[Path]:
    return [config.FASHION_MNIST_SYSTEM_DIR, config.RAW_DIR / "fashion-mnist", config.RAW_DIR / "FashionMNIST" / "raw"]


def locate_fashion_mnist() -> Path | None:
    for directory in fashion_mnist_dirs():
        if all((directory / name).is_file() for name in FASHION_MNIST_FILES):
            return directory
    return None


def clothing_dirs() -> list[Path]:
    from_env = os.environ.get("FASHIONREC_CLOTHING_DIR")
    return [*([Path(from_env)] if from_env else []), config.RAW_DIR / "clothing-dataset",
            config.PROJECT_ROOT.parent / "shared" / "data" / "clothing-dataset"]


def locate_clothing() -> Path | None:
    return next((directory for directory in clothing_dirs() if (directory / "images.csv").is_file()), None)


def ensure_dataset(name: str, progress: bool = True) -> Path | None:
    """The directory of a named dataset, fetched first if it is missing.

    Datasets that live wherever the user points them (``folder``, ``catalog``) return None.
    Raises DatasetError, naming every source tried, when a dataset can be neither found
    nor fetched.
    """
    if name == "fashion-mnist":
        return locate_fashion_mnist() or fetch_fashion_mnist(progress)
    if name == "clothing":
        return locate_clothing() or fetch_clothing(progress)
    return None


def fetch_fashion_mnist(progress: bool = True) -> Path:
    target = config.RAW_DIR / "fashion-mnist"
    attempts = []
    for source in (_fashion_mnist_from_debian, _fashion_mnist_from_torchvision):
        try:
            if progress:
                print(f"[data] fetching Fashion-MNIST ({source.__doc__.strip()})", file=sys.stderr)
            return source(target)
        except (DatasetError, OSError, subprocess.SubprocessError) as error:
            attempts.append(f"{source.__doc__.strip()}: {error}")
    raise DatasetError("Fashion-MNIST is not installed and could not be fetched; tried " + "; ".join(attempts) +
                       f". Install it with `apt-get install {FASHION_MNIST_DEBIAN_PACKAGE}` or put the four IDX "
                       f"files in {target}")


def _fashion_mnist_from_debian(target: Path) -> Path:
    """the Debian package, with apt-get download"""
    if not (shutil.which("apt-get") and shutil.which("dpkg-deb")):
        raise DatasetError("apt-get and dpkg-deb are not available")
    with tempfile.TemporaryDirectory() as scratch:
        command = ["apt-get", "download", "-qq", FASHION_MNIST_DEBIAN_PACKAGE]
        result = _run(command, scratch)
        if result.returncode != 0 and os.geteuid() == 0:
            _run(["apt-get", "update", "-qq"], scratch)   # a fresh machine may have no package lists yet
            result = _run(command, scratch)
        debs = list(Path(scratch).glob("*.deb"))
        if result.returncode != 0 or not debs:
            raise DatasetError(f"`{' '.join(command)}` failed: {result.stderr.strip().splitlines()[-1:] or '?'}")
        unpacked = Path(scratch) / "root"
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(unpacked)], check=True, capture_output=True,
                       timeout=FETCH_TIMEOUT_S)
        return _install_files(unpacked / str(config.FASHION_MNIST_SYSTEM_DIR).lstrip("/"), target)


def _fashion_mnist_from_torchvision(target: Path) -> Path:
    """torchvision's download from the internet"""
    from torchvision.datasets import FashionMNIST

    with tempfile.TemporaryDirectory(dir=_made(config.RAW_DIR)) as scratch:
        try:
            FashionMNIST(root=scratch, train=True, download=True)
            FashionMNIST(root=scratch, train=False, download=True)
        except Exception as error:  # torchvision raises several kinds of network errors
            raise DatasetError(f"{type(error).__name__}: {error}") from error
        return _install_files(Path(scratch) / "FashionMNIST" / "raw", target)


def _install_files(source: Path, target: Path) -> Path:
    """Copies the four IDX files into ``target`` through a temporary directory and a rename."""
    missing = [name for name in FASHION_MNIST_FILES if not (source / name).is_file()]
    if missing:
        raise DatasetError(f"{source}: missing {', '.join(missing)}")
    staging = Path(tempfile.mkdtemp(dir=_made(target.parent), prefix=f".{target.name}-"))
    for name in FASHION_MNIST_FILES:
        shutil.copyfile(source / name, staging / name)
    if target.exists():
        shutil.rmtree(target)
    os.replace(staging, target)
    return target


def fetch_clothing(progress: bool = True) -> Path:
    target = config.RAW_DIR / "clothing-dataset"
    if progress:
        print(f"[data] fetching the clothing photos from {CLOTHING_ARCHIVE_URL}", file=sys.stderr)
    staging = Path(tempfile.mkdtemp(dir=_made(config.RAW_DIR), prefix=".clothing-dataset-"))
    try:
        archive = staging / "archive.tar.gz"
        with urllib.request.urlopen(CLOTHING_ARCHIVE_URL, timeout=FETCH_TIMEOUT_S) as response, \
                open(archive, "wb") as stream:
            shutil.copyfileobj(response, stream)
        with tarfile.open(archive) as tar:
            tar.extractall(staging / "unpacked", filter="data")
        top = next((staging / "unpacked").iterdir())
        if not (top / "images.csv").is_file():
            raise DatasetError(f"{CLOTHING_ARCHIVE_URL}: the archive has no images.csv")
        os.replace(top, target)
        return target
    except (OSError, tarfile.TarError, StopIteration) as error:
        raise DatasetError(f"the clothing photos are not on this machine (looked in "
                           f"{', '.join(map(str, clothing_dirs()))}) and could not be fetched from "
                           f"{CLOTHING_ARCHIVE_URL} ({type(error).__name__}: {error}); pass --data-dir") from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _run(command: list[str], cwd) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=FETCH_TIMEOUT_S,
                          env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})


def _made(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    return directory
