"""--address (cluster.address): checked before any work, and a cluster that does not answer is
one line within a bounded time, never a hang (Ray itself retries for minutes)."""
import socket
import time

import pytest

from var_ssg.cluster.address import endpoint, reach
from var_ssg.common.errors import ConfigError
from tests.conftest import TINY, alarm_guard
from tests.test_reliability_inputs import cli, one_line_error

SAMPLE = ["--model", TINY, "--random-init", "0", "--classes", "1", "--per-class", "1"]


@pytest.fixture
def bounded():
    """A hang turns into a failure after 60 s."""
    with alarm_guard("--address hung"):
        yield


@pytest.mark.parametrize("address,msg", [
    ("", "--address is empty"),
    ("   ", "--address is empty"),
    ("local:5", "no Ray cluster answers at --address 'local:5'"),    # the probes (no host 'local')
    ("[::1]:99999", "the port must be in 1..65535, got '99999'"),
    ("127.0.0.1:0", "the port must be in 1..65535"),
    ("127.0.0.1:" + "9" * 10_000, "the port must be in 1..65535"),
    (":6379", "the host must be a name or an IP address (it is empty)"),
    ("::1:6379", "put an IPv6 host in brackets"),
    ("[nothost]:6379", "is not an address"),
    ("127.0.0.1", "is not an address"),
    ("head\nERROR: fake:6379", "--address 'head\\nERROR: fake:6379'"),       # escaped: no forged line
])
def test_bad_addresses_are_one_line_before_any_work(capsys, tmp_path, bounded, address, msg):
    line = one_line_error(cli(capsys, "sample", *SAMPLE, "--out", tmp_path / "s.npz", "--address", address), msg)
    assert len(line) < 400 and "\n" not in line
    assert not (tmp_path / "s.npz").exists()


def _closed_port() -> int:
    with socket.socket() as s:           # a port nothing listens on (bound, then released)
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_nothing_listening_is_one_line_naming_the_address(capsys, tmp_path, bounded):
    """The issue's probe: sample.py --address 127.0.0.1:PORT with nothing there."""
    addr = f"127.0.0.1:{_closed_port()}"
    t0 = time.monotonic()
    line = one_line_error(cli(capsys, "sample", *SAMPLE, "--out", tmp_path / "s.npz", "--address", addr),
                          f"no Ray cluster answers at --address '{addr}'")
    assert time.monotonic() - t0 < 30 and "Connection refused" in line


def test_a_silent_host_is_bounded_by_the_timeout():
    """A listener that never accepts (backlog full) stands in for a host that drops packets."""
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(0)
        fill = []
        try:
            for _ in range(64):             # fill the backlog: later connects wait
                c = socket.socket()
                c.setblocking(False)
                c.connect_ex(srv.getsockname())
                fill.append(c)
            t0 = time.monotonic()
            try:
                reach(f"127.0.0.1:{srv.getsockname()[1]}", timeout_s=0.5)
            except ConfigError as e:
                assert "no answer within 0.5 s" in str(e) or "refused" in str(e)
            assert time.monotonic() - t0 < 5
        finally:
            for c in fill:
                c.close()


def test_good_addresses():
    assert endpoint(None) is None and endpoint("local") is None and endpoint("auto") is None
    assert endpoint("10.0.0.2:6379") == ("10.0.0.2", 6379)
    assert endpoint("ray://head.example:10001") == ("head.example", 10001)
    assert endpoint("[::1]:6379") == ("::1", 6379)
