"""Request bodies by their Content-Encoding: only the codings Cohere's API accepts, decoded incrementally
with the output bounded, so a small compressed body cannot become a large one in memory.

mitmproxy's own `.content` decodes with no output limit and with any codec Python knows by that name
(`bz2`, `zlib`, `base64`, ...): a 440-byte bz2 body decoded to 512 MiB. The gateway never uses it for
request bodies.
"""

from __future__ import annotations

import zlib

from cohere_gateway.addons.routing import RouteError

# Content-Encoding values accepted on request bodies, with zlib's wbits for each; "identity" (or none) is
# passed through untouched. gzip and deflate are what HTTP clients send and what Cohere decodes.
CODINGS: dict[str, int] = {
    "gzip": 16 + zlib.MAX_WBITS,
    "x-gzip": 16 + zlib.MAX_WBITS,
    "deflate": zlib.MAX_WBITS,
}
# Below this many compressed bytes a body is decoded on the event loop (well under a millisecond);
# larger ones in a thread.
DECODE_INLINE_BYTES = 64 * 1024


def _accepted() -> str:
    return ", ".join(["identity", *(c for c in CODINGS if not c.startswith("x-"))])


def is_identity(coding: str | None) -> bool:
    return not coding or coding.strip().lower() in ("", "identity")


def check_content_encoding(coding: str | None) -> None:
    """415 for a coding the gateway does not decode (Cohere would not either), or for a stack of them."""
    if is_identity(coding):
        return
    assert coding is not None
    if coding.strip().lower() not in CODINGS:
        raise RouteError(
            415, f"Content-Encoding {coding[:40]!r} is not accepted; send the body as {_accepted()}"
        )


def too_large(limit: int) -> RouteError:
    return RouteError(413, f"request body is larger than the gateway's limit of {limit} bytes")


def decode_body(raw: bytes, coding: str, limit: int) -> bytes:
    """The decoded body, at most `limit` bytes (413 beyond); 400 when it does not decode."""
    if is_identity(coding):
        if len(raw) > limit:
            raise too_large(limit)
        return raw
    check_content_encoding(coding)
    wbits = CODINGS[coding.strip().lower()]
    out = bytearray()
    data = raw
    try:
        while data:  # gzip allows several members back to back
            d = zlib.decompressobj(wbits)
            out += d.decompress(data, limit + 1 - len(out))
            if len(out) > limit or d.unconsumed_tail:
                raise too_large(limit)
            if not d.eof:
                raise RouteError(400, f"the {coding} request body is truncated")
            data = d.unused_data
            if wbits == zlib.MAX_WBITS:  # deflate has one stream; what follows it is garbage
                if data:
                    raise RouteError(400, f"the {coding} request body has bytes after its end")
                break
    except zlib.error:
        raise RouteError(400, f"the request body is not valid {coding}") from None
    return bytes(out)
