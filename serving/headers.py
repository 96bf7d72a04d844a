"""The header bound at the HTTP proxy (no Ray import): a request's header block must arrive
within HEADER_TIMEOUT_S (else 408) and hold at most MAX_HEADER_BYTES (request line and every
header, else 431); either answer closes the connection. DESIGN.md "Serving: bounded, bound, stoppable".

Neither Ray Serve (2.60: its HTTPOptions set only the keep-alive timeout) nor uvicorn's httptools
protocol (the one Ray Serve's proxy runs) has a setting for either; uvicorn only bounds
keep-alive idling. So the bound is a subclass of uvicorn's own protocol, and `install()` names
it as the protocol uvicorn's "auto" choice loads. install() runs in the proxy process alone,
from the proxy callback (serving.proxy.middlewares), before the proxy builds its server.

Counting: the raw bytes received while a header block is incomplete (a 32 MiB header is refused
after 64 KiB, not buffered), and the parsed sizes of the URL and headers when the block
completes inside one read (a block that arrives whole is refused before any deployment sees it).
"""
from __future__ import annotations

import json
import logging
import os

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger(__name__)

MAX_HEADER_BYTES = 64 * 1024
HEADER_TIMEOUT_S = 10.0
ENV_HEADER_TIMEOUT = "VAR_SSG_HEADER_TIMEOUT_S"
PROTOCOL = "var_ssg.serving.headers:HeaderLimitProtocol"

_REASONS = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}


def header_timeout_s() -> float:
    return float(os.environ.get(ENV_HEADER_TIMEOUT, HEADER_TIMEOUT_S))


class HeaderLimitProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with each request's header block bounded in time and size."""

    max_header_bytes = MAX_HEADER_BYTES

    def connection_made(self, transport) -> None:
        self._refused = False
        super().connection_made(transport)
        self._timeout_s = header_timeout_s()
        self._await_headers()

    def _await_headers(self) -> None:
        """A header block is due: start counting and the clock."""
        self._in_headers, self._raw, self._parsed = True, 0, 0
        self._header_timer = self.loop.call_later(self._timeout_s, self._headers_late)

    def _headers_done(self) -> None:
        self._in_headers = False
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if self._in_headers and not self._refused:
            self._refuse(408, f"the request headers did not arrive within {self._timeout_s:g} s")

    def _refuse(self, status: int, message: str) -> None:
        self._refused = True
        self._headers_done()
        body = json.dumps({"error": message}).encode()
        self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                             b"connection: close\r\n\r\n" % (status, _REASONS[status], len(body)) + body)
        self.transport.close()

    def _too_large(self) -> None:
        self._refuse(431, f"the request line and headers exceed {self.max_header_bytes // 1024} KiB")

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._in_headers:
            self._raw += len(data)
        super().data_received(data)
        if self._in_headers and not self._refused and self._raw > self.max_header_bytes:
            self._too_large()                # still incomplete, and already too long

    def connection_lost(self, exc) -> None:
        self._headers_done()
        super().connection_lost(exc)

    # parser callbacks
    def on_message_begin(self) -> None:
        if not self._in_headers:             # the next request on a kept-alive connection
            self._await_headers()
        super().on_message_begin()

    def on_url(self, url: bytes) -> None:
        self._parsed += len(url)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._parsed += len(name) + len(value) + 4
        if self._parsed <= self.max_header_bytes:
            super().on_header(name, value)

    def on_headers_complete(self) -> None:
        if self._refused:
            return
        if self._parsed > self.max_header_bytes:
            self._too_large()
            return
        self._headers_done()
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if not self._refused:
            super().on_message_complete()


def install() -> None:
    """Make uvicorn's "auto" HTTP protocol this one, in this process (the proxy's)."""
    from uvicorn import config
    config.HTTP_PROTOCOLS["auto"] = PROTOCOL
