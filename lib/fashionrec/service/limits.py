"""What a caller may send: upload size, image pixels, k, time per request; checked before any work is done."""
from __future__ import annotations

import io
import json
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from ..data.images import MAX_PIXELS
from ..errors import BadParameter, ImageError



@dataclass(frozen=True)
class ServiceLimits:
    """``max_upload_bytes``: a request body larger is refused (413) before it is parsed; ``max_pixels``:
    an image whose header declares more is refused (422) before it is decoded; ``max_k``: the most
    results one query may ask for; ``timeout_s``: a request not answered by then gets 503;
    ``max_batch`` / ``max_wait_ms``: the dynamic batch of query photos embedded together;
    ``decode_threads``: photos decoded at once."""

    max_upload_bytes: int = 10 * 1024 * 1024
    max_pixels: int = MAX_PIXELS
    max_k: int = 100
    timeout_s: float = 30.0
    max_batch: int = 16
    max_wait_ms: float = 5.0
    decode_threads: int = 2

    def __post_init__(self):
        for name in ("max_upload_bytes", "max_pixels", "max_k", "max_batch", "decode_threads"):
            if getattr(self, name) < 1:
                raise BadParameter(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.timeout_s <= 0 or self.max_wait_ms < 0:
            raise BadParameter(f"timeout_s must be positive and max_wait_ms not negative, got {self.timeout_s}, "
                               f"{self.max_wait_ms}")

    def check_k(self, k: int) -> int:
        if not 1 <= k <= self.max_k:
            raise BadParameter(f"k must be between 1 and {self.max_k}, got {k}")
        return k

    def check_pixels(self, data: bytes, name: str) -> None:
        """ImageError for an image whose header declares more than ``max_pixels`` (nothing is decoded).

        A header Pillow cannot read is left to the decoder, which names the exact reason.
        """
        try:
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
        except Image.DecompressionBombError:
            raise ImageError(name, f"decompression bomb: more pixels than the limit of {self.max_pixels}") from None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
            return
        if width * height > self.max_pixels:
            raise ImageError(name, f"decompression bomb: {width}x{height} pixels exceeds the limit of "
                                   f"{self.max_pixels}")


class BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` gets 413 and is never handed to the application.

    A body that declares its length is refused at once; it is read (and dropped) first when it
    is at most ``drain_factor`` times the limit, so that a client still uploading reads the 413
    instead of a reset connection. A streamed body is read up to the limit, then refused.
    """

    def __init__(self, app, max_bytes: int, drain_factor: int = 8):
        self.app = app
        self.max_bytes = max_bytes
        self.drain_bytes = max_bytes * drain_factor

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        try:
            declared = int(declared) if declared is not None else None
        except ValueError:
            declared = None
        if declared is not None and declared > self.max_bytes:
            if declared <= self.drain_bytes:
                await _drain(receive)
            return await self._too_large(send)
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                return await self._too_large(send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, send) -> None:
        body = json.dumps({"error": f"request body larger than the limit of {self.max_bytes} bytes"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


async def _drain(receive) -> None:
    more = True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        more = message.get("more_body", False)


