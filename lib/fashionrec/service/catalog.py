"""The index a service answers from: one loaded version at a time, swapped whole, and the catalog's writes.

Every request takes the version loaded when it starts (:attr:`ServedIndex.current`, a
Recommender that never changes) and answers wholly from it. A new version, written by this
service (``POST /items``, ``DELETE /items/{id}``) or by another process (``python -m fashionrec
index --update``), is loaded beside the one serving and then swapped in with one assignment;
requests under way finish on the version they started with.

Writes go through a second Recommender, kept at the folder's CURRENT version
(:meth:`~fashionrec.serving.recommender.Recommender.refresh`), and are saved as a new version
atomically (:mod:`fashionrec.serving.folder`); one write at a time. When another process moved
CURRENT between this writer's load and its save, the write is repeated on the newer version.
Uploaded photos are kept in the media folder under their content's SHA-256 (the index folder
holds only versions): an item's image outlives the versions that list it.
"""
from __future__ import annotations

import hashlib
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import BadParameter, IndexFolderError
from ..serving.folder import CURRENT, current_version
from ..serving.recommender import Recommender
from ..settings import InferenceSettings, StoreSettings

log = logging.getLogger("fashionrec.service")

SAVE_ATTEMPTS = 3
UPLOAD_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}


@dataclass
class Upload:
    """One uploaded photo: the client's file name (errors name it), its bytes, label and optional id."""

    name: str
    data: bytes
    label: str
    item_id: str | None = None


@dataclass
class WriteReport:
    """What a write did, in the client's terms (upload names, never server paths)."""

    index_version: str
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"added": self.added, "removed": self.removed, "skipped": self.skipped,
                "index_version": self.index_version}


class ServedIndex:
    """An index folder served by version: :attr:`current` answers, :meth:`reload` follows CURRENT."""

    def __init__(self, outdir, settings: InferenceSettings | None = None, store: StoreSettings | None = None,
                 media_dir=None, on_swap=None):
        self.outdir = Path(outdir)
        self.settings = (settings or InferenceSettings()).but(progress=False)
        self.store = store
        self.media_dir = Path(media_dir) if media_dir else self.outdir.parent / f"{self.outdir.name}-media"
        self.on_swap = on_swap
        self._current = self._load()
        self._swap_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._writer: Recommender | None = None
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self._announce()

    @property
    def current(self) -> Recommender:
        return self._current

    def _load(self, reuse: Recommender | None = None) -> Recommender:
        # Many requests share the query model's threads: no spinning, which only pays on idle cores.
        return Recommender.load(self.outdir, self.settings, spinning=False, store=self.store, reuse=reuse)

    def _announce(self) -> None:
        if self.on_swap is not None:
            self.on_swap(self._current)

    def current_on_disk(self) -> str:
        return current_version(self.outdir).name

    def reload(self) -> bool:
        """Loads and swaps in the version CURRENT names, if it is not the one serving; whether it swapped.

        Raises IndexFolderError when that version cannot be loaded; the version serving goes on.
        """
        with self._swap_lock:
            if self.current_on_disk() == self._current.version:
                return False
            loaded = self._load(reuse=self._current)
            previous, self._current = self._current, loaded
        log.info("serving index version %s (%d items), was %s", loaded.version, len(loaded), previous.version)
        self._announce()
        return True

    # --- following CURRENT --------------------------------------------------------------------------

    def watch(self, interval_s: float) -> None:
        """Checks CURRENT every ``interval_s`` seconds on a background thread (one read of a small file)."""
        if self._watcher is not None:
            return
        self._watcher = threading.Thread(target=self._watch, args=(interval_s,), name="fashionrec-watch", daemon=True)
        self._watcher.start()

    def _watch(self, interval_s: float) -> None:
        pointer = self.outdir / CURRENT
        while not self._stop.wait(interval_s):
            try:
                if pointer.read_text().strip() != self._current.version:
                    self.reload()
            except (OSError, IndexFolderError) as error:   # mid-update or gone: keep serving what is loaded
                log.warning("index folder not reloaded: %s", error)

    def close(self) -> None:
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=5)

    # --- writes -----------------------------------------------------------------------------------------

    def add(self, uploads: list[Upload]) -> WriteReport:
        """Adds uploaded photos (embedded with the index's backbone and runtime) as one new version."""
        if not uploads:
            raise BadParameter("no photos: send one or more files in the field 'photos'")
        stored = [self._keep(upload) for upload in uploads]
        names = {str(path): upload.name for path, upload in zip(stored, uploads)}
        ids = [upload.item_id or path.stem[:16] for upload, path in zip(uploads, stored)]

        def change(writer: Recommender):
            return writer.add([str(path) for path in stored], [upload.label for upload in uploads], ids)

        report, version = self._write(change)
        skipped = [{"name": names.get(entry["path"], Path(entry["path"]).name), "stage": entry["stage"],
                    "reason": entry["reason"]} for entry in report.skipped]
        return WriteReport(version, added=report.added, skipped=skipped)

    def remove(self, ids: list[str]) -> WriteReport:
        """Removes items by id as one new version; UnknownItem (nothing removed) for an id not in it."""
        report, version = self._write(lambda writer: writer.remove(ids))
        return WriteReport(version, removed=report.removed)

    def _write(self, change):
        with self._write_lock:
            for attempt in range(1, SAVE_ATTEMPTS + 1):
                try:
                    writer = self._fresh_writer()
                    report = change(writer)
                    changed = bool(report.added or report.removed or report.compacted)
                    version = writer.save() if changed else writer.version
                except IndexFolderError:
                    # Most often another process saved a version in between; the writer's state may
                    # hold the change that was not saved, so the next attempt starts from disk.
                    self._writer = None
                    if attempt == SAVE_ATTEMPTS:
                        raise
                    continue
                except BaseException:
                    self._writer = None
                    raise
                break
        self.reload()
        return report, version

    def _fresh_writer(self) -> Recommender:
        if self._writer is None:
            self._writer = self._load(reuse=self._current)
        else:
            self._writer.refresh()
        return self._writer

    def _keep(self, upload: Upload) -> Path:
        """Writes an upload into the media folder under its content's digest (the same photo once)."""
        digest = hashlib.sha256(upload.data).hexdigest()
        suffix = Path(upload.name).suffix.lower()
        target = self.media_dir / digest[:2] / (digest + (suffix if suffix in UPLOAD_SUFFIXES else ".img"))
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(target.name + ".partial")
            partial.write_bytes(upload.data)
            partial.replace(target)
        return target
