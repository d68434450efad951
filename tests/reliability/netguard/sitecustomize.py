"""Network guard for covreport's reliability tests: no connection leaves the process.

Imported by ``tests/reliability/conftest.py`` (for the test process and the
DataLoader workers it forks) and, through ``PYTHONPATH``, as the
``sitecustomize`` of every ``covreport`` subprocess the tests start, where it
installs itself when ``COVREPORT_NETGUARD=1``.

A blocked call raises :class:`NetworkBlocked` (an ``OSError``, so code sees an
offline machine) and is recorded: in the test process in
:data:`ATTEMPTS` (the conftest fails the test if any), in a subprocess as a
line ``COVREPORT-NETGUARD-BLOCKED ...`` on stderr, which the tests look for.
Unix-domain sockets (local inter-process communication) are allowed.
"""

import os
import socket
import sys

ATTEMPTS = []
MARKER = "COVREPORT-NETGUARD-BLOCKED"
_ORIGINAL = {}


class NetworkBlocked(OSError):
    """A network connection or name lookup was attempted while the network is blocked."""


def _family(sock):
    try:
        return sock.family
    except OSError:  # pragma: no cover - closed socket
        return None


def _blocked(what, target):
    ATTEMPTS.append((what, repr(target)))
    try:
        sys.stderr.write(f"{MARKER} {what} {target!r}\n")
    except Exception:  # pragma: no cover - stderr closed
        pass
    return NetworkBlocked(f"network access blocked in covreport's reliability tests: {what} {target!r}")


def install():
    """Patch socket connect/connect_ex/sendto and name resolution (idempotent)."""
    if _ORIGINAL:
        return
    _ORIGINAL.update(
        connect=socket.socket.connect, connect_ex=socket.socket.connect_ex,
        sendto=socket.socket.sendto, getaddrinfo=socket.getaddrinfo,
        gethostbyname=socket.gethostbyname, gethostbyname_ex=socket.gethostbyname_ex,
    )

    def connect(self, address):
        if _family(self) == socket.AF_UNIX:
            return _ORIGINAL["connect"](self, address)
        raise _blocked("connect", address)

    def connect_ex(self, address):
        if _family(self) == socket.AF_UNIX:
            return _ORIGINAL["connect_ex"](self, address)
        raise _blocked("connect_ex", address)

    def sendto(self, data, *args):
        if _family(self) == socket.AF_UNIX:
            return _ORIGINAL["sendto"](self, data, *args)
        raise _blocked("sendto", args[-1] if args else None)

    def getaddrinfo(host, *args, **kwargs):
        raise _blocked("getaddrinfo", host)

    def gethostbyname(host):
        raise _blocked("gethostbyname", host)

    def gethostbyname_ex(host):
        raise _blocked("gethostbyname_ex", host)

    socket.socket.connect = connect
    socket.socket.connect_ex = connect_ex
    socket.socket.sendto = sendto
    socket.getaddrinfo = getaddrinfo
    socket.gethostbyname = gethostbyname
    socket.gethostbyname_ex = gethostbyname_ex


def uninstall():
    """Restore the original socket functions."""
    if not _ORIGINAL:
        return
    socket.socket.connect = _ORIGINAL["connect"]
    socket.socket.connect_ex = _ORIGINAL["connect_ex"]
    socket.socket.sendto = _ORIGINAL["sendto"]
    socket.getaddrinfo = _ORIGINAL["getaddrinfo"]
    socket.gethostbyname = _ORIGINAL["gethostbyname"]
    socket.gethostbyname_ex = _ORIGINAL["gethostbyname_ex"]
    _ORIGINAL.clear()


if os.environ.get("COVREPORT_NETGUARD") == "1":
    install()
