"""Frame-layer speed: reading one masked text message, gevent-websocket 0.10.1 against ours.

Stock: its per-byte unmasking loop, then its pure-Python UTF-8 validator run twice (per frame,
then per message), as its read_message() does. Ours: FrameParser.feed() on the same bytes,
which unmasks with one whole-buffer XOR and validates with the codec's incremental decoder.

Run: .venv/bin/python bench/protocol.py   (one process, no server; prints times and ratios)
"""

from __future__ import annotations

import os
import sys
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from geventwebsocket.utf8validator import Utf8Validator  # noqa: E402
from geventwebsocket.websocket import Header  # noqa: E402

from chatapp import frames  # noqa: E402


def masked_frame(payload: bytes, mask: bytes) -> bytes:
    plain = frames.encode_frame(frames.OP_TEXT, payload)
    header_size = len(plain) - len(payload)
    header = plain[:1] + bytes([plain[1] | 0x80]) + plain[2:header_size]
    return header + mask + frames.unmask(payload, mask)


def stock_read(masked_payload: bytes, mask: bytes) -> str:
    header = Header(length=len(masked_payload))
    header.mask = mask
    payload = header.unmask_payload(masked_payload)
    for _ in range(2):
        if not Utf8Validator().validate(payload)[0]:
            raise ValueError
    return payload.decode("utf-8")


def best(fn, number: int) -> float:  # type: ignore[no-untyped-def]
    """Seconds per call, best of 5 runs."""
    return min(timeit.repeat(fn, number=number, repeat=5)) / number


def main() -> None:
    mask = os.urandom(4)
    print(f"{'message':>9} {'stock':>11} {'ours':>9} {'ours ×':>7}")
    for size in (512, 65536, 1 << 20):
        payload = ("héllo wörld " * (size // 12 + 1)).encode()[:size].decode("utf-8", "ignore").encode()
        frame = masked_frame(payload, mask)
        masked_payload = frames.unmask(payload, mask)
        calls = max(1, 200_000 // size)
        stock = best(lambda p=masked_payload: stock_read(p, mask), calls)
        ours = best(lambda f=frame: frames.FrameParser(1 << 30).feed(f), calls * 20)
        print(f"{len(payload):>9} {stock * 1e6:>9.1f}µs {ours * 1e6:>7.1f}µs {stock / ours:>7.0f}")
        print(f"{'':>9} {len(payload) / stock / 1e6:>7.1f}MB/s {len(payload) / ours / 1e6:>5.0f}MB/s")


if __name__ == "__main__":
    main()
