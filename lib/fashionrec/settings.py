"""How to run a backbone over images: one object instead of six keyword arguments.

The same settings travel from the command line, the notebooks and the app down to the
embedding loop; none of them changes an embedding except ``runtime`` (and ``weights_file``,
which names other weights), and both of those are part of the embedding cache key.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace

RUNTIMES = ("eager", "onnx", "onnx-int8")
DEFAULT_RUNTIME = "onnx"
STORES = ("faiss", "milvus")
ENGINES = ("local", "ray")


@dataclass(frozen=True)
class InferenceSettings:
    """Inference options shared by every stage that embeds images.

    ``batch_size`` images per forward pass; ``workers`` threads that decode each batch (None:
    one per CPU this process may use; 0: the calling thread); ``threads`` intra-op threads of
    the runtime (None: every CPU this process may use);
    ``runtime`` one of ``RUNTIMES`` (``onnx``: equal to eager within 1e-4, several times
    faster on a CPU; ``onnx-int8`` changes embeddings and is used only when asked for);
    ``progress`` shows progress bars (only ever on a terminal); ``weights_file`` replaces a
    backbone's published weights with a local state_dict file. ``engine`` says where images
    are embedded: ``"local"`` (this process and its decoding threads) or ``"ray"`` (a Ray Data
    job on the cluster at ``ray_address``, or on a private local one when None); both write
    the same cache and give the same embeddings (within float noise). ``compiled_resize``: a
    single query's resize and crop run in compiled kernels (0.4 ms a photo against Pillow's 4,
    the same pixels), which take about 0.8 s to load once per process; False suits a process that
    answers a few photos and exits.
    """

    batch_size: int = 32
    workers: int | None = None
    threads: int | None = None
    runtime: str = DEFAULT_RUNTIME
    progress: bool = True
    weights_file: str | None = None
    engine: str = "local"
    ray_address: str | None = None
    compiled_resize: bool = True

    def __post_init__(self):
        if self.runtime not in RUNTIMES:
            raise ValueError(f"unknown runtime {self.runtime!r}; available: {', '.join(RUNTIMES)}")
        if self.engine not in ENGINES:
            raise ValueError(f"unknown engine {self.engine!r}; available: {', '.join(ENGINES)}")
        if self.ray_address is not None and self.engine != "ray":
            raise ValueError("ray_address applies only to the ray engine")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.workers is not None and self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")

    def but(self, **changes) -> "InferenceSettings":
        """A copy with some settings changed: ``settings.but(progress=False)``."""
        return replace(self, **changes)


@dataclass(frozen=True)
class StoreSettings:
    """Where the vectors of a search live (see fashionrec.ranking.rank.gallery_store).

    ``store``: ``"faiss"`` (in this process, the default) or ``"milvus"``; ``milvus_uri``: a
    Milvus Lite file (a path ending in ``.db``; None: ``results/milvus.db``) or a server's
    ``http://host:19530``; ``milvus_token``: credentials for a server that asks for them.
    """

    store: str = "faiss"
    milvus_uri: str | None = None
    milvus_token: str = ""

    def __post_init__(self):
        if self.store not in STORES:
            raise ValueError(f"unknown store {self.store!r}; available: {', '.join(STORES)}")
        if self.milvus_uri is not None and self.store != "milvus":
            raise ValueError("milvus_uri applies only to the milvus store")

def available_threads() -> int:
    """CPUs this process may run on (respects taskset / cgroup affinity)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
