"""Running the service: uvicorn on one machine, with plain or JSON log lines."""
from __future__ import annotations

import ipaddress
import json
import logging
import os
import socket
import sys
import time

import uvicorn

from ..console import warn_once
from .app import create_app, wrap_with_limits
from .catalog import ServedIndex
from .limits import ServiceLimits

TOKEN_VARIABLE = "FASHIONREC_API_TOKEN"


class JsonLines(logging.Formatter):
    """One JSON object per log record: time, level, logger, message and the request's fields when present."""

    FIELDS = ("route", "method", "status", "ms")

    def format(self, record: logging.LogRecord) -> str:
        line = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
                "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
        line.update({name: getattr(record, name) for name in self.FIELDS if hasattr(record, name)})
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line)


def log_config(json_lines: bool) -> dict:
    """uvicorn's logging configuration: our request lines replace its access log."""
    formatter = {"()": f"{__name__}.JsonLines"} if json_lines else {"format": "%(asctime)s %(levelname)s %(message)s"}
    handler = {"class": "logging.StreamHandler", "formatter": "default", "stream": "ext://sys.stderr"}
    return {"version": 1, "disable_existing_loggers": False, "formatters": {"default": formatter},
            "handlers": {"default": handler},
            "loggers": {"uvicorn": {"handlers": ["default"], "level": "INFO", "propagate": False},
                        "uvicorn.access": {"handlers": [], "level": "WARNING", "propagate": False},
                        "fashionrec.service": {"handlers": ["default"], "level": "INFO", "propagate": False}}}


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
        except (OSError, ValueError):
            return False


def api_token() -> str | None:
    return os.environ.get(TOKEN_VARIABLE) or None


def warn_if_exposed(host: str, token: str | None) -> None:
    if token is None and not is_loopback(host):
        warn_once(f"serving on {host}, reachable from other machines, without {TOKEN_VARIABLE}: the write routes "
                  "(POST /items, DELETE /items/{id}, POST /reload) answer 403; set it to enable them")


def serve(index: ServedIndex, host: str = "127.0.0.1", port: int = 8000, limits: ServiceLimits | None = None,
          json_logs: bool = False, watch_interval_s: float | None = 1.0) -> None:
    """Runs the service on uvicorn until interrupted."""
    limits = limits or ServiceLimits()
    token = api_token()
    warn_if_exposed(host, token)
    app = wrap_with_limits(create_app(index, limits, token, watch_interval_s=watch_interval_s), limits)
    print(f"serving {index.outdir.name} version {index.current.version} ({len(index.current)} items) on "
          f"http://{host}:{port} (OpenAPI: /docs)", file=sys.stderr)
    uvicorn.run(app, host=host, port=port, log_config=log_config(json_logs), access_log=False,
                timeout_graceful_shutdown=5)
