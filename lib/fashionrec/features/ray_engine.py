"""Batch embedding on Ray Data: the in-process embedding job, run as a ``map_batches`` job on a Ray cluster.

:func:`fashionrec.features.embed.embed_catalog` decides what to compute (files not yet in the
content-addressed cache, in catalog order) and writes the results as the same cache shards
whichever engine computed them. This module only computes: a Ray Data dataset of
(position, path) rows goes through a pool of :class:`EmbedActor` s. Each actor builds the
backbone once (same registry, same runtime, same code as in-process) and then, per batch,
decodes, stacks and runs it with :mod:`fashionrec.features.batches`, returning each row's
embedding or the reason its file could not be used.

Where it runs:

* ``address=None``: a private Ray instance on this machine, bound to 127.0.0.1 (no dashboard,
  no metrics export, no usage reporting), started for the job and shut down after it.
* ``address="auto"`` or ``"host:6379"`` (the head of a cluster started with
  ``ray start --head``): the same job on every node of that cluster. Each node needs the
  package (and its backbone weights) installed and the image paths readable (a shared
  filesystem); an actor checks that the backbone it built has the driver's cache key, so a
  node with other weights or code fails loudly instead of mixing embeddings.
* a Ray session already open in this process (``ray.init`` by the caller) is used as it is.
"""
from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from ..console import warn_once
from ..errors import FashionRecError
from ..models.backbone import Backbone
from ..models.registry import get_backbone
from ..models.runtime import DraftTransform, runtime_of, with_runtime
from ..settings import InferenceSettings, available_threads
from .batches import collate, decode, embed_batch, exact_preprocessing

# Ray reads this once, at import: "0" makes it pick the loopback address for a local node
# and bind every server there (the mode it uses on macOS and Windows).
LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
# A local start can fail when the machine is so loaded that Ray's dashboard agent takes more
# than the raylet's fixed 15 s to come up (ray-project/ray#65983); it is tried this many times.
LOCAL_START_ATTEMPTS = 3


@dataclass(frozen=True)
class BackboneRecipe:
    """How a Ray worker rebuilds the driver's backbone, and the cache key it must end up with."""

    name: str
    weights_file: str | None
    runtime: str
    draft: bool
    threads: int
    cache_key: str

    @classmethod
    def of(cls, backbone: Backbone, settings: InferenceSettings, threads: int) -> "BackboneRecipe":
        runtime = runtime_of(backbone)
        if runtime == "onnx-int8":
            raise FashionRecError("the ray engine runs the eager and onnx runtimes; onnx-int8 calibrates on the "
                                  "driver's images and is not rebuilt on workers yet (use --engine local)")
        return cls(backbone.name, settings.weights_file, runtime, isinstance(backbone.transform, DraftTransform),
                   threads, backbone.cache_key)

    def build(self) -> Backbone:
        backbone = with_runtime(get_backbone(self.name, weights_file=self.weights_file), self.runtime,
                                threads=self.threads, draft=self.draft)
        if backbone.cache_key != self.cache_key:
            raise FashionRecError(f"backbone {self.name!r} built on this Ray worker has cache key "
                                  f"{backbone.cache_key}, the driver's has {self.cache_key}: the worker has other "
                                  "weights, preprocessing or code; install the same fashionrec and weights on every "
                                  "node")
        return backbone


class EmbedActor:
    """A Ray Data actor: the backbone is built once, in ``__init__``, then every batch reuses it."""

    def __init__(self, recipe: BackboneRecipe):
        torch.set_num_threads(recipe.threads)
        self.backbone = recipe.build()
        self.spec = exact_preprocessing(self.backbone.transform)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch_tensor, reasons = collate([decode(str(path), self.backbone.transform, self.spec)
                                         for path in batch["path"]])
        return {"position": batch["position"], "vector": embed_batch(self.backbone, batch_tensor, reasons),
                "error": np.array(reasons, dtype=object)}


def embed_on_ray(paths: list[str], backbone: Backbone, settings: InferenceSettings
                 ) -> Iterator[tuple[np.ndarray, np.ndarray, list[str]]]:
    """Embeds ``paths`` on Ray; yields (positions into ``paths``, vectors, reasons) as batches finish, in any order.

    One actor per ``settings.threads`` CPUs of the cluster (default: one per CPU, one thread
    each); batches of ``settings.batch_size`` images.
    """
    with ray_session(settings.ray_address):
        import ray  # only now: ray_session sets what Ray reads at import time
        import ray.data

        threads = settings.threads or 1
        cpus = int(ray.cluster_resources().get("CPU", 1))
        actors = max(1, min(cpus // threads, math.ceil(len(paths) / settings.batch_size)))
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # embed_catalog draws its own bar on the driver
        context.print_on_execution_start = False
        _quiet_ray_data()
        rows = ray.data.from_items([{"position": position, "path": str(path)} for position, path in enumerate(paths)],
                                   override_num_blocks=max(1, math.ceil(len(paths) / settings.batch_size)))
        embedded = rows.map_batches(EmbedActor, fn_constructor_kwargs={"recipe": BackboneRecipe.of(backbone, settings,
                                                                                                  threads)},
                                    batch_size=settings.batch_size, batch_format="numpy", num_cpus=threads,
                                    compute=ray.data.ActorPoolStrategy(size=actors))
        try:
            for batch in embedded.iter_batches(batch_size=None, batch_format="numpy"):
                yield batch["position"], batch["vector"], [str(reason) for reason in batch["error"]]
        except ray.exceptions.RayError as error:
            raise FashionRecError(f"the Ray embedding job failed: {_root_cause(error)}") from None


@contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None, worker_env: dict | None = None):
    """Ray, connected for the duration: the session already open, the cluster at ``address``, or a private local one.

    A private local instance (``address`` None) binds 127.0.0.1 only, has no dashboard, no
    metrics export and no usage reporting, uses ``num_cpus`` CPUs (default: all this process
    may use) and is shut down on exit; so is a connection this function opened.
    ``worker_env`` adds environment variables to the workers of a session opened here.
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address is None:
        os.environ[LOCAL_ONLY_ENV] = "0"
    import ray

    if ray.is_initialized():
        yield
        return
    runtime_env = {"env_vars": dict(worker_env)} if worker_env else None
    if address is None:
        _start_local(ray, num_cpus or available_threads(), runtime_env)
    else:
        try:
            ray.init(address=address, log_to_driver=False, configure_logging=False, runtime_env=runtime_env)
        except (ConnectionError, RuntimeError, ValueError) as error:
            raise FashionRecError(f"cannot connect to the Ray cluster at {address!r} ({error}); start one with "
                                  "`ray start --head` and pass its address (or 'auto' on a cluster node)") from None
    try:
        yield
    finally:
        ray.shutdown()


def _start_local(ray, num_cpus: int, runtime_env: dict | None) -> None:
    from ray._private import ray_constants

    if ray_constants.ENABLE_RAY_CLUSTER:
        warn_once(f"ray was imported before {LOCAL_ONLY_ENV}=0 was set, so this local Ray may listen on every "
                  "interface; import fashionrec's ray engine (or set the variable) before ray")
    for attempt in range(1, LOCAL_START_ATTEMPTS + 1):
        try:
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False,
                     runtime_env=runtime_env, _system_config={"enable_metrics_collection": False})
            return
        except Exception as error:  # Ray raises a bare Exception when its node does not come up in time
            ray.shutdown()
            if attempt == LOCAL_START_ATTEMPTS or "timed out during startup" not in str(error):
                raise FashionRecError(f"a local Ray instance did not start ({error})") from None
            warn_once("a local Ray instance did not come up in time (a loaded machine); trying again")


def _quiet_ray_data() -> None:
    """Ray Data's per-job INFO lines and its notice that its own progress bars are off stay out of the CLI's stderr."""
    from ray.util.debug import log_once

    logging.getLogger("ray.data").setLevel(logging.WARNING)
    log_once("ray_data_progress_manager_disabled")  # marks Ray Data's one-time notice as already shown


def _root_cause(error: Exception) -> str:
    """The last line of the innermost error text Ray wraps around a worker's exception."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    causes = [line for line in lines if "FashionRecError" in line or "Error:" in line]
    return (causes[-1] if causes else lines[-1] if lines else type(error).__name__)[:500]
