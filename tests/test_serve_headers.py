"""The header bound (serving.headers) under load: slow and oversized header blocks, on a plain
uvicorn server running the protocol Ray Serve's proxy runs (127.0.0.1, started and stopped
here, in this process). The same bound inside a real Ray Serve proxy: tests/test_serve.py."""
import asyncio
import socket
import threading
import time

import pytest

pytestmark = pytest.mark.slow


async def _app(scope, receive, send):
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


@pytest.fixture
def server(monkeypatch):
    """(host, port) of a uvicorn server with HeaderLimitProtocol, 1.5 s header timeout."""
    import uvicorn
    from var_ssg.serving.headers import ENV_HEADER_TIMEOUT, HeaderLimitProtocol
    monkeypatch.setenv(ENV_HEADER_TIMEOUT, "1.5")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    cfg = uvicorn.Config(_app, http=HeaderLimitProtocol, lifespan="off", log_config=None, access_log=False,
                         timeout_keep_alive=30)
    srv = uvicorn.Server(cfg)
    t = threading.Thread(target=srv.run, kwargs=dict(sockets=[sock]), daemon=True)
    t.start()
    while not srv.started:
        time.sleep(0.02)
    yield sock.getsockname()
    srv.should_exit = True
    t.join(10)
    sock.close()
    assert not t.is_alive()


def _status(s: socket.socket, timeout=10.0) -> int:
    """The status of the answer on `s`; 0 if it was closed without one."""
    s.settimeout(timeout)
    data = b""
    try:
        while b"\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    except (ConnectionResetError, socket.timeout):
        pass
    return int(data.split()[1]) if data.startswith(b"HTTP/1.1 ") else 0


def _closed(s: socket.socket) -> bool:
    s.settimeout(5)
    try:
        while s.recv(65536):
            pass
        return True
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def _send_all(s, data):
    try:
        s.sendall(data)
    except (BrokenPipeError, ConnectionResetError):
        pass                                # refused mid-send: the answer is still there to read


def test_a_plain_request_passes_and_keep_alive_still_works(server):
    with socket.create_connection(server) as s:
        s.settimeout(10)
        for _ in range(3):                  # one connection, three requests
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            data = b""
            while not data.endswith(b"\r\n\r\nok"):
                data += s.recv(4096)
            assert data.startswith(b"HTTP/1.1 200 ")


def test_slow_headers_get_408_and_are_closed(server):
    """The issue's probe, bounded: 100 connections that send a request line and part of a header
    block, then nothing: each is answered 408 and closed within the timeout."""
    conns = []
    t0 = time.monotonic()
    for _ in range(100):
        s = socket.create_connection(server)
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        conns.append(s)
    quiet = socket.create_connection(server)          # sends nothing at all
    try:
        deadline = t0 + 10                  # the timeout is 1.5 s: all answered well within this
        got = [_status(s, timeout=max(0.05, deadline - time.monotonic())) for s in conns + [quiet]]
        assert got == [408] * 101
        assert all(_closed(s) for s in conns + [quiet])
    finally:
        for s in conns + [quiet]:
            s.close()


@pytest.mark.parametrize("case", ["one-huge-header", "many-headers", "huge-url"])
def test_oversized_headers_get_431(server, case):
    with socket.create_connection(server) as s:
        if case == "one-huge-header":      # 32 MiB, sent in pieces: refused after 64 KiB
            _send_all(s, b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: ")
            for _ in range(512):
                _send_all(s, b"a" * 65536)
        elif case == "many-headers":       # 20,000 small headers in one block
            _send_all(s, b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(20000)) + b"\r\n")
        else:
            _send_all(s, b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _status(s) == 431 and _closed(s)


def test_headers_just_under_the_bound_pass(server):
    with socket.create_connection(server) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Fill: " + b"a" * 60000 + b"\r\n\r\n")
        assert _status(s) == 200
