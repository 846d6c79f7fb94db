"""An index folder whose vectors live in Milvus: its collections, named after the folder.

``python -m fashionrec index ... --store milvus --milvus-uri URI`` writes the usual folder (id
map, float16 embeddings, query model, build.json) but indexes the vectors in a Milvus
collection instead of ``index.faiss``; build.json's ``index`` section names the URI and the
collection. The Recommender, ``recommend`` and the app then search through Milvus.

Rows are Milvus primary keys: row i of the id map is id i. Milvus cannot renumber rows, so
removed items stay as tombstones that the Recommender filters out, and compaction rewrites
the collection (:class:`fashionrec.ranking.milvus.MilvusRowStore`).

Versions stay what they were: a version's collection is never changed. The first change a
loaded Recommender makes (an add, a compaction) copies the collection to a new one, which
the next saved version names; when a save or a build leaves versions behind, their
collections are dropped with them (:func:`drop_unreferenced_collections`).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from ..errors import IndexFolderError
from ..indexing.milvus_store import drop_collection, list_collections
from .folder import versions
from .manifest import BuildManifest

def collection_prefix(outdir) -> str:
    """Collections of one index folder share this prefix (from the folder's absolute path)."""
    return "fashionrec_" + hashlib.sha256(str(Path(outdir).resolve()).encode()).hexdigest()[:12]


def drop_unreferenced_collections(outdir, uri: str, token: str = "") -> list[str]:
    """Drops the folder's collections that no version on disk names any more; returns their names."""
    outdir = Path(outdir)
    referenced = set()
    for name in versions(outdir):
        try:
            manifest = BuildManifest.read(outdir / name)
        except IndexFolderError:
            continue
        if manifest.store == "milvus":
            referenced.add(manifest.index["collection"])
    prefix = collection_prefix(outdir)
    dropped = [name for name in list_collections(uri, token) if name.startswith(prefix) and name not in referenced]
    for name in dropped:
        drop_collection(uri, name, token)
    return dropped
