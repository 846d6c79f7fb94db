"""Compact codes in memory, exact re-ranking from a float16 file on disk.

This is how systems that serve billions of vectors from little RAM work (DiskANN, SPANN):
a compact index held in memory proposes ``k * k_factor`` candidates for each query, and
their full vectors, read from an SSD, re-rank them exactly. Here

* the compact index is any faiss index, typically an IVF over PQ codes of a PCA-reduced
  copy of the vectors (``PCA256,IVF4096,PQ48``): codes, ids, coarse centroids, codebooks
  and the projection are all that sits in process memory;
* the full vectors (normalised for the cosine metric) are a float16 file, memory-mapped by
  faiss (``IO_FLAG_MMAP_IFC``) and advised for random access, so the kernel reads only the
  pages of the candidates; they live in the page cache, which the kernel may evict;
* the two are joined in a faiss ``IndexRefine``: :func:`fashionrec.indexing.faiss_index.search`,
  ``faiss.ParameterSpace`` (``"nprobe=16,k_factor_rf=8"``) and the measurement code treat it
  like any other index. Re-ranking computes float32 inner products (or L2 distances) on the
  float16 vectors, so with a k_factor that proposes every vector the results are exact
  search over the float16-rounded vectors.

Specs are faiss factory strings of the in-memory index followed by ``,RDisk`` ("re-rank
from disk"), e.g. ``"PCA256,IVF{nlist},PQ48,RDisk"``; :func:`split_disk_spec` parses them.

Files of a saved index ``P`` (:func:`fashionrec.indexing.faiss_index.save_index`): ``P`` (the
in-memory part, a faiss index file), ``P.json`` (how it was built, ``storage: "disk"``, the
vectors file's name relative to ``P``'s folder, its header size, ``k_factor_rf``) and the
vectors file. That file is a faiss ``IndexScalarQuantizer`` (fp16) file: a header of
``vectors_header_bytes`` bytes, then the n x d float16 matrix, row i = id i, so that numpy reads
it too: ``np.memmap(path, np.float16, "r", offset=header, shape=(n, d))``.

For the servable index folder (and anyone else), the whole API is::

    index = build_index(vectors, "PCA256,IVF{nlist},PQ48,RDisk", storage_dir=folder)  # writes folder/vectors.f16
    scores, ids = search(index, queries, k)                  # candidates from memory, exact re-rank from disk
    save_index(index, folder / "index.faiss", {"factory": ..., "metric": "cosine"})  # references vectors.f16
    index, info = load_index(folder / "index.faiss")          # maps the vectors file again

(all four from ``fashionrec.indexing.faiss_index``). Without ``storage_dir`` the vectors go
to an unnamed temporary file, deleted as soon as it is mapped (its space is freed with the
index); :func:`save_index` then copies them next to the saved index. Memory accounting:
:func:`memory_bytes` counts the serialised in-memory part, :func:`disk_bytes` the vectors
file; :func:`evict_from_page_cache` and :func:`page_cache_fraction` make and check a cold
start. The vectors file is read-only once written: adding rows to (or resetting) such an index,
or a ``faiss.clone_index`` of it (which maps the same file), raises FashionRecError; build a new
one from all the vectors instead.
"""
from __future__ import annotations

import ctypes
import mmap
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import faiss
import numpy as np

from ..errors import FashionRecError, IndexBuildError

DISK_SUFFIX = ",RDisk"
VECTORS_FILE_NAME = "vectors.f16"
# faiss's fp16 encoding; 65504 is float16's largest finite value.
FLOAT16_MAX = float(np.finfo(np.float16).max)
_HEADER_FOURCC = b"IxSQ"
_NTOTAL_OFFSET = 8  # after the fourcc and d (int32): faiss's write_index_header
_PAGE = mmap.PAGESIZE
_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]


def split_disk_spec(factory: str) -> tuple[str, bool]:
    """(factory of the in-memory index, whether the spec asks for re-ranking from disk)."""
    if factory == DISK_SUFFIX.lstrip(",") or factory == DISK_SUFFIX:
        raise ValueError(f"{factory!r}: RDisk needs an in-memory index before it, e.g. 'IVF1024,PQ32,RDisk'")
    if factory.endswith(DISK_SUFFIX):
        return factory[: -len(DISK_SUFFIX)], True
    if "RDisk" in factory:
        raise ValueError(f"{factory!r}: RDisk must come last (it re-ranks what the index before it proposes)")
    return factory, False


def write_vectors_file(path, chunks: Iterable[np.ndarray], n: int, d: int, metric_type: int) -> int:
    """Stream float32 row blocks into a faiss fp16 ``IndexScalarQuantizer`` file at ``path``.

    The file is the one ``faiss.write_index`` writes for such an index holding the same rows
    (byte for byte), but it is written block by block, so the float16 copy never sits in memory
    whole. It goes to a temporary name and is renamed into place: an index already mapping an
    older file at ``path`` keeps reading that one. Returns the header size in bytes (where row 0
    starts). Raises IndexBuildError for values float16 cannot hold.
    """
    path = Path(path)
    header = _header(n, d, metric_type)
    # faiss's own encoder: it rounds halfway cases away from zero, numpy's astype to even.
    encoder = faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_fp16, metric_type)
    partial = path.with_name(path.name + ".partial")
    written = 0
    try:
        with open(partial, "wb") as out:
            out.write(header)
            for block in chunks:
                block = np.ascontiguousarray(block, dtype=np.float32)
                if np.abs(block).max(initial=0.0) > FLOAT16_MAX:
                    raise IndexBuildError(f"{path}: vectors hold values beyond float16's range "
                                          f"(|x| > {FLOAT16_MAX:g}); scale them first or use an in-memory index")
                out.write(encoder.sa_encode(block).tobytes())
                written += len(block)
        if written != n:
            raise ValueError(f"{path}: {written} rows written, {n} announced")
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return len(header)


def _header(n: int, d: int, metric_type: int) -> bytes:
    """faiss's serialisation of an empty fp16 IndexScalarQuantizer, patched to announce n rows."""
    empty = faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_fp16, metric_type)
    blob = faiss.serialize_index(empty).tobytes()
    # The layout this relies on (fourcc, d, ntotal, ..., codes as size + bytes last) is
    # checked here, and tests compare a whole file with faiss.serialize_index.
    if blob[:4] != _HEADER_FOURCC or struct.unpack_from("<i", blob, 4)[0] != d or blob[-8:] != bytes(8):
        raise IndexBuildError(f"faiss {faiss.__version__} writes fp16 scalar-quantizer files in an unknown layout")
    header = bytearray(blob[:-8])
    struct.pack_into("<q", header, _NTOTAL_OFFSET, n)
    return bytes(header) + struct.pack("<Q", n * d * 2)


@dataclass(frozen=True)
class VectorsSource:
    """Which file a disk-backed index maps: its path (None once deleted) and inode, so that a
    later file at the same path (a rebuild) is not mistaken for it."""

    path: Path | None
    device: int
    inode: int

    def still_there(self) -> bool:
        if self.path is None:
            return False
        try:
            status = os.stat(self.path)
        except OSError:
            return False
        return (status.st_dev, status.st_ino) == (self.device, self.inode)


def open_vectors(path, delete: bool = False) -> tuple[faiss.IndexScalarQuantizer, VectorsSource]:
    """Map a vectors file written by :func:`write_vectors_file` (read-only, random access).

    ``delete`` unlinks the file once mapped: its space is freed when the index is.
    """
    path = Path(path)
    if not path.is_file():
        raise FashionRecError(f"{path}: no such vectors file (written by build_index with an RDisk spec)")
    status = os.stat(path)
    try:
        vectors = faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY)
    except RuntimeError as error:
        raise FashionRecError(f"{path}: not a float16 vectors file ({str(error).splitlines()[0]})") from None
    if not isinstance(vectors, faiss.IndexScalarQuantizer) or vectors.sq.qtype != faiss.ScalarQuantizer.QT_fp16:
        raise FashionRecError(f"{path}: a faiss {type(vectors).__name__}, not a float16 vectors file")
    if delete:
        path.unlink()
    if vectors.ntotal:
        _advise(vectors, mmap.MADV_RANDOM)
    return vectors, VectorsSource(None if delete else path.resolve(), status.st_dev, status.st_ino)


def attach(base: faiss.Index, vectors: faiss.IndexScalarQuantizer, source: VectorsSource,
           k_factor: float) -> faiss.IndexRefine:
    """The searchable index: ``base`` proposes k * k_factor candidates, ``vectors`` re-rank them.

    The result remembers its :class:`VectorsSource` (:func:`vectors_source`) for saving and eviction.
    """
    if (base.d, base.ntotal, base.metric_type) != (vectors.d, vectors.ntotal, vectors.metric_type):
        raise FashionRecError(f"in-memory index ({base.ntotal} x {base.d}, metric {base.metric_type}) and vectors "
                              f"file ({vectors.ntotal} x {vectors.d}, metric {vectors.metric_type}) do not belong together")
    index = faiss.IndexRefine(base, vectors)  # faiss's wrapper keeps both Python objects alive with it
    index.k_factor = k_factor
    # faiss proxies accept no new attributes; the list that keeps base and vectors alive does.
    index.referenced_objects.append(source)
    return index


def vectors_source(index: faiss.Index) -> VectorsSource | None:
    """The file behind an index returned by :func:`attach` (build_index, load_index); None for
    another Python handle on the same faiss object, e.g. from ``faiss.downcast_index``."""
    return next((item for item in getattr(index, "referenced_objects", None) or []
                 if isinstance(item, VectorsSource)), None)


def is_disk_backed(index: faiss.Index) -> bool:
    """Whether ``index`` re-ranks from a mapped vectors file (an RDisk spec)."""
    index = faiss.downcast_index(index)
    if not isinstance(index, faiss.IndexRefine):
        return False
    refine = faiss.downcast_index(index.refine_index)
    return isinstance(refine, faiss.IndexScalarQuantizer) and refine.ntotal > 0 and not refine.codes.is_owned


def disk_parts(index: faiss.Index) -> tuple[faiss.Index, faiss.IndexScalarQuantizer]:
    """(in-memory index, mapped vectors) of a disk-backed index."""
    if not is_disk_backed(index):
        raise ValueError("not an index that re-ranks from disk (build it from a spec ending in ,RDisk)")
    index = faiss.downcast_index(index)
    return faiss.downcast_index(index.base_index), faiss.downcast_index(index.refine_index)


def memory_bytes(index: faiss.Index) -> int:
    """Serialised size of what a disk-backed index holds in process memory: the in-memory index
    (codes, ids, coarse centroids, codebooks, projection); the vectors file is not counted."""
    return serialised_size(disk_parts(index)[0])


def disk_bytes(index: faiss.Index) -> int:
    """Size of the vectors file of a disk-backed index (header and n x d float16 values)."""
    return header_bytes(index) + disk_parts(index)[1].codes.size()


def header_bytes(index: faiss.Index) -> int:
    """Where row 0 starts in the vectors file of a disk-backed index."""
    _, vectors = disk_parts(index)
    return len(_header(vectors.ntotal, vectors.d, vectors.metric_type))


def float16_vectors(index: faiss.Index) -> np.ndarray:
    """The (n, d) float16 vectors a disk-backed index re-ranks with, as a read-only view of the mapping."""
    _, vectors = disk_parts(index)
    view = faiss.rev_swig_ptr(vectors.codes.data(), vectors.codes.size()).view(np.float16)
    view.flags.writeable = False
    return view.reshape(vectors.ntotal, vectors.d)


def page_cache_fraction(index: faiss.Index) -> float:
    """Share of the vectors file's pages that are in memory (mincore): 0.0 after a cold start."""
    start, length = _mapped_range(disk_parts(index)[1])
    pages = (ctypes.c_ubyte * ((length + _PAGE - 1) // _PAGE))()
    if _libc.mincore(start, length, pages) != 0:
        raise OSError(ctypes.get_errno(), "mincore failed on the vectors mapping")
    return sum(page & 1 for page in pages) / len(pages)


def evict_from_page_cache(index: faiss.Index) -> float:
    """Make the next search a cold one: unmap this process's pages of the vectors file and ask
    the kernel to drop the file from the page cache (posix_fadvise DONTNEED). Pages another
    index or process maps stay; the host under a virtual machine may still cache the disk. Needs the
    index as built or loaded (it knows its file) and a named file (``storage_dir`` or loaded).
    Returns :func:`page_cache_fraction` afterwards."""
    source = vectors_source(index)
    if source is None or not source.still_there():
        raise ValueError("the index's vectors file has no name (built without storage_dir) or was replaced")
    _advise(disk_parts(index)[1], mmap.MADV_DONTNEED)
    descriptor = os.open(source.path, os.O_RDONLY)
    try:
        os.fdatasync(descriptor)  # dirty pages (a file just written) cannot be dropped
        os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(descriptor)
    _advise(disk_parts(index)[1], mmap.MADV_RANDOM)
    return page_cache_fraction(index)


def copy_vectors_file(index: faiss.Index, destination) -> int:
    """Write the vectors of a disk-backed index to ``destination`` (from the mapping). Returns the header size."""
    vectors = float16_vectors(index)
    n, d = vectors.shape
    metric_type = disk_parts(index)[1].metric_type
    rows = 65_536
    return write_vectors_file(destination, (vectors[start:start + rows].astype(np.float32)
                                            for start in range(0, n, rows)), n, d, metric_type)


def temporary_vectors_path() -> Path:
    """A fresh path for an unnamed vectors file (deleted once mapped)."""
    descriptor, name = tempfile.mkstemp(prefix="fashionrec-", suffix=".f16")
    os.close(descriptor)
    return Path(name)


def link_or_copy(source, destination) -> None:
    """Put ``source`` at ``destination``: a hard link where the file system allows, else a copy."""
    destination = Path(destination)
    partial = destination.with_name(destination.name + ".partial")
    partial.unlink(missing_ok=True)
    try:
        os.link(source, partial)
    except OSError:
        shutil.copyfile(source, partial)
    os.replace(partial, destination)


def _read_only_when_disk_backed(method: str) -> None:
    """faiss aborts the whole process (FAISS_ASSERT on a viewed vector) when rows are added to,
    or removed from, an index whose float16 codes are a memory-mapped view. Guard the Python
    entry points of IndexRefine so that such a call raises instead, before faiss changes anything."""
    original = getattr(faiss.IndexRefine, method)
    if getattr(original, "refuses_disk_backed", False):
        return

    def guarded(self, *args, **kwargs):
        if is_disk_backed(self):
            raise FashionRecError(f"{method}: an index that re-ranks from a float16 vectors file is read-only; "
                                  "build a new one from all the vectors")
        return original(self, *args, **kwargs)

    guarded.refuses_disk_backed = True
    guarded.__doc__ = original.__doc__
    setattr(faiss.IndexRefine, method, guarded)


for _method in ("add", "reset"):
    _read_only_when_disk_backed(_method)


def serialised_size(index: faiss.Index) -> int:
    """Bytes ``faiss.write_index`` writes for ``index``, counted without keeping a copy."""
    total = 0

    def count(chunk: bytes) -> int:
        nonlocal total
        total += len(chunk)
        return len(chunk)

    faiss.write_index(index, faiss.PyCallbackIOWriter(count))
    return total


def _mapped_range(vectors: faiss.IndexScalarQuantizer) -> tuple[int, int]:
    address = int(faiss.rev_swig_ptr(vectors.codes.data(), 1).ctypes.data)
    start = address - address % _PAGE
    return start, address + vectors.codes.size() - start


def _advise(vectors: faiss.IndexScalarQuantizer, advice: int) -> None:
    start, length = _mapped_range(vectors)
    if _libc.madvise(start, length, advice) != 0:
        raise OSError(ctypes.get_errno(), f"madvise({advice}) failed on the vectors mapping")
