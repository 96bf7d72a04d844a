"""--address, checked before Ray is imported (DESIGN.md "Serving: bounded, bound, stoppable"):
what it may be, and a bounded first contact with the cluster it names.

    check_address(a)   None or "local" (a Ray instance of our own), "auto" (the cluster this
                       machine runs), HOST:PORT or ray://HOST:PORT (host non-empty, IPv6 in
                       brackets, port 1..65535); anything else is one ConfigError line
    reach(a)           HOST:PORT / ray://HOST:PORT: a TCP connection within CONNECT_TIMEOUT_S,
                       else one line naming the address (Ray itself retries for minutes)
"""
from __future__ import annotations

import re
import socket
import threading
from typing import Optional, Tuple

from var_ssg.common.errors import ConfigError
from var_ssg.common.text import shown

CONNECT_TIMEOUT_S = 30.0
FORMS = "local, auto, HOST:PORT or ray://HOST:PORT (IPv6 in brackets: [::1]:6379)"
_HOST = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,252}[A-Za-z0-9])?|[A-Za-z0-9]")
_IPV6 = re.compile(r"\[(?P<host>[0-9A-Fa-f:.]{2,45})\]")


def endpoint(address: Optional[str]) -> Optional[Tuple[str, int]]:
    """(host, port) of HOST:PORT or ray://HOST:PORT; None for a local instance or "auto". Raises
    ConfigError for anything else."""
    if address is None or address in ("local", "auto"):
        return None
    if not isinstance(address, str) or not address.strip():
        raise ConfigError(f"--address is empty: give {FORMS}, or leave it out to run in this process")
    rest = address[len("ray://"):] if address.startswith("ray://") else address
    host, sep, port = rest.rpartition(":")
    bad = f"--address {shown(address)} is not an address: give {FORMS}"
    if not sep or not port:
        raise ConfigError(bad)
    if host.startswith("["):
        m = _IPV6.fullmatch(host)
        if not m:
            raise ConfigError(bad)
        host = m.group("host")
        try:
            socket.inet_pton(socket.AF_INET6, host)
        except OSError:
            raise ConfigError(f"--address {shown(address)}: {shown(host)} is not an IPv6 address") from None
    elif ":" in host:
        raise ConfigError(f"--address {shown(address)}: put an IPv6 host in brackets ([::1]:6379)")
    elif not _HOST.fullmatch(host):
        raise ConfigError(f"--address {shown(address)}: the host must be a name or an IP address (it is "
                          f"{'empty' if not host else shown(host)}); give {FORMS}")
    if not (port.isascii() and port.isdigit() and len(port) <= 5 and 1 <= int(port) <= 65535):
        raise ConfigError(f"--address {shown(address)}: the port must be in 1..65535, got {shown(port, 20)}")
    return host, int(port)


def check_address(address: Optional[str]) -> None:
    endpoint(address)


def reach(address: Optional[str], timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Open (and close) a TCP connection to the cluster `address` names, within `timeout_s`;
    one ConfigError line naming the address if nothing answers."""
    ep = endpoint(address)
    if ep is None:
        return
    done: list = []

    def connect():                      # name resolution has no timeout of its own: a thread bounds it
        try:
            socket.create_connection(ep, timeout=timeout_s).close()
            done.append(None)
        except socket.timeout:
            done.append(f"no answer within {timeout_s:g} s")
        except OSError as e:
            done.append(e.strerror or type(e).__name__)
    t = threading.Thread(target=connect, name="ray-address-probe", daemon=True)
    t.start()
    t.join(timeout_s + 1)
    why = done[0] if done else f"no answer within {timeout_s:g} s"
    if why is None:
        return
    raise ConfigError(f"no Ray cluster answers at --address {shown(address)} ({why}): start one there "
                      f"(ray start --head) or give the right address")
