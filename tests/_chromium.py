"""A minimal headless-Chromium driver for the report tests (DevTools protocol over a pipe, no extra package)."""

from __future__ import annotations

import fcntl
import json
import os
import select
import shutil
import subprocess
import time


class Chromium:
    """A minimal DevTools-protocol client over --remote-debugging-pipe (fds 3 and 4, NUL-separated JSON)."""

    def __init__(self, binary, profile, width=1200):
        r_in, w_in = os.pipe()
        r_out, w_out = os.pipe()
        a = fcntl.fcntl(r_in, fcntl.F_DUPFD, 10)
        b = fcntl.fcntl(w_out, fcntl.F_DUPFD, 10)
        os.close(r_in)
        os.close(w_out)
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-extensions", "--disable-default-apps", "--no-default-browser-check",
                 "--hide-scrollbars", f"--window-size={width},2000", f"--user-data-dir={profile}",
                 "--remote-debugging-pipe", "about:blank"]
        cmd = " ".join([binary, *flags]) + f" 3<&{a} 4>&{b} {a}<&- {b}>&-"
        self.proc = subprocess.Popen(["bash", "-c", "exec " + cmd], pass_fds=(a, b),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(a)
        os.close(b)
        self.w, self.r, self.buf, self.n, self.events = w_in, r_out, b"", 0, []

    def _read(self, deadline):
        while b"\0" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("chromium did not answer in time")
            if select.select([self.r], [], [], left)[0]:
                chunk = os.read(self.r, 1 << 20)
                if not chunk:
                    raise RuntimeError("chromium closed the DevTools pipe")
                self.buf += chunk
        msg, self.buf = self.buf.split(b"\0", 1)
        return json.loads(msg)

    def send(self, method, params=None, session=None, timeout=60):
        self.n += 1
        msg = {"id": self.n, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self.w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            m = self._read(deadline)
            if m.get("id") == self.n:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m.get("result", {})
            self.events.append(m)

    def wait_event(self, name, timeout=60):
        if any(e.get("method") == name for e in self.events):
            return
        deadline = time.monotonic() + timeout
        while True:
            m = self._read(deadline)
            self.events.append(m)
            if m.get("method") == name:
                return

    def drain(self, seconds):
        deadline = time.monotonic() + seconds
        try:
            while True:
                self.events.append(self._read(deadline))
        except TimeoutError:
            pass

    def close(self):
        try:
            self.send("Browser.close", timeout=10)
        except Exception:  # noqa: BLE001 - the browser may already be gone
            pass
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self.w)
        os.close(self.r)

    def open(self, url, width=None, height=2000):
        """A new tab showing ``url`` (at ``width`` CSS pixels if given); returns its session id."""
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        sid = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.send(f"{domain}.enable", session=sid)
        if width:
            self.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": height,
                                                              "deviceScaleFactor": 1, "mobile": False}, session=sid)
        self.events = [e for e in self.events if e.get("method") != "Page.loadEventFired"]
        self.send("Page.navigate", {"url": url}, session=sid)
        self.wait_event("Page.loadEventFired")
        return sid

    def evaluate(self, sid, expression):
        """The value of a JavaScript expression in the tab (returned by value)."""
        res = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True}, session=sid)
        if "exceptionDetails" in res:
            raise RuntimeError(f"JavaScript error: {res['exceptionDetails']}")
        return res["result"].get("value")


def chromium_binary():
    return shutil.which("chromium") or shutil.which("chromium-browser")


