"""Which files of a catalog are usable images, decided once per file content.

Every file is decoded in full before the split, so a truncated JPEG whose header looks fine
never takes a train, gallery or query slot. Full decoding costs milliseconds per photo, so
each verdict is cached by the BLAKE2b digest of the file's bytes in
``data/interim/image-checks/``: the next run only hashes the files (a fraction of a
millisecond each) and decodes only new or changed ones. The cache file is named after the
check version and the Pillow version, since a newer decoder may judge a file differently.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

import PIL

from .. import config
from ..console import progress_bar
from ..errors import ImageError
from .images import DIGEST_BYTES, check_image_file, open_regular_file

# Bump when check_image_file changes what it accepts, so no stale verdict is reused.
CHECK_VERSION = 1
# Pillow releases the GIL while it decodes, so threads decode in parallel.
CHECK_THREADS = min(4, os.cpu_count() or 1)

Verdict = tuple[str, str] | None   # (stage, reason) of a file left out, or None for a usable image


def verdict_cache_path() -> Path:
    return config.INTERIM_DIR / "image-checks" / f"v{CHECK_VERSION}-pillow-{PIL.__version__}.json"


def check_files(paths, progress: bool = True) -> list[Verdict]:
    """The verdict on each path, in order: None (usable), or ("file" | "header" | "decode", reason).

    "file" verdicts (missing, not a regular file, unreadable) are about the path, not the
    content, and are never cached; the others are cached by content digest.
    """
    paths = [str(path) for path in paths]
    cache_path = verdict_cache_path()
    cached = _read_cache(cache_path)

    def check(path: str) -> tuple[Verdict, str | None]:
        try:
            stream = open_regular_file(path)
        except ImageError as error:
            return ("file", error.reason), None
        with stream:
            try:
                digest = _digest(stream)
            except OSError as error:
                return ("file", f"cannot read file: {error.strerror or error}"), None
            if digest in cached:
                return _as_verdict(cached[digest]), None
            stream.seek(0)
            return check_image_file(stream, path), digest

    verdicts: list[Verdict] = []
    fresh: dict[str, list[str] | None] = {}
    with ThreadPoolExecutor(CHECK_THREADS) as pool:
        results = pool.map(check, paths)
        for verdict, digest in progress_bar(results, total=len(paths), desc="checking images", unit="img",
                                            progress=progress, leave=False):
            verdicts.append(verdict)
            if digest is not None:
                fresh[digest] = list(verdict) if verdict else None
    if fresh:
        _write_cache(cache_path, fresh)
    return verdicts


def _digest(stream: BinaryIO) -> str:
    # The same digest as fashionrec.data.images.file_digest, from the already open file.
    digest = hashlib.blake2b(digest_size=DIGEST_BYTES)
    for block in iter(lambda: stream.read(1 << 20), b""):
        digest.update(block)
    return digest.hexdigest()


def _as_verdict(value) -> Verdict:
    return (str(value[0]), str(value[1])) if value else None


def _read_cache(path: Path) -> dict:
    try:
        loaded = json.loads(path.read_text())
    except (OSError, ValueError):   # absent, or cut short by a crash on a filesystem without atomic rename
        return {}
    return loaded if isinstance(loaded, dict) else {}


def _write_cache(path: Path, fresh: dict) -> None:
    """Merges ``fresh`` into the cache file through a temporary file and a rename.

    Two runs writing at once may drop each other's newest verdicts; those files are simply
    decoded again next time, so the race costs time, never correctness.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    merged = {**_read_cache(path), **fresh}
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".partial-", suffix=".json")
    with os.fdopen(handle, "w") as stream:
        json.dump(merged, stream, separators=(",", ":"))
    os.replace(temporary, path)
