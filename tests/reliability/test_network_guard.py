"""The network guard of the reliability suite itself: it must block, and let local IPC through."""

import socket
import subprocess
import sys

import pytest

from reliability_helpers import netguard, subprocess_env


def test_tcp_connect_and_dns_are_blocked_and_recorded():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        with pytest.raises(netguard.NetworkBlocked):
            s.connect(("127.0.0.1", 9))
    finally:
        s.close()
    with pytest.raises(OSError):
        socket.create_connection(("example.org", 80), timeout=1)
    assert [a[0] for a in netguard.ATTEMPTS] == ["connect", "getaddrinfo"]
    netguard.ATTEMPTS.clear()  # recorded on purpose here; the autouse check must not fail


def test_unix_sockets_still_work():
    a, b = socket.socketpair(socket.AF_UNIX)
    with a, b:
        a.sendall(b"ok")
        assert b.recv(2) == b"ok"


def test_subprocess_guard(tmp_path):
    code = "import socket; socket.create_connection(('127.0.0.1', 9), timeout=1)"
    proc = subprocess.run([sys.executable, "-c", code], env=subprocess_env(tmp_path),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert netguard.MARKER in proc.stderr and "NetworkBlocked" in proc.stderr
