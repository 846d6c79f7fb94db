"""Hostile input against a running service: every answer must be a 4xx, the server must keep answering.

    python benchmarks/serve_hostile.py --url http://127.0.0.1:8000 [--pid PID] [--random 1000] [--photo P] [--json]

Sends a 20000x20000 PNG (a decompression bomb: its header says 400 million pixels), a 50 MB
body, a JSON body instead of a multipart one, a request without the photo, an empty photo,
k out of range, an unknown category and ``--random`` random byte strings (seeded, 0-20 kB),
then one real photo, which must get 200. Reports the status of each kind, whether any answer
was not a 4xx, and the server's resident memory (``--pid``, read from /proc) before and after.
"""
from __future__ import annotations

import argparse
import json
import struct
import sys
import time
import zlib
from collections import Counter
from pathlib import Path

import httpx
import numpy as np


def png_claiming_size(width: int, height: int) -> bytes:
    """A well-formed PNG whose header declares width x height (8-bit grey) but whose data holds one row."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * (1 + width)))
            + chunk(b"IEND", b""))


def resident_mb(pid: int | None) -> float | None:
    if pid is None:
        return None
    status = Path(f"/proc/{pid}/status").read_text()
    return round(int(status.split("VmRSS:")[1].split()[0]) / 1024, 1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True)
    parser.add_argument("--pid", type=int, default=None, help="the server's process id (its memory is reported)")
    parser.add_argument("--random", type=int, default=1000, help="random byte strings to send")
    parser.add_argument("--photo", default=None, help="a real photo, sent last (must get 200)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    url = args.url.rstrip("/") + "/recommend"
    rng = np.random.default_rng(args.seed)
    memory_before = resident_mb(args.pid)
    statuses: dict[str, Counter] = {}
    started = time.perf_counter()
    with httpx.Client(timeout=120) as client:
        def send(kind: str, **request):
            try:
                status = client.post(url, **request).status_code
            except httpx.HTTPError as error:
                status = f"failed: {type(error).__name__}"
            statuses.setdefault(kind, Counter())[status] += 1

        send("bomb 20000x20000 PNG", files={"image": ("bomb.png", png_claiming_size(20_000, 20_000), "image/png")})
        send("50 MB body", files={"image": ("big.jpg", b"\xff\xd8" + bytes(50 * 1024 * 1024), "image/jpeg")})
        send("JSON body", json={"image": "x"})
        send("no photo", data={"k": "3"})
        send("empty photo", files={"image": ("empty.jpg", b"", "image/jpeg")})
        for k in ("0", "1000", "ten"):
            send("k out of range", files={"image": ("r.jpg", rng.bytes(100), "image/jpeg")}, data={"k": k})
        send("unknown category", files={"image": ("r.jpg", rng.bytes(100), "image/jpeg")}, data={"category": "nope"})
        for _ in range(args.random):
            send("random bytes", files={"image": ("random.jpg", rng.bytes(int(rng.integers(0, 20_000))), "image/jpeg")})
        if args.photo:
            send("real photo", files={"image": (Path(args.photo).name, Path(args.photo).read_bytes(), "image/jpeg")})
    hostile = {kind: counts for kind, counts in statuses.items() if kind != "real photo"}
    not_4xx = sum(n for counts in hostile.values() for status, n in counts.items()
                  if not (isinstance(status, int) and 400 <= status < 500))
    record = {"statuses": {kind: {str(status): n for status, n in counts.items()} for kind, counts in statuses.items()},
              "hostile_requests": sum(sum(counts.values()) for counts in hostile.values()), "not_4xx": not_4xx,
              "seconds": round(time.perf_counter() - started, 1),
              "resident_mb_before": memory_before, "resident_mb_after": resident_mb(args.pid)}
    if args.json:
        print(json.dumps(record))
    else:
        for kind, counts in record["statuses"].items():
            print(f"{kind:<22} {dict(counts)}")
        print(f"{record['hostile_requests']} hostile requests, {not_4xx} answered other than 4xx; server memory "
              f"{memory_before} -> {record['resident_mb_after']} MB")
    return 0 if not_4xx == 0 and statuses.get("real photo", Counter({200: 1})).get(200) else 1


if __name__ == "__main__":
    sys.exit(main())
