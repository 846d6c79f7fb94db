"""``app``: the recommendation app (Streamlit) in the browser, over an index folder.

Without ``--index-dir`` it serves the default index: a fine-tuned EfficientNet-Lite0 (or a
student distilled on the same catalog) of the clothing photos when they are on this machine,
else of Fashion-MNIST (fetched if needed), built once into data/processed/indexes
(:mod:`fashionrec.experiment.default_index`).
"""
from __future__ import annotations

import os
import sys

from .. import config
from ..errors import FashionRecError
from ..experiment.default_index import ensure_default_index
from ..serving.folder import current_version
from ..settings import InferenceSettings
from .commands import SUMMARIES
from .common import add_store_arguments, serving_store

APP_FILE = config.PROJECT_ROOT / "app" / "streamlit_app.py"


def add_parser(commands) -> None:
    parser = commands.add_parser("app", help=SUMMARIES["app"],
                                 description=__doc__.splitlines()[0])
    parser.add_argument("--index-dir", default=None, help="index folder to serve (default: build/reuse the default)")
    parser.add_argument("--port", type=int, default=8501)
    parser.add_argument("--address", default="127.0.0.1", help="address to listen on (default: this machine only)")
    add_store_arguments(parser, default=None, what="where the index's vectors are searched")
    parser.set_defaults(handler=run)


def run(args) -> int:
    if not APP_FILE.is_file():
        raise FashionRecError(f"{APP_FILE}: the app is not there (run from a clone of the project)")
    store = serving_store(args)
    index_dir = args.index_dir or ensure_default_index(InferenceSettings())
    current_version(index_dir)   # a missing or broken folder: say how to build one, before starting a server
    command = [sys.executable, "-m", "streamlit", "run", str(APP_FILE), "--server.port", str(args.port),
               "--server.address", args.address, "--server.headless", "true",
               "--browser.gatherUsageStats", "false", "--client.toolbarMode", "minimal", "--", "--index-dir",
               str(index_dir)]
    if store is not None:   # the app reads the token from the environment it inherits, never from its arguments
        command += ["--store", store.store] + (["--milvus-uri", store.milvus_uri] if store.milvus_uri else [])
    print(f"[app] serving {index_dir} on http://{args.address}:{args.port} (Ctrl-C stops it)", file=sys.stderr,
          flush=True)
    # Replaced by the server process, so that signals (Ctrl-C, a service manager's SIGTERM) reach it directly.
    os.execv(sys.executable, command)
