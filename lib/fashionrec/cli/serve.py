"""``serve``: the recommendations of an index folder over HTTP, for a shop's website.

    python -m fashionrec serve --index-dir OUTDIR [--host 127.0.0.1] [--port 8000] [--json-logs]
        [--max-batch 16] [--max-wait-ms 5] [--max-upload-mb 10] [--max-pixels N] [--max-k 100]
        [--timeout-s 30] [--threads N] [--watch-s 1] [--media-dir DIR]
        [--engine ray [--replicas N] [--ray-address ADDR]]

Routes, limits, the token and the metrics: docs/serve.md; OpenAPI at /docs. The write routes
(POST /items, DELETE /items/{id}, POST /reload) need ``Authorization: Bearer $FASHIONREC_API_TOKEN``
and answer 403 when the variable is not set. A version written by another process
(``python -m fashionrec index --update``) is served within ``--watch-s`` seconds, without a restart.
An ONNX index folder is served without PyTorch.
"""
from __future__ import annotations

import argparse

from ..data.images import MAX_PIXELS
from ..errors import BadParameter
from ..service.catalog import ServedIndex
from ..service.limits import ServiceLimits
from ..service.ray_engine import serve_on_ray
from ..service.server import serve
from ..serving.folder import current_version
from ..settings import InferenceSettings, available_threads
from .commands import SUMMARIES

ENGINES = ("uvicorn", "ray")
RESIZERS = ("pillow", "compiled")


def add_parser(commands) -> None:
    parser = commands.add_parser("serve", help=SUMMARIES["serve"], description=__doc__.splitlines()[0],
                                 epilog=__doc__.split("\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index-dir", required=True, help="an index folder (python -m fashionrec index ... --out)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--json-logs", action="store_true", help="log one JSON object per line (stderr)")
    parser.add_argument("--max-batch", type=int, default=16, help="most query photos embedded together (default 16)")
    parser.add_argument("--max-wait-ms", type=float, default=5.0,
                        help="longest a batch waits for photos still being decoded (default 5; an idle server "
                             "never waits)")
    parser.add_argument("--decode-threads", type=int, default=None,
                        help="photos decoded at once (default: the CPUs this process may use)")
    parser.add_argument("--max-upload-mb", type=float, default=10.0, help="largest request body (default 10 MB: 413)")
    parser.add_argument("--max-pixels", type=int, default=MAX_PIXELS,
                        help=f"largest image, read from its header before decoding (default {MAX_PIXELS}: 422)")
    parser.add_argument("--max-k", type=int, default=100, help="most results per query (default 100)")
    parser.add_argument("--timeout-s", type=float, default=30.0, help="a request not answered by then gets 503")
    parser.add_argument("--threads", type=int, default=None, help="threads of the query model (default: all CPUs)")
    parser.add_argument("--resize", choices=RESIZERS, default="pillow",
                        help="the crop's resize: pillow (default; about 4 ms a photo) or compiled (the same pixels in "
                             "0.4 ms, for about 120 MB more resident memory: numba's compiler)")
    parser.add_argument("--watch-s", type=float, default=1.0,
                        help="how often CURRENT is checked for a new version (default 1; 0: only POST /reload)")
    parser.add_argument("--media-dir", default=None,
                        help="where uploaded photos are kept (default: OUTDIR-media beside the index folder)")
    parser.add_argument("--engine", choices=ENGINES, default="uvicorn",
                        help="uvicorn (one process) or ray (Ray Serve replicas)")
    parser.add_argument("--replicas", type=int, default=1, help="Ray Serve replicas (--engine ray)")
    parser.add_argument("--ray-address", default=None, help="a Ray cluster to join (--engine ray; default: a local one)")
    parser.set_defaults(handler=run)


def run(args) -> int:
    from_ray = args.engine == "ray"
    if not from_ray and (args.replicas != 1 or args.ray_address):
        raise BadParameter("--replicas and --ray-address apply to --engine ray")
    current_version(args.index_dir)   # a missing or broken folder: say how to build one, before loading anything
    limits = _limits(args)
    settings = InferenceSettings(threads=args.threads, progress=False, compiled_resize=args.resize == "compiled")
    watch = args.watch_s or None
    if from_ray:
        serve_on_ray(args.index_dir, settings, limits, host=args.host, port=args.port, replicas=args.replicas,
                     address=args.ray_address, media_dir=args.media_dir, watch_interval_s=watch)
        return 0
    serve(ServedIndex(args.index_dir, settings, media_dir=args.media_dir), args.host, args.port, limits,
          args.json_logs, watch)
    return 0


def _limits(args) -> ServiceLimits:
    return ServiceLimits(max_upload_bytes=int(args.max_upload_mb * 1024 * 1024), max_pixels=args.max_pixels,
                         max_k=args.max_k, timeout_s=args.timeout_s, max_batch=args.max_batch,
                         max_wait_ms=args.max_wait_ms, decode_threads=args.decode_threads or available_threads())
