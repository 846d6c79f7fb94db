"""The FastAPI application of the service: thin routes over the Recommender, one error table, one token.

    POST   /recommend              multipart: image, k, category, colour_weight, exclude_id
    GET    /items/{id}             the item: id, label, image_url
    GET    /items/{id}/image       its photo
    GET    /items/{id}/similar?k=  "more like this", from its stored vector
    GET    /health                 200 with the index version and item count once loaded
    GET    /metrics                Prometheus
    POST   /items                  multipart photos + labels (+ ids): a new version      (bearer token)
    DELETE /items/{id}             a new version without it                              (bearer token)
    POST   /reload                 load the version CURRENT names now                    (bearer token)

Every answer of a query names the index version it came from and holds no server path (an
item's photo is ``image_url``). A failure is one line of JSON, ``{"error": "..."}``, with the
status :data:`STATUS_OF` gives its exception. A query photo is decoded and cropped on a worker
thread and embedded in a dynamic batch with the photos of concurrent requests
(:mod:`fashionrec.service.batcher`); a folder whose query path cannot batch (an eager
backbone, a category classifier, a colour weight) answers through ``Recommender.recommend``.
"""

import asyncio
import contextlib
import hmac
import io
import logging
import mimetypes
import re
import time
from functools import partial
from pathlib import Path
from typing import Annotated
from urllib.parse import quote

import anyio
import numpy as np
from fastapi import Depends, FastAPI, File, Form, Header, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..data.images import decode_query
from ..errors import BadParameter, FashionRecError, ImageError, IndexUnavailable, UnknownItem
from ..models.preprocess import crop_pixels
from ..models.query_model import OnnxEncoder
from ..serving.recommender import Recommendation, Recommender, Result
from .batcher import MicroBatcher
from .catalog import ServedIndex, Upload
from .limits import BodyLimit, ServiceLimits
from .metrics import ServiceMetrics

log = logging.getLogger("fashionrec.service")

STATUS_OF = ((ImageError, 422), (UnknownItem, 404), (BadParameter, 400), (IndexUnavailable, 503),
             (FashionRecError, 400))
_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/<])/(?:[^\s'\"/:,;()]+/)+[^\s'\"/:,;()]*")


class Refused(Exception):
    """A request refused before any work: its status, one-line message and headers."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.headers = status, headers


class LocalEmbedder:
    """Query crops embedded in this process, in dynamic batches (:class:`MicroBatcher`).

    At most ``limits.decode_threads`` photos are decoded at once: more threads than cores
    would only take the cores from the embedding, whose threads wait for each other at every
    layer (a descheduled one stalls the whole batch).
    """

    def __init__(self, limits: ServiceLimits, metrics: ServiceMetrics):
        self.batcher = MicroBatcher(limits.max_batch, limits.max_wait_ms, on_batch=metrics.observe_batch)
        self.decoding = anyio.CapacityLimiter(limits.decode_threads)

    async def embed(self, encoder: OnnxEncoder, prepare) -> tuple[np.ndarray, dict]:
        """``prepare()`` (decode and crop, on a worker thread) -> the crop's embedding, with the time of each stage."""
        with self.batcher.announce() as ticket:
            pixels, timing = await anyio.to_thread.run_sync(prepare, limiter=self.decoding)
            future = ticket.submit(encoder, pixels)
        queued = time.perf_counter()
        vector, batch_seconds = await asyncio.wrap_future(future)
        waited = (time.perf_counter() - queued) * 1000.0
        return vector, {**timing, "queue": max(waited - batch_seconds * 1000.0, 0.0), "embed": batch_seconds * 1000.0}

    def close(self) -> None:
        self.batcher.close()


def status_of(error: Exception) -> int:
    for kind, status in STATUS_OF:
        if isinstance(error, kind):
            return status
    return 500


def create_app(index: ServedIndex, limits: ServiceLimits | None = None, token: str | None = None,
               embedder=None, watch_interval_s: float | None = 1.0) -> FastAPI:
    """The application serving ``index``; ``token``: the bearer token of the write routes (None: they answer 403).

    ``embedder``: what embeds query crops (:class:`LocalEmbedder` by default; the Ray Serve
    deployment passes its batched method). ``watch_interval_s``: how often CURRENT is checked
    for a version another process wrote (None: only ``POST /reload``).
    """
    limits = limits or ServiceLimits()
    metrics = ServiceMetrics()
    embedder = embedder or LocalEmbedder(limits, metrics)
    index.on_swap = lambda served: metrics.serving(served.version, len(served))
    metrics.serving(index.current.version, len(index.current))
    hidden = sorted({(str(path), name) for folder, name in ((index.outdir, "the index"), (index.media_dir, "<media>"))
                     for path in (folder, folder.resolve())}, key=lambda pair: len(pair[0]), reverse=True)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if watch_interval_s:
            index.watch(watch_interval_s)
        try:
            yield
        finally:
            index.close()
            close = getattr(embedder, "close", None)
            if close is not None:
                close()

    app = FastAPI(lifespan=lifespan, title="fashionrec", version=index.current.info.get("format", ""),
                  summary="Catalog items most similar to a product photo",
                  description="Send a photo, get the most similar products of the catalog. Answers name the index "
                              "version that gave them; failures are one line of JSON: {\"error\": \"...\"}.")
    app.state.index, app.state.limits, app.state.metrics, app.state.embedder = index, limits, metrics, embedder

    def public(message: str) -> str:
        """A message without the server's paths (the index folder is "the index", any other path "<path>")."""
        for path, name in hidden:
            message = message.replace(path, name)
        return _ABSOLUTE_PATH.sub("<path>", message)

    def failure(status: int, message: str, headers: dict | None = None) -> JSONResponse:
        return JSONResponse({"error": public(" ".join(message.split()))}, status_code=status, headers=headers)

    @app.exception_handler(FashionRecError)
    async def known_failure(request: Request, error: FashionRecError):
        return failure(status_of(error), str(error))

    @app.exception_handler(Refused)
    async def refused(request: Request, error: Refused):
        return failure(error.status, str(error), error.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError):
        first = error.errors()[0] if error.errors() else {}
        where = ".".join(str(part) for part in first.get("loc", ())[1:]) or "request"
        return failure(422, f"{where}: {first.get('msg', 'invalid')}")

    @app.exception_handler(StarletteHTTPException)
    async def http_failure(request: Request, error: StarletteHTTPException):
        return failure(error.status_code, str(error.detail), getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def bug(request: Request, error: Exception):
        log.exception("unexpected failure answering %s %s", request.method, request.url.path)
        return failure(500, f"internal error ({type(error).__name__}); the server keeps answering")

    def write_access(authorization: Annotated[str | None, Header()] = None) -> None:
        if not token:
            raise Refused(403, "write routes are disabled: start the service with FASHIONREC_API_TOKEN set")
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise Refused(401, "a write route needs the header 'Authorization: Bearer <FASHIONREC_API_TOKEN>'",
                          {"WWW-Authenticate": "Bearer"})

    async def within_timeout(work):
        try:
            return await asyncio.wait_for(work, limits.timeout_s)
        except asyncio.TimeoutError:
            raise Refused(503, f"no answer within {limits.timeout_s:g} s; try again") from None

    def answer(recommendation: Recommendation, served: Recommender) -> dict:
        record = {"results": [result_record(result) for result in recommendation.results]}
        if recommendation.predicted_category is not None:
            record["predicted_category"] = recommendation.predicted_category
            record["category_probability"] = round(recommendation.category_probability, 4)
        record["timing_ms"] = {stage: round(ms, 3) for stage, ms in recommendation.timing_ms.items()}
        record["index_version"] = recommendation.index_version or served.version
        if recommendation.warnings:
            record["warnings"] = list(recommendation.warnings)
        metrics.observe_stages(recommendation.timing_ms)
        return record

    async def batched_query(served: Recommender, data: bytes, name: str, k: int, category, exclude,
                            filters) -> Recommendation:
        encoder = served.query_encoder
        started = time.perf_counter()

        def prepare():
            decode_started = time.perf_counter()
            image = decode_query(_named(data, name), encoder.draft_size, as_array=True)
            decoded = time.perf_counter()
            pixels = crop_pixels(image, encoder.spec, encoder.exact_shortcut)
            return pixels, {"decode": (decoded - decode_started) * 1000.0,
                            "preprocess": (time.perf_counter() - decoded) * 1000.0}

        vector, timing = await embedder.embed(encoder, prepare)
        search_started = time.perf_counter()
        results = await run_in_threadpool(partial(served.search_vector, vector, k, category, exclude,
                                                  filters=filters))
        done = time.perf_counter()
        timing = {**timing, "search": (done - search_started) * 1000.0, "total": (done - started) * 1000.0}
        return Recommendation(results, timing, index_version=served.version)

    @app.post("/recommend", summary="Catalog items most similar to a photo")
    async def recommend(image: Annotated[UploadFile, File(description="the photo (JPEG, PNG, WebP...)")],
                        k: Annotated[int, Form(description=f"number of results, 1..{limits.max_k}")] = 10,
                        category: Annotated[str | None, Form(description="only items of this category")] = None,
                        colour_weight: Annotated[float, Form(description="w in [0, 1]: (1-w) x network + w x "
                                                                         "product-colour similarity")] = 0.0,
                        exclude_id: Annotated[list[str] | None, Form(description="never these items")] = None,
                        filter: Annotated[list[str] | None, Form(description="only items whose attributes pass, "
                                                                             "e.g. colour=Red, price=10..50")] = None):
        limits.check_k(k)
        data = await image.read()
        name = Path(image.filename or "image").name
        limits.check_pixels(data, name)
        served = index.current
        exclude = list(exclude_id or [])
        weight = served.check_colour_weight(colour_weight)
        if isinstance(served.query_encoder, OnnxEncoder) and not served.has_classifier and weight == 0:
            recommendation = await within_timeout(batched_query(served, data, name, k, category or None, exclude,
                                                                filter or None))
        else:
            recommendation = await within_timeout(run_in_threadpool(partial(
                served.recommend, _named(data, name), k, category or None, exclude, weight, filters=filter or None)))
        return answer(recommendation, served)

    @app.get("/items/{item_id:path}/similar", summary="More like this: items similar to a catalog item")
    async def similar(item_id: str, k: Annotated[int, Query()] = 10, category: str | None = None,
                      colour_weight: float = 0.0):
        limits.check_k(k)
        served = index.current
        recommendation = await within_timeout(run_in_threadpool(served.similar_to, item_id, k, category or None, (),
                                                                colour_weight))
        return answer(recommendation, served)

    @app.get("/items/{item_id:path}/image", summary="The photo of a catalog item", response_class=FileResponse)
    def item_image(item_id: str):
        item = index.current.item(item_id)
        path = Path(item.path)
        if not path.is_file():
            raise UnknownItem(f"the photo of item {item_id!r} is no longer on the server")
        return FileResponse(path, media_type=mimetypes.guess_type(path.name)[0] or "application/octet-stream")

    @app.get("/items/{item_id:path}", summary="A catalog item")
    def item(item_id: str):
        served = index.current
        return {**result_record(served.item(item_id), score=False), "index_version": served.version}

    @app.get("/health", summary="200 with the index version and item count once loaded")
    def health():
        served = index.current
        return {"status": "ok", "index_version": served.version, "items": len(served)}

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    def prometheus():
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/items", summary="Add photos to the catalog (a new index version)", dependencies=[Depends(write_access)])
    async def add_items(photos: Annotated[list[UploadFile], File(description="one or more photos")],
                        labels: Annotated[list[str], Form(description="one category per photo, or one for all")],
                        ids: Annotated[list[str] | None, Form(description="one id per photo (default: from the "
                                                                           "photo's content)")] = None):
        if len(labels) not in (1, len(photos)):
            raise BadParameter(f"{len(photos)} photos need {len(photos)} labels (or one for all), got {len(labels)}")
        if ids is not None and len(ids) != len(photos):
            raise BadParameter(f"{len(photos)} photos need {len(photos)} ids, got {len(ids)}")
        uploads = []
        for position, photo in enumerate(photos):
            uploads.append(Upload(Path(photo.filename or f"photo-{position}").name, await photo.read(),
                                  labels[position if len(labels) > 1 else 0], ids[position] if ids else None))
        report = await run_in_threadpool(index.add, uploads)
        return report.to_dict()

    @app.delete("/items/{item_id:path}", summary="Remove an item (a new index version)",
                dependencies=[Depends(write_access)])
    async def remove_item(item_id: str):
        report = await run_in_threadpool(index.remove, [item_id])
        return report.to_dict()

    @app.post("/reload", summary="Serve the version CURRENT names now", dependencies=[Depends(write_access)])
    async def reload():
        swapped = await run_in_threadpool(index.reload)
        return {"reloaded": swapped, "index_version": index.current.version}

    app.add_middleware(RequestMetrics, metrics=metrics)
    return app


def result_record(result: Result, score: bool = True) -> dict:
    record = {"id": result.id, "label": result.label}
    if score:
        record["score"] = result.score
    record["image_url"] = f"/items/{quote(result.id, safe='')}/image"
    if result.attributes:
        record["attributes"] = result.attributes
    if result.label_probability is not None:
        record["label_probability"] = result.label_probability
    return record


def _named(data: bytes, name: str) -> io.BytesIO:
    """The upload as a file object whose name labels decoding errors."""
    stream = io.BytesIO(data)
    stream.name = name
    return stream


class RequestMetrics:
    """ASGI middleware: counts each request by route template and status, times it, and logs it."""

    def __init__(self, app, metrics: ServiceMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = 500

        async def observed_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            seconds = time.perf_counter() - started
            self.metrics.requests.labels(route, scope["method"], str(status)).inc()
            self.metrics.request_seconds.labels(route).observe(seconds)
            log.info("%s %s %d %.1f ms", scope["method"], route, status, seconds * 1000.0,
                     extra={"route": route, "method": scope["method"], "status": status,
                            "ms": round(seconds * 1000.0, 3)})


def wrap_with_limits(app: FastAPI, limits: ServiceLimits):
    """The ASGI application to run: ``app`` behind the upload size limit."""
    return BodyLimit(app, limits.max_upload_bytes)
