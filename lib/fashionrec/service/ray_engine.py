"""The same application as a Ray Serve deployment: replicas behind Ray's proxy, photos batched with ``@serve.batch``.

Each replica loads the index folder itself (:class:`~fashionrec.service.catalog.ServedIndex`),
follows CURRENT like the single-process service, and embeds the crops of concurrent requests
together in a ``@serve.batch`` method (``max_batch_size``, ``batch_wait_timeout_s``) in place of
the single-process batcher; the routes, limits, answers and errors are those of
:func:`~fashionrec.service.app.create_app`. Ray is imported only when this engine is used.
"""
from __future__ import annotations

import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
from starlette.concurrency import run_in_threadpool

from ..models.query_model import run_query_model
from ..settings import InferenceSettings
from .app import create_app, wrap_with_limits
from .catalog import ServedIndex
from .limits import ServiceLimits
from .server import api_token, warn_if_exposed

APPLICATION = "fashionrec"


class BatchedEmbedder:
    """Embeds each request's crop through ``batched(encoder, pixels)``, a ``@serve.batch`` method."""

    def __init__(self, batched):
        self.batched = batched

    async def embed(self, encoder, prepare) -> tuple[np.ndarray, dict]:
        pixels, timing = await run_in_threadpool(prepare)
        queued = time.perf_counter()
        vector, batch_seconds = await self.batched(encoder, pixels)
        waited = (time.perf_counter() - queued) * 1000.0
        return vector, {**timing, "queue": max(waited - batch_seconds * 1000.0, 0.0), "embed": batch_seconds * 1000.0}


def embed_together(encoders: list, crops: list[np.ndarray]) -> list[tuple[np.ndarray, float]]:
    """One batch of crops -> (vector, seconds of its batch) each; crops of different query models run apart."""
    answers: list = [None] * len(crops)
    groups: dict[int, list[int]] = {}
    for position, encoder in enumerate(encoders):
        groups.setdefault(id(encoder), []).append(position)
    for positions in groups.values():
        started = time.perf_counter()
        vectors = run_query_model(encoders[positions[0]].session, np.stack([crops[i] for i in positions]))
        seconds = time.perf_counter() - started
        for row, position in enumerate(positions):
            answers[position] = (vectors[row], seconds)
    return answers


def deployment(index_dir: str, settings: InferenceSettings, limits: ServiceLimits, replicas: int,
               media_dir: str | None, watch_interval_s: float | None, token: str | None):
    """The bound Ray Serve application: one deployment, ``replicas`` copies, each loading the index itself."""
    from ray import serve

    @serve.deployment(num_replicas=replicas, max_ongoing_requests=max(4 * limits.max_batch, 16))
    @serve.ingress()
    class FashionRec:
        def __init__(self):
            self.index = ServedIndex(index_dir, settings, media_dir=media_dir)
            if watch_interval_s:
                self.index.watch(watch_interval_s)

        def __serve_build_asgi_app__(self):
            app = create_app(self.index, limits, token, embedder=BatchedEmbedder(self.embed_batch),
                             watch_interval_s=None)
            return wrap_with_limits(app, limits)

        @serve.batch(max_batch_size=limits.max_batch, batch_wait_timeout_s=limits.max_wait_ms / 1000.0)
        async def embed_batch(self, encoders: list, crops: list) -> list:
            return await run_in_threadpool(embed_together, encoders, crops)

    return FashionRec.bind()


def serve_on_ray(index_dir, settings: InferenceSettings, limits: ServiceLimits, host: str = "127.0.0.1",
                 port: int = 8000, replicas: int = 1, address: str | None = None, media_dir=None,
                 watch_interval_s: float | None = 1.0) -> None:
    """Starts (or joins) a Ray cluster and runs the application on Ray Serve's HTTP proxy at ``host:port``
    until interrupted; then the application is deleted (and a local cluster this started, stopped)."""
    import ray
    from ray import serve

    token = api_token()
    warn_if_exposed(host, token)
    ray.init(address=address or "local", ignore_reinit_error=True, log_to_driver=False, include_dashboard=False)
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(deployment(str(Path(index_dir).resolve()), settings, limits, replicas, media_dir,
                             watch_interval_s, token), name=APPLICATION, route_prefix="/")
        print(f"serving {Path(index_dir).name} on Ray Serve ({replicas} replica(s)) at http://{host}:{port} "
              "(OpenAPI: /docs)", file=sys.stderr, flush=True)
        stop = threading.Event()
        for received in (signal.SIGINT, signal.SIGTERM):
            signal.signal(received, lambda *_: stop.set())
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()
