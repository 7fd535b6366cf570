"""Tests for simple_comet.py: the server is started as users start it, as a
subprocess on port 4080 (others on free ports and unix sockets), and
driven with http.client and raw sockets. The JavaScript client is run in
headless Chromium, and the README's nginx configuration in a real nginx;
those tests are skipped when Chromium or nginx is not installed.

    python3 -m unittest -v test_simple_comet
"""

import asyncio
import atexit
import base64
import contextlib
import fcntl
import gc
import grp
import hashlib
import hmac
import http.client
import http.server
import ipaddress
import itertools
import json
import math
import os
import random
import re
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import unittest
from unittest import mock
from urllib.parse import quote, urlencode

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "simple_comet.py")
sys.path.insert(0, HERE)
import simple_comet  # noqa: E402  (unit checks of a few pure functions)

PORT = 4080
MAIN_POLL_TIMEOUT = 3.0    # long enough to push into a held poll calmly

_names = itertools.count()


def fresh(prefix="ch"):
    """A channel or client id no other test uses."""
    return f"{prefix}{next(_names)}_{os.getpid()}"


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------

def report(text):
    """Figures for the README's Reliability section, with SIMPLE_COMET_REPORT=1."""
    if os.environ.get("SIMPLE_COMET_REPORT"):
        print(f"\n  figure: {text}", file=sys.stderr)


# Time bounds hold on a slow, shared, noisy machine: a default run bounds
# only what must never happen (a stall of seconds) and waits on conditions,
# not on sleeps; SIMPLE_COMET_LONG=1 checks the tight latency figures too,
# which SIMPLE_COMET_REPORT=1 prints.
STRICT = bool(os.environ.get("SIMPLE_COMET_LONG"))


def bound(loose, strict):
    """A time bound: `strict` in SIMPLE_COMET_LONG runs, else `loose`."""
    return strict if STRICT else loose


def wait_for(predicate, timeout=5.0, interval=0.01):
    """predicate()'s first true value; fails once `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("condition not reached in time")


class Background(threading.Thread):
    """Runs a (blocking) call in a thread; .result() joins and returns."""

    def __init__(self, fn, *args, **kw):
        super().__init__(daemon=True)
        self.fn, self.args, self.kw = fn, args, kw
        self.value = self.error = None
        self.start()

    def run(self):
        try:
            self.value = self.fn(*self.args, **self.kw)
        except BaseException as e:       # reported by result()
            self.error = e

    def result(self, timeout=10):
        self.join(timeout)
        if self.is_alive():
            raise AssertionError("background call did not finish")
        if self.error:
            raise self.error
        return self.value


def _ephemeral_ports():
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = map(int, f.read().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    return low, high


_EPHEMERAL = _ephemeral_ports()


def free_port():
    """A TCP port nothing listens on (IPv4 or IPv6).  It is drawn below the
    kernel's range of ephemeral ports, so that no outgoing connection can
    take it before a server binds it; another process can still draw it,
    which ServerProcess (retrying) and the callers allow for."""
    low = _EPHEMERAL[0]
    for _ in range(200):
        port = random.randrange(10_000, low) if low > 11_000 else 0
        try:
            with socket.socket(socket.AF_INET) as s:
                s.bind(("0.0.0.0", port))
                port = s.getsockname()[1]
                try:
                    v6 = socket.socket(socket.AF_INET6)
                except OSError:
                    return port                 # no IPv6 here
                with v6:
                    v6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                    v6.bind(("::", port))
                return port
        except OSError:
            continue
    raise RuntimeError("no free port found")


def stop_process(proc, sig=signal.SIGTERM, timeout=10):
    """Send sig (then SIGCONT, in case the process was stopped) and wait:
    the exit code, or None if it had to be killed after `timeout`."""
    if proc is None:
        return None
    if proc.poll() is None:
        try:
            proc.send_signal(sig)
            if sig != signal.SIGKILL:
                proc.send_signal(signal.SIGCONT)
        except OSError:
            pass
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return None


def file_text(path, tail=3000):
    """A log file's text (its last `tail` characters; all with None)."""
    try:
        with open(path, errors="replace") as f:
            text = f.read()
    except OSError:
        return ""
    return text[-tail:] if tail else text


FREE = "free"


class ServerProcess:
    """simple_comet.py in a subprocess, as users start it, its log in a
    temporary file; the one way the tests start a server.

    port=FREE (the default) gives it a free TCP port, and another if that
    one was taken before the server bound it; port=N that port; port=None
    no TCP listener (args then name a unix socket).  The port goes in as
    --http-port=N, or in place of "{port}" where an argument holds that.
    Unless wait=False the server is waited for until each of its listeners
    is up.  stderr=FD sends the log there instead (nothing to read then).
    .port is the TCP port."""

    def __init__(self, *args, port=FREE, env=None, wait=True, stderr=None):
        self.free = port is FREE
        self.port = free_port() if self.free else port
        self.template = args
        self.env = None if env is None else {**os.environ, **env}
        self.stderr = stderr
        self.log = None
        self.signalled = False
        self._spawn()
        if wait:
            self.wait_listening()

    def _spawn(self):
        args = [a.replace("{port}", str(self.port)) for a in self.template]
        if self.port is not None and args == list(self.template):
            assert not any(a.startswith("--http-port") for a in args), \
                "the port is ServerProcess's port=, or {port} in an argument"
            args.insert(0, f"--http-port={self.port}")
        self.args = args
        self.unix = any(a in ("--unix-socket-path", "--unix-socket") or
                        a.startswith(("--unix-socket-path=",
                                      "--unix-socket="))
                        for a in args)
        self.quiet = any(a.lower() in ("--log-level=warning",
                                       "--log-level=error") for a in args)
        if self.stderr is None:
            self.log = tempfile.NamedTemporaryFile(prefix="comet-log-")
        self.proc = subprocess.Popen(
            [sys.executable, SCRIPT, *args], stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL if self.log is None else self.log,
            stderr=self.stderr or self.log, env=self.env)
        self.signalled = False

    def output(self):
        if self.log is None:
            return ""
        with open(self.log.name, encoding="utf-8", errors="replace") as f:
            return f.read()

    def _ready(self):
        if self.log is not None and not self.quiet:
            output = self.output()
            return (("listening on http://" in output or self.port is None)
                    and ("listening on unix:" in output or not self.unix))
        try:
            if self.port is not None:
                connect(self.port, timeout=1).close()
            return True
        except OSError:
            return False

    def wait_listening(self, timeout=15):
        """Wait until the server listens; on a free port found taken, start
        it again on another."""
        for attempt in range(5):
            deadline = time.monotonic() + timeout
            while not self._ready():
                if self.proc.poll() is not None:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError("server did not start: "
                                       + self.output())
                time.sleep(0.01)
            else:
                return
            output = self.output()
            if not self.free or attempt == 4 or not (
                    "in use" in output or self.log is None):
                raise RuntimeError("server exited: " + output)
            if self.log is not None:
                self.log.close()
            self.port = free_port()
            self._spawn()

    def send_signal(self, sig=signal.SIGTERM):
        """Send sig (and SIGCONT, in case it was stopped); stop() then waits
        without sending another."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.send_signal(signal.SIGCONT)
            self.signalled = True

    def stop(self, sig=signal.SIGTERM, timeout=10):
        """Stop the server with sig (unless send_signal() was already sent) and
        wait for it: its exit code.  One still running after `timeout` is
        killed, and that is an error."""
        if self.signalled and self.proc.poll() is None:
            try:
                code = self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                code = stop_process(self.proc, signal.SIGKILL)
                raise AssertionError(f"server still running {timeout} s "
                                     "after its signal") from None
        else:
            code = stop_process(self.proc, sig, timeout)
            if code is None:
                raise AssertionError(f"server still running {timeout} s "
                                     f"after {signal.Signals(sig).name}")
        self.signalled = False
        return code

    def stop_clean(self, timeout=10):
        """SIGTERM (unless send_signal() was sent): exit 0, no traceback.  Its
        output."""
        code = self.stop(timeout=timeout)
        output = self.output()
        assert code == 0 and "Traceback" not in output, (code, output[-3000:])
        return output

    def close(self):
        """Stop (if still running) and clean up; for cleanups."""
        try:
            if self.proc.poll() is None:
                self.stop()
        finally:
            if self.log is not None:
                self.log.close()


def run_server(*args, timeout=10, env=None, cwd=None):
    """Run the server to completion (for switches that make it exit)."""
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                          cwd=cwd,
                          env=None if env is None else {**os.environ, **env})


def run_servers(cases, timeout=30):
    """run_server(*args, env=env) for each (args, env) of cases, all at
    once (they are short and mostly start up): their results, in order."""
    jobs = [Background(run_server, *args, env=env, timeout=timeout)
            for args, env in cases]
    return [job.result(timeout + 5) for job in jobs]


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path, timeout=5):
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


def call(method, path, params=None, headers=None, port=PORT, unix=None,
         body=None, timeout=10):
    """One request on a new connection: (response, body bytes)."""
    headers = dict(headers or {})
    if params is not None:
        if method in ("GET", "HEAD", "OPTIONS", "DELETE"):
            path += "?" + urlencode(params)
        else:
            body = urlencode(params)
            headers.setdefault("Content-Type",
                               "application/x-www-form-urlencoded")
    if unix:
        conn = UnixHTTPConnection(unix, timeout=timeout)
    else:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body, headers)
        resp = conn.getresponse()
        return resp, resp.read()
    finally:
        conn.close()


def api(method, path, params=None, **kw):
    """A request whose reply must be HTTP 200 JSON: the decoded object."""
    resp, data = call(method, path, params, **kw)
    assert resp.status == 200, (resp.status, data)
    return json.loads(data)


def register(name=None, port=PORT, **params):
    name = name or fresh()
    reply = api("POST", "/channels.json", {"channel_id": name, **params},
                port=port)
    assert reply["return_code"] == 1, reply
    return name


def register_unix(path):
    name = fresh()
    reply = api("POST", "/channels.json", {"channel_id": name}, unix=path)
    assert reply["return_code"] == 1, reply
    return name


def push(name, content, port=PORT):
    reply = api("POST", f"/channels/{quote(name, safe='')}.json",
                {"content": content}, port=port)
    assert reply["return_code"] == 1, reply
    return reply


def read(names, port=PORT, **params):
    path = "/channels/" + "%7C".join(quote(n, safe="") for n in names) + ".json"
    return api("GET", path, params, port=port)


def status(port=PORT):
    return api("GET", "/status.json", port=port)["status"]


def status_unix(path):
    return api("GET", "/status.json", unix=path)["status"]


def wait_held(count, port=PORT):
    wait_for(lambda: status(port)["held_connections_count"] == count)


def connect(port=PORT, timeout=5):
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def connect_unix(path, timeout=5):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(path)
    return s


def split_head(head):
    """A response head (bytes up to its blank line, lines ending in CRLF):
    (status line, status, headers with lower-case names)."""
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return lines[0], int(lines[0].split()[1]), headers


def read_head(f):
    """A response head read from a socket's binary file: (status, headers),
    or None on a closed connection."""
    lines = [f.readline()]
    if not lines[0]:
        return None
    while lines[-1] not in (b"\r\n", b""):
        lines.append(f.readline())
    _, code, headers = split_head(b"".join(lines))
    return code, headers


def read_response(f):
    """One response from a socket's binary file: (status, headers, body)
    with lower-case header names; None on a closed connection."""
    head = read_head(f)
    if head is None:
        return None
    code, headers = head
    return code, headers, f.read(int(headers.get("content-length", 0)))


def exchange(data, port=PORT, timeout=5):
    """Send raw bytes, read until the server closes: list of responses."""
    with connect(port, timeout) as s:
        s.sendall(data)
        f = s.makefile("rb")
        replies = []
        while True:
            reply = read_response(f)
            if reply is None:
                return replies
            replies.append(reply)


def get_request(path, extra=""):
    return (f"GET {path} HTTP/1.1\r\nHost: localhost\r\n{extra}\r\n").encode()


def channel_path(name, suffix=".json"):
    return f"/channels/{quote(name, safe='')}{suffix}"


def post_request(path, params):
    """The bytes of one form POST (for pipelining)."""
    body = urlencode(params).encode()
    return (f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: "
            f"application/x-www-form-urlencoded\r\nContent-Length: "
            f"{len(body)}\r\n\r\n").encode() + body


def pipeline(requests, port, timeout=30):
    """Write the requests back to back on one keep-alive connection and
    read every reply: [(status, headers, body)].  A thread writes while this
    one reads, so full socket buffers cannot stall the two sides."""
    with connect(port, timeout) as s:
        writer = Background(s.sendall, b"".join(requests))
        f = s.makefile("rb")
        replies = []
        for _ in requests:
            reply = read_response(f)
            if reply is None:
                break
            replies.append(reply)
        writer.result(timeout)
        return replies


def pipelined_replies(port, requests, batch=200):
    """Send requests pipelined on one connection, batch by batch: the
    decoded JSON replies, in order (HTTP status 200 required)."""
    replies = []
    with connect(port, timeout=30) as s:
        f = s.makefile("rb")
        for i in range(0, len(requests), batch):
            chunk = requests[i:i + batch]
            s.sendall(b"".join(chunk))
            for _ in chunk:
                code, headers, body = read_response(f)
                assert code == 200, (code, body)
                replies.append(json.loads(body))
    return replies


def push_many(name, count, port):
    """count pushes pipelined on one connection (fast): their ids."""
    request = post_request(channel_path(name), {"content": "filler"})
    replies = pipelined_replies(port, [request] * count)
    assert all(reply["return_code"] == 1 for reply in replies), replies[-1]
    return [reply["message_id"] for reply in replies]


def sse_path(names, query=""):
    """The stream URL of a list of channels (%7C between them)."""
    return ("/channels/" + "%7C".join(quote(n, safe="") for n in names)
            + ".sse" + query)


def tcp_inode(local_port, remote_port):
    """The inode of the TCP socket between these ports on this machine (0
    once its process has closed it and the kernel alone keeps it), or None
    when there is none."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                if (int(fields[1].rsplit(":", 1)[1], 16) == local_port and
                        int(fields[2].rsplit(":", 1)[1], 16) == remote_port):
                    return int(fields[9])
    return None


def unread_requests(port):
    """How many connections to `port` on this machine hold bytes the
    server has not read yet (accepted or not)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                if (int(fields[1].rsplit(":", 1)[1], 16) == port and
                        fields[3] == "01" and
                        int(fields[4].split(":")[1], 16) > 0):
                    count += 1
    return count


def traced(pid):
    """Whether every thread of process pid is traced (strace attached)."""
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                if not re.search(r"^TracerPid:\s*[1-9]", f.read(), re.M):
                    return False
    except FileNotFoundError:
        return False
    return True


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


class SSE:
    """One EventSource stream on a raw socket: the tests' one client of
    streams.

    The request is sent and the response head parsed at once (status,
    headers with lower-case names). For a 200 the opening block is read
    into .opening; for any other status the whole body into .body (and
    .json when it is JSON). next() then returns the body's items one by
    one: {"comment": text, "raw": bytes} for a comment line, or, at the
    blank line that ends an event, {"id"|"event"|"data"|"retry": str, ...,
    "raw": bytes} with raw the exact bytes from its first line through the
    blank line. next() returns None once the stream has ended (.reset tells
    whether it ended with a reset rather than a clean close).  Through nginx
    the body comes chunked; SSE decodes that too.  follow() reads on in a
    thread instead, as a browser does."""

    def __init__(self, port, path, headers=(), version="1.1", timeout=5,
                 unix=None, rcvbuf=None, sock=None):
        self.timeout = timeout
        if sock is None:
            sock = socket.socket(socket.AF_UNIX if unix else socket.AF_INET,
                                 socket.SOCK_STREAM)
            if rcvbuf:     # set before connecting so the window stays small
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.settimeout(timeout)
            sock.connect(unix or ("127.0.0.1", port))
        self.sock = sock
        lines = [f"GET {path} HTTP/{version}"]
        if version == "1.1":
            lines.append("Host: localhost")
        lines += ["Accept: text/event-stream", "Accept-Encoding: gzip"]
        lines += [f"{name}: {value}" for name, value in headers]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        self.raw = b""            # received, not yet decoded
        self.body = b""           # the decoded body so far
        self.pos = 0              # how far next() has parsed the body
        self.start = None         # where the event being parsed began
        self.fields = {}
        self.ended = self.reset = False
        self.chunked = False
        deadline = time.monotonic() + timeout
        while b"\r\n\r\n" not in self.raw:
            if not self._recv(deadline):
                raise AssertionError("no response head: %r" % self.raw)
        head, self.raw = self.raw.split(b"\r\n\r\n", 1)
        self.status_line, self.status, self.headers = split_head(head)
        self.chunked = "chunked" in self.headers.get("transfer-encoding", "")
        self._decode()
        self.opening = self.json = None
        if self.status == 200:
            while b"\n\n" not in self.body:
                if not self._more(deadline):
                    raise AssertionError("stream ended before its opening: "
                                         "%r" % self.body)
            end = self.body.index(b"\n\n") + 2
            self.opening, self.pos = self.body[:end], end
        else:
            length = self.headers.get("content-length")
            while (length is None or len(self.body) < int(length)) \
                    and self._more(deadline):
                pass
            if length is not None:
                self.body = self.body[:int(length)]
            if self.headers.get("content-type", "").startswith(
                    "application/json"):
                self.json = json.loads(self.body)

    # -- bytes in ---------------------------------------------------------

    def _recv(self, deadline):
        """Receive more bytes; False once the connection has ended."""
        if self.ended:
            return False
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError("nothing from the stream in %.1f s"
                                 % self.timeout)
        self.sock.settimeout(left)
        try:
            data = self.sock.recv(1 << 16)
        except socket.timeout:
            raise AssertionError("nothing from the stream in %.1f s"
                                 % self.timeout) from None
        except ConnectionResetError:
            self.reset, data = True, b""
        if not data:
            self.ended = True
            return False
        self.raw += data
        return True

    def _decode(self):
        """Move what has been received into the body (undoing chunking)."""
        if not self.chunked:
            self.body += self.raw
            self.raw = b""
            return
        while b"\r\n" in self.raw:
            size_line, rest = self.raw.split(b"\r\n", 1)
            size = int(size_line.split(b";")[0], 16)
            if size == 0:           # the last chunk: the body has ended
                self.ended, self.raw = True, b""
                return
            if len(rest) < size + 2:
                return
            self.body += rest[:size]
            self.raw = rest[size + 2:]

    def _more(self, deadline):
        """More body bytes; False once the body has ended."""
        while not self.ended:
            before = len(self.body)
            if not self._recv(deadline):
                break
            self._decode()
            if len(self.body) > before:
                return True
        self._decode()
        return False

    # -- items out --------------------------------------------------------

    def _parse(self):
        while True:
            end = self.body.find(b"\n", self.pos)
            if end < 0:
                return None
            line, begin, self.pos = self.body[self.pos:end], self.pos, end + 1
            if not line:
                if self.start is None:
                    continue           # a blank line after a comment
                item = dict(self.fields, raw=self.body[self.start:self.pos])
                self.start, self.fields = None, {}
                return item
            if line.startswith(b":") and self.start is None:
                return {"comment": line[1:].decode(), "raw": line + b"\n"}
            if self.start is None:
                self.start = begin
            name, _, value = line.decode().partition(":")
            if value.startswith(" "):
                value = value[1:]
            if name == "data" and "data" in self.fields:
                value = self.fields["data"] + "\n" + value
            self.fields[name] = value

    def next(self, timeout=5):
        """The next item, or None once the stream has ended."""
        deadline = time.monotonic() + timeout
        while True:
            item = self._parse()
            if item is not None:
                item["at"] = time.monotonic()
                return item
            if not self._more(deadline):
                # An event cut short by the end (say a last "retry: R\n"
                # without its blank line) comes out once, marked partial.
                if self.start is not None or self.pos < len(self.body):
                    start = self.pos if self.start is None else self.start
                    item = dict(self.fields, raw=self.body[start:],
                                partial=True, at=time.monotonic())
                    tail = self.body[self.pos:]
                    if tail:
                        name, _, value = tail.decode(errors="replace") \
                            .partition(":")
                        item.setdefault(name, value.lstrip(" "))
                    self.start, self.fields = None, {}
                    self.pos = len(self.body)
                    return item
                return None

    def event(self, timeout=5):
        """The next event (comments skipped); fails if the stream ends."""
        while True:
            item = self.next(timeout)
            if item is None:
                raise AssertionError("stream ended; body so far: %r"
                                     % self.body[-300:])
            if "comment" not in item:
                return item

    def message(self, timeout=5):
        """The next event, which must be a message: its decoded data."""
        item = self.event(timeout)
        assert "event" not in item and "id" in item, item
        return json.loads(item["data"])

    def contents_until(self, last, timeout=5):
        """Contents of the messages up to and including `last`."""
        got = []
        while not got or got[-1] != last:
            got.append(self.message(timeout)["content"])
        return got

    def within(self, seconds):
        """Every item arriving within `seconds` (the stream may go on)."""
        items, deadline = [], time.monotonic() + seconds
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return items
            try:
                item = self.next(left)
            except AssertionError:       # nothing more in time
                return items
            if item is None:
                return items
            items.append(item)

    def rest(self, timeout=5):
        """Every item up to the end of the stream, which must come."""
        items, deadline = [], time.monotonic() + timeout
        while True:
            item = self.next(max(0.01, deadline - time.monotonic()))
            if item is None:
                return items
            items.append(item)

    # -- read by a thread -------------------------------------------------

    def follow(self):
        """Read on in a thread of its own (nothing else may read the stream
        then): .events fills with the events, comments left out, each
        {"data": decoded JSON, "at": arrival time} with its "id" or
        "event"; .closed is set once the stream has ended.  Returns self."""
        self.events, self.closed = [], threading.Event()
        if self.status != 200:
            self.closed.set()
            return self

        def run():
            try:
                while (item := self.next(timeout=3600)) is not None:
                    if "data" in item and not item.get("partial"):
                        event = {k: item[k] for k in ("id", "event")
                                 if k in item}
                        event["data"] = json.loads(item["data"])
                        event["at"] = item["at"]
                        self.events.append(event)
            except (OSError, ValueError, AssertionError):
                pass
            finally:
                self.closed.set()
        threading.Thread(target=run, daemon=True).start()
        return self

    def arrived(self):
        """The data of the message events follow() has seen, in order."""
        return [e["data"] for e in list(self.events) if "event" not in e]

    def wait_arrived(self, count, timeout=5):
        """arrived() once it holds `count` messages or the stream ended."""
        wait_for(lambda: len(self.arrived()) >= count or self.closed.is_set(),
                 timeout)
        return self.arrived()

    def close(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)   # wakes a follow() thread
        except OSError:
            pass
        self.sock.close()


class RedisProcess:
    """A redis-server of the test's own: loopback only, no persistence (so
    a restart comes back empty), files in a temporary directory. stop()
    and start() again reuse the same port."""

    def __init__(self, *args, port=None):
        self.dir = tempfile.TemporaryDirectory(prefix="comet-redis-")
        self.port = port or free_port()
        self.socket_path = os.path.join(self.dir.name, "redis.sock")
        self.args = args
        self.proc = self.log = None
        # A run cut short skips tearDownClass; redis-server would outlive it.
        atexit.register(self.stop)
        for attempt in range(5):
            try:
                self.start()
                return
            except RuntimeError:
                # A free port can be drawn by another process meanwhile.
                self.stop()
                if port is not None or attempt == 4 or \
                        "in use" not in self.output():
                    raise
                self.port = free_port()

    def start(self):
        self.log = open(os.path.join(self.dir.name, "redis.log"), "ab")
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", self.dir.name,
             "--unixsocket", self.socket_path, "--unixsocketperm", "700",
             "--enable-debug-command", "yes", *self.args],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("redis-server exited: " + self.output())
            try:
                with socket.create_connection(("127.0.0.1", self.port), 1) as s:
                    s.sendall(b"PING\r\n")
                    # +PONG, or -NOAUTH when it wants a password: up either way.
                    if s.recv(100)[:1] in (b"+", b"-"):
                        return
            except OSError:
                pass
            time.sleep(0.01)
        raise RuntimeError("redis-server did not start: " + self.output())

    def output(self):
        return file_text(os.path.join(self.dir.name, "redis.log"))

    def pause(self):
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)     # in case it was paused
        stop_process(self.proc, signal.SIGTERM, 10)
        if self.log is not None and not self.log.closed:
            self.log.close()

    def close(self):
        self.stop()
        atexit.unregister(self.stop)
        self.dir.cleanup()

    @property
    def url(self):
        return f"redis://127.0.0.1:{self.port}"


def follow(port, names, since=None, last_event_id=None, client_id=None):
    """A stream of these channels read by a thread (SSE.follow())."""
    params = {}
    if since is not None:
        params["since"] = since
    if client_id is not None:
        params["client_id"] = client_id
    headers = [] if last_event_id is None else [("Last-Event-ID",
                                                 str(last_event_id))]
    return SSE(port, sse_path(names, "?" + urlencode(params) if params else
                              ""), headers=headers).follow()


# ---------------------------------------------------------------------------
# The main server, shared by most tests
# ---------------------------------------------------------------------------

MAIN = None
PART = os.environ.get("SIMPLE_COMET_PART")


def setUpModule():
    global MAIN
    if PART in ("C", "D"):
        return                   # the first process runs the main server
    MAIN = ServerProcess("--enable-status",
                         f"--poll-timeout={MAIN_POLL_TIMEOUT}", port=PORT)


def tearDownModule():
    if MAIN is None:
        return
    try:
        MAIN.stop_clean()
    finally:
        MAIN.close()


# ---------------------------------------------------------------------------
# A0. The pure parts, in process: request heads, parameters, ids, bodies,
# JSON-P (no server needed; the Redis URL and RESP reader are under C3)
# ---------------------------------------------------------------------------

from simple_comet import (  # noqa: E402
    APIError, HTTPError, body_length, callback_error, check_id,
    decode_params, frame_body, parse_head)


def head(*lines, end=b"\r\n"):
    """A request head of these lines (bytes), each ended by `end`."""
    return b"".join(line + end for line in lines) + end


class ParseHeadTests(unittest.TestCase):
    """simple_comet.parse_head: what it makes of a request head, and the
    status and message of each refusal."""

    def refused(self, data, status, message):
        with self.assertRaises(HTTPError) as caught:
            parse_head(data)
        self.assertEqual((caught.exception.status, caught.exception.message),
                         (status, message), data[:80])
        self.assertTrue(caught.exception.close)

    def test_request_line_and_headers(self):
        request = parse_head(head(b"GET /channels/a.json?since=1&cb=x HTTP/1.1",
                                  b"Host: example.org",
                                  b"X-Spaced:  \t value with  spaces \t",
                                  b"Accept: a", b"accept: b",
                                  b"X-Latin: caf\xe9"))
        self.assertEqual((request.method, request.path, request.query,
                          request.version),
                         ("GET", "/channels/a.json", "since=1&cb=x",
                          "HTTP/1.1"))
        self.assertEqual(request.headers, {
            "host": "example.org", "x-spaced": "value with  spaces",
            "accept": "a, b", "x-latin": "caf\xe9"})
        self.assertEqual(request.body, b"")
        # A fragment is no part of the path; a target without ? has no query.
        request = parse_head(head(b"DELETE /channels/b.json#top HTTP/1.1",
                                  b"Host: x"))
        self.assertEqual((request.method, request.path, request.query),
                         ("DELETE", "/channels/b.json", ""))

    def test_keep_alive(self):
        cases = [(b"HTTP/1.1", None, True), (b"HTTP/1.1", b"close", False),
                 (b"HTTP/1.1", b"Keep-Alive", True),
                 (b"HTTP/1.1", b"foo, Close", False),
                 (b"HTTP/1.0", None, False), (b"HTTP/1.0", b"keep-alive", True),
                 (b"HTTP/1.0", b"Keep-Alive", True), (b"HTTP/1.0", b"close", False)]
        for version, connection, keep in cases:
            with self.subTest(version=version, connection=connection):
                lines = [b"GET / " + version, b"Host: x"]
                if connection is not None:
                    lines.append(b"Connection: " + connection)
                self.assertIs(parse_head(head(*lines)).keep_alive, keep)

    def test_line_endings(self):
        """CRLF, bare LF, and the two mixed; a bare CR anywhere is 400."""
        for data in (head(b"GET /a HTTP/1.1", b"Host: x"),
                     head(b"GET /a HTTP/1.1", b"Host: x", end=b"\n"),
                     b"GET /a HTTP/1.1\r\nHost: x\n\r\n",
                     b"GET /a HTTP/1.1\nHost: x\r\n\n"):
            with self.subTest(data=data):
                request = parse_head(data)
                self.assertEqual((request.path, request.headers),
                                 ("/a", {"host": "x"}))
        for data in (b"GET / HTTP/1.1\r\nHost: x\rX: y\r\n\r\n",
                     b"GET / HTTP/1.1\nHost: x\rX: y\n\n",
                     b"GET / HTTP/1.1\r\nHost: x\r\r\n\r\n",
                     b"GET /\r HTTP/1.1\nHost: x\n\n"):
            with self.subTest(data=data):
                self.refused(data, 400, "Bare CR in request head")

    def test_control_characters(self):
        for data in (head(b"G\x00T / HTTP/1.1", b"Host: x"),
                     head(b"GET / HTTP/1.1", b"Host: x", b"X: a\x01b"),
                     head(b"GET / HTTP/1.1", b"Host: x", b"X: a\x7f"),
                     head(b"GET / HTTP/1.1", b"Host: x", b"X: \x1b[0m")):
            with self.subTest(data=data):
                self.refused(data, 400, "Control character in request head")
        # A tab may stand in a value, not in the target.
        self.assertEqual(parse_head(head(b"GET / HTTP/1.1", b"Host: x",
                                         b"X: a\tb")).headers["x"], "a\tb")
        self.refused(head(b"GET /a\tb HTTP/1.1", b"Host: x"), 400,
                     "Malformed request line")

    def test_sizes(self):
        """8 KiB of request line, 16 KiB of headers, 100 header lines."""
        line = b"GET /" + b"a" * (8192 - len(b"GET / HTTP/1.1")) + b" HTTP/1.1"
        self.assertEqual(len(line), 8192)
        self.assertEqual(len(parse_head(head(line, b"Host: x")).path), 8192 - 13)
        self.refused(head(line.replace(b"/", b"/a", 1), b"Host: x"), 414,
                     "Request line over 8192 bytes")
        hundred = [b"Host: x"] + [b"X%d: v" % i for i in range(99)]
        self.assertEqual(len(parse_head(head(b"GET / HTTP/1.1",
                                             *hundred)).headers), 100)
        self.refused(head(b"GET / HTTP/1.1", *hundred, b"X: one more"), 431,
                     "More than 100 header lines")
        self.refused(head(b"GET / HTTP/1.1", b"Host: x", b"X: " + b"a" * 16400),
                     431, "Headers over 16384 bytes")
        # Repeated lines count one by one, even the same one.
        self.refused(head(b"GET / HTTP/1.1", b"Host: x", *[b"X: a"] * 100), 431,
                     "More than 100 header lines")

    def test_malformed_request_lines(self):
        for line in (b"GET", b"GET /", b"GET / HTTP/1.1 extra",
                     b"GET  / HTTP/1.1", b" GET / HTTP/1.1", b"G(T / HTTP/1.1",
                     b"GET@ / HTTP/1.1", b"GET  HTTP/1.1"):
            with self.subTest(line=line):
                self.refused(head(line, b"Host: x"), 400,
                             "Malformed request line")
        self.refused(head(b"GET /\xff HTTP/1.1", b"Host: x"), 400,
                     "Non-ASCII byte in request line")
        for version in (b"HTTP/2.0", b"HTTP/0.9", b"HTTP/3.0"):
            with self.subTest(version=version):
                self.refused(head(b"GET / " + version, b"Host: x"), 505,
                             f"{version.decode()} is not supported; use HTTP/1.1")
        for version in (b"HTTX/1.1", b"HTTP/1.10", b"HTTP/1", b"http/1.1",
                        b"HTTP/a.b"):
            with self.subTest(version=version):
                self.refused(head(b"GET / " + version, b"Host: x"), 400,
                             "Malformed HTTP version")

    def test_targets(self):
        """The absolute form names its path; * only for OPTIONS."""
        cases = {b"http://localhost:4080/channels/a.json?since=2":
                 ("/channels/a.json", "since=2"),
                 b"HTTPS://example.org/x": ("/x", ""),
                 b"http://example.org": ("/", ""),
                 b"/channels/a%7Cb.json": ("/channels/a%7Cb.json", "")}
        for target, (path, query) in cases.items():
            with self.subTest(target=target):
                request = parse_head(head(b"GET " + target + b" HTTP/1.1",
                                          b"Host: x"))
                self.assertEqual((request.path, request.query), (path, query))
        self.assertEqual(parse_head(head(b"OPTIONS * HTTP/1.1", b"Host: x")).path,
                         "/*")
        for target in (b"*", b"nopath", b"ftp://h/x", b"http:/h/x",
                       b"channels/a.json"):
            with self.subTest(target=target):
                self.refused(head(b"GET " + target + b" HTTP/1.1", b"Host: x"),
                             400, "Malformed request target")

    def test_header_lines(self):
        """No colon, an empty or non-token name, space before the colon and
        obs-fold (a line starting with space) are refused."""
        for line in (b"No colon", b": empty name", b"Host : x", b" Host: x",
                     b"\tX: y", b"X Y: z", b"X\": y", b"caf\xe9: x"):
            with self.subTest(line=line):
                self.refused(head(b"GET / HTTP/1.1", b"Host: x", line), 400,
                             "Malformed header line")
        self.refused(head(b"GET / HTTP/1.1", b"Host: x", b"X: a", b" folded"),
                     400, "Malformed header line")

    def test_host_and_content_length(self):
        """One Host (HTTP/1.1 needs it); Content-Length repeated only with
        the same value."""
        self.refused(head(b"GET / HTTP/1.1"), 400,
                     "HTTP/1.1 request without Host header")
        self.assertEqual(parse_head(head(b"GET / HTTP/1.0")).headers, {})
        for hosts in ((b"a", b"b"), (b"a", b"a")):
            with self.subTest(hosts=hosts):
                self.refused(head(b"GET / HTTP/1.1", b"Host: " + hosts[0],
                                  b"Host: " + hosts[1]), 400,
                             "Conflicting host headers")
        request = parse_head(head(b"POST / HTTP/1.1", b"Host: x",
                                  b"Content-Length: 5", b"content-length:  5"))
        self.assertEqual(request.headers["content-length"], "5")
        self.refused(head(b"POST / HTTP/1.1", b"Host: x", b"Content-Length: 1",
                          b"Content-Length: 2"), 400,
                     "Conflicting content-length headers")


def request_with(*header_lines, version=b"HTTP/1.1"):
    return parse_head(head(b"POST /channels.json " + version, b"Host: x",
                           *header_lines))


class BodyLengthTests(unittest.TestCase):
    """simple_comet.body_length: how much body a request announces."""

    def refused(self, request, status, message, max_body=1000):
        with self.assertRaises(HTTPError) as caught:
            body_length(request, max_body)
        self.assertEqual((caught.exception.status, caught.exception.message),
                         (status, message))

    def test_lengths(self):
        self.assertEqual(body_length(request_with(), 1000), 0)
        for value, length in ((b"0", 0), (b"5", 5), (b"1000", 1000),
                              (b"007", 7), (b" 12 ", 12)):
            with self.subTest(value=value):
                self.assertEqual(body_length(request_with(
                    b"Content-Length: " + value), 1000), length)
        self.assertEqual(body_length(request_with(
            b"Content-Length: 5", b"Content-Length: 5"), 1000), 5)

    def test_bad_lengths(self):
        for value in (b"", b"-1", b"+5", b"1x", b"0x10", b"1 2", b"1.0",
                      b"\xd9\xa3", b"1" * 19):
            with self.subTest(value=value):
                self.refused(request_with(b"Content-Length: " + value), 400,
                             "Malformed Content-Length")
        self.refused(request_with(b"Content-Length: 1001"), 413,
                     "Body over 1000 bytes")
        self.refused(request_with(b"Content-Length: " + b"9" * 18), 413,
                     "Body over 1000 bytes")

    def test_transfer_encoding(self):
        for coding in (b"chunked", b"Chunked", b"CHUNKED"):
            with self.subTest(coding=coding):
                self.assertIsNone(body_length(request_with(
                    b"Transfer-Encoding: " + coding), 1000))
        self.refused(request_with(b"Transfer-Encoding: gzip"), 501,
                     "Transfer coding not supported: gzip (only chunked)")
        self.refused(request_with(b"Transfer-Encoding: gzip, chunked"), 501,
                     "Transfer coding not supported: gzip, chunked (only "
                     "chunked)")
        self.refused(request_with(b"Transfer-Encoding: chunked",
                                  b"Content-Length: 3"), 400,
                     "Both Content-Length and Transfer-Encoding")
        self.refused(request_with(b"Transfer-Encoding: chunked",
                                  version=b"HTTP/1.0"), 400,
                     "Transfer-Encoding in an HTTP/1.0 request")
        long = b"x" * 100
        with self.assertRaises(HTTPError) as caught:
            body_length(request_with(b"Transfer-Encoding: " + long), 1000)
        self.assertEqual(caught.exception.message,
                         f"Transfer coding not supported: {'x' * 40} (only "
                         "chunked)")


class DecodeParamsTests(unittest.TestCase):
    """simple_comet.decode_params: query strings and forms."""

    def test_plain(self):
        cases = {"": {}, "a=1": {"a": "1"}, "a=1&b=2": {"a": "1", "b": "2"},
                 "a": {"a": ""}, "a=": {"a": ""}, "a=1&&b=2&": {"a": "1",
                                                                 "b": "2"},
                 "a=1=2": {"a": "1=2"}, "a=1;b=2": {"a": "1;b=2"},
                 "cb=_JSONP_x.y": {"cb": "_JSONP_x.y"}}
        for text, params in cases.items():
            with self.subTest(text=text):
                self.assertEqual(decode_params(text, "query"), params)

    def test_escapes_and_plus(self):
        cases = {"a=%41": {"a": "A"}, "a=b+c": {"a": "b c"},
                 "a+b=c": {"a b": "c"}, "%61=1": {"a": "1"},
                 "a=%C3%A9%e2%98%83": {"a": "\u00e9\u2603"},
                 "a=%2B": {"a": "+"}, "a=%26&b=%3D": {"a": "&", "b": "="},
                 "a=%7C": {"a": "|"}, "a=1=2&b=%20": {"a": "1=2", "b": " "},
                 "a=%00": {"a": "\x00"}}
        for text, params in cases.items():
            with self.subTest(text=text):
                self.assertEqual(decode_params(text, "query"), params)

    def test_bad_escapes(self):
        for text in ("a=%zz", "a=%4", "a=%", "a=%%41", "%g1=x", "a=1&b=%+1"):
            with self.subTest(text=text):
                with self.assertRaises(HTTPError) as caught:
                    decode_params(text, "form")
                self.assertEqual((caught.exception.status,
                                  caught.exception.message),
                                 (400, "Malformed percent-escape in form"))
        for text in ("a=%ff", "a=%C3", "a=%ed%a0%80", "%ff=1"):
            with self.subTest(text=text):
                with self.assertRaises(HTTPError) as caught:
                    decode_params(text, "query")
                self.assertEqual((caught.exception.status,
                                  caught.exception.message),
                                 (400, "Invalid UTF-8 in query"))

    def test_repeated_parameters(self):
        """The same value twice is one; two values are a -1 API error."""
        self.assertEqual(decode_params("a=1&a=1", "query"), {"a": "1"})
        self.assertEqual(decode_params("a=%31&a=1", "query"), {"a": "1"})
        for text in ("a=1&a=2", "a=1&a=", "a&a=x", "a=+&a=%20x"):
            with self.subTest(text=text):
                with self.assertRaises(APIError) as caught:
                    decode_params(text, "query")
                self.assertEqual((caught.exception.return_code,
                                  caught.exception.message),
                                 (-1, "Parameter a given twice"))

    def test_field_count(self):
        hundred = "&".join(f"f{i}=1" for i in range(100))
        self.assertEqual(len(decode_params(hundred, "query")), 100)
        for text in (hundred + "&x=1", hundred + "&", "&" * 100):
            with self.subTest(text=text[-10:]):
                with self.assertRaises(HTTPError) as caught:
                    decode_params(text, "query")
                self.assertEqual((caught.exception.status,
                                  caught.exception.message),
                                 (400, "More than 100 fields in query"))


class CheckIdTests(unittest.TestCase):
    """simple_comet.check_id: channel and client ids."""

    def refused(self, value, message, channel=True, what="channel_id"):
        with self.assertRaises(APIError) as caught:
            check_id(value, what, channel)
        self.assertEqual((caught.exception.return_code,
                          caught.exception.message), (-1, message))

    def test_accepted(self):
        for value in ("a", "x" * 200, "\u00e9" * 100, "\U0001F600" * 50,
                      "sp ace", "q\"uo\\te", "\u4e2d" * 66 + "ab", "a.b-c_d"):
            with self.subTest(value=value[:20]):
                self.assertEqual(check_id(value, "channel_id", True), value)
        # A client id may hold | and /.
        self.assertEqual(check_id("a|b/c", "client_id"), "a|b/c")

    def test_refused(self):
        self.refused("", "Missing channel_id")
        self.refused("", "Missing client_id", False, "client_id")
        for value in ("x" * 201, "\u00e9" * 101, "a" + "\u00e9" * 100,
                      "\U0001F600" * 50 + "a", "\u4e2d" * 67):
            with self.subTest(value=value[:20]):
                self.assertGreater(len(value.encode()), 200)
                self.refused(value, "channel_id longer than 200 bytes")
        for value in ("a\x01b", "tab\there", "nl\n", "c\x7f", "\u2028",
                      "a\x00"):
            with self.subTest(value=value):
                self.refused(value, "Control character in channel_id")
        for value in ("a|b", "a/b", "/", "|"):
            with self.subTest(value=value):
                self.refused(value, "channel_id contains | or /")
        # Length is checked before characters.
        self.refused("|" * 201, "channel_id longer than 200 bytes")


class JSONPFunctionTests(unittest.TestCase):
    """simple_comet.callback_error and frame_body."""

    def test_callback_names(self):
        for name in ("_JSONP_comet_cb", "_JSONP_a.b_1", "_JSONP_",
                     "_JSONP_" + "x" * 57, "_JSONP_A9._"):
            with self.subTest(name=name):
                self.assertIsNone(callback_error(name))
        cases = {"alert": "JSONP callback name must start with _JSONP_",
                 "": "JSONP callback name must start with _JSONP_",
                 "_jsonp_x": "JSONP callback name must start with _JSONP_",
                 "_JSONP_" + "x" * 58: "JSONP callback name longer than 64",
                 "a" * 65: "JSONP callback name longer than 64",
                 "_JSONP_a-b": "invalid JSONP callback name",
                 "_JSONP_x(1);alert": "invalid JSONP callback name",
                 "_JSONP_\u00e9": "invalid JSONP callback name",
                 "_JSONP_x</script>": "invalid JSONP callback name",
                 "_JSONP_x\u2028": "invalid JSONP callback name",
                 "_JSONP_x y": "invalid JSONP callback name"}
        for name, error in cases.items():
            with self.subTest(name=name):
                self.assertEqual(callback_error(name), error)

    def test_frames(self):
        text = '{"content": "\u00e9"}'
        self.assertEqual(frame_body(text, None, False),
                         (b"application/json", text.encode()))
        self.assertEqual(frame_body(text, None, True),
                         (b"application/json",
                          b"/*-secure- " + text.encode() + b" */"))
        for quote_json in (False, True):       # JSON-P is never quoted
            self.assertEqual(frame_body(text, "_JSONP_x", quote_json),
                             (b"application/javascript",
                              b"/**/_JSONP_x(" + text.encode() + b");"))


# ---------------------------------------------------------------------------
# A1. Command line
# ---------------------------------------------------------------------------

class CommandLineTests(unittest.TestCase):

    def test_help_and_version(self):
        result = run_server("--help")
        self.assertEqual(result.returncode, 0)
        for switch in ("--http-port", "--unix-socket-path", "--http-timeout",
                       "--session-timeout", "--inactive-channel-timeout",
                       "--messages-per-channel", "--quote-json",
                       "--enable-status", "--poll-timeout", "--admin-token",
                       "--max-body", "--max-connections", "--log-level",
                       "--unix-socket-mode", "--http-host"):
            self.assertIn(switch, result.stdout)
        result = run_server("--version")
        self.assertEqual(result.returncode, 0)
        self.assertRegex(result.stdout, r"^simple_comet\.py \d+\.\d+\.\d+\n$")

    def test_bad_values_exit_2_with_one_line(self):
        cases = (["--http-port=70000"], ["--http-port=0"],
                 ["--http-timeout=0"], ["--poll-timeout=-1"],
                 ["--session-timeout=nan"], ["--messages-per-channel=0"],
                 ["--max-messages-per-channel", "x"],
                 ["--max-connections=0"], ["--unix-socket-mode=999"],
                 ["--inactive-channel-timeout=inf"], ["--no-such-switch"])
        results = run_servers([(args, None) for args in cases])
        for args, result in zip(cases, results):
            with self.subTest(args=args):
                self.assertEqual(result.returncode, 2)
                self.assertEqual(result.stdout, "")
                self.assertEqual(result.stderr.count("\n"), 1, result.stderr)
                self.assertNotIn("Traceback", result.stderr)

    def test_default_port_is_4080_and_in_use_exits_1(self):
        # The main server holds 4080, so a server with neither a port nor a
        # socket must try 4080 and fail cleanly.
        result = run_server()
        self.assertEqual(result.returncode, 1)
        self.assertIn("4080", result.stderr)
        self.assertEqual(result.stderr.strip().count("\n"), 0, result.stderr)
        self.assertNotIn("Traceback", result.stderr)

    def test_both_switch_spellings_and_http_host(self):
        server = ServerProcess("--http-port", "{port}", "--http-host",
                               "127.0.0.1", "--max-messages-per-channel", "2")
        p = server.port
        try:
            self.assertIn(f"listening on http://127.0.0.1:{p}",
                          server.output())
            name = register(port=p)
            for i in range(3):
                push(name, f"m{i}", port=p)
            got = read([name], port=p)["messages"][name]
            self.assertEqual([m["content"] for m in got], ["m1", "m2"])
        finally:
            server.close()

    def test_messages_per_channel(self):
        server = ServerProcess("--messages-per-channel=3")
        p = server.port
        try:
            name = register(port=p)
            for i in range(5):
                push(name, f"m{i}", port=p)
            got = read([name], port=p)["messages"][name]
            self.assertEqual([m["content"] for m in got], ["m2", "m3", "m4"])
        finally:
            server.close()

    def test_quote_json(self):
        server = ServerProcess("--quote-json", "--poll-timeout=0.2")
        try:
            resp, body = call("POST", "/channels.json", {"channel_id": "q"},
                              port=server.port)
            text = body.decode()
            self.assertTrue(text.startswith("/*-secure- "), text)
            self.assertTrue(text.endswith(" */"), text)
            self.assertEqual(json.loads(text[11:-3])["channel_id"], "q")
            # A push and a read (the commonest requests, on the short path)
            # are wrapped too.
            for method, path, params in (
                    ("POST", "/channels/q.json", {"content": "m"}),
                    ("GET", "/channels/q.json?since=0", None)):
                resp, body = call(method, path, params, port=server.port)
                text = body.decode()
                self.assertTrue(text.startswith("/*-secure- "), text)
                self.assertEqual(json.loads(text[11:-3])["return_code"], 1)
            # JSON-P is already a script and is not wrapped.
            resp, body = call("GET", "/channels/q.jsonp?since=99999999999999",
                              port=server.port)
            self.assertTrue(body.startswith(b"/**/_JSONP_comet_cb("), body)
        finally:
            server.close()

    def test_status_is_off_by_default(self):
        server = ServerProcess()
        try:
            for path in ("/status.json", "/stats.json"):
                resp, _ = call("GET", path, port=server.port)
                self.assertEqual(resp.status, 404)
        finally:
            server.close()

    def test_log_level(self):
        # Client mistakes are logged at INFO (SPEC C4): hidden at WARNING,
        # shown at INFO.
        for level, shown in (("warning", False), ("info", True)):
            # At WARNING the log does not say when the server listens: it
            # is waited for by connecting.
            server = ServerProcess(f"--log-level={level}")
            try:
                call("GET", "/nowhere.json", port=server.port)
                self.assertEqual(server.stop(), 0)
                output = server.output()
                self.assertNotIn("WARNING", output)
                self.assertEqual("INFO" in output, shown)
                self.assertEqual("404 No resource at /nowhere.json" in output,
                                 shown)
            finally:
                server.close()


class UnixSocketTests(unittest.TestCase):

    def setUp(self):
        self.dir = tempfile.TemporaryDirectory()
        self.path = os.path.join(self.dir.name, "comet.sock")

    def tearDown(self):
        self.dir.cleanup()

    def test_socket_mode_serving_and_removal(self):
        server = ServerProcess(f"--unix-socket-path={self.path}", port=None)
        try:
            self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o666)
            self.assertNotIn("http://", server.output())   # socket only
            # Writes are accepted from the socket without a token.
            name = register_unix(self.path)
            reply = api("POST", f"/channels/{name}.json", {"content": "x"},
                        unix=self.path)
            self.assertEqual(reply["return_code"], 1)
            got = api("GET", f"/channels/{name}.json", unix=self.path)
            self.assertEqual(got["messages"][name][0]["content"], "x")
            self.assertEqual(server.stop(), 0)
            self.assertFalse(os.path.exists(self.path))
        finally:
            server.close()

    def test_prefix_switch_and_mode(self):
        server = ServerProcess("--unix-socket", self.path,
                               "--unix-socket-mode=660")
        try:
            self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o660)
            register(port=server.port)            # TCP too
        finally:
            server.close()

    def test_stale_socket_replaced_live_one_refused(self):
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(self.path)
        stale.close()                              # file left, nobody listens
        server = ServerProcess(f"--unix-socket-path={self.path}", port=None)
        try:
            register_unix(self.path)
            result = run_server(f"--unix-socket-path={self.path}")
            self.assertEqual(result.returncode, 1)
            self.assertIn("another server", result.stderr)
            self.assertEqual(result.stderr.strip().count("\n"), 0)
            register_unix(self.path)               # the first still works
        finally:
            server.close()

    def test_socket_removed_when_the_port_is_in_use(self):
        result = run_server(f"--unix-socket-path={self.path}",
                            f"--http-port={PORT}")        # the main server's
        self.assertEqual(result.returncode, 1)
        self.assertIn(str(PORT), result.stderr)
        self.assertFalse(os.path.exists(self.path))

    def test_path_that_is_not_a_socket(self):
        with open(self.path, "w") as f:
            f.write("data")
        result = run_server(f"--unix-socket-path={self.path}")
        self.assertEqual(result.returncode, 1)
        self.assertIn("not a socket", result.stderr)
        with open(self.path) as f:
            self.assertEqual(f.read(), "data")


# ---------------------------------------------------------------------------
# A2-A3. Resources, replies, messages
# ---------------------------------------------------------------------------

class ResourceTests(unittest.TestCase):

    def test_register_channel(self):
        name = fresh()
        reply = api("POST", "/channels.json", {"channel_id": name})
        self.assertEqual(reply, {"return_code": 1, "error_message": "",
                                 "channel_id": name})
        again = api("POST", "/channels.json", {"channel_id": name})
        self.assertEqual(again["return_code"], -2)
        self.assertTrue(again["error_message"])
        missing = api("POST", "/channels.json", {"use_sessions": "1"})
        self.assertEqual(missing["return_code"], -1)

    def test_invalid_ids(self):
        for bad in ("", "a|b", "a/b", "x" * 201, "é" * 101, "a\x01b",
                    "tab\there", "nl\n"):
            with self.subTest(bad=bad):
                reply = api("POST", "/channels.json", {"channel_id": bad})
                self.assertEqual(reply["return_code"], -1, reply)
        ok = "é" * 100                            # 200 bytes exactly
        self.assertEqual(api("POST", "/channels.json",
                             {"channel_id": ok + fresh()[:0]})["return_code"],
                         1)
        api("DELETE", "/channels/" + quote(ok) + ".json")
        for bad in ("", "y" * 201, "c\x7f"):
            with self.subTest(client=bad):
                reply = api("POST", "/clients.json", {"client_id": bad})
                self.assertEqual(reply["return_code"], -1, reply)
        # A client id may hold | and /.
        reply = api("POST", "/clients.json", {"client_id": fresh("a|b/")})
        self.assertEqual(reply["return_code"], 1)

    def test_max_messages_parameter(self):
        name = register(max_messages="2")
        for i in range(4):
            push(name, str(i))
        got = read([name])["messages"][name]
        self.assertEqual([m["content"] for m in got], ["2", "3"])
        for bad in ("0", "-1", "x", "1.5", "", "10001", "١"):
            with self.subTest(max_messages=bad):
                reply = api("POST", "/channels.json",
                            {"channel_id": fresh(), "max_messages": bad})
                self.assertEqual(reply["return_code"], -1, reply)

    def test_push(self):
        name = register()
        reply = push(name, "hello")
        self.assertEqual(set(reply), {"return_code", "error_message",
                                      "message_id", "delivered"})
        self.assertEqual(reply["delivered"], 0)
        self.assertIsInstance(reply["message_id"], int)
        reply = api("POST", f"/channels/{fresh()}.json", {"content": "x"})
        self.assertEqual(reply["return_code"], -2)
        reply = api("POST", f"/channels/{name}.json", {"other": "x"})
        self.assertEqual(reply["return_code"], -1)
        # Empty content is a message.
        push(name, "")
        self.assertEqual(read([name])["messages"][name][-1]["content"], "")

    def test_message_shape_ids_and_timestamps(self):
        a, b = register(), register()
        before = time.time()
        first = push(a, "one")["message_id"]
        second = push(b, "two")["message_id"]
        self.assertEqual(second, first + 1)      # one counter for all
        # The counter started at the time in units of 10 microseconds.
        self.assertLess(first, (time.time() + 1) * 100_000)
        self.assertGreater(first, (before - 3600) * 100_000)
        self.assertLess(second, 2 ** 53)
        reply = read([a])
        message = reply["messages"][a][0]
        self.assertEqual(set(message), {"id", "ts", "content"})
        self.assertEqual(message["id"], first)
        self.assertIsInstance(message["ts"], int)
        self.assertLessEqual(abs(message["ts"] - before), 2)
        self.assertEqual(reply["last_id"], second)

    def test_read_reply_and_since(self):
        name = register()
        ids = [push(name, f"m{i}")["message_id"] for i in range(3)]
        reply = read([name])
        self.assertEqual(set(reply), {"return_code", "error_message", "since",
                                      "last_id", "messages"})
        self.assertEqual(reply["since"], 0)
        self.assertEqual([m["id"] for m in reply["messages"][name]], ids)
        reply = read([name], since=ids[0])
        self.assertEqual(reply["since"], ids[0])
        self.assertEqual([m["content"] for m in reply["messages"][name]],
                         ["m1", "m2"])
        for bad in ("x", "1.0", "-1", "1e3", " 1", "١"):
            with self.subTest(since=bad):
                self.assertEqual(read([name], since=bad)["return_code"], -1)

    def test_since_above_counter_is_clamped(self):
        name = register()
        last = push(name, "x")["message_id"]
        poll = Background(read, [name], since="9" * 5000)
        wait_held(1)
        pushed = push(name, "y")["message_id"]
        reply = poll.result()
        self.assertEqual(reply["since"], last)
        self.assertEqual(reply["last_id"], pushed)
        self.assertEqual([m["content"] for m in reply["messages"][name]],
                         ["y"])

    def test_several_channels_and_separators(self):
        a, b = register(), register()
        push(a, "to a")
        push(b, "to b")
        for sep in ("%7C", "%7c", "|"):
            with self.subTest(sep=sep):
                reply = api("GET", f"/channels/{a}{sep}{b}{sep}{fresh()}.json")
                self.assertEqual(list(reply["messages"]), [a, b])
                self.assertEqual(reply["messages"][b][0]["content"], "to b")
        reply = read([fresh(), fresh()])
        self.assertEqual(reply["return_code"], -2)
        self.assertEqual(reply["error_message"], "No valid channels")
        reply = read([a] * 3)
        self.assertEqual(list(reply["messages"]), [a])
        too_many = [fresh() for _ in range(101)]
        self.assertEqual(read(too_many)["return_code"], -1)

    def test_percent_decoded_channel_names(self):
        name = fresh("sp ace é ")
        register(name)
        push(name, "ok")
        reply = read([name])
        self.assertEqual(reply["messages"][name][0]["content"], "ok")

    def test_delete(self):
        name = register()
        push(name, "x")
        reply = api("DELETE", f"/channels/{name}.json")
        self.assertEqual(reply, {"return_code": 2, "error_message": "",
                                 "channel_id": name, "removed": True})
        reply = api("DELETE", f"/channels/{name}.json")
        self.assertEqual(reply["return_code"], 1)
        self.assertIs(reply["removed"], False)
        self.assertEqual(read([name])["return_code"], -2)
        register(name)                        # the name is free again
        push(name, "new")
        self.assertEqual([m["content"] for m in read([name])["messages"][name]],
                         ["new"])

    def test_status(self):
        name = register()
        client = fresh("cl")
        api("POST", "/clients.json", {"client_id": client})
        before = status()
        push(name, "x")
        after = status()
        self.assertIn(name, after["channels"])
        self.assertIn(client, after["clients"])
        for field in ("held_connections_count", "uptime", "connections",
                      "polls_held", "channels_count", "clients_count",
                      "messages_pushed", "messages_delivered"):
            self.assertIn(field, after)
        self.assertEqual(after["messages_pushed"], before["messages_pushed"] + 1)
        self.assertGreaterEqual(after["connections"], 1)
        self.assertGreater(after["uptime"], 0)
        self.assertEqual(api("GET", "/stats.json")["status"]["channels_count"],
                         status()["channels_count"])

    def test_parameters_from_query_string_on_post(self):
        # The original read request.args, which merges query and form.
        name = register()
        reply = api("POST", f"/channels/{name}.json?content=from-query")
        self.assertEqual(reply["return_code"], 1)
        self.assertEqual(read([name])["messages"][name][0]["content"],
                         "from-query")

    def test_content_is_kept_exactly(self):
        name = register()
        content = 'quote " backslash \\ nul \x00 \u2028 \u2029 é 😀 <script>'
        push(name, content)
        resp, body = call("GET", f"/channels/{name}.jsonp")
        self.assertNotIn("\u2028".encode(), body)
        self.assertNotIn("\u2029".encode(), body)
        self.assertEqual(read([name])["messages"][name][0]["content"], content)


# ---------------------------------------------------------------------------
# A3 and B. Long polls
# ---------------------------------------------------------------------------

class LongPollTests(unittest.TestCase):

    def test_held_poll_woken_by_push_and_delivered_count(self):
        a, b = register(), register()
        last = push(a, "old")["message_id"]
        polls = [Background(read, [a, b], since=last) for _ in range(3)]
        wait_held(3)
        before = status()["messages_delivered"]
        reply = push(b, "new")
        self.assertEqual(reply["delivered"], 3)
        self.assertEqual(status()["messages_delivered"], before + 3)
        for poll in polls:
            got = poll.result()
            self.assertEqual(got["return_code"], 1)
            self.assertEqual(got["since"], last)
            self.assertEqual(got["last_id"], reply["message_id"])
            self.assertEqual(got["messages"][a], [])
            self.assertEqual([m["content"] for m in got["messages"][b]],
                             ["new"])
        self.assertEqual(status()["held_connections_count"], 0)
        self.assertEqual(push(a, "nobody")["delivered"], 0)

    def test_first_read_of_empty_channel_is_held(self):
        name = register()
        poll = Background(read, [name])
        wait_held(1)
        push(name, "first")
        self.assertEqual(poll.result()["messages"][name][0]["content"],
                         "first")

    def test_following_last_id_sees_every_message_once(self):
        name = register(max_messages="1000")
        seen = []
        since = 0
        pusher = Background(lambda: [push(name, str(i)) for i in range(200)])
        while len(seen) < 200:
            reply = read([name], since=since)
            self.assertGreaterEqual(reply["last_id"], since)
            seen += [m["content"] for m in reply["messages"][name]]
            since = reply["last_id"]
        pusher.result()
        self.assertEqual(seen, [str(i) for i in range(200)])

    def test_poll_timeout_answers_with_empty_lists(self):
        server = ServerProcess("--poll-timeout=0.2")
        try:
            a, b = register(port=server.port), register(port=server.port)
            last = push(a, "x", port=server.port)["message_id"]
            start = time.monotonic()
            reply = read([a, b], since=last, port=server.port)
            elapsed = time.monotonic() - start
            self.assertGreaterEqual(elapsed, 0.15)
            self.assertLess(elapsed, 5)
            self.assertEqual(reply, {"return_code": 1, "error_message": "",
                                     "since": last, "last_id": last,
                                     "messages": {a: [], b: []}})
            # JSON-P too, through its callback.
            resp, body = call("GET", f"/channels/{a}.jsonp?since={last}&cb="
                              "_JSONP_t", port=server.port)
            self.assertTrue(body.startswith(b"/**/_JSONP_t({"), body)
        finally:
            server.close()

    def test_disconnect_forgets_the_poll(self):
        name = register()
        last = push(name, "x")["message_id"]
        s = connect()
        s.sendall(get_request(f"/channels/{name}.json?since={last}"))
        wait_held(1)
        s.close()
        wait_held(0)
        self.assertEqual(push(name, "y")["delivered"], 0)

    def test_delete_releases_held_polls(self):
        a, b = register(), register()
        last = push(a, "x")["message_id"]
        only_a = Background(read, [a], since=last)
        both = Background(read, [a, b], since=last)
        wait_held(2)
        api("DELETE", f"/channels/{a}.json")
        reply = only_a.result()
        self.assertEqual(reply["return_code"], -2)
        self.assertEqual(reply["error_message"], "No valid channels")
        wait_held(1)                      # the other waits on b alone
        self.assertTrue(both.is_alive())
        push(b, "on b")
        reply = both.result()
        self.assertEqual(list(reply["messages"]), [b])
        self.assertEqual(reply["messages"][b][0]["content"], "on b")

    def test_lost_messages_are_reported(self):
        a, b = register(max_messages="2"), register(max_messages="2")
        first = push(a, "0")["message_id"]
        push(b, "b0")
        for i in range(1, 4):
            push(a, str(i))
        reply = read([a, b], since=first)
        self.assertEqual(reply["lost"], [a])     # 1 was dropped, 2 and 3 kept
        self.assertEqual([m["content"] for m in reply["messages"][a]],
                         ["2", "3"])
        self.assertNotIn("lost", read([a, b]))   # since 0: what is retained
        kept = [m["id"] for m in reply["messages"][a]]
        # A reader that is behind but has lost nothing is not told so.
        self.assertNotIn("lost", read([a], since=kept[0] - 1))

    def test_pipelined_request_behind_held_poll_waits_its_turn(self):
        name = register()
        last = push(name, "x")["message_id"]
        with connect() as s:
            s.sendall(get_request(f"/channels/{name}.json?since={last}") +
                      get_request("/channels/" + name + ".json?since=0"))
            wait_held(1)
            push(name, "y")
            f = s.makefile("rb")
            first = json.loads(read_response(f)[2])
            second = json.loads(read_response(f)[2])
        self.assertEqual([m["content"] for m in first["messages"][name]],
                         ["y"])
        self.assertEqual([m["content"] for m in second["messages"][name]],
                         ["x", "y"])


# ---------------------------------------------------------------------------
# A4. Sessions, and expiry of clients and channels
# ---------------------------------------------------------------------------

class SessionTests(unittest.TestCase):

    def test_session_channels_need_a_registered_client(self):
        private = register(use_sessions="1")
        public = register()
        push(private, "secret")
        push(public, "hello")
        self.assertEqual(read([private])["return_code"], -2)
        reply = read([private, public])
        self.assertEqual(list(reply["messages"]), [public])
        reply = read([private, public], client_id=fresh("nobody"))
        self.assertEqual(reply["return_code"], -3)
        self.assertEqual(reply["error_message"], "Unregistered client_id")
        self.assertEqual(read([public], client_id="")["return_code"], -1)
        client = fresh("cl")
        reply = api("POST", "/clients.json", {"client_id": client})
        self.assertEqual(reply, {"return_code": 1, "error_message": "",
                                 "client_id": client})
        self.assertEqual(api("POST", "/clients.json", {"client_id": client}
                             )["return_code"], -2)
        self.assertEqual(api("POST", "/clients.json", {})["return_code"], -1)
        reply = read([private, public], client_id=client)
        self.assertEqual(reply["messages"][private][0]["content"], "secret")
        self.assertEqual(reply["messages"][public][0]["content"], "hello")

    def test_use_sessions_values(self):
        for word, private in (("1", True), ("true", True), ("0", False),
                              ("", False)):
            name = register(use_sessions=word)
            push(name, "x")
            self.assertEqual(read([name])["return_code"],
                             -2 if private else 1, word)
        reply = api("POST", "/channels.json", {"channel_id": fresh(),
                                               "use_sessions": "maybe"})
        self.assertEqual(reply["return_code"], -1)

    def test_expiry_of_sessions_and_inactive_channels(self):
        server = ServerProcess("--enable-status",
                               "--session-timeout=0.4",
                               "--inactive-channel-timeout=0.6",
                               "--poll-timeout=10")
        p = server.port
        try:
            # Registered in this order, kept and held_ch would expire no
            # later than idle and push_ch, were they not kept alive.
            kept, idle = fresh("kept"), fresh("idle")
            for client in (kept, idle):
                api("POST", "/clients.json", {"client_id": client}, port=p)
            held_ch, read_ch, push_ch = (register(port=p) for _ in range(3))
            push(read_ch, "r", port=p)
            last = push(held_ch, "h", port=p)["message_id"]
            # A held poll keeps its client and channel alive past both
            # timeouts; reads keep read_ch alive; pushes do not count.
            poll = Background(read, [held_ch], since=last, client_id=kept,
                              port=p)
            wait_held(1, p)
            deadline = time.monotonic() + 5
            while True:
                read([read_ch], port=p)
                api("POST", f"/channels/{push_ch}.json", {"content": "p"},
                    port=p)               # -2 once the channel has expired
                st = status(p)
                if idle not in st["clients"] and \
                        push_ch not in st["channels"]:
                    break
                self.assertLess(time.monotonic(), deadline, st)
                time.sleep(0.05)
            self.assertIn(kept, st["clients"])
            self.assertIn(read_ch, st["channels"])
            self.assertIn(held_ch, st["channels"])
            self.assertEqual(read([push_ch], port=p)["return_code"], -2)
            self.assertTrue(poll.is_alive())
            push(held_ch, "wake", port=p)
            self.assertEqual([m["content"] for m in
                              poll.result()["messages"][held_ch]], ["wake"])
            self.assertEqual(read([read_ch], client_id=idle, port=p)
                             ["return_code"], -3)
            # Once nobody reads, everything goes.
            wait_for(lambda: status(p)["channels"] == [] and
                     status(p)["clients"] == [], timeout=5)
        finally:
            server.close()


# ---------------------------------------------------------------------------
# A5. JSON-P
# ---------------------------------------------------------------------------

class JSONPTests(unittest.TestCase):

    def jsonp(self, path, params=None, method="GET"):
        resp, body = call(method, path, params)
        self.assertEqual(resp.status, 200)
        self.assertEqual(resp.getheader("Content-Type"),
                         "application/javascript")
        self.assertEqual(resp.getheader("X-Content-Type-Options"), "nosniff")
        return body.decode()

    def unwrap(self, text, callback="_JSONP_comet_cb"):
        prefix = f"/**/{callback}("
        self.assertTrue(text.startswith(prefix), text)
        self.assertTrue(text.endswith(");"), text)
        return json.loads(text[len(prefix):-2])

    def test_default_and_custom_callback(self):
        name = register()
        push(name, "x")
        reply = self.unwrap(self.jsonp(f"/channels/{name}.jsonp"))
        self.assertEqual(reply["messages"][name][0]["content"], "x")
        reply = self.unwrap(self.jsonp(f"/channels/{name}.jsonp",
                                       {"cb": "_JSONP_a.b_1"}), "_JSONP_a.b_1")
        self.assertEqual(reply["return_code"], 1)

    def test_every_resource_speaks_jsonp_and_errors_use_the_callback(self):
        name = fresh()
        reply = self.unwrap(self.jsonp("/channels.jsonp", {"channel_id": name},
                                       "POST"))
        self.assertEqual(reply["channel_id"], name)
        reply = self.unwrap(self.jsonp(f"/channels/{name}.jsonp",
                                       {"content": "c"}, "POST"))
        self.assertEqual(reply["delivered"], 0)
        reply = self.unwrap(self.jsonp("/clients.jsonp",
                                       {"client_id": fresh()}, "POST"))
        self.assertEqual(reply["return_code"], 1)
        reply = self.unwrap(self.jsonp("/status.jsonp"))
        self.assertIn("held_connections_count", reply["status"])
        reply = self.unwrap(self.jsonp(f"/channels/{fresh()}.jsonp"))
        self.assertEqual(reply["return_code"], -2)
        reply = self.unwrap(self.jsonp(f"/channels/{name}.jsonp",
                                       {"since": "x"}))
        self.assertEqual(reply["return_code"], -1)
        reply = self.unwrap(self.jsonp(f"/channels/{name}.jsonp",
                                       method="DELETE"))
        self.assertEqual(reply["return_code"], 2)

    def test_bad_callbacks_get_a_comment_never_the_callers_text(self):
        name = register()
        push(name, "x")                # so that the good read is not held
        for cb in ("alert", "_JSONP_x(1);alert", "_JSONP_" + "x" * 58,
                   "_JSONP_a-b", "_JSONP_é", "", "_JSONP_x</script>",
                   "_JSONP_x\u2028"):
            with self.subTest(cb=cb):
                text = self.jsonp(f"/channels/{name}.jsonp", {"cb": cb})
                self.assertRegex(text, r"^/\* [A-Za-z_ 0-9]+ \*/$")
                if cb:
                    self.assertNotIn(cb, text)
        self.assertEqual(self.jsonp(f"/channels/{name}.jsonp",
                                    {"cb": "alert"}),
                         "/* JSONP callback name must start with _JSONP_ */")
        self.assertEqual(self.jsonp(f"/channels/{name}.jsonp",
                                    {"cb": "_JSONP_a-b"}),
                         "/* invalid JSONP callback name */")
        # 64 characters is the limit.
        cb = "_JSONP_" + "x" * 57
        self.unwrap(self.jsonp(f"/channels/{name}.jsonp", {"cb": cb}), cb)

    def test_malformed_parameters_answer_through_the_callback(self):
        name = register()
        text = self.jsonp(f"/channels/{name}.jsonp?since=1&since=2")
        self.assertEqual(self.unwrap(text)["return_code"], -1)
        text = self.jsonp(f"/channels/{name}.jsonp?since=1&since=2&cb=_JSONP_z")
        self.assertEqual(self.unwrap(text)["return_code"], -1)

    def test_bad_callback_does_not_act(self):
        name = fresh()
        self.jsonp("/channels.jsonp", {"channel_id": name, "cb": "evil"},
                   "POST")
        self.assertEqual(read([name])["return_code"], -2)

    def test_line_separators_are_escaped(self):
        name = register()
        push(name, "a\u2028b\u2029c")
        text = self.jsonp(f"/channels/{name}.jsonp")
        self.assertNotIn("\u2028", text)
        self.assertNotIn("\u2029", text)
        self.assertEqual(self.unwrap(text)["messages"][name][0]["content"],
                         "a\u2028b\u2029c")


# ---------------------------------------------------------------------------
# B. Publisher protection, CORS, caching
# ---------------------------------------------------------------------------

class AdminTokenTests(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.server = ServerProcess("--admin-token=s3cret", "--enable-status",
                                   "--poll-timeout=0.2")

    @classmethod
    def tearDownClass(cls):
        cls.server.close()

    def test_writes_and_status_need_the_token(self):
        good = {"Authorization": "Bearer s3cret"}
        for headers in ({}, {"Authorization": "Bearer wrong"},
                        {"Authorization": "Basic s3cret"},
                        {"Authorization": "s3cret"}):
            for method, path, params in (
                    ("POST", "/channels.json", {"channel_id": "t"}),
                    ("POST", "/clients.json", {"client_id": "t"}),
                    ("POST", "/channels/t.json", {"content": "x"}),
                    ("DELETE", "/channels/t.json", None),
                    ("GET", "/status.json", None)):
                with self.subTest(headers=headers, method=method, path=path):
                    resp, body = call(method, path, params, headers=headers,
                                      port=self.server.port)
                    self.assertEqual(resp.status, 403)
                    self.assertEqual(resp.getheader("Content-Type"),
                                     "application/json")
                    self.assertIn("token", json.loads(body)["error_message"])
        resp, body = call("POST", "/channels.json", {"channel_id": "t"},
                          headers=good, port=self.server.port)
        self.assertEqual(json.loads(body)["return_code"], 1)
        resp, body = call("POST", "/channels/t.json", {"content": "x"},
                          headers={"Authorization": "bearer s3cret"},
                          port=self.server.port)
        self.assertEqual(json.loads(body)["return_code"], 1)
        # Reads stay open.
        reply = read(["t"], port=self.server.port)
        self.assertEqual(reply["messages"]["t"][0]["content"], "x")
        resp, body = call("GET", "/status.json", headers=good, port=self.server.port)
        self.assertEqual(resp.status, 200)

    def test_token_from_environment(self):
        server = ServerProcess(env={"SIMPLE_COMET_ADMIN_TOKEN": "envtok"})
        try:
            resp, _ = call("POST", "/channels.json", {"channel_id": "e"},
                           port=server.port)
            self.assertEqual(resp.status, 403)
            resp, body = call("POST", "/channels.json", {"channel_id": "e"},
                              headers={"Authorization": "Bearer envtok"},
                              port=server.port)
            self.assertEqual(json.loads(body)["return_code"], 1)
        finally:
            server.close()


class LocalOnlyTests(unittest.TestCase):
    """Without a token, writes come only from loopback or the socket.  The
    tests reach the server only over loopback, so the refusal of other
    addresses is checked on the function that decides it."""

    def test_which_peers_are_local(self):
        for peer in (("127.0.0.1", 1), ("127.9.8.7", 1), ("::1", 1, 0, 0),
                     ("::ffff:127.0.0.1", 1, 0, 0), "", "/run/comet.sock"):
            self.assertTrue(simple_comet.is_local(peer), peer)
        for peer in (("10.0.0.1", 1), ("192.168.1.2", 1), ("8.8.8.8", 1),
                     ("::ffff:10.0.0.1", 1, 0, 0), ("fe80::1%eth0", 1, 0, 2),
                     ("2001:db8::1", 1, 0, 0), ("garbage", 1)):
            self.assertFalse(simple_comet.is_local(peer), peer)

    def test_refusal_names_the_switch(self):
        config = simple_comet.Config()

        class Remote:
            local = False
            store = None
        app = simple_comet.App(config, Remote(), None)
        request = simple_comet.Request("POST", "/channels.json", "",
                                       "HTTP/1.1", {"host": "x"})
        with self.assertRaises(simple_comet.HTTPError) as caught:
            app.credentials(request, Remote(), {}, simple_comet.ADMIN)
        self.assertEqual(caught.exception.status, 403)
        self.assertIn("--admin-token", caught.exception.message)


class HeaderTests(unittest.TestCase):

    def test_cors_and_cache_headers(self):
        name = register()
        push(name, "x")
        resp, _ = call("GET", f"/channels/{name}.json")
        self.assertEqual(resp.getheader("Access-Control-Allow-Origin"), "*")
        self.assertEqual(resp.getheader("Cache-Control"),
                         "no-cache, no-store, no-transform")
        resp, _ = call("POST", f"/channels/{name}.json", {"content": "y"})
        self.assertIsNone(resp.getheader("Access-Control-Allow-Origin"))
        self.assertEqual(resp.getheader("Cache-Control"),
                         "no-cache, no-store, no-transform")
        resp, _ = call("GET", "/nowhere.json")
        self.assertEqual(resp.status, 404)
        self.assertEqual(resp.getheader("Cache-Control"),
                         "no-cache, no-store, no-transform")

    def test_preflight(self):
        resp, body = call("OPTIONS", f"/channels/{fresh()}.json", headers={
            "Origin": "http://example.org",
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "X-Requested-With"})
        self.assertEqual(resp.status, 204)
        self.assertEqual(body, b"")
        self.assertEqual(resp.getheader("Access-Control-Allow-Origin"), "*")
        self.assertIn("GET", resp.getheader("Access-Control-Allow-Methods"))
        self.assertEqual(resp.getheader("Access-Control-Allow-Headers"),
                         "X-Requested-With")
        resp, _ = call("OPTIONS", "/channels.json")
        self.assertEqual(resp.status, 405)
        self.assertIsNone(resp.getheader("Access-Control-Allow-Origin"))


# ---------------------------------------------------------------------------
# B. HTTP/1.1 by hand
# ---------------------------------------------------------------------------

class HeadParsingTests(unittest.TestCase):
    """In-process: parse_head() takes the common shape of head on a short
    path and must give exactly what the general parser gives: the same
    fields, or the same refusal (status, message, close)."""

    COMMON = [
        b"GET /channels/a.json?since=0 HTTP/1.1\r\nHost: 127.0.0.1:4080\r\n\r\n",
        b"POST /channels/a.json HTTP/1.1\r\nHost: x\r\nContent-Type: "
        b"application/x-www-form-urlencoded\r\nContent-Length: 13\r\n\r\n",
        b"GET /channels/a%7Cb.jsonp?since=5&cb=_JSONP_x HTTP/1.0\r\n\r\n",
        b"GET /x HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: Close\r\n\r\n",
        b"GET /x? HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /x?a?b=c/d HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nhOsT: x\r\nX-Empty:\r\nX-Pad:   a  b\r\n"
        b"X-Close:v\r\n!#$%&'*+-.^_`|~09az: y\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: x\r\nX-Latin: caf\xe9 \xff\r\n\r\n",
        b"GET /a/b.c;d,e@f!g$h&i'j(k)l*m+n:o=p~q HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /x?a=/?b:c@d!e$f&g'h(i)j*k+l,m;n=o~p%20 HTTP/1.1\r\nHost: x\r\n"
        b"\r\n",
        b"DELETE /channels/a.json HTTP/1.1\r\nHost: x\r\n"
        b"Authorization: Bearer abc==\r\nExpect: 100-continue\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: x\r\n"
        + b"".join(b"X-%d: v\r\n" % i for i in range(99)) + b"\r\n",
    ]
    TRICKY = [
        b"GET /x HTTP/1.1\r\nHost: x\r\n" + b"X-N: v\r\n" * 99 + b"\r\n",
        b"GET /x HTTP/1.1\r\nHost: x\r\n"
        + b"".join(b"X-%d: v\r\n" % i for i in range(100)) + b"\r\n",
        # Bare LF and mixed line ends, bare CR
        b"GET /x HTTP/1.1\nHost: x\n\n",
        b"GET /x HTTP/1.1\r\nHost: x\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: x\r\rY: z\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: x\rY\r\n\r\n",
        # Control characters, tab and non-ASCII where they may not be
        b"GET /x HTTP/1.1\r\nHost: x\x00\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: x\x7f\r\n\r\n",
        b"GET /x\x01 HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /x\t HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /\xe9 HTTP/1.1\r\nHost: x\r\n\r\n",
        b"G\xc3T /x HTTP/1.1\r\nHost: x\r\n\r\n",
        # Request lines
        b"GET  /x HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /x  HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /x HTTP/1.1 \r\nHost: x\r\n\r\n",
        b" GET /x HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /x\r\nHost: x\r\n\r\n",
        b"get /x HTTP/1.1\r\nHost: x\r\n\r\n",
        b"M-SEARCH /x HTTP/1.1\r\nHost: x\r\n\r\n",
        b"G(T /x HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /x HTTP/2.0\r\nHost: x\r\n\r\n",
        b"GET /x HTTP/1.2\r\nHost: x\r\n\r\n",
        b"GET /x http/1.1\r\nHost: x\r\n\r\n",
        b"GET /x HTTP/1.10\r\nHost: x\r\n\r\n",
        b"GET x HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET http://example.org/a/b?c=d HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET HTTPS://example.org HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET ftp://example.org/a HTTP/1.1\r\nHost: x\r\n\r\n",
        b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET * HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /x#frag HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /x?a=b#frag HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /x#f?a=b HTTP/1.1\r\nHost: x\r\n\r\n",
        # Header lines
        b"GET /x HTTP/1.1\r\n\r\n",
        b"GET /x HTTP/1.1\r\nX: y\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: a\r\nhost: b\r\n\r\n",
        b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n"
        b"Content-Length: 3\r\n\r\n",
        b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n"
        b"Content-Length: 4\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: a\r\nX-A: 1\r\nx-a: 2\r\nX-A:\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost : a\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: a\r\n\tfolded\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost a\r\n\r\n",
        b"GET /x HTTP/1.1\r\n: a\r\n\r\n",
        b"GET /x HTTP/1.1\r\nH(st: a\r\n\r\n",
        b"GET /x HTTP/1.1\r\nH\xe9st: a\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost:a\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost:\t a \t \r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: x\r\nX-Blank:   \r\nX-Pad:  a  b \r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: x\r\nX-Tab:\tv\r\nX-T: a\tb\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: x\r\nX: \x80\x9f\xa0\xad\r\n\r\n",
        b"GET /x HTTP/1.1 \r\n\r\n",
        b"GET /x HTTP/1.0\r\nX: y\r\n",
        b"GET /x HTTP/1.0\r\nX: y\r\n\r\nZ: w\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n\r\n",
        # Limits
        b"GET /x HTTP/1.1\r\nHost: x\r\n" + b"X-N: v\r\n" * 100 + b"\r\n",
        b"GET /x HTTP/1.1\r\nHost: x\r\n" + b"a:\r\n" * 2000 + b"\r\n",
        b"GET /" + b"a" * (8 * 1024) + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /" + b"a" * (8 * 1024 - 16) + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: x\r\nX: " + b"v" * (16 * 1024)
        + b"\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: x\r\nX: " + b"v" * (8 * 1024)
        + b"\r\n\r\n",
    ]

    @staticmethod
    def outcome(parse, head):
        try:
            r = parse(head)
        except simple_comet.HTTPError as e:
            return ("refused", e.status, e.message, e.close)
        return (r.method, r.path, r.query, r.version, r.headers,
                r.keep_alive, r.body, r.callback)

    def check(self, head):
        self.assertEqual(self.outcome(simple_comet.parse_head, head),
                         self.outcome(simple_comet.parse_any_head, head), head)

    def test_common_heads_take_the_short_path(self):
        from unittest import mock
        for head in self.COMMON:
            self.check(head)
            with mock.patch.object(simple_comet, "parse_any_head",
                                   side_effect=AssertionError("general")):
                simple_comet.parse_head(head)

    def test_tricky_heads_parse_as_the_general_parser_does(self):
        for head in self.TRICKY:
            self.check(head)

    def test_a_connection_s_next_head_parses_alike(self):
        # The previous request's header lines kept (parse_head's kept): a
        # head with the same lines is checked by its request line alone,
        # and must still give what the general parser gives, whatever its
        # request line (a bad one, HTTP/1.1 after lines without Host).
        lines = {head.partition(b"\n")[0] + b"\n"
                 for head in self.COMMON + self.TRICKY}
        lines |= {b"GET /x HTTP/1.1\r\n", b"GET /x HTTP/1.0\r\n",
                  b"GET /x HTTP/1.1\n", b"GET /x HTTP/1.1\r\r\n", b"\r\n"}
        for previous in self.COMMON:
            kept = simple_comet.parse_head(previous).kept
            self.assertIsNotNone(kept, previous)
            block = previous.partition(b"\r\n")[2]
            for line in sorted(lines):
                head = line + block
                with self.subTest(previous=previous[:40], head=head[:60]):
                    self.assertEqual(
                        self.outcome(lambda h: simple_comet.parse_head(
                            h, kept), head),
                        self.outcome(simple_comet.parse_any_head, head))
            # A request line of the common shape reuses the kept lines.
            head = b"GET /other?since=1 HTTP/1.1\r\n" + block
            if b"host" in block.lower():
                self.assertIs(simple_comet.parse_head(head, kept).kept, kept)
        # A push's next lines differ in Content-Length's value alone.
        previous = self.COMMON[1]
        kept = simple_comet.parse_head(previous).kept
        for value in (b"7", b"130", b"013", b"", b" 7", b"7 ", b"1 3", b"x",
                      b"\xb2", b"7, 7", b"7\r\nX: y", b"-1"):
            head = previous.replace(b"Length: 13", b"Length: " + value)
            with self.subTest(value=value):
                self.assertEqual(
                    self.outcome(lambda h: simple_comet.parse_head(h, kept),
                                 head),
                    self.outcome(simple_comet.parse_any_head, head))
                if value.isdigit():
                    request = simple_comet.parse_head(head, kept)
                    self.assertIs(request.kept, kept)
                    self.assertEqual(request.headers["content-length"],
                                     value.decode())
        # Lines too long to keep by every idle connection are not kept.
        self.assertIsNone(simple_comet.parse_head(
            b"GET / HTTP/1.1\r\nHost: x\r\nCookie: " + b"v" * 2100
            + b"\r\n\r\n").kept)
        # Other lines are parsed whole, and are kept in their turn.
        kept = simple_comet.parse_head(self.COMMON[0]).kept
        request = simple_comet.parse_head(self.COMMON[1], kept)
        self.assertIsNot(request.kept, kept)
        self.assertEqual(request.headers["content-length"], "13")

    def test_one_plain_field(self):
        # The short path of decode_params: what parse_qsl would give.
        from urllib.parse import parse_qsl
        for text in ("since=0", "content=hello world", "a", "=", "a=",
                     "=b", "a=b=c", "cb=_JSONP_x.y", "a==", "since=-1"):
            self.assertEqual(simple_comet.decode_params(text, "body"),
                             dict(parse_qsl(text, keep_blank_values=True)),
                             text)

    def test_prebuilt_reply_heads(self):
        # render() builds each shape of head once: the bytes are those of
        # a head built field by field, every time.
        def reference(status, content_type, body, keep_alive, version,
                      cors, extra, head_only):
            out = [b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\n"
                   b"Content-Length: %d\r\n" % (
                       status, simple_comet.REASONS[status].encode(),
                       content_type, len(body)),
                   b"Cache-Control: no-cache, no-store, no-transform\r\n",
                   b"X-Content-Type-Options: nosniff\r\n"]
            if cors:
                out.append(b"Access-Control-Allow-Origin: *\r\n")
            out.append(extra)
            if not keep_alive:
                out.append(b"Connection: close\r\n")
            elif version == "HTTP/1.0":
                out.append(b"Connection: keep-alive\r\n")
            out.append(b"\r\n")
            if not head_only:
                out.append(body)
            return b"".join(out)
        for args in itertools.product(
                (200, 204, 404, 503), (b"application/json", b"text/plain"),
                (b"", b'{"a": "%d %s"}'), (True, False),
                ("HTTP/1.1", "HTTP/1.0"), (True, False),
                (b"", b"Allow: GET, HEAD\r\n"), (True, False)):
            for _ in range(2):
                self.assertEqual(simple_comet.render(*args), reference(*args),
                                 args)

    def test_every_byte_in_every_part(self):
        # One byte of each value put where the common shape has a path, a
        # query, a header name and a header value.
        for byte in range(256):
            b = bytes([byte])
            for head in (b"GET /a" + b + b"b?c HTTP/1.1\r\nHost: x\r\n\r\n",
                         b"GET /a?c" + b + b"d HTTP/1.1\r\nHost: x\r\n\r\n",
                         b"GET /a HTTP/1.1\r\nHost: x\r\nX" + b + b"Y: z\r\n\r\n",
                         b"GET /a HTTP/1.1\r\nHost: x\r\nX: y" + b + b"z\r\n\r\n",
                         b"GET /a HTTP/1.1\r\nHost: x\r\nX: " + b + b"\r\n\r\n",
                         b + b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"):
                self.check(head)


class ShortPathTests(unittest.TestCase):
    """Plain reads and admin pushes of one channel take a short path in
    App.route(); a parameter nobody reads (x) sends the same request down
    the general route, and both must answer the same bytes."""

    def one(self, s, f, data):
        s.sendall(data)
        return read_response(f)

    def pair(self, request, version="1.1", extra=""):
        """(short, general) replies to GET ``request`` (a path and query)."""
        with connect() as s:
            f = s.makefile("rb")
            return [self.one(s, f, (
                f"GET {path} HTTP/{version}\r\nHost: localhost\r\n"
                f"{extra}\r\n").encode())
                for path in (request, request + "&x=1")]

    def test_reads_answer_as_the_general_route(self):
        name = register()
        ids = [push(name, f"m{i} \u00e9\"<>").get("message_id")
               for i in range(3)]
        for query in ("since=0", f"since={ids[0]}", f"since={ids[2] - 1}",
                      "since=0&cb=_JSONP_x.y"):
            for suffix in (".json", ".jsonp"):
                for version, extra in (("1.1", ""), ("1.0", "keep"),
                                       ("1.1", "Connection: close\r\n")):
                    with self.subTest(query=query, suffix=suffix,
                                      version=version, extra=extra):
                        if extra == "keep":
                            replies = self.pair(
                                f"/channels/{name}{suffix}?{query}",
                                version, "Connection: keep-alive\r\n")
                        elif extra:
                            replies = [exchange(get_request(
                                f"/channels/{name}{suffix}?{query}" + q,
                                extra)) for q in ("", "&x=1")]
                        else:
                            replies = self.pair(
                                f"/channels/{name}{suffix}?{query}",
                                version)
                        self.assertEqual(replies[0], replies[1])
                        self.assertIn(b"m2", replies[0][0][-1]
                                      if extra == "Connection: close\r\n"
                                      else replies[0][-1])

    def test_refusals_and_held_polls_answer_as_the_general_route(self):
        name = register()
        last = push(name, "one")["message_id"]
        for query in (f"since={last + 10 ** 9}", "since=-1", "since=",
                      "since=1&since=2", "since=1e3", "cb=x"):
            with self.subTest(query=query):
                short, general = self.pair(f"/channels/{name}.jsonp?{query}")
                self.assertEqual(short, general)
        short, general = self.pair(f"/channels/{fresh()}.json?since=0")
        self.assertEqual(short, general)
        self.assertIn(b"-2", short[-1])
        # Two held polls, one down each path: the same reply to one push.
        held = []
        for q in ("", "&x=1"):
            s = connect()
            s.sendall(get_request(f"/channels/{name}.json?since={last}{q}"))
            held.append(s)
        wait_held(2)
        push(name, "two")
        replies = [read_response(s.makefile("rb")) for s in held]
        for s in held:
            s.close()
        self.assertEqual(replies[0], replies[1])
        self.assertIn(b'"two"', replies[0][-1])

    def test_pushes_answer_as_the_general_route(self):
        name = register()
        with connect() as s:
            f = s.makefile("rb")
            replies = [self.one(s, f, post_request(
                f"/channels/{name}.json", params))
                for params in ({"content": "a b+c%d\u00e9"},
                               {"content": "a b+c%d\u00e9", "x": ""})]
        bodies = [json.loads(r[2]) for r in replies]
        self.assertEqual(bodies[1]["message_id"], bodies[0]["message_id"] + 1)
        for body in bodies:
            del body["message_id"]
        self.assertEqual(len(replies[0][2]), len(replies[1][2]))
        self.assertEqual(replies[0][:2], replies[1][:2])
        self.assertEqual(bodies[0], bodies[1])
        messages = read([name])["messages"][name]
        self.assertEqual([m["content"] for m in messages],
                         ["a b+c%d\u00e9"] * 2)
        # A push to no channel, and one with no content: as before.
        for params in ({"content": "x"}, {}):
            with self.subTest(params=params):
                other = fresh() if params else name
                short = api("POST", f"/channels/{other}.json", params)
                general = api("POST", f"/channels/{other}.json",
                              {**params, "x": ""})
                self.assertEqual(short, general)
                self.assertLess(short["return_code"], 0)

    def test_a_connection_s_repeated_header_lines_are_judged_alike(self):
        # A connection keeps its last header lines (HeadParsingTests):
        # behind the same lines, a bad request line is still refused, and
        # HTTP/1.1 still needs the Host that HTTP/1.0 did without.
        name = register()
        push(name, "one")
        for first, second, status in (
                (f"GET /channels/{name}.json?since=0 HTTP/1.1",
                 f"GET  /channels/{name}.json?since=0 HTTP/1.1", 400),
                (f"GET /channels/{name}.json?since=0 HTTP/1.1",
                 f"GET /channels/{name}.json?since=0 HTTP/1.2", 505),
                (f"GET /channels/{name}.json?since=0 HTTP/1.0",
                 f"GET /channels/{name}.json?since=0 HTTP/1.1", 400)):
            lines = "Connection: keep-alive\r\nX-Same: 1\r\n"
            if first.endswith("1.1"):
                lines = "Host: localhost\r\n" + lines
            with self.subTest(second=second), connect() as s:
                f = s.makefile("rb")
                reply = self.one(s, f, f"{first}\r\n{lines}\r\n".encode())
                self.assertIn(b'"one"', reply[-1])
                reply = self.one(s, f, f"{second}\r\n{lines}\r\n".encode())
                self.assertEqual(reply[0], status, reply)

    def test_pushes_of_every_size_on_one_connection(self):
        # The same header lines but for Content-Length's value: every body
        # is read at its own length, one request at a time and pipelined.
        name = register()
        contents = ["x" * n for n in (1, 9, 1, 10, 99, 100, 7, 1000, 3)]
        with connect() as s:
            f = s.makefile("rb")
            for content in contents:
                reply = self.one(s, f, post_request(f"/channels/{name}.json",
                                                    {"content": content}))
                self.assertEqual(json.loads(reply[2])["return_code"], 1)
        replies = pipeline([post_request(f"/channels/{name}.json",
                                         {"content": c}) for c in contents],
                           PORT)
        self.assertEqual([json.loads(r[2])["return_code"] for r in replies],
                         [1] * len(contents))
        messages = read([name])["messages"][name]
        self.assertEqual([m["content"] for m in messages], contents * 2)


class HTTPTests(unittest.TestCase):

    def setUp(self):
        self.name = register()
        self.last = push(self.name, "hello")["message_id"]
        self.path = f"/channels/{self.name}.json"

    def assertStatus(self, data, expected, closed=True):
        """One reply with the expected status; the server closes the
        connection after it when closed is true, else keeps it."""
        with connect() as s:
            s.sendall(data)
            f = s.makefile("rb")
            replies = [read_response(f)]
            if closed:
                try:
                    self.assertIsNone(read_response(f))
                except ConnectionResetError:
                    pass      # closed with the rest of our request unread
            else:
                s.sendall(get_request("/again.json"))
                self.assertEqual(read_response(f)[0], 404)
        self.assertEqual([r[0] for r in replies], [expected], replies)
        status, headers, body = replies[0]
        if expected >= 400:
            self.assertEqual(headers["content-type"], "application/json")
            self.assertTrue(json.loads(body)["error_message"].startswith(
                str(expected)))
        if closed:
            self.assertEqual(headers.get("connection"), "close")
        return headers, body

    def test_keep_alive_and_pipelining(self):
        post = (f"POST {self.path} HTTP/1.1\r\nHost: x\r\nContent-Type: "
                "application/x-www-form-urlencoded\r\nContent-Length: 9\r\n"
                "\r\ncontent=2").encode()
        with connect() as s:
            # Three requests in one write, answered in order.
            s.sendall(get_request(self.path) + post + get_request(self.path))
            f = s.makefile("rb")
            replies = [read_response(f) for _ in range(3)]
            # And the connection is still open for more.
            s.sendall(get_request("/channels/" + self.name + ".json"))
            replies.append(read_response(f))
        self.assertEqual([r[0] for r in replies], [200] * 4)
        bodies = [json.loads(r[2]) for r in replies]
        self.assertEqual(len(bodies[0]["messages"][self.name]), 1)
        self.assertEqual(bodies[1]["return_code"], 1)
        self.assertEqual(len(bodies[2]["messages"][self.name]), 2)
        self.assertTrue(all("connection" not in r[1] for r in replies))

    def test_connection_close(self):
        replies = exchange(get_request(self.path, "Connection: close\r\n") +
                           get_request(self.path))
        self.assertEqual(len(replies), 1)
        self.assertEqual(replies[0][1]["connection"], "close")

    def test_http_1_0(self):
        replies = exchange(f"GET {self.path} HTTP/1.0\r\n\r\n".encode())
        self.assertEqual(len(replies), 1)
        self.assertEqual(replies[0][0], 200)
        self.assertEqual(replies[0][1]["connection"], "close")
        with connect() as s:
            s.sendall(f"GET {self.path} HTTP/1.0\r\nConnection: keep-alive"
                      "\r\n\r\n".encode() * 2)
            f = s.makefile("rb")
            for _ in range(2):
                status, headers, _ = read_response(f)
                self.assertEqual(headers["connection"], "keep-alive")

    def test_http_1_0_held_poll(self):
        # nginx's default upstream protocol: HTTP/1.0, one request each.
        poll = Background(exchange, f"GET {self.path}?since={self.last} "
                          "HTTP/1.0\r\n\r\n".encode())
        wait_held(1)
        push(self.name, "woken")
        replies = poll.result()
        self.assertEqual(len(replies), 1)
        body = json.loads(replies[0][2])
        self.assertEqual(body["messages"][self.name][0]["content"], "woken")

    def test_chunked_body(self):
        body = b"conte\r\n"
        request = (f"POST {self.path} HTTP/1.1\r\nHost: x\r\n"
                   "Transfer-Encoding: chunked\r\n\r\n"
                   "5;ext=1\r\nconte\r\n6\r\nnt=chu\r\n4\r\nnked\r\n"
                   "0\r\nTrailer: x\r\n\r\n").encode()
        del body
        with connect() as s:
            s.sendall(request + get_request(self.path))
            f = s.makefile("rb")
            self.assertEqual(json.loads(read_response(f)[2])["return_code"], 1)
            reply = json.loads(read_response(f)[2])
        self.assertEqual(reply["messages"][self.name][-1]["content"],
                         "chunked")

    def test_expect_100_continue(self):
        with connect() as s:
            s.sendall(f"POST {self.path} HTTP/1.1\r\nHost: x\r\n"
                      "Expect: 100-continue\r\nContent-Length: 12\r\n\r\n"
                      .encode())
            f = s.makefile("rb")
            self.assertEqual(f.readline(), b"HTTP/1.1 100 Continue\r\n")
            self.assertEqual(f.readline(), b"\r\n")
            s.sendall(b"content=cont")
            self.assertEqual(json.loads(read_response(f)[2])["return_code"], 1)
        self.assertStatus(f"POST {self.path} HTTP/1.1\r\nHost: x\r\nExpect: "
                          "100-continue\r\nContent-Length: 2000000\r\n\r\n"
                          .encode(), 413)
        self.assertStatus(f"POST {self.path} HTTP/1.1\r\nHost: x\r\nExpect: "
                          "something\r\nContent-Length: 0\r\n\r\n".encode(),
                          417)

    def test_head(self):
        with connect() as s:
            s.sendall(f"HEAD {self.path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
                      + get_request(self.path))
            f = s.makefile("rb")
            line = f.readline()
            self.assertTrue(line.startswith(b"HTTP/1.1 200"))
            headers = {}
            while (line := f.readline()) != b"\r\n":
                k, _, v = line.decode().partition(":")
                headers[k.lower()] = v.strip()
            # No body: the next bytes are the GET's reply.
            status, get_headers, body = read_response(f)
        self.assertEqual(status, 200)
        self.assertEqual(headers["content-length"],
                         get_headers["content-length"])
        # A HEAD is never held.
        resp, body = call("HEAD", f"{self.path}?since={self.last}")
        self.assertEqual((resp.status, body), (200, b""))

    def test_malformed_requests_get_400(self):
        for data in (b"GET\r\n\r\n",
                     b"GET / HTTP/1.1 extra\r\nHost: x\r\n\r\n",
                     b"GET  / HTTP/1.1\r\nHost: x\r\n\r\n",
                     b"G\x00T / HTTP/1.1\r\nHost: x\r\n\r\n",
                     b"GET / HTTX/1.1\r\nHost: x\r\n\r\n",
                     b"GET nopath HTTP/1.1\r\nHost: x\r\n\r\n",
                     b"GET /\xff HTTP/1.1\r\nHost: x\r\n\r\n",
                     b"GET / HTTP/1.1\r\nNo colon\r\nHost: x\r\n\r\n",
                     b"GET / HTTP/1.1\r\nHost : x\r\n\r\n",
                     b"GET / HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n",
                     b"GET / HTTP/1.1\r\nHost: x\rX: y\r\n\r\n",
                     b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
                     b"GET / HTTP/1.1\r\n\r\n",
                     b"GET / HTTP/1.1\r\nHost: x\r\nX: a\x01b\r\n\r\n",
                     b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n"
                     b"Content-Length: 2\r\n\r\n",
                     b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
                     b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1x\r\n\r\n",
                     b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n",
                     b"POST /channels.json HTTP/1.1\r\nHost: x\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\nzz\r\n",
                     b"POST /channels.json HTTP/1.1\r\nHost: x\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n",
                     b"GET /channels/%zz.json HTTP/1.1\r\nHost: x\r\n\r\n",
                     b"GET /channels/%ff.json HTTP/1.1\r\nHost: x\r\n\r\n",
                     b"GET /channels/a.json?since=%ff HTTP/1.1\r\nHost: x\r\n"
                     b"\r\n",
                     b"GET /channels/a.json?x=%g HTTP/1.1\r\nHost: x\r\n\r\n"):
            with self.subTest(data=data):
                self.assertStatus(data, 400)

    def test_status_codes(self):
        headers, _ = self.assertStatus(
            b"PUT /channels.json HTTP/1.1\r\nHost: x\r\n\r\n", 405,
            closed=False)
        self.assertEqual(headers["allow"], "POST")
        headers, _ = self.assertStatus(
            f"PATCH {self.path} HTTP/1.1\r\nHost: x\r\n\r\n".encode(), 405,
            closed=False)
        self.assertEqual(headers["allow"], "GET, HEAD, POST, DELETE, OPTIONS")
        for path in ("/", "/nothing", "/channel.json", "/channels", "/channels/a",
                     "/channels/a.xml", "/channels/a/b.json", "/clients",
                     "/status.xml"):
            with self.subTest(path=path):
                self.assertStatus(get_request(path), 404, closed=False)
        self.assertStatus(b"GET / HTTP/2.0\r\nHost: x\r\n\r\n", 505)
        self.assertStatus(b"GET / HTTP/0.9\r\nHost: x\r\n\r\n", 505)
        self.assertStatus(b"POST /channels.json HTTP/1.1\r\nHost: x\r\n"
                          b"Transfer-Encoding: gzip\r\n\r\n", 501)
        self.assertStatus(b"POST /channels.json HTTP/1.1\r\nHost: x\r\n"
                          b"Content-Length: 1048577\r\n\r\n", 413)
        chunk = b"%x\r\n" % (600 * 1024) + b"x" * (600 * 1024) + b"\r\n"
        self.assertStatus(b"POST /channels.json HTTP/1.1\r\nHost: x\r\n"
                          b"Transfer-Encoding: chunked\r\n\r\n" + chunk * 2,
                          413)
        self.assertStatus(b"GET /" + b"a" * 8200 + b" HTTP/1.1\r\n"
                          b"Host: x\r\n\r\n", 414)
        self.assertStatus(b"GET /" + b"a" * 40000 + b" HTTP/1.1\r\n"
                          b"Host: x\r\n\r\n", 414)
        self.assertStatus(b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 17000 +
                          b"\r\n\r\n", 431)
        self.assertStatus(b"GET / HTTP/1.1\r\nHost: x\r\n" +
                          b"X: a\r\n" * 101 + b"\r\n", 431)
        self.assertStatus(b"POST /channels.json HTTP/1.1\r\nHost: x\r\n"
                          b"Content-Type: multipart/form-data\r\n"
                          b"Content-Length: 3\r\n\r\na=b", 415, closed=False)
        # Limits themselves are allowed.
        self.assertStatus(b"GET /" + b"a" * 8000 + b" HTTP/1.1\r\n"
                          b"Host: x\r\n\r\n", 404, closed=False)
        self.assertStatus(b"GET / HTTP/1.1\r\nHost: x\r\n" +
                          b"X: a\r\n" * 99 + b"\r\n", 404, closed=False)

    def test_max_body_switch(self):
        server = ServerProcess("--max-body=20")
        try:
            self.assertEqual(api("POST", "/channels.json", {"channel_id": "m"},
                                 port=server.port)["return_code"], 1)
            resp, body = call("POST", "/channels/m.json", {"content": "x" * 20},
                              port=server.port)
            self.assertEqual(resp.status, 413)
        finally:
            server.close()

    def test_get_body_is_read_and_ignored(self):
        with connect() as s:
            s.sendall(f"GET {self.path} HTTP/1.1\r\nHost: x\r\n"
                      "Content-Length: 6\r\n\r\n\xff=%zz&".encode("latin-1") +
                      get_request(self.path))
            f = s.makefile("rb")
            for _ in range(2):
                status_code, _, body = read_response(f)
                self.assertEqual(status_code, 200)
                self.assertEqual(json.loads(body)["messages"][self.name][0]
                                 ["content"], "hello")

    def test_absolute_form_target(self):
        replies = exchange(f"GET http://localhost:4080{self.path} HTTP/1.1\r\n"
                           "Host: localhost\r\nConnection: close\r\n\r\n"
                           .encode())
        self.assertEqual(replies[0][0], 200)
        self.assertEqual(json.loads(replies[0][2])["messages"][self.name][0]
                         ["content"], "hello")

    def test_bad_input_does_not_disturb_other_connections(self):
        poll = Background(read, [self.name], since=self.last)
        wait_held(1)
        for data in (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" * 20,
                     b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n",
                     b"\r\n" * 100):
            with connect(timeout=2) as s:
                s.sendall(data)
                s.shutdown(socket.SHUT_WR)
                try:
                    s.recv(65536)
                except OSError:
                    pass
        push(self.name, "still here")
        self.assertEqual(poll.result()["messages"][self.name][0]["content"],
                         "still here")


class TimeoutTests(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.server = ServerProcess("--http-timeout=0.4", "--poll-timeout=0.2")

    @classmethod
    def tearDownClass(cls):
        cls.server.close()

    def closed_after(self, data):
        with connect(self.server.port) as s:
            start = time.monotonic()
            if data:
                s.sendall(data)
            received = b""
            while chunk := s.recv(65536):
                received += chunk
            return time.monotonic() - start, received

    def test_idle_connection_closed(self):
        elapsed, received = self.closed_after(b"")
        self.assertEqual(received, b"")
        self.assertGreaterEqual(elapsed, 0.35)
        self.assertLess(elapsed, 5)

    def test_partial_request_closed(self):
        elapsed, received = self.closed_after(b"GET /channels/a.json HTTP/1.1"
                                              b"\r\nHost: x\r\n")
        self.assertGreaterEqual(elapsed, 0.35)
        self.assertLess(elapsed, 5)

    def test_keep_alive_idle_after_reply(self):
        request = b"GET /nope.json HTTP/1.1\r\nHost: x\r\n\r\n"
        elapsed, received = self.closed_after(request)
        self.assertTrue(received.startswith(b"HTTP/1.1 404"))
        self.assertGreaterEqual(elapsed, 0.35)

    def test_held_polls_outlive_the_http_timeout(self):
        # Polls answered by --poll-timeout keep their connection going.
        name = register(port=self.server.port)
        with connect(self.server.port) as s:
            f = s.makefile("rb")
            for _ in range(4):                 # 0.8 s in all, > 0.4
                s.sendall(get_request(f"/channels/{name}.json"))
                status, headers, body = read_response(f)
                self.assertEqual(json.loads(body)["messages"], {name: []})


# ---------------------------------------------------------------------------
# B. Shutdown, connection cap, hostile input
# ---------------------------------------------------------------------------

class ShutdownTests(unittest.TestCase):

    def test_signal_answers_held_polls_and_cleans_up(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            with self.subTest(sig=sig), tempfile.TemporaryDirectory() as d:
                path = os.path.join(d, "comet.sock")
                server = ServerProcess(f"--unix-socket-path={path}",
                                       "--enable-status")
                try:
                    name = register(port=server.port)
                    last = push(name, "x", port=server.port)["message_id"]
                    target = f"/channels/{name}.json?since={last}"
                    polls = [Background(exchange, get_request(target),
                                        server.port),
                             Background(exchange, f"GET {target} HTTP/1.0\r\n"
                                        "\r\n".encode(), server.port)]
                    idle = connect(server.port)
                    # Both polls held, the idle connection taken (and the
                    # one asking).
                    wait_for(lambda: (lambda st: (
                        st["held_connections_count"], st["connections"]))(
                            status(server.port)) == (2, 4))
                    self.assertEqual(server.stop(sig, timeout=5), 0)
                    for poll in polls:
                        replies = poll.result()
                        self.assertEqual(len(replies), 1)
                        code, headers, body = replies[0]
                        self.assertEqual(headers["connection"], "close")
                        self.assertEqual(json.loads(body)["messages"],
                                         {name: []})
                    self.assertEqual(idle.recv(10), b"")
                    idle.close()
                    self.assertFalse(os.path.exists(path))
                    self.assertNotIn("Traceback", server.output())
                    with self.assertRaises(OSError):
                        connect(server.port).close()
                finally:
                    server.close()


class ConnectionCapTests(unittest.TestCase):

    def test_connections_beyond_the_cap_are_refused_at_once(self):
        # Loopback may go LOCAL_RESERVE beyond the cap (SPEC C4), so that a
        # saturated server can still be looked at; then 503.
        cap = 3 + simple_comet.LOCAL_RESERVE
        server = ServerProcess("--max-connections=3", "--enable-status")
        held = []
        try:
            for _ in range(cap):
                s = connect(server.port)
                held.append((s, s.makefile("rb")))
                s.sendall(get_request("/status.json"))
                self.assertEqual(read_response(held[-1][1])[0], 200)
            with connect(server.port) as extra:
                start = time.monotonic()
                f = extra.makefile("rb")
                status_code, headers, body = read_response(f)
                self.assertEqual(status_code, 503)
                self.assertIn("too many connections",
                              json.loads(body)["error_message"])
                self.assertIsNone(read_response(f))
                # At once: not after --http-timeout (30 s).
                self.assertLess(time.monotonic() - start, 3)
            # The first ones are unaffected.
            for s, f in held:
                s.sendall(get_request("/status.json"))
                reply = json.loads(read_response(f)[2])
                self.assertEqual(reply["status"]["connections"], cap)
            s, f = held.pop()
            f.close()
            s.close()
            # A freed slot is usable again.
            wait_for(lambda: self.accepted(server.port, cap))
        finally:
            for s, f in held:
                f.close()
                s.close()
            server.close()

    @staticmethod
    def accepted(port, count):
        try:
            return status(port)["connections"] == count
        except (OSError, http.client.HTTPException, AssertionError):
            return False


# SIMPLE_COMET_LONG=1 runs the long version.
FUZZ_REQUESTS = 100_000 if os.environ.get("SIMPLE_COMET_LONG") else 400


class FuzzTests(unittest.TestCase):
    """Seeded mutations of valid requests: the server must answer every one
    with a real status or close, print no traceback, and lose nothing."""

    SEEDS = [
        b"GET /channels/fz.json?since=0 HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /channels/fz%7Cother.jsonp?since=1&cb=_JSONP_x HTTP/1.1\r\n"
        b"Host: x\r\n\r\n",
        b"POST /channels/fz.json HTTP/1.1\r\nHost: x\r\nContent-Type: "
        b"application/x-www-form-urlencoded\r\nContent-Length: 9\r\n\r\n"
        b"content=z",
        b"POST /channels.json HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: "
        b"chunked\r\n\r\n5\r\nchann\r\n7\r\nel_id=q\r\n0\r\n\r\n",
        b"POST /clients.json HTTP/1.0\r\nContent-Length: 11\r\n\r\n"
        b"client_id=c",
        b"DELETE /channels/gone.json HTTP/1.1\r\nHost: x\r\n\r\n",
        b"OPTIONS /channels/fz.json HTTP/1.1\r\nHost: x\r\n\r\n",
        b"HEAD /status.json HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n\r\n",
    ]
    JUNK = [b"\x00", b"\xff\xfe", b"%", b"%zz", b"%C3%28", b"\r\n", b"\n",
            b"\r", b" ", b":", b"|", b"%7C", b"Content-Length: 5\r\n",
            b"Content-Length: 99999999999999999999\r\n",
            b"Transfer-Encoding: chunked\r\n", b"Host: y\r\n",
            b"since=-1", b"since=99999999999999999999999", b"cb=alert",
            b"cb=_JSONP_" + b"a" * 80, b"ffffffffffffffffff\r\n",
            b"\xc3\x28", b"\xed\xa0\x80", b"9" * 50, b"?", b"&", b"=",
            b"HTTP/1.1", b"HTTP/9.9"]

    def mutate(self, rng, data):
        data = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            op = rng.randrange(6)
            pos = rng.randrange(len(data) + 1)
            if op == 0 and data:                       # flip a bit
                i = min(pos, len(data) - 1)
                data[i] ^= 1 << rng.randrange(8)
            elif op == 1:                              # truncate
                del data[pos:]
            elif op == 2:                              # insert junk
                data[pos:pos] = rng.choice(self.JUNK)
            elif op == 3:                              # duplicate a header
                lines = bytes(data).split(b"\r\n")
                if len(lines) > 2:
                    k = rng.randrange(1, len(lines) - 1)
                    lines.insert(k, lines[k])
                    data = bytearray(b"\r\n".join(lines))
            elif op == 4 and data:                     # delete a span
                del data[pos:pos + rng.randint(1, 8)]
            else:                                      # repeat a span
                data[pos:pos] = data[pos:pos + rng.randint(1, 16)] * \
                    rng.randint(2, 50)
        return bytes(data)

    def test_fuzz(self):
        server = ServerProcess("--enable-status",
                               "--poll-timeout=0.05", "--http-timeout=0.3")
        try:
            for name in ("fz", "other", "kept"):
                register(name, port=server.port)
            # On a channel the mutated requests do not name, so its short
            # history is not pushed out by their pushes.
            pushed = [push("kept", f"keep {i} \u2028é", port=server.port)
                      ["message_id"] for i in range(5)]
            rng = random.Random(20261121)
            statuses = {}
            for _ in range(FUZZ_REQUESTS):
                data = self.mutate(rng, rng.choice(self.SEEDS))
                try:
                    with connect(server.port, timeout=10) as s:
                        s.sendall(data)
                        s.shutdown(socket.SHUT_WR)
                        reply = b""
                        while chunk := s.recv(65536):
                            reply += chunk
                except ConnectionResetError:
                    reply = b"reset"
                code = reply[9:12] if reply.startswith(b"HTTP/1.1 ") else \
                    reply[:5]
                statuses[code] = statuses.get(code, 0) + 1
                if reply.startswith(b"HTTP/1.1 5") and \
                        not reply.startswith((b"HTTP/1.1 501",
                                              b"HTTP/1.1 505")):
                    self.fail(f"server error for {data!r}: {reply!r}")
            report(f"fuzz: {FUZZ_REQUESTS} mutated requests, replies by "
                   f"status {dict(sorted(statuses.items()))}")
            self.assertGreater(statuses.get(b"200", 0), 10, statuses)
            self.assertGreater(statuses.get(b"400", 0), 10, statuses)
            reply = read(["kept"], port=server.port)
            self.assertEqual([m["id"] for m in reply["messages"]["kept"]],
                             pushed)
            self.assertEqual([m["content"] for m in reply["messages"]["kept"]],
                             [f"keep {i} \u2028é" for i in range(5)])
            self.assertEqual(server.stop(), 0)
            self.assertNotIn("Traceback", server.output())
            self.assertNotIn(" ERROR ", server.output())
        finally:
            server.close()


# ---------------------------------------------------------------------------
# B. The JavaScript client in a real Chromium
# ---------------------------------------------------------------------------
#
# Chromium is driven through the DevTools protocol over --remote-debugging-pipe
# (JSON messages ended by a NUL byte; Chromium reads commands on fd 3 and
# writes replies and events on fd 4). The test page comes from a second origin
# (a throwaway http.server on another loopback port), as a real page would.
# Skipped when no Chromium is installed.

CLIENT_JS = os.path.join(HERE, "simple-comet.js")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class Chromium:
    """Headless Chromium driven over --remote-debugging-pipe."""

    def __init__(self, binary):
        self.profile = tempfile.mkdtemp(prefix="simple-comet-chromium-")
        cmd_r, cmd_w = os.pipe()      # we write commands, Chromium reads (fd 3)
        out_r, out_w = os.pipe()      # Chromium writes (fd 4), we read
        # Chromium's ends go to fds >= 10 first, so that putting them on
        # fds 3 and 4 (in a small Python trampoline, which keeps this free of
        # preexec_fn) cannot clobber one with the other.
        a = fcntl.fcntl(cmd_r, fcntl.F_DUPFD, 10)
        b = fcntl.fcntl(out_w, fcntl.F_DUPFD, 10)
        os.close(cmd_r)
        os.close(out_w)
        args = [binary, "--headless", "--no-sandbox", "--disable-gpu",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run",
                "--user-data-dir=" + self.profile,
                "--remote-debugging-pipe", "about:blank"]
        trampoline = ("import os, sys; a, b = int(sys.argv[1]), int(sys.argv[2]); "
                      "os.dup2(a, 3); os.dup2(b, 4); os.close(a); os.close(b); "
                      "os.execv(sys.argv[3], sys.argv[3:])")
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", trampoline, str(a), str(b)] + args,
                pass_fds=(a, b), stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        finally:
            os.close(a)
            os.close(b)
        self.wfd, self.rfd = cmd_w, out_r
        self.buf = b""
        self.next_id = 0

    def send(self, method, params=None, session=None, timeout=10):
        """Send one command and return its result (events are dropped)."""
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        data = json.dumps(msg).encode() + b"\0"
        while data:
            data = data[os.write(self.wfd, data):]
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self.buf:
                raw, self.buf = self.buf.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self.next_id:
                    if "error" in reply:
                        raise RuntimeError("%s: %s" % (method, reply["error"]))
                    return reply.get("result", {})
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.rfd], [], [], left)[0]:
                raise TimeoutError("no answer to " + method)
            chunk = os.read(self.rfd, 1 << 16)
            if not chunk:
                raise RuntimeError("Chromium went away")
            self.buf += chunk

    def new_tab(self, url="about:blank"):
        target = self.send("Target.createTarget", {"url": url})["targetId"]
        session = self.send("Target.attachToTarget",
                            {"targetId": target, "flatten": True})["sessionId"]
        return Tab(self, target, session)

    def close(self):
        try:
            self.send("Browser.close", timeout=5)
        except Exception:
            pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self.wfd)
        os.close(self.rfd)
        shutil.rmtree(self.profile, ignore_errors=True)


class Tab:
    def __init__(self, browser, target, session):
        self.browser, self.target, self.session = browser, target, session

    def navigate(self, url):
        self.browser.send("Page.navigate", {"url": url}, self.session)

    def js(self, expression):
        """Evaluate `expression` in the page and return its value."""
        result = self.browser.send("Runtime.evaluate", {
            "expression": expression, "returnByValue": True}, self.session)
        if "exceptionDetails" in result:
            raise RuntimeError("page error: %s" % result["exceptionDetails"])
        return result["result"].get("value")

    def wait_for(self, expression, timeout=10):
        """Poll `expression` until it is truthy; return its last value."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                value = self.js(expression)
            except RuntimeError:      # page still loading
                value = None
            if value or time.monotonic() > deadline:
                return value
            time.sleep(0.05)

    def close(self):
        self.browser.send("Target.closeTarget", {"targetId": self.target})


PAGE = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>simple-comet.js test</title>
<script src="/simple-comet.js"></script>
<script>
var COMET = "http://127.0.0.1:%(port)d/channels/";
var got = [], replies = 0, errors = 0;
// record("s1") makes a callback that logs "s1 channel content" per message.
function record(tag) {
  return function (reply) {
    replies++;
    for (var c in reply.messages)
      for (var i = 0; i < reply.messages[c].length; i++)
        got.push(tag + " " + c + " " + reply.messages[c][i].content);
  };
}
var codes = [];                  // return_code of each failed reply
function failed(what) { errors++; if (what && what.return_code) codes.push(what.return_code); }
%(script)s
</script></head><body></body></html>
"""


class PageHandler(http.server.BaseHTTPRequestHandler):
    """The page's origin: simple-comet.js and the tests' pages."""

    pages = {}                        # path -> HTML, filled by the tests
    minted = None                     # a tiny backend: GET /token mints one

    def do_GET(self):
        if self.path == "/token" and self.minted is not None:
            body, ctype = self.minted().encode(), "text/plain"
        elif self.path == "/simple-comet.js":
            with open(CLIENT_JS, "rb") as f:
                body, ctype = f.read(), "application/javascript"
        elif self.path in self.pages:
            body, ctype = self.pages[self.path].encode(), "text/html; charset=utf-8"
        else:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class BrowserPages:
    """A Chromium of the class's own, and a second origin that serves
    simple-comet.js and the tests' pages."""

    @classmethod
    def setUpClass(cls):
        cls.pages = http.server.ThreadingHTTPServer(("127.0.0.1", 0), PageHandler)
        cls.pages.daemon_threads = True
        threading.Thread(target=cls.pages.serve_forever, daemon=True).start()
        cls.page_origin = "http://127.0.0.1:%d" % cls.pages.server_address[1]
        try:
            cls.browser = Chromium(CHROMIUM)
            # Its first start on a busy machine (fonts, a new profile) can
            # take longer than any later command.
            cls.browser.send("Target.getTargets", timeout=30)
        except Exception:
            if hasattr(cls, "browser"):
                cls.browser.close()
            cls.pages.shutdown()
            cls.pages.server_close()
            raise

    @classmethod
    def tearDownClass(cls):
        cls.browser.close()
        cls.pages.shutdown()
        cls.pages.server_close()


@unittest.skipUnless(CHROMIUM, "Chromium not installed (apt-get install chromium)")
class BrowserTests(BrowserPages, unittest.TestCase):
    """simple-comet.js in a real browser, on a page of another origin."""

    part = "D"                  # run by the third process, see main()

    def start_server(self, poll_timeout, port=FREE):
        server = ServerProcess("--enable-status",
                               f"--poll-timeout={poll_timeout}", port=port)
        self.addCleanup(server.close)
        return server

    def setUp(self):
        self.server = self.start_server(0.2)
        self.port = self.server.port
        self.tab = self.browser.new_tab()
        self.addCleanup(self.tab.close)

    def open_page(self, script, port=None):
        """Load a page from the other origin that runs `script`."""
        path = "/%s.html" % self.id().rsplit(".", 1)[-1]
        PageHandler.pages[path] = PAGE % {"port": port or self.port, "script": script}
        self.tab.navigate(self.page_origin + path)
        self.assertTrue(self.tab.wait_for("window.got !== undefined"), "page did not load")

    def wait_held(self, count, port=None):
        """Wait until the server holds at least `count` polls (abandoned
        polls still held count too)."""
        wait_for(lambda: status(port or self.port)["held_connections_count"]
                 >= count)

    def wait_got(self, expected, timeout=10):
        """Wait until the page recorded `expected` (a list), then check it."""
        self.tab.wait_for("got.length >= %d" % len(expected), timeout)
        self.assertEqual(self.tab.js("got"), expected)

    def test_retained_message_arrives(self):
        register("R", port=self.port)
        push("R", "before the page", port=self.port)
        self.open_page('SimpleComet.subscribe(COMET + "R.jsonp", record("s"));'
                       'SimpleComet.start();')
        self.wait_got(["s R before the page"])

    def test_held_poll_woken_by_either_channel(self):
        register("A", port=self.port)
        register("B", port=self.port)
        self.open_page('SimpleComet.subscribe(COMET + "A%7CB.jsonp", record("s"));'
                       'SimpleComet.start();')
        self.wait_held(1)
        push("B", "to B", port=self.port)
        self.wait_got(["s B to B"])
        self.wait_held(1)
        push("A", "to A", port=self.port)
        self.wait_got(["s B to B", "s A to A"])

    def test_two_subscriptions_on_one_page(self):
        register("X", port=self.port)
        register("Y", port=self.port)
        # One subscription before start(), one after it.
        self.open_page('SimpleComet.subscribe(COMET + "X.jsonp", record("one"));'
                       'SimpleComet.start();'
                       'SimpleComet.subscribe(COMET + "Y.jsonp", record("two"));')
        self.wait_held(2)
        push("X", "x1", port=self.port)
        self.wait_got(["one X x1"])
        self.wait_held(2)
        push("Y", "y1", port=self.port)
        self.wait_got(["one X x1", "two Y y1"])
        self.wait_held(2)
        push("X", "x2", port=self.port)
        self.wait_got(["one X x1", "two Y y1", "one X x2"])

    def test_delivery_continues_after_poll_timeout(self):
        register("T", port=self.port)
        self.open_page('SimpleComet.subscribe(COMET + "T.jsonp", record("s"), null, failed);'
                       'SimpleComet.start();')
        # The server answers each held poll empty after 0.2 s; the client
        # must take that as a success and poll again.
        self.assertTrue(self.tab.wait_for("replies >= 3"), "no empty replies seen")
        self.wait_held(1)
        push("T", "later", port=self.port)
        self.wait_got(["s T later"])
        self.assertEqual(self.tab.js("errors"), 0)

    def test_burst_arrives_once_in_order(self):
        register("M", port=self.port)
        self.open_page('SimpleComet.subscribe(COMET + "M.jsonp", record("s"));'
                       'SimpleComet.start();')
        self.wait_held(1)
        expected = ["s M m%d" % i for i in range(20)]
        for i in range(20):
            push("M", "m%d" % i, port=self.port)
        self.wait_got(expected)
        time.sleep(0.5)               # nothing more may come
        self.assertEqual(self.tab.js("got"), expected)
        # Script tags are removed: at most the one poll in flight is left,
        # and only its callback remains.
        self.assertLessEqual(self.tab.js(
            'document.querySelectorAll("script[src*=\'cb=\']").length'), 1)
        self.assertLessEqual(self.tab.js(
            "Object.keys(window._JSONP_SimpleComet || {}).length"), 1)

    def test_client_id_reads_session_channel(self):
        reply = api("POST", "/clients.json", {"client_id": "me & you"},
                    port=self.port)
        self.assertGreater(reply["return_code"], 0, reply)
        register("P", port=self.port, use_sessions="1")
        push("P", "private", port=self.port)
        # With the client_id the session channel is read; without it the
        # read fails (-2) and the error callback hears of it.
        self.open_page('SimpleComet.subscribe(COMET + "P.jsonp", record("in"), "me & you");'
                       'SimpleComet.subscribe(COMET + "P.jsonp", record("out"), null, failed);'
                       'SimpleComet.start();')
        self.wait_got(["in P private"])
        self.assertTrue(self.tab.wait_for("codes.length >= 1"), "no error reported")
        self.assertEqual(self.tab.js("codes[0]"), -2)

    def test_abandoned_polls_are_ignored(self):
        # The server holds polls for 5 s, the client gives up after 0.3 s:
        # several abandoned polls are held when the message comes, and all
        # are answered, but the page must see it once.
        port = self.start_server(5).port
        register("S", port=port)
        self.open_page('SimpleComet.timeout = 300; SimpleComet.backoff = 50;'
                       'SimpleComet.subscribe(COMET + "S.jsonp", record("s"), null, failed);'
                       'SimpleComet.start();', port)
        self.assertTrue(self.tab.wait_for("errors >= 3"), "client time-out did not fire")
        self.wait_held(2, port)
        push("S", "once", port=port)
        self.wait_got(["s S once"])
        time.sleep(0.5)
        self.assertEqual(self.tab.js("got"), ["s S once"])

    def test_recovers_after_server_restart(self):
        register("Z", port=self.port)
        # The client's own back-off defaults are used here.
        self.open_page('SimpleComet.subscribe(COMET + "Z.jsonp", record("s"));'
                       'SimpleComet.start();')
        self.wait_held(1)
        push("Z", "first", port=self.port)
        self.wait_got(["s Z first"])
        self.server.close()
        time.sleep(0.3)               # let the page meet the closed port
        self.server = self.start_server(0.2, port=self.port)
        register("Z", port=self.port)
        push("Z", "second", port=self.port)
        self.wait_got(["s Z first", "s Z second"], timeout=10)


# ---------------------------------------------------------------------------
# B. Deployment behind nginx
# ---------------------------------------------------------------------------
#
# The documented nginx deployment, checked with a real nginx. The nginx
# configuration is taken from the README ("Behind nginx") when the README has
# it; otherwise from README_NGINX_CONF below, which is a copy of it
# (test_readme_matches_copy keeps the two equal). Only the socket path and
# the listening ports are changed for the test. Skipped when nginx is not
# installed.

README = os.path.join(HERE, "README.md")

# Copy of the configuration in the README, section "Behind nginx".
README_NGINX_CONF = '''\
upstream simple_comet {
    server unix:/run/simple-comet/comet.sock;
    keepalive 16;                     # idle connections kept open to the server
    keepalive_timeout 20s;            # below the server's --http-timeout (30 s)
}

# Public: reads only.
server {
    listen 80;
    server_name comet.example.com;

    location /channels/ {
        limit_except GET { deny all; }    # GET and HEAD pass; POST, DELETE, ... get 403

        proxy_pass http://simple_comet;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_buffering off;
        proxy_read_timeout 60s;           # above --poll-timeout (25 s)
    }

    location / {
        return 404;                       # /channels.json, /clients.json, /status.json stay private
    }
}

# Private: publishing, for applications on this host only.
server {
    listen 127.0.0.1:8081;

    location / {
        proxy_pass http://simple_comet;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_buffering off;
        proxy_read_timeout 60s;
    }
}
'''

PROD_SOCKET = '/run/simple-comet/comet.sock'
NGINX_POLL_TIMEOUT = 0.3


def _nginx_binary():
    found = shutil.which('nginx')
    if found:
        return found
    for path in ('/usr/sbin/nginx', '/usr/local/sbin/nginx',
                 '/usr/local/nginx/sbin/nginx'):
        if os.access(path, os.X_OK):
            return path
    return None


NGINX = _nginx_binary()


def readme_nginx_conf():
    """The README's nginx block, or None when the README has none."""
    try:
        with open(README, encoding='utf-8') as f:
            text = f.read()
    except OSError:
        return None
    for block in re.findall(r'^```nginx[ \t]*\n(.*?)^```', text, re.M | re.S):
        if 'upstream simple_comet' in block:
            return block
    return None


def _replace(text, old, new):
    if old not in text:
        raise AssertionError('README nginx configuration no longer contains %r'
                             % old)
    return text.replace(old, new)


def build_nginx_conf(snippet, prefix, sock, public_port, private_port,
                     http10_port):
    """Turn the README snippet into a complete nginx.conf for the test.

    Besides the README's servers, a third server is the README's public
    server in the minimal form the README mentions: proxy_pass straight to
    the socket, nginx's default HTTP/1.0 and one connection per request.
    """
    snippet = _replace(snippet, PROD_SOCKET, sock)
    snippet = _replace(snippet, '    listen 80;\n',
                       '    listen 127.0.0.1:%d;\n' % public_port)
    snippet = _replace(snippet, '    listen 127.0.0.1:8081;\n',
                       '    listen 127.0.0.1:%d;\n' % private_port)

    start = snippet.index('# Public: reads only.')
    end = snippet.index('# Private:')
    minimal = snippet[start:end]
    minimal = _replace(minimal, 'listen 127.0.0.1:%d;' % public_port,
                       'listen 127.0.0.1:%d;' % http10_port)
    minimal = _replace(minimal, 'proxy_pass http://simple_comet;',
                       'proxy_pass http://unix:%s:;' % sock)
    minimal = re.sub(r'^\s*proxy_http_version 1\.1;.*\n', '', minimal,
                     flags=re.M)
    minimal = re.sub(r'^\s*proxy_set_header Connection "";.*\n', '', minimal,
                     flags=re.M)
    assert 'proxy_http_version' not in minimal
    assert 'Connection' not in minimal

    # Workers run unprivileged, as in production: nginx honours "user" when
    # started as root (and ignores it otherwise), so the socket must be
    # reachable by another user.
    group = 'nogroup'
    try:
        grp.getgrnam(group)
    except KeyError:
        group = 'nobody'
    temps = ''.join('    %s_temp_path %s/%s_temp;\n' % (kind, prefix, kind)
                    for kind in ('client_body', 'proxy', 'fastcgi', 'uwsgi',
                                 'scgi'))
    return (
        'daemon off;\n'
        'master_process on;\n'
        'worker_processes 1;\n'
        'user nobody %s;\n'
        'pid %s/nginx.pid;\n'
        'error_log %s/error.log warn;\n'
        'events { worker_connections 256; }\n'
        'http {\n'
        '    access_log off;\n'
        '%s'
        '\n# ---- README configuration ----\n'
        '%s'
        '\n# ---- minimal form (HTTP/1.0, no upstream block) ----\n'
        '%s'
        '}\n' % (group, prefix, prefix, temps, snippet, minimal))


FORM = {'Content-Type': 'application/x-www-form-urlencoded'}


def nginx_unix_sockets(master):
    """The inodes of the connected unix sockets that nginx's master
    process and its workers hold."""
    pids = [master]
    for entry in os.listdir('/proc'):
        if entry.isdigit():
            try:
                with open(f'/proc/{entry}/stat') as f:
                    if int(f.read().rsplit(')', 1)[1].split()[1]) == master:
                        pids.append(int(entry))
            except (OSError, ValueError, IndexError):
                pass
    held = set()
    for pid in pids:
        try:
            fds = os.listdir(f'/proc/{pid}/fd')
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f'/proc/{pid}/fd/{fd}')
            except OSError:
                continue
            if link.startswith('socket:['):
                held.add(link[8:-1])
    with open('/proc/net/unix') as f:
        next(f)
        return {fields[6] for fields in map(str.split, f)
                if fields[5] == '03' and fields[6] in held}


class ReadmeNginx:
    """A class's own server on a unix socket behind a real nginx running the
    README's configuration: a keep-alive upstream on public_port, the
    minimal HTTP/1.0 form on http10_port, the private server on
    private_port."""

    SERVER_ARGS = (f'--poll-timeout={NGINX_POLL_TIMEOUT}', '--enable-status')


    @classmethod
    def setUpClass(cls):
        cls.server = cls.nginx = None
        cls.tmp = tempfile.mkdtemp(prefix='comet-nginx-')
        try:
            cls._start()
        except BaseException:
            cls.tearDownClass()
            raise

    @classmethod
    def _start(cls):
        # Like /run/simple-comet: a folder of mode 0755 that nginx's
        # unprivileged worker can traverse but not write.
        os.chmod(cls.tmp, 0o755)
        run = os.path.join(cls.tmp, 'run')
        os.mkdir(run, 0o755)
        os.chmod(run, 0o755)
        cls.sock = os.path.join(run, 'comet.sock')
        cls.server = ServerProcess(f'--unix-socket-path={cls.sock}',
                                   *cls.SERVER_ARGS, port=None)

        prefix = os.path.join(cls.tmp, 'nginx')
        os.mkdir(prefix, 0o755)
        os.chmod(prefix, 0o755)
        cls.public_port = free_port()
        cls.private_port = free_port()
        cls.http10_port = free_port()
        while len({cls.public_port, cls.private_port, cls.http10_port}) < 3:
            cls.http10_port = free_port()
            cls.private_port = free_port()
        snippet = readme_nginx_conf() or README_NGINX_CONF
        conf = os.path.join(prefix, 'nginx.conf')
        with open(conf, 'w') as f:
            f.write(build_nginx_conf(snippet, prefix, cls.sock,
                                     cls.public_port, cls.private_port,
                                     cls.http10_port))
        cls.nginx_log = os.path.join(prefix, 'error.log')
        cls.nginx_out = os.path.join(prefix, 'stderr.log')
        with open(cls.nginx_out, 'wb') as out:
            cls.nginx = subprocess.Popen(
                [NGINX, '-p', prefix, '-c', conf, '-e', cls.nginx_log],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        pending = [cls.public_port, cls.private_port, cls.http10_port]
        while pending:
            if cls.nginx.poll() is not None:
                raise RuntimeError('nginx exited with %s:\n%s\n%s' % (
                    cls.nginx.returncode, file_text(cls.nginx_out),
                    file_text(cls.nginx_log)))
            try:
                connect(pending[0], timeout=1).close()
                pending.pop(0)
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError('nginx never listened:\n'
                                       + file_text(cls.nginx_log))
                time.sleep(0.02)
        cls.nginx_own = nginx_unix_sockets(cls.nginx.pid)

    @classmethod
    def tearDownClass(cls):
        stop_process(cls.nginx, signal.SIGQUIT)    # graceful shutdown
        if cls.server is not None:
            cls.server.close()
        shutil.rmtree(cls.tmp, ignore_errors=True)


@unittest.skipIf(NGINX is None, 'nginx is not installed (looked for nginx on '
                 'PATH and in /usr/sbin)')
class NginxTests(ReadmeNginx, unittest.TestCase):

    # -- helpers -------------------------------------------------------

    def direct(self, method, path, fields=None):
        """Request straight to the unix socket; returns the JSON reply."""
        return api(method, path, fields, unix=self.sock)

    def via(self, port, method, path, body=None, headers=None, conn=None,
            timeout=5):
        """Request through nginx; returns (response, body bytes, seconds)."""
        own = conn is None
        if own:
            conn = http.client.HTTPConnection('127.0.0.1', port,
                                              timeout=timeout)
        try:
            start = time.monotonic()
            conn.request(method, path, body, headers or {})
            resp = conn.getresponse()
            data = resp.read()
            return resp, data, time.monotonic() - start
        finally:
            if own:
                conn.close()

    def json_via(self, port, path, conn=None):
        resp, data, elapsed = self.via(port, 'GET', path, conn=conn)
        self.assertEqual(resp.status, 200, data[:300])
        self.assertTrue(resp.getheader('Content-Type', '')
                        .startswith('application/json'),
                        resp.getheader('Content-Type'))
        return json.loads(data.decode('utf-8')), elapsed

    def new_channel(self):
        return register_unix(self.sock)

    def push(self, name, content):
        reply = self.direct('POST', '/channels/%s.json' % name,
                            {'content': content})
        self.assertGreater(reply['return_code'], 0, reply)
        return reply

    def ports(self):
        return (('keep-alive upstream', self.public_port),
                ('HTTP/1.0 upstream', self.http10_port))

    def wait_held(self, count):
        """Wait until the server holds `count` polls; False if it did not
        within 2 s (they may have timed out meanwhile: the caller retries)."""
        try:
            return wait_for(lambda: status_unix(self.sock)
                            ['held_connections_count'] == count, timeout=2)
        except AssertionError:
            return False

    # -- checks, run through both upstream forms ------------------------

    def check_read(self, port):
        name = self.new_channel()
        first = self.push(name, 'hello')
        self.push(name, 'w\u00f6rld \u2603')
        reply, _ = self.json_via(port, '/channels/%s.json?since=0' % name)
        self.assertEqual(reply['return_code'], 1, reply)
        self.assertEqual(reply['error_message'], '')
        got = reply['messages'][name]
        self.assertEqual([m['content'] for m in got],
                         ['hello', 'w\u00f6rld \u2603'])
        self.assertEqual(got[0]['id'], first['message_id'])
        self.assertGreaterEqual(reply['last_id'], got[-1]['id'])
        # since= is passed through: only the newer message comes back.
        reply, _ = self.json_via(port, '/channels/%s.json?since=%d'
                                 % (name, got[0]['id']))
        self.assertEqual([m['content'] for m in reply['messages'][name]],
                         ['w\u00f6rld \u2603'])
        # Two channels in one read; %7C must reach the server intact.
        other = self.new_channel()
        self.push(other, 'other')
        reply, _ = self.json_via(port, '/channels/%s%%7C%s.json'
                                 % (name, other))
        self.assertEqual(len(reply['messages'][name]), 2, reply)
        self.assertEqual([m['content'] for m in reply['messages'][other]],
                         ['other'])

    def check_held_poll(self, port):
        name = self.new_channel()
        self.push(name, 'seed')
        reply, _ = self.json_via(port, '/channels/%s.json' % name)
        self.assertEqual([m['content'] for m in reply['messages'][name]],
                         ['seed'])
        last = reply['last_id']
        for attempt in range(5):
            self.wait_held(0)
            conn = http.client.HTTPConnection('127.0.0.1', port, timeout=5)
            try:
                conn.request('GET', '/channels/%s.json?since=%d'
                             % (name, last))
                self.wait_held(1)           # the poll reached the server
                content = 'wake-%d' % attempt
                pushed = self.push(name, content)
                resp = conn.getresponse()
                data = resp.read()
            finally:
                conn.close()
            self.assertEqual(resp.status, 200, data[:300])
            reply = json.loads(data.decode('utf-8'))
            got = [m['content'] for m in reply['messages'][name]]
            if pushed['delivered'] == 1:
                # The push answered the poll held through nginx.
                self.assertEqual(got, [content], reply)
                self.assertEqual(reply['messages'][name][0]['id'],
                                 pushed['message_id'])
                return
            # The poll was not held when the push came (too early, or it had
            # already timed out): the reply is then consistent either way.
            self.assertIn(got, ([], [content]), reply)
            last = reply['last_id']
        self.fail('no poll held through nginx was woken by a push')

    def check_poll_timeout(self, port):
        name = self.new_channel()
        self.push(name, 'seed')
        first, _ = self.json_via(port, '/channels/%s.json' % name)
        self.assertEqual(len(first['messages'][name]), 1, first)
        reply, elapsed = self.json_via(port, '/channels/%s.json?since=%d'
                                       % (name, first['last_id']))
        self.assertEqual(reply['return_code'], 1, reply)
        self.assertEqual(reply['messages'], {name: []})
        self.assertGreaterEqual(reply['last_id'], first['last_id'])
        self.assertGreaterEqual(elapsed, NGINX_POLL_TIMEOUT * 0.8)
        self.assertLess(elapsed, NGINX_POLL_TIMEOUT + 3)

    def test_read_keepalive(self):
        self.check_read(self.public_port)

    def test_read_http10(self):
        self.check_read(self.http10_port)

    def test_held_poll_woken_by_push_keepalive(self):
        self.check_held_poll(self.public_port)

    def test_held_poll_woken_by_push_http10(self):
        self.check_held_poll(self.http10_port)

    def test_poll_timeout_is_a_normal_reply_keepalive(self):
        self.check_poll_timeout(self.public_port)

    def test_poll_timeout_is_a_normal_reply_http10(self):
        self.check_poll_timeout(self.http10_port)

    def test_one_client_connection_many_requests(self):
        # A browser keeps its connection to nginx; nginx reuses (keep-alive)
        # or reopens (HTTP/1.0) its connection to the server. Reads, a
        # timed-out poll and a woken poll follow each other on one client
        # connection.
        for label, port in self.ports():
            with self.subTest(label):
                name = self.new_channel()
                conn = http.client.HTTPConnection('127.0.0.1', port,
                                                  timeout=5)
                try:
                    last = 0
                    for i in range(2):
                        self.push(name, 'm%d' % i)
                        reply, _ = self.json_via(
                            port, '/channels/%s.json?since=%d' % (name, last),
                            conn=conn)
                        self.assertEqual([m['content'] for m in
                                          reply['messages'][name]],
                                         ['m%d' % i], reply)
                        last = reply['last_id']
                        reply, _ = self.json_via(
                            port, '/channels/%s.json?since=%d' % (name, last),
                            conn=conn)
                        self.assertEqual(reply['messages'][name], [], reply)
                        last = reply['last_id']
                finally:
                    conn.close()

    def test_concurrent_held_polls(self):
        # Several polls held at once through each upstream form, all woken
        # by one push.
        name = self.new_channel()
        self.push(name, 'seed')
        reply, _ = self.json_via(self.public_port, '/channels/%s.json' % name)
        last = reply['last_id']
        for attempt in range(4):
            results = []
            conns = []
            self.wait_held(0)
            for port in (self.public_port, self.http10_port) * 3:
                conn = http.client.HTTPConnection('127.0.0.1', port,
                                                  timeout=5)
                conn.request('GET', '/channels/%s.json?since=%d'
                             % (name, last))
                conns.append(conn)
            self.wait_held(len(conns))
            content = 'all-%d' % attempt
            pushed = self.push(name, content)
            for conn in conns:
                try:
                    resp = conn.getresponse()
                    results.append((resp.status, resp.read()))
                finally:
                    conn.close()
            replies = []
            for status, data in results:
                self.assertEqual(status, 200, data[:300])
                replies.append(json.loads(data.decode('utf-8')))
            if pushed['delivered'] == len(conns):
                for reply in replies:
                    self.assertEqual([m['content'] for m in
                                      reply['messages'][name]], [content])
                return
            last = pushed['message_id']
        self.fail('the polls were never all held at once')

    def upstream_connections(self):
        """nginx's open connections to the server: the connected unix
        sockets its processes hold, less those they held before any
        request (between master and workers).  (The server's ends of
        connections closed by their clients may linger a moment.)"""
        return len(nginx_unix_sockets(self.nginx.pid) - self.nginx_own)

    @unittest.skipUnless(os.path.exists('/proc/net/unix'),
                         'needs /proc/net/unix (Linux)')
    def test_upstream_connections(self):
        # The keep-alive form reuses one connection for sequential requests
        # and keeps it open; the HTTP/1.0 form leaves none open.
        name = self.new_channel()
        self.push(name, 'x')
        path = '/channels/%s.json' % name
        self.json_via(self.public_port, path)
        kept = self.upstream_connections()
        self.assertGreaterEqual(kept, 1, 'no upstream connection kept alive')
        for _ in range(5):
            self.json_via(self.public_port, path)
        self.assertEqual(self.upstream_connections(), kept,
                         'sequential requests did not reuse the connection')
        for _ in range(5):
            self.json_via(self.http10_port, path)
        self.assertEqual(self.upstream_connections(), kept,
                         'HTTP/1.0 upstream connections were left open')

    # -- JSON-P ------------------------------------------------------------

    def test_jsonp(self):
        name = self.new_channel()
        self.push(name, 'for a script tag')
        for label, port in self.ports():
            with self.subTest(label):
                resp, data, _ = self.via(port, 'GET',
                                         '/channels/%s.jsonp' % name)
                self.assertEqual(resp.status, 200, data[:300])
                self.assertTrue(resp.getheader('Content-Type', '').startswith(
                    'application/javascript'), resp.getheader('Content-Type'))
                self.assertEqual(resp.getheader('X-Content-Type-Options'),
                                 'nosniff')
                text = data.decode('utf-8')
                self.assertTrue(text.startswith('/**/_JSONP_comet_cb('), text)
                inner = text[len('/**/_JSONP_comet_cb('):].rstrip()
                self.assertTrue(inner.endswith(');'), text)
                reply = json.loads(inner[:-2])
                self.assertEqual([m['content'] for m in
                                  reply['messages'][name]],
                                 ['for a script tag'])

    def test_jsonp_custom_callback(self):
        name = self.new_channel()
        self.push(name, 'x')
        resp, data, _ = self.via(self.public_port, 'GET',
                                 '/channels/%s.jsonp?cb=_JSONP_x1' % name)
        self.assertEqual(resp.status, 200)
        self.assertTrue(data.startswith(b'/**/_JSONP_x1('), data[:100])

    # -- the public side is read-only ---------------------------------------

    def test_public_post_is_refused_by_nginx(self):
        name = self.new_channel()
        self.push(name, 'genuine')
        for label, port in self.ports():
            with self.subTest(label):
                resp, data, _ = self.via(
                    port, 'POST', '/channels/%s.json' % name,
                    urlencode({'content': 'forged'}), FORM)
                self.assertEqual(resp.status, 403, data[:300])
                # nginx's own refusal, not a reply from Simple Comet.
                self.assertNotIn(b'return_code', data)
        reply = self.direct('GET', '/channels/%s.json?since=0' % name)
        self.assertEqual(reply['return_code'], 1, reply)
        self.assertEqual([m['content'] for m in reply['messages'][name]],
                         ['genuine'],
                         'a POST through the public server created a message')

    def test_public_delete_is_refused_by_nginx(self):
        name = self.new_channel()
        self.push(name, 'keep me')
        resp, data, _ = self.via(self.public_port, 'DELETE',
                                 '/channels/%s.json' % name)
        self.assertEqual(resp.status, 403, data[:300])
        reply = self.direct('GET', '/channels/%s.json' % name)
        self.assertEqual([m['content'] for m in reply['messages'][name]],
                         ['keep me'])

    def test_public_registration_and_status_are_not_exposed(self):
        name = fresh('ngx')
        for path, body in (('/channels.json', {'channel_id': name}),
                           ('/clients.json', {'client_id': name})):
            resp, data, _ = self.via(self.public_port, 'POST', path,
                                     urlencode(body), FORM)
            self.assertIn(resp.status, (403, 404), data[:300])
            self.assertNotIn(b'return_code', data)
        for path in ('/status.json', '/stats.json', '/channels.json'):
            resp, data, _ = self.via(self.public_port, 'GET', path)
            self.assertEqual(resp.status, 404, path)
            self.assertNotIn(b'return_code', data)
        reply = self.direct('GET', '/channels/%s.json' % name)
        self.assertEqual(reply['return_code'], -2,
                         'a registration through the public server worked')

    # -- the private side publishes --------------------------------------

    def test_private_server_publishes(self):
        name = fresh('ngx')
        port = self.private_port
        resp, data, _ = self.via(port, 'POST', '/channels.json',
                                 urlencode({'channel_id': name}), FORM)
        self.assertEqual(resp.status, 200, data[:300])
        self.assertEqual(json.loads(data.decode())['return_code'], 1)
        resp, data, _ = self.via(port, 'POST', '/channels/%s.json' % name,
                                 urlencode({'content': 'via nginx'}), FORM)
        self.assertEqual(resp.status, 200, data[:300])
        reply = json.loads(data.decode())
        self.assertGreater(reply['return_code'], 0, reply)
        self.assertIn('message_id', reply)
        reply, _ = self.json_via(self.public_port,
                                 '/channels/%s.json' % quote(name))
        self.assertEqual([m['content'] for m in reply['messages'][name]],
                         ['via nginx'])

    # -- what the deployment relies on --------------------------------------

    def test_socket_is_world_connectable(self):
        # nginx's worker runs as another user (www-data); the README relies
        # on the server's default socket mode.
        mode = stat.S_IMODE(os.stat(self.sock).st_mode)
        self.assertEqual(mode, 0o666, oct(mode))

    def test_readme_matches_copy(self):
        block = readme_nginx_conf()
        if block is None:
            self.skipTest('README.md has no nginx configuration block')
        self.assertEqual(block.strip(), README_NGINX_CONF.strip(),
                         'update README_NGINX_CONF to match the README')

    def test_no_upstream_errors_logged(self):
        # nginx logs failures talking to the server (connection refused or
        # reset, upstream closed prematurely, ...) at level error or above.
        name = self.new_channel()
        self.push(name, 'x')
        for label, port in self.ports():
            for _ in range(10):
                self.json_via(port, '/channels/%s.json' % name)
        lines = [line for line in file_text(self.nginx_log, None).splitlines()
                 if re.search(r'\[(error|crit|alert|emerg)\]', line)
                 and 'access forbidden by rule' not in line]
        self.assertEqual(lines, [])


# ---------------------------------------------------------------------------
# C1. EventSource streams (.sse)
# ---------------------------------------------------------------------------
#
# Streams are read over raw sockets by SSE below, the way a browser's
# EventSource reads them: the response head, then the body line by line, an
# event ending at each blank line. The exact bytes of every item are kept,
# since the framing is part of the contract. Through nginx the body comes
# chunked; SSE decodes that too.

SSE_HEARTBEAT = 0.3
SSE_HEADERS = {
    "content-type": "text/event-stream; charset=utf-8",
    "cache-control": "no-cache, no-store, no-transform",
    "x-accel-buffering": "no",
    "access-control-allow-origin": "*",
}
# The opening: a retry line, a comment, a blank line (lines end in \n).
SSE_OPENING = re.compile(rb"retry: 3000\n:[^\r\n]*\n\n")
# What a stream with no event sends: comment lines (a blank line after each
# one is allowed, it dispatches nothing).
SSE_HEARTBEATS = re.compile(rb"(?::[^\r\n]*\n\n?)+")
BIG = 64 * 1024                      # content size for the slow-reader tests


def data_forms(obj):
    """The accepted bytes of a data line's JSON: json.dumps' layout, with
    non-ASCII escaped or raw (raw U+2028/2029 allowed or escaped)."""
    raw = json.dumps(obj, ensure_ascii=False)
    return {json.dumps(obj).encode(), raw.encode(),
            raw.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
            .encode()}


def retained(name, port):
    """The channel's retained messages, as a JSON read returns them."""
    return read([name], port=port)["messages"][name]


def delete(name, port):
    return api("DELETE", f"/channels/{quote(name, safe='')}.json", port=port)


class SSEAssertions(unittest.TestCase):
    """Exact checks of a stream's parts (SPEC C1)."""

    part = "C"                  # run by the second process, see main()

    def assertStreamOpened(self, stream, proxied=False):
        self.assertEqual(stream.status, 200, (stream.status_line, stream.body))
        for name, value in SSE_HEADERS.items():
            if proxied and name == "x-accel-buffering":
                continue                 # nginx consumes it
            self.assertEqual(stream.headers.get(name), value, name)
        self.assertNotIn("content-encoding", stream.headers)
        if not proxied:
            # The body ends when the connection closes.
            self.assertNotIn("content-length", stream.headers)
            self.assertNotIn("transfer-encoding", stream.headers)
        self.assertRegex(stream.opening, SSE_OPENING)
        self.assertEqual(SSE_OPENING.fullmatch(stream.opening).group(0),
                         stream.opening)

    def assertMessageEvent(self, item, channel, message):
        """item is exactly the event of `message` (a dict from a JSON read)."""
        data = {"channel": channel, "id": message["id"], "ts": message["ts"],
                "content": message["content"]}
        forms = {b"id: %d\ndata: %s\n\n" % (message["id"], form)
                 for form in data_forms(data)}
        self.assertIn(item["raw"], forms)

    def assertLostEvent(self, item, channels):
        self.assertNotIn("id", item)
        self.assertEqual(item.get("event"), "lost", item)
        self.assertEqual(sorted(json.loads(item["data"])["channels"]),
                         sorted(channels))
        if len(channels) == 1:
            self.assertIn(item["raw"], {b"event: lost\ndata: %s\n\n" % form
                                        for form in data_forms(
                                            {"channels": channels})})

    def assertDeletedEvent(self, item, channel):
        self.assertIn(item["raw"], {b"event: deleted\ndata: %s\n\n" % form
                                    for form in data_forms(
                                        {"channel": channel})})

    def assertRefused(self, stream, status_code, return_code):
        """A refusal before the stream: a real status, the JSON error."""
        self.assertEqual(stream.status, status_code,
                         (stream.status_line, stream.body))
        self.assertEqual(stream.headers.get("content-type"),
                         "application/json")
        self.assertIsNotNone(stream.json, stream.body)
        self.assertEqual(stream.json["return_code"], return_code, stream.json)
        self.assertTrue(stream.json["error_message"])
        self.assertNotIn(b"retry:", stream.body)


class SSETests(SSEAssertions):
    """Streams read over raw sockets, on a server of their own."""

    @classmethod
    def setUpClass(cls):
        cls.server = ServerProcess(
            "--enable-status", "--poll-timeout=1",
            f"--sse-heartbeat={SSE_HEARTBEAT}")
        cls.port = cls.server.port

    @classmethod
    def tearDownClass(cls):
        try:
            cls.server.stop_clean()
        finally:
            cls.server.close()

    def setUp(self):
        # Streams of the tests before are gone.
        wait_for(lambda: self.status()["streams_open"] == 0)

    def open(self, names, query="", **kw):
        """A stream of these channels, closed at the end of the test."""
        path = names if isinstance(names, str) else sse_path(names, query)
        stream = SSE(kw.pop("port", self.port), path, **kw)
        self.addCleanup(stream.close)
        return stream

    def status(self):
        return status(self.port)

    def wait_streams(self, count, port=None):
        wait_for(lambda: status(port or self.port)["streams_open"] == count)

    def test_headers_and_opening(self):
        """The head: 200, the four headers, no length, no chunking; then the
        opening."""
        name = register(port=self.port)
        stream = self.open([name])
        self.assertStreamOpened(stream)
        self.assertTrue(stream.status_line.startswith("HTTP/1.1 200"),
                        stream.status_line)

    def test_events_are_framed_exactly(self):
        """Each event is exactly `id: N`, one `data:` line of JSON, a blank
        line."""
        # Contents that could break the framing if they reached it raw: line
        # breaks of every kind, quotes, a forged field, separators, NUL.
        contents = ["plain", "two\nlines", "crlf\r\nand a lone cr\r",
                    'quote " backslash \\ slash /', "sep \u2028 and \u2029",
                    "\u00e9 \u2603 \U0001F600 \u4e2d\u6587",
                    "data: forged\n\nid: 1\n\nevent: lost",
                    "nul \x00 tab \t <script>", " leading space"]
        name = register(port=self.port)
        for content in contents[:5]:
            push(name, content, port=self.port)
        stream = self.open([name])
        self.assertStreamOpened(stream)
        for content in contents[5:]:           # these arrive live
            push(name, content, port=self.port)
        messages = retained(name, self.port)
        self.assertEqual([m["content"] for m in messages], contents)
        for message in messages:
            self.assertMessageEvent(stream.event(), name, message)

    def test_channel_names_are_escaped(self):
        """Odd channel names stay JSON strings in every kind of event."""
        # A channel id may hold quotes, backslashes, spaces and non-ASCII:
        # in message, lost and deleted events alike it is a JSON string.
        name = register(fresh('q"uo\\te caf\u00e9 \u2603 '), port=self.port,
                        max_messages="1")
        first = push(name, "one", port=self.port)["message_id"]
        push(name, "two", port=self.port)
        stream = self.open([name], f"?since={first - 1}")
        self.assertStreamOpened(stream)
        self.assertLostEvent(stream.event(), [name])
        self.assertMessageEvent(stream.event(), name,
                                retained(name, self.port)[0])
        delete(name, self.port)
        items = stream.rest()
        self.assertEqual(len(items), 1, items)
        self.assertDeletedEvent(items[0], name)

    def test_replay_from_since(self):
        """Replay for since absent, 0, an id, the last id, above the
        counter."""
        name = register(port=self.port)
        ids = [push(name, f"m{i}", port=self.port)["message_id"]
               for i in range(1, 4)]
        cases = [("", ["m1", "m2", "m3"]),
                 ("?since=0", ["m1", "m2", "m3"]),
                 (f"?since={ids[0]}", ["m2", "m3"]),
                 (f"?since={ids[2]}", []),
                 (f"?since={ids[2] + 10**9}", [])]      # clamped
        streams = [(query, expected, self.open([name], query))
                   for query, expected in cases]
        for query, _, stream in streams:
            self.assertStreamOpened(stream)
        # A live message after the replay: it comes next, and only once.
        push(name, "live", port=self.port)
        for query, expected, stream in streams:
            with self.subTest(query=query):
                self.assertEqual(stream.contents_until("live"),
                                 expected + ["live"])

    def test_last_event_id_wins_over_since(self):
        """A non-negative integer Last-Event-ID is the cursor; anything else
        is ignored."""
        name = register(port=self.port)
        ids = [push(name, f"m{i}", port=self.port)["message_id"]
               for i in range(1, 4)]
        cases = [  # (query, Last-Event-ID, expected replay)
            ("?since=0", str(ids[1]), ["m3"]),
            ("", str(ids[0]), ["m2", "m3"]),
            (f"?since={ids[1]}", "0", ["m1", "m2", "m3"]),   # 0: everything
            (f"?since={ids[0]}", str(ids[2] + 10**9), []),   # clamped
            # Not a non-negative integer: ignored, since is used.
            (f"?since={ids[1]}", "abc", ["m3"]),
            (f"?since={ids[0]}", "-5", ["m2", "m3"]),
            (f"?since={ids[1]}", "", ["m3"]),
            (f"?since={ids[1]}", "1.5", ["m3"]),
        ]
        streams = []
        for query, last_id, expected in cases:
            stream = self.open([name], query,
                               headers=[("Last-Event-ID", last_id)])
            self.assertStreamOpened(stream)
            streams.append((query, last_id, expected, stream))
        push(name, "live", port=self.port)
        for query, last_id, expected, stream in streams:
            with self.subTest(query=query, last_event_id=last_id):
                self.assertEqual(stream.contents_until("live"),
                                 expected + ["live"])

    def test_several_channels_in_id_order(self):
        """One stream of several channels: one order, by id, replay and
        live."""
        a, b = register(port=self.port), register(port=self.port)
        for name, content in ((a, "a1"), (b, "b1"), (b, "b2"), (a, "a2")):
            push(name, content, port=self.port)
        unknown = fresh("nowhere")
        # %7C and a raw | both separate channels; an unknown one is left out.
        streams = [self.open([a, b, unknown]),
                   self.open(f"/channels/{b}|{a}.sse")]
        for stream in streams:
            self.assertStreamOpened(stream)
        for name, content in ((b, "b3"), (a, "a3"), (b, "b4")):
            push(name, content, port=self.port)
        order = ["a1", "b1", "b2", "a2", "b3", "a3", "b4"]
        by_content = {m["content"]: (ch, m) for ch in (a, b)
                      for m in retained(ch, self.port)}
        for stream in streams:
            for content in order:
                channel, message = by_content[content]
                self.assertMessageEvent(stream.event(), channel, message)

    def test_session_channels(self):
        """Session channels stream only with a registered client_id."""
        client = fresh("client")
        reply = api("POST", "/clients.json", {"client_id": client},
                    port=self.port)
        self.assertEqual(reply["return_code"], 1, reply)
        private = register(port=self.port, use_sessions="1")
        public = register(port=self.port)
        push(private, "secret", port=self.port)
        push(public, "open", port=self.port)
        # Without a client_id the session channel is left out.
        anonymous = self.open([private, public])
        self.assertStreamOpened(anonymous)
        member = self.open([private, public],
                           "?" + urlencode({"client_id": client}))
        self.assertStreamOpened(member)
        push(private, "secret 2", port=self.port)
        push(public, "end", port=self.port)
        self.assertEqual(anonymous.contents_until("end"), ["open", "end"])
        self.assertEqual(member.contents_until("end"),
                         ["secret", "open", "secret 2", "end"])

    def test_refusals_are_real_statuses(self):
        """400, 404 and 403 with the JSON error, before any stream."""
        name = register(port=self.port)
        private = register(port=self.port, use_sessions="1")
        before = self.status()["streams_open"]
        cases = [
            (sse_path([name], "?since=abc"), 400, -1),
            (sse_path([name], "?since=1.5"), 400, -1),
            (sse_path([name] + [fresh("x") for _ in range(100)]), 400, -1),
            (sse_path([fresh("missing")]), 404, -2),
            (sse_path([private]), 404, -2),   # session channel, no client
            (sse_path([name], "?client_id=" + fresh("stranger")), 403, -3),
        ]
        for path, status_code, return_code in cases:
            with self.subTest(path=path[:80]):
                self.assertRefused(self.open(path), status_code, return_code)
        self.assertEqual(self.status()["streams_open"], before)
        # A browser reconnecting after losing its channel gets a 404 too,
        # whatever its Last-Event-ID.
        self.assertRefused(self.open([fresh("gone")],
                                     headers=[("Last-Event-ID", "5")]),
                           404, -2)

    def test_lost_comes_before_the_replay(self):
        """`event: lost` names the channels that dropped messages after the
        cursor."""
        lossy = register(port=self.port, max_messages="2")
        whole = register(port=self.port)
        ids = {"l1": push(lossy, "l1", port=self.port)["message_id"]}
        push(whole, "w1", port=self.port)
        for content in ("l2", "l3", "l4"):
            ids[content] = push(lossy, content, port=self.port)["message_id"]
        kept = retained(lossy, self.port)            # l3 and l4
        w1 = retained(whole, self.port)[0]
        # l2 was dropped and is newer than the cursor l1: lost.
        cases = [(f"?since={ids['l1']}", (), True),
                 ("?since=0", (), False),            # never for cursor 0
                 ("", (), False),
                 (f"?since={ids['l2']}", (), False),  # nothing newer dropped
                 ("?since=0", [("Last-Event-ID", str(ids["l1"]))], True)]
        for query, headers, lost in cases:
            with self.subTest(query=query, headers=headers):
                stream = self.open([lossy], query, headers=headers)
                self.assertStreamOpened(stream)
                if lost:
                    self.assertLostEvent(stream.event(), [lossy])
                for message in kept:
                    self.assertMessageEvent(stream.event(), lossy, message)
        # Two channels: only the one that lost is named; the replay follows
        # in id order across both.
        stream = self.open([whole, lossy], f"?since={ids['l1']}")
        self.assertLostEvent(stream.event(), [lossy])
        self.assertMessageEvent(stream.event(), whole, w1)
        for message in kept:
            self.assertMessageEvent(stream.event(), lossy, message)
        # Live messages never say lost, even when history drops as they come.
        push(lossy, "l5", port=self.port)
        self.assertMessageEvent(stream.event(), lossy,
                                retained(lossy, self.port)[-1])

    def test_heartbeat(self):
        """A comment line after each --sse-heartbeat without an event, none
        while busy."""
        name = register(port=self.port)
        requested = time.monotonic()
        stream = self.open([name])
        self.assertStreamOpened(stream)
        start = len(stream.body)
        # With no event to send, heartbeats and nothing else.  The k-th
        # cannot come before k intervals from the request (a reader that
        # is late only sees them later); one that never comes is an error.
        items = [stream.next() for _ in range(3)]
        self.assertTrue(all(i is not None and "comment" in i for i in items),
                        items)
        self.assertRegex(stream.body[start:], SSE_HEARTBEATS)
        self.assertEqual(SSE_HEARTBEATS.fullmatch(stream.body[start:]).group(),
                         stream.body[start:])
        times = [requested] + [i["at"] for i in items]
        gaps = [b - a for a, b in zip(times, times[1:])]
        report(f"heartbeats every {SSE_HEARTBEAT} s: gaps {gaps}")
        for k, item in enumerate(items, 1):
            self.assertGreater(item["at"] - requested, k * SSE_HEARTBEAT * 0.9,
                               gaps)
        if STRICT:
            self.assertGreater(min(gaps[1:]), SSE_HEARTBEAT * 0.6, gaps)
            self.assertLess(max(gaps), SSE_HEARTBEAT * 3, gaps)
        # While events keep coming, no heartbeat is needed (one may still
        # be on its way when the first event is pushed): none comes between
        # two events the server sent less than an interval apart (as seen
        # from here: from the start of one push to the end of the next).
        previous = time.monotonic()
        push(name, "busy0", port=self.port)
        stream.event()
        checked = 0
        for i in range(1, 7):
            time.sleep(SSE_HEARTBEAT / 4)
            started = time.monotonic()
            push(name, f"busy{i}", port=self.port)
            window = time.monotonic() - previous
            previous = started
            item = stream.next()
            if window < SSE_HEARTBEAT * 0.9:
                self.assertNotIn("comment", item, window)
                checked += 1
            elif "comment" in item:
                item = stream.event()
            self.assertEqual(json.loads(item["data"])["content"], f"busy{i}")
        self.assertGreater(checked, 0, "every push took an interval")
        # And once they stop, heartbeats come again.
        self.assertIn("comment", stream.next())

    def test_deleted_channel_and_close(self):
        """`event: deleted`; a stream with no channel left is closed."""
        one, two = register(port=self.port), register(port=self.port)
        both = self.open([one, two])
        only = self.open([one])
        old = self.open([one], version="1.0")
        for stream in (both, only, old):
            self.assertStreamOpened(stream)
        self.wait_streams(3)
        self.assertEqual(delete(one, self.port)["return_code"], 2)
        # The stream that still has a channel stays open.
        self.assertDeletedEvent(both.event(), one)
        push(two, "still here", port=self.port)
        self.assertMessageEvent(both.event(), two, retained(two, self.port)[0])
        # A stream left with none is closed after the event.
        for stream in (only, old):
            items = stream.rest()
            self.assertEqual(len(items), 1, items)
            self.assertDeletedEvent(items[0], one)
            self.assertFalse(stream.reset, "closed with a reset")
        self.assertEqual(delete(two, self.port)["return_code"], 2)
        items = both.rest()
        self.assertEqual(len(items), 1, items)
        self.assertDeletedEvent(items[0], two)
        self.wait_streams(0)
        # The browser's reconnect then gets 404 and stops.
        self.assertRefused(self.open([one, two], headers=[
            ("Last-Event-ID", str(10**12))]), 404, -2)

    def test_delivered_and_status_counts(self):
        """delivered counts streams; streams_open; polls are counted apart."""
        name = register(port=self.port)
        last = push(name, "seed", port=self.port)["message_id"]
        streams = [self.open([name], f"?since={last}") for _ in range(2)]
        poll = Background(read, [name], since=last, port=self.port)
        wait_for(lambda: self.status()["held_connections_count"] == 1)
        st = self.status()
        # Streams are not polls.
        self.assertEqual(st["streams_open"], 2)
        self.assertEqual(st["held_connections_count"], 1)
        self.assertEqual(st["polls_held"], 1)
        delivered_before = st["messages_delivered"]
        reply = push(name, "to three", port=self.port)
        self.assertEqual(reply["delivered"], 3)
        self.assertEqual([m["content"] for m in
                          poll.result()["messages"][name]], ["to three"])
        for stream in streams:
            self.assertEqual(stream.message()["content"], "to three")
        self.assertGreaterEqual(self.status()["messages_delivered"],
                                delivered_before + 3)
        for stream in streams:
            stream.close()
        # A stream whose client went away no longer counts.
        self.wait_streams(0)
        self.assertEqual(push(name, "to none", port=self.port)["delivered"], 0)

    def test_http_1_0(self):
        """HTTP/1.0 clients (nginx's default upstream protocol) stream too."""
        name = register(port=self.port)
        push(name, "retained", port=self.port)
        streams = []
        for extra in ([], [("Connection", "keep-alive")]):
            stream = self.open([name], version="1.0", headers=extra)
            self.assertStreamOpened(stream)
            # No length: the body cannot end but by closing.
            self.assertNotEqual(stream.headers.get("connection", "").lower(),
                                "keep-alive")
            self.assertEqual(stream.message()["content"], "retained")
            streams.append(stream)
        push(name, "live", port=self.port)
        for stream in streams:
            self.assertEqual(stream.message()["content"], "live")

    def test_slow_reader_is_closed_others_get_everything(self):
        """Over 1 MiB of live events unsent: closed; the others get every
        message."""
        name = register(port=self.port, max_messages="1000")
        slow = self.open([name], rcvbuf=4096)
        self.assertStreamOpened(slow)
        fast = self.open([name])
        self.assertStreamOpened(fast)
        self.wait_streams(2)
        got = []

        def read_all():
            while True:
                item = fast.event(10)
                got.append(item)
                if json.loads(item["data"])["content"] == "end":
                    return
        reader = Background(read_all)
        # The slow stream never reads; the kernel's buffers take a few MiB,
        # then 1 MiB more may wait in the server, then it is closed.
        pushed = []
        for i in range(200):
            content = f"{i:04d}" + "x" * (BIG - 4)
            pushed.append(content)
            push(name, content, port=self.port)
            if self.status()["streams_open"] == 1:
                break
        else:
            self.fail("the stream that did not read was never closed "
                      f"({len(pushed)} x 64 KiB pushed)")
        pushed.append("end")
        push(name, "end", port=self.port)
        reader.result(timeout=20)
        self.assertEqual([json.loads(i["data"])["content"] for i in got],
                         pushed)
        # What the slow stream got before its end is a prefix of what was
        # pushed: nothing skipped.
        start = len(slow.opening)
        items = slow.rest(timeout=10)
        events = [i for i in items
                  if "comment" not in i and not i.get("partial")]
        contents = [json.loads(i["data"])["content"] for i in events]
        self.assertEqual(contents, pushed[:len(contents)])
        self.assertLess(len(contents), len(pushed) - 1)
        # The server held more than 1 MiB for it before closing it: what was
        # pushed while it was open, less what reached the client.
        sent = sum(len(i["raw"]) for i in got[:len(pushed) - 1])
        received = len(slow.body) - start
        self.assertGreater(sent - received, 1 << 20,
                           f"closed with {sent - received} bytes unsent")
        if not slow.reset:
            self.assertLess(sent - received, 2 << 20,
                            f"closed with {sent - received} bytes unsent")
        # Its reconnect replays from its cursor: every message once.
        headers = [("Last-Event-ID", events[-1]["id"])] if events else []
        again = self.open([name], headers=headers)
        self.assertStreamOpened(again)
        self.assertEqual(again.contents_until("end", timeout=10),
                         pushed[len(contents):])

    def test_replay_is_not_counted_as_unsent(self):
        """A long opening replay goes out as the client reads, without a
        cut."""
        # 8 MiB retained: far more than the kernel's buffers and 1 MiB. The
        # replay is written as the client reads, so a client reading slowly
        # still gets all of it.
        name = register(port=self.port, max_messages="200")
        pushed = [f"{i:04d}" + "r" * (BIG - 4) for i in range(128)]
        for content in pushed:
            push(name, content, port=self.port)
        stream = self.open([name], rcvbuf=65536)
        self.assertStreamOpened(stream)
        time.sleep(0.3)                  # not reading
        # A live event meanwhile waits for the replay, and is not a reason
        # to close the stream either.
        self.assertEqual(push(name, "live", port=self.port)["delivered"], 1)
        time.sleep(0.2)
        self.assertEqual(self.status()["streams_open"], 1)
        contents = [stream.message(timeout=10)["content"]
                    for _ in range(len(pushed) + 1)]
        self.assertEqual(contents, pushed + ["live"])
        push(name, "after", port=self.port)
        self.assertEqual(stream.message()["content"], "after")

    def test_stream_keeps_session_and_channels_alive(self):
        """An open stream keeps its channels and its client's session."""
        server = ServerProcess("--enable-status",
                               "--session-timeout=0.4",
                               "--inactive-channel-timeout=0.4",
                               "--http-timeout=0.6", "--poll-timeout=0.3",
                               f"--sse-heartbeat={SSE_HEARTBEAT}")
        port = server.port
        self.addCleanup(server.close)
        kept, idle = fresh("kept"), fresh("idle")
        for client in (kept, idle):
            api("POST", "/clients.json", {"client_id": client}, port=port)
        private = register(port=port, use_sessions="1")
        public = register(port=port)
        unread = register(port=port)
        stream = self.open([private, public],
                           "?" + urlencode({"client_id": kept}), port=port)
        self.assertStreamOpened(stream)
        # Past every timeout (and past --http-timeout for the connection),
        # until the idle ones are gone: the timeouts do work, and those the
        # stream holds (registered before them) would have gone too.
        stream.within(1.0)
        st = wait_for(lambda: (lambda st: idle not in st["clients"] and
                               unread not in st["channels"] and st)(
                                   status(port)))
        self.assertEqual(st["streams_open"], 1)
        self.assertIn(kept, st["clients"])
        self.assertIn(private, st["channels"])
        self.assertIn(public, st["channels"])
        push(private, "still", port=port)
        self.assertEqual(stream.message()["content"], "still")
        # Once the stream is gone, so are they.
        stream.close()
        wait_for(lambda: status(port)["channels"] == [] and
                 status(port)["clients"] == [], timeout=3)

    def test_streams_count_in_max_connections(self):
        """Streams count in --max-connections."""
        server = ServerProcess("--enable-status",
                                          "--max-connections=2")
        port = server.port
        self.addCleanup(server.close)
        name = register(port=port)
        streams = []

        def open_stream():
            """A new stream, or None when the connection is refused."""
            s = connect(port)
            self.addCleanup(s.close)
            # A refused connection is answered 503 at once, unasked (on a
            # busy machine the answer may come after the request).
            if select.select([s], [], [], 0.05)[0]:
                status_code, _, body = read_response(s.makefile("rb"))
                self.assertEqual(status_code, 503, body)
                return None
            try:
                stream = SSE(port, sse_path([name]), sock=s)
            except (ConnectionResetError, BrokenPipeError):
                return None
            if stream.status == 503:
                return None
            self.assertStreamOpened(stream)
            return stream
        for _ in range(10):
            stream = open_stream()
            if stream is None:
                break
            streams.append(stream)
        # Two, or two plus the four that loopback may open beyond the cap
        # (SPEC C4).
        self.assertIn(len(streams), (2, 6))
        streams.pop().close()
        self.assertIsNotNone(wait_for(open_stream))

    def test_memory_per_stream_not_above_per_poll(self):
        """An open stream costs no more memory than a held poll."""
        count = 300
        grown = {}
        for kind in ("poll", "stream"):
            server = ServerProcess("--enable-status",
                                              "--poll-timeout=30")
            port = server.port
            self.addCleanup(server.close)
            name = register(port=port)
            last = push(name, "x", port=port)["message_id"]
            for _ in range(20):          # warm up
                read([name], port=port)
            before = rss_kib(server.proc.pid)
            socks = []
            for _ in range(count):
                s = connect(port)
                self.addCleanup(s.close)
                s.sendall(get_request(
                    f"/channels/{name}.{'json' if kind == 'poll' else 'sse'}"
                    f"?since={last}"))
                socks.append(s)
            field = "polls_held" if kind == "poll" else "streams_open"
            wait_for(lambda: status(port)[field] == count)
            grown[kind] = rss_kib(server.proc.pid) - before
            for s in socks:
                s.close()
            server.close()
        report(f"memory: {count} held polls {grown['poll']} KiB, "
               f"{count} streams {grown['stream']} KiB")
        self.assertLessEqual(grown["stream"], grown["poll"] * 1.25 + 256,
                             grown)


class SSEShutdownTests(SSEAssertions):
    """SIGTERM and SIGINT end every stream cleanly, with spread retries."""

    def test_signal_flushes_streams_and_spreads_retries(self):
        """Pending events, then `retry: R` (1000-5000, spread), a clean
        close, exit 0."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            with self.subTest(sig=sig), tempfile.TemporaryDirectory() as d:
                sock = os.path.join(d, "comet.sock")
                server = ServerProcess(
                    f"--unix-socket-path={sock}", "--enable-status",
                    "--poll-timeout=5", f"--sse-heartbeat={SSE_HEARTBEAT}")
                port = server.port
                try:
                    self.check_shutdown(server, port, sock, sig)
                finally:
                    server.close()

    def check_shutdown(self, server, port, sock, sig):
        a, b = register(port=port), register(port=port)
        push(a, "retained", port=port)
        streams = [SSE(port, sse_path([a])) for _ in range(4)]
        streams += [SSE(port, sse_path([a, b])),
                    SSE(port, sse_path([a]), version="1.0"),
                    SSE(None, sse_path([a]), unix=sock),
                    SSE(port, sse_path([b]))]
        for stream in streams:
            self.addCleanup(stream.close)
            self.assertStreamOpened(stream)
        wait_for(lambda: status(port)["streams_open"] == len(streams))
        # Pushed just before the signal and not read yet: flushed first.
        self.assertEqual(push(a, "last", port=port)["delivered"], 7)
        self.assertEqual(server.stop(sig, timeout=5), 0)
        retries = []
        for stream in streams:
            items = [i for i in stream.rest() if "comment" not in i]
            on_a = stream is not streams[-1]
            contents = [json.loads(i["data"])["content"] for i in items[:-1]]
            self.assertEqual(contents, ["retained", "last"] if on_a else [])
            self.assertRegex(items[-1]["raw"], rb"^retry: \d+\n\n?$")
            retries.append(int(items[-1]["retry"]))
            self.assertFalse(stream.reset, "closed with a reset")
        self.assertTrue(all(1000 <= r <= 5000 for r in retries), retries)
        # Spread, not one value for all.
        self.assertGreater(len(set(retries)), 1, retries)
        self.assertFalse(os.path.exists(sock))
        self.assertNotIn("Traceback", server.output())
        with self.assertRaises(OSError):
            connect(port).close()

    def test_stuck_stream_does_not_stall_shutdown(self):
        """A stream that cannot be flushed delays neither the others nor the
        exit."""
        # A client that stopped reading in the middle of an 8 MiB replay
        # cannot be flushed: the others still end at once, the server exits
        # 0 in bounded time, and nothing is logged as an error.
        server = ServerProcess("--enable-status",
                                    f"--sse-heartbeat={SSE_HEARTBEAT}")
        port = server.port
        self.addCleanup(server.close)
        big = register(port=port, max_messages="200")
        small = register(port=port)
        pushed = [f"{i:04d}" + "s" * (BIG - 4) for i in range(128)]
        for content in pushed:
            push(big, content, port=port)
        stuck = SSE(port, sse_path([big]), rcvbuf=4096)
        self.addCleanup(stuck.close)
        normal = SSE(port, sse_path([small]))
        self.addCleanup(normal.close)
        wait_for(lambda: status(port)["streams_open"] == 2)
        signalled = time.monotonic()
        server.send_signal(signal.SIGTERM)
        # Not after the stuck one's grace period (5 s): at once.
        items = normal.rest(timeout=3.5)
        ended = time.monotonic() - signalled
        report(f"a stream ended {ended:.2f} s after SIGTERM beside a stuck one")
        self.assertLess(ended, bound(3.5, 1))
        self.assertEqual(len(items), 1, items)
        self.assertRegex(items[0]["raw"], rb"^retry: \d+\n\n?$")
        self.assertEqual(server.stop(timeout=15), 0)
        output = server.output()
        self.assertNotIn("Traceback", output)
        self.assertNotIn(" ERROR ", output)
        # What the stuck client gets in the end is whole events in order
        # (a last one may be cut short), nothing skipped.
        events = [i for i in stuck.rest(timeout=10)
                  if "comment" not in i and not i.get("partial")
                  and "retry" not in i]
        contents = [json.loads(i["data"])["content"] for i in events]
        self.assertEqual(contents, pushed[:len(contents)])


SSE_PAGE = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>EventSource test</title>
<script>
var COMET = "http://127.0.0.1:%(port)d/channels/";
var got = [], events = [], opens = 0, errors = 0, idsMatch = true;
var page = Math.random();          // a reload would draw another
var times = [];
function listen(url) {
  var es = new EventSource(url);
  es.onopen = function () { opens++; times.push("open " + Date.now()); };
  es.onerror = function () { errors++; times.push("error " + Date.now()); };
  es.onmessage = function (e) {
    var m = JSON.parse(e.data);
    if (e.lastEventId !== String(m.id)) idsMatch = false;
    got.push(m.channel + " " + m.content);
  };
  ["lost", "deleted"].forEach(function (kind) {
    es.addEventListener(kind, function (e) {
      events.push(kind + " " + e.data);
    });
  });
  return es;
}
%(script)s
</script></head><body></body></html>
"""


@unittest.skipUnless(CHROMIUM,
                     "Chromium not installed (apt-get install chromium)")
class SSEBrowserTests(BrowserPages, unittest.TestCase):
    """EventSource in a real browser, on a page of another origin."""

    part = "D"                  # run by the third process, see main()

    def setUp(self):
        self.port = None
        self.state = tempfile.mkdtemp(prefix="comet-sse-state-")
        self.addCleanup(shutil.rmtree, self.state, ignore_errors=True)
        self.tab = self.browser.new_tab()
        self.addCleanup(self.tab.close)

    def start_server(self, *args):
        """A server on a free port; a restarted one on the same port."""
        args = ("--enable-status", f"--sse-heartbeat={SSE_HEARTBEAT}") + args
        if self.port is None:
            server = ServerProcess(*args)
            self.port = server.port
        else:
            server = ServerProcess(*args, port=self.port)
        self.addCleanup(server.close)
        return server

    def open_page(self, script):
        path = "/%s.html" % self.id().rsplit(".", 1)[-1]
        PageHandler.pages[path] = SSE_PAGE % {"port": self.port,
                                              "script": script}
        self.tab.navigate(self.page_origin + path)
        self.assertTrue(self.tab.wait_for("window.got !== undefined"),
                        "page did not load")

    def wait_got(self, expected, timeout=10):
        self.tab.wait_for("got.length >= %d" % len(expected), timeout)
        self.assertEqual(self.tab.js("got"), expected)

    def streams(self):
        return status(self.port)["streams_open"]

    def test_two_channels_retained_live_and_deleted(self):
        """EventSource on A|B: retained and live in order, deleted, then
        stopped by 404."""
        self.start_server()
        tricky = "two\nlines \"quoted\" \u2028 \u00e9 \u2603 \U0001F600"
        for name in ("A", "B"):
            register(name, port=self.port)
        for name, content in (("A", "a1"), ("B", tricky), ("A", "a2")):
            push(name, content, port=self.port)
        self.open_page('var es = listen(COMET + "A%7CB.sse");')
        expected = ["A a1", "B " + tricky, "A a2"]
        self.wait_got(expected)
        wait_for(lambda: self.streams() == 1)
        for name, content in (("B", "b2"), ("A", "a3"), ("B", "b3")):
            push(name, content, port=self.port)
            expected.append(f"{name} {content}")
            self.wait_got(expected)
        self.assertTrue(self.tab.js("idsMatch"))
        self.assertEqual(self.tab.js("opens"), 1)
        # Deleting one channel: the page hears of it, the other goes on.
        delete("A", self.port)
        self.tab.wait_for("events.length >= 1")
        self.assertEqual(self.tab.js("events"), ['deleted {"channel": "A"}'])
        push("B", "b4", port=self.port)
        expected.append("B b4")
        self.wait_got(expected)
        # Deleting the last one closes the stream; the reconnect (after the
        # 3 s retry) gets 404 and the browser stops for good.
        delete("B", self.port)
        self.assertTrue(self.tab.wait_for("es.readyState === 2", 8),
                        "EventSource did not stop")
        self.assertEqual(self.tab.js("events")[-1], 'deleted {"channel": "B"}')
        self.assertEqual(self.streams(), 0)
        self.assertEqual(self.tab.js("got"), expected)

    def check_restart(self, args, restore):
        """Stream A|B, restart the server on the same port, go on: the page
        gets every message once, in order, without a reload."""
        server = self.start_server(*args)
        for name in ("A", "B"):
            register(name, port=self.port)
        push("A", "a1", port=self.port)
        push("B", "b1", port=self.port)
        self.open_page('var es = listen(COMET + "A%7CB.sse");')
        self.wait_got(["A a1", "B b1"])
        push("A", "a2", port=self.port)
        self.wait_got(["A a1", "B b1", "A a2"])
        page = self.tab.js("page")
        self.assertEqual(server.stop(), 0)
        server = self.start_server(*args)
        restore()
        # Pushed before the browser is back (its retry is >= 1 s): it must
        # come from the replay after its Last-Event-ID.
        push("B", "b2", port=self.port)
        self.assertEqual(self.streams(), 0, "reconnected too early to tell")
        wait_for(lambda: self.streams() == 1, timeout=8)
        push("A", "a3", port=self.port)
        expected = ["A a1", "B b1", "A a2", "B b2", "A a3"]
        self.wait_got(expected)
        time.sleep(0.3)                   # nothing more may come
        self.assertEqual(self.tab.js("got"), expected)
        self.assertEqual(self.tab.js("page"), page, "the page reloaded")
        self.assertEqual(self.tab.js("opens"), 2)
        self.assertTrue(self.tab.js("idsMatch"))
        self.assertEqual(self.tab.js("events"), [])
        # The browser waited for the retry it was given at shutdown
        # (1000-5000 ms) before reconnecting.
        times = self.tab.js("times")
        self.assertEqual([t.split()[0] for t in times],
                         ["open", "error", "open"], times)
        waited = int(times[2].split()[1]) - int(times[1].split()[1])
        self.assertGreaterEqual(waited, 950, times)
        self.assertLess(waited, 6000, times)

    def test_restart_with_state_file_no_duplicate_no_gap(self):
        """Restart with --state-file: Last-Event-ID resumes with no
        duplicate and no gap."""
        # The channels and a1, b1, a2 survive the restart: a reconnect that
        # ignored Last-Event-ID would deliver them again.
        state = os.path.join(self.state, "comet.state")
        self.check_restart([f"--state-file={state}"], lambda: None)


@unittest.skipIf(NGINX is None, 'nginx is not installed (looked for nginx on '
                 'PATH and in /usr/sbin)')
class SSENginxTests(ReadmeNginx, SSEAssertions):
    """Streams through the README's nginx configuration, in both upstream
    forms (HTTP/1.1 keep-alive, and nginx's default HTTP/1.0)."""

    SERVER_ARGS = ('--enable-status', '--poll-timeout=0.3',
                   f'--sse-heartbeat={SSE_HEARTBEAT}')

    def ports(self):
        return (('keep-alive upstream', self.public_port),
                ('HTTP/1.0 upstream', self.http10_port))

    def new_channel(self):
        return register_unix(self.sock)

    def push(self, name, content):
        reply = api('POST', '/channels/%s.json' % name, {'content': content},
                    unix=self.sock)
        self.assertEqual(reply['return_code'], 1, reply)
        return reply

    def open(self, port, path, headers=()):
        stream = SSE(port, path, headers=headers)
        self.addCleanup(stream.close)
        return stream

    def check_stream(self, port):
        name = self.new_channel()
        first = self.push(name, 'retained')['message_id']
        stream = self.open(port, sse_path([name]))
        # The head and the opening pass at once, before any event.
        self.assertStreamOpened(stream, proxied=True)
        self.assertEqual(stream.message()['content'], 'retained')
        # Each event arrives as soon as it is pushed, not batched (a
        # buffering proxy would hold these few bytes for good).
        for i in range(5):
            pushed_at = time.monotonic()
            self.push(name, 'live %d' % i)
            item = stream.event(timeout=3)
            self.assertEqual(json.loads(item['data'])['content'],
                             'live %d' % i)
            self.assertLess(item['at'] - pushed_at, bound(2, 0.25))
        # Heartbeats pass through too.
        self.assertIn('comment', stream.next())
        # Last-Event-ID reaches the server.
        again = self.open(port, sse_path([name], '?since=0'),
                          headers=[('Last-Event-ID', str(first))])
        self.assertStreamOpened(again, proxied=True)
        self.assertEqual(again.message()['content'], 'live 0')
        # The end of the stream passes through as the end of the body.
        api('DELETE', '/channels/%s.json' % name, unix=self.sock)
        for s in (stream, again):
            items = [i for i in s.rest() if 'comment' not in i]
            self.assertEqual(len(items) - 1, 0 if s is stream else 4, items)
            self.assertDeletedEvent(items[-1], name)
        # And the browser's reconnect gets the server's 404.
        refused = self.open(port, sse_path([name]),
                            headers=[('Last-Event-ID', str(first))])
        self.assertRefused(refused, 404, -2)

    def test_stream_keepalive(self):
        """Through nginx's keep-alive upstream: at once, not batched, end
        passed on."""
        self.check_stream(self.public_port)

    def test_stream_http10(self):
        """Through nginx's HTTP/1.0 upstream: at once, not batched, end
        passed on."""
        self.check_stream(self.http10_port)

    def test_two_streams_and_no_upstream_errors(self):
        """Several streams through both forms; nginx logs no upstream error."""
        # Streams on both forms at once, each closed by the client midway
        # or by the server; nginx logs no upstream error for either.
        name = self.new_channel()
        streams = [self.open(port, sse_path([name])) for _, port in
                   self.ports() for _ in range(2)]
        for stream in streams:
            self.assertStreamOpened(stream, proxied=True)
        wait_for(lambda: status_unix(self.sock)['streams_open'] == 4)
        self.push(name, 'to all')
        for stream in streams:
            self.assertEqual(stream.message()['content'], 'to all')
        streams[0].close()
        streams[2].close()
        wait_for(lambda: status_unix(self.sock)['streams_open'] == 2)
        self.assertEqual(self.push(name, 'to two')['delivered'], 2)
        api('DELETE', '/channels/%s.json' % name, unix=self.sock)
        for stream in (streams[1], streams[3]):
            self.assertEqual(stream.message()['content'], 'to two')
            self.assertDeletedEvent(stream.event(), name)
            self.assertIsNone(stream.next())
        lines = [line for line in file_text(self.nginx_log, None).splitlines()
                 if re.search(r'\[(error|crit|alert|emerg)\]', line)]
        self.assertEqual(lines, [])

    def test_readme_read_timeout_outlasts_the_heartbeat(self):
        """The README's proxy_read_timeout leaves room for the heartbeat."""
        # nginx closes a stream that is silent for proxy_read_timeout; the
        # heartbeat (default 15 s) must come well before that.
        snippet = readme_nginx_conf() or README_NGINX_CONF
        public = snippet[snippet.index('location /channels/'):]
        public = public[:public.index('\n    location ')]
        timeout = re.search(r'proxy_read_timeout\s+(\d+)s?;', public)
        self.assertIsNotNone(timeout, public)
        self.assertGreaterEqual(int(timeout.group(1)), 2 * 15)


# ---------------------------------------------------------------------------
# C2. State that survives restarts and crashes (--state-file=PATH)
# ---------------------------------------------------------------------------

def state_server(path, *args, poll_timeout=0.5, env=None):
    """A server keeping its state under path, on a free port (.port; a
    restart takes another one)."""
    return ServerProcess(f"--state-file={path}", "--enable-status",
                         f"--poll-timeout={poll_timeout}", *args, env=env)


def state_files(path):
    """{file name: bytes} of every file under PATH* (PATH itself and the
    files beside it whose names start with PATH's name)."""
    directory, base = os.path.split(path)
    files = {}
    for name in sorted(os.listdir(directory)):
        full = os.path.join(directory, name)
        if name.startswith(base) and os.path.isfile(full):
            try:
                with open(full, "rb") as f:
                    files[name] = f.read()
            except FileNotFoundError:     # a temporary file renamed away
                pass
    return files


def state_sizes(path):
    """{file name: size} of the files under PATH*, cheap enough to sample
    every millisecond while the server works."""
    directory, base = os.path.split(path)
    sizes = {}
    with os.scandir(directory) as entries:
        for entry in entries:
            if entry.name.startswith(base):
                try:
                    sizes[entry.name] = entry.stat().st_size
                except FileNotFoundError:
                    pass
    return sizes


def state_modes(path):
    directory, base = os.path.split(path)
    modes = {}
    for name in os.listdir(directory):
        if name.startswith(base):
            try:
                modes[name] = stat.S_IMODE(os.stat(os.path.join(directory,
                                                                name)).st_mode)
            except FileNotFoundError:
                pass
    return modes


def restore_files(path, files):
    """Put the files under PATH* back exactly as in a state_files() copy."""
    directory, base = os.path.split(path)
    for name in os.listdir(directory):
        if name.startswith(base) and name not in files:
            os.unlink(os.path.join(directory, name))
    for name, data in files.items():
        full = os.path.join(directory, name)
        with open(full, "wb") as f:
            f.write(data)
        os.chmod(full, 0o600)


def appended(before, after):
    """The one file that grew by an append between two state_files()
    copies: (name, offset where the new bytes start, the new bytes)."""
    changed = [name for name in after if before.get(name) != after[name]]
    assert len(changed) == 1, ("expected one file to grow", changed)
    name = changed[0]
    old = before.get(name, b"")
    assert after[name].startswith(old), "the file was rewritten, not appended"
    return name, len(old), after[name][len(old):]


@contextlib.contextmanager
def umask(mask):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def clock_env(directory, offset):
    """Environment that starts the server with its wall clock shifted by
    offset seconds, as after an NTP step: a sitecustomize module shifts
    time.time and time.time_ns before simple_comet.py is imported."""
    with open(os.path.join(directory, "sitecustomize.py"), "w") as f:
        f.write("import time\n"
                f"_t, _ns, _off = time.time, time.time_ns, {offset!r}\n"
                "time.time = lambda: _t() + _off\n"
                "time.time_ns = lambda: _ns() + int(_off * 1e9)\n")
    return {"PYTHONPATH": directory}


def messages_of(name, port, **params):
    reply = read([name], port=port, **params)
    assert reply["return_code"] == 1, reply
    return reply["messages"][name]


def warning_lines(output):
    return [line for line in output.splitlines() if "WARNING" in line]


def names_number(line, number):
    return re.search(rf"(?<![0-9]){number}(?![0-9])", line) is not None


class StateFileTests(unittest.TestCase):

    part = "C"                  # run by the second process, see main()

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="comet-state-")
        self.path = os.path.join(self.dir, "comet.state")
        self.port = free_port()
        self.servers = []

    def tearDown(self):
        for server in self.servers:
            server.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def start(self, *args, **kw):
        server = state_server(self.path, *args, **kw)
        self.servers.append(server)
        self.port = server.port
        return server

    def stop(self, server, sig=signal.SIGTERM):
        code = server.stop(sig)
        output = server.output()
        self.assertNotIn("Traceback", output)
        if sig == signal.SIGTERM:
            self.assertEqual(code, 0, output)
        return output

    def test_restart_restores_everything(self):
        """Channels with their options, retained messages (any text),
        clients and deletions come back after SIGTERM."""
        server = self.start()
        p = self.port
        private = register("privé-ч", port=p, use_sessions="1",
                           max_messages="3")
        public = register(port=p, max_messages="20")
        deleted = register(port=p)
        client = "clïent-😀"
        self.assertEqual(api("POST", "/clients.json", {"client_id": client},
                             port=p)["return_code"], 1)
        contents = ["héllo ☃ 😀 中文", "line one\nline two\r\nthree\n",
                    'quotes " \' \\" \\\\ </script>', "\u2028 and \u2029",
                    "", "a\x00b\x1f\x7f\t", "x" * 5000]
        for text in contents:
            push(public, text, port=p)
        for i in range(5):                  # two are dropped (max 3)
            push(private, f"p{i}\n\"{i}\"", port=p)
        push(deleted, "gone with its channel", port=p)
        self.assertEqual(api("DELETE", channel_path(deleted), port=p)
                         ["return_code"], 2)
        before = {name: messages_of(name, p, client_id=client)
                  for name in (private, public)}
        self.assertEqual([m["content"] for m in before[public]], contents)
        self.stop(server)

        server = self.start()
        p = self.port
        st = status(p)
        self.assertEqual(sorted(st["channels"]), sorted([private, public]))
        self.assertEqual(st["clients"], [client])
        for name in (private, public):
            # Ids, timestamps and contents exactly as before.
            self.assertEqual(messages_of(name, p, client_id=client),
                             before[name])
        # use_sessions is kept: the old client_id still reads, no one else.
        self.assertEqual(read([private], port=p)["return_code"], -2)
        self.assertEqual(read([private], port=p, client_id="other")
                         ["return_code"], -3)
        # max_messages is kept: one more push drops the oldest of 3.
        push(private, "p5", port=p)
        self.assertEqual([m["content"] for m in
                          messages_of(private, p, client_id=client)],
                         ["p3\n\"3\"", "p4\n\"4\"", "p5"])
        for text in ("more", "and more"):
            push(public, text, port=p)
        self.assertEqual(len(messages_of(public, p)), len(contents) + 2)
        # Registered things stay registered; deleted ones stay deleted.
        self.assertEqual(api("POST", "/clients.json", {"client_id": client},
                             port=p)["return_code"], -2)
        self.assertEqual(api("POST", "/channels.json",
                             {"channel_id": public}, port=p)["return_code"],
                         -2)
        self.assertEqual(read([deleted], port=p)["return_code"], -2)
        self.assertEqual(api("POST", channel_path(deleted), {"content": "x"},
                             port=p)["return_code"], -2)
        register(deleted, port=p)
        push(deleted, "new", port=p)
        self.assertEqual([m["content"] for m in messages_of(deleted, p)],
                         ["new"])
        # And the second restart sees the changes made after the first.
        after = {name: messages_of(name, p, client_id=client)
                 for name in (private, public, deleted)}
        self.stop(server)
        self.start()
        p = self.port
        for name in (private, public, deleted):
            self.assertEqual(messages_of(name, p, client_id=client),
                             after[name])

    def test_ids_stay_above_every_acknowledged_one(self):
        """New ids are above every id acknowledged before, dropped and
        deleted ones included, even when the clock stepped back; and above
        the time-seeded start when the clock stepped forward."""
        # A server whose clock is an hour ahead hands out ids an hour
        # ahead of the real clock's seed.
        server = self.start(env=clock_env(self.dir, 3600))
        p = self.port
        kept = register(port=p, max_messages="1")
        for i in range(3):
            push(kept, f"k{i}", port=p)        # two are dropped
        doomed = register(port=p)
        top = push(doomed, "last", port=p)["message_id"]
        api("DELETE", channel_path(doomed), port=p)
        self.assertGreater(top, (time.time() + 3000) * 100_000)
        self.stop(server)
        # Back to the real clock: the seed is an hour below top, and the
        # highest acknowledged id belongs to a deleted channel.
        os.unlink(os.path.join(self.dir, "sitecustomize.py"))
        server = self.start()
        p = self.port
        first = push(kept, "after", port=p)["message_id"]
        self.assertGreater(first, top)
        self.assertEqual(read([kept], port=p, since=top)["messages"][kept]
                         [0]["id"], first)
        self.stop(server, signal.SIGKILL)
        server = self.start()
        p = self.port
        self.assertGreater(push(kept, "after kill", port=p)["message_id"],
                           first)
        self.stop(server)
        # A clock two hours ahead: the time seed is above what is stored.
        server = self.start(env=clock_env(self.dir, 7200))
        p = self.port
        seed = (time.time() + 7100) * 100_000
        self.assertGreater(push(kept, "seeded", port=p)["message_id"], seed)
        self.stop(server)

    def test_lost_is_still_reported_after_restart(self):
        """A reader whose since is behind the restored history is told
        exactly which channel lost messages: after a restart from the
        journal, and after one from a compacted file."""
        server = self.start()
        p = self.port
        small, other = register(port=p, max_messages="3"), register(port=p)
        ids = [push(small, f"s{i}", port=p)["message_id"] for i in range(3)]
        between = push(other, "o", port=p)["message_id"]
        ids += [push(small, f"s{i}", port=p)["message_id"]
                for i in range(3, 6)]            # s0..s2 are dropped
        for how in ("journal", "compacted"):
            if how == "compacted":
                # Pushes elsewhere make the journal outgrow the live data.
                noise = register(port=p, max_messages="1")
                sizes = []
                for i in range(10):
                    request = post_request(channel_path(noise),
                                           {"content": "n" * 300})
                    pipelined_replies(p, [request] * 100)
                    sizes.append(sum(state_sizes(self.path).values()))
                self.assertTrue(any(b < a for a, b in zip(sizes, sizes[1:])),
                                sizes)
            self.stop(server, signal.SIGTERM if how == "journal"
                      else signal.SIGKILL)
            server = self.start()
            p = self.port
            both = [small, other]
            reply = read(both, port=p, since=ids[1])  # missed s2
            self.assertEqual(reply["lost"], [small], how)
            self.assertEqual([m["id"] for m in reply["messages"][small]],
                             ids[3:])
            # Nothing dropped after these: no "lost".
            for since in (ids[2], between, ids[3]):
                reply = read(both, port=p, since=since)
                self.assertNotIn("lost", reply, (how, since))
            self.assertNotIn("lost", read(both, port=p))       # since 0
            # A channel that never dropped anything loses nothing, however
            # old the since.
            self.assertNotIn("lost", read([other], port=p, since=1))
            self.assertEqual(read([small], port=p, since=1)["lost"], [small])

    def test_restored_sessions_and_channels_get_a_fresh_timeout(self):
        """What expired before the restart stays gone; what was alive gets
        the whole timeout again from the restart."""
        timeout = 2.0                 # the server looks every timeout / 4
        args = (f"--session-timeout={timeout}",
                f"--inactive-channel-timeout={timeout}")
        server = self.start(*args)
        p = self.port
        gone_client, gone_channel = fresh("gonecl"), register(port=p)
        api("POST", "/clients.json", {"client_id": gone_client}, port=p)
        push(gone_channel, "x", port=p)
        wait_for(lambda: status(p)["clients"] == [] and
                 status(p)["channels"] == [], timeout=5)
        kept_client, kept_channel = fresh("keptcl"), register(port=p)
        api("POST", "/clients.json", {"client_id": kept_client}, port=p)
        push(kept_channel, "y", port=p)
        active = time.monotonic()         # their last use was before this
        # Most of their timeout passes before the restart.
        time.sleep(max(0, active + timeout * 0.7 - time.monotonic()))
        self.stop(server)
        restart = time.monotonic()
        server = self.start(*args)
        p = self.port
        st = status(p)
        self.assertEqual(st["clients"], [kept_client])
        self.assertEqual(st["channels"], [kept_channel])
        # With the old deadlines both would be gone (a look later) by now;
        # with fresh ones they stay until restart + timeout, which leaves
        # most of a second for this read.
        time.sleep(max(0, active + timeout * 1.3 - time.monotonic()))
        st = status(p)
        self.assertEqual(st["clients"], [kept_client])
        self.assertEqual(st["channels"], [kept_channel])
        self.assertLess(time.monotonic(), restart + timeout,
                        "too slow to tell: the fresh timeout ran out too")
        # Nobody reads: both expire, and their expiry is kept.
        wait_for(lambda: status(p)["clients"] == [] and
                 status(p)["channels"] == [], timeout=5)
        self.stop(server)
        self.start(*args)
        p = self.port
        st = status(p)
        self.assertEqual((st["clients"], st["channels"]), ([], []))
        self.assertEqual(read([gone_channel, kept_channel], port=p)
                         ["return_code"], -2)
        self.assertEqual(read([register(port=p)], port=p,
                              client_id=kept_client)["return_code"], -3)

    def damaged_start(self):
        """Start the server on damaged files: it must refuse with exit 1 and
        one line, leaving every file as it was."""
        files = state_files(self.path)
        try:
            result = run_server(f"--http-port={free_port()}",
                                f"--state-file={self.path}")
        except subprocess.TimeoutExpired as e:
            self.fail("the server started instead of refusing: %s" % e.stderr)
        stderr = result.stderr
        self.assertEqual(result.returncode, 1, stderr)
        self.assertNotIn("Traceback", stderr)
        self.assertEqual(stderr.strip().count("\n"), 0, stderr)
        after = state_files(self.path)
        for name, data in files.items():
            self.assertEqual(after.get(name), data, f"{name} was changed")
        for name in set(after) - set(files):
            self.assertEqual(after[name], b"", f"{name} was created")
        return stderr.strip()

    def test_torn_last_record_is_dropped_with_a_warning(self):
        """A last record cut short or failing its check (a crash in
        mid-write) is dropped with a warning giving the bytes dropped; the
        state before it is there, and the file is cut back."""
        server = self.start()
        p = self.port
        name = register(port=p)
        first = push(name, "first", port=p)
        before = state_files(self.path)
        push(name, "second, the torn one: é\u2028", port=p)
        after = state_files(self.path)
        self.stop(server, signal.SIGKILL)
        self.assertEqual(state_files(self.path), after)
        file, offset, record = appended(before, after)
        full = after[file]
        flip = len(record) // 2
        if record[flip] ^ 1 in (0x0a, 0x0d):
            flip -= 1
        damaged = {f"cut to {n} bytes": full[:offset + n]
                   for n in (1, len(record) // 2, len(record) - 1)}
        damaged["bad check"] = (full[:offset + flip] +
                                bytes([record[flip] ^ 1]) +
                                full[offset + flip + 1:])
        def check(case, data, path):
            restore_files(path, {**after, file: data})
            dropped = len(data) - offset
            server = state_server(path)
            try:
                p = server.port
                got = [m["content"] for m in messages_of(name, p)]
                lines = [line for line in warning_lines(server.output())
                         if names_number(line, dropped) and
                         "byte" in line.lower()]
                if case == f"cut to {len(record) - 1} bytes" and \
                        record.endswith(b"\n") and len(got) == 2:
                    # Only the terminating newline was missing: keeping
                    # the whole record is fine too.
                    pass
                else:
                    self.assertEqual(got, ["first"])
                    self.assertEqual(len(lines), 1, server.output())
                push(name, "third", port=p)
                expected = got + ["third"]
                server.stop_clean()
            finally:
                server.close()
            # The file was cut back: the next start is clean.
            server = state_server(path)
            try:
                p = server.port
                self.assertEqual([m["content"] for m in messages_of(name, p)],
                                 expected)
                self.assertEqual(messages_of(name, p)[0]["id"],
                                 first["message_id"])
                self.assertEqual(warning_lines(server.output()), [])
                server.stop_clean()
            finally:
                server.close()

        # The cases are independent: each on its own copy, all at once.
        jobs = {}
        for i, (case, data) in enumerate(damaged.items()):
            path = os.path.join(self.dir, f"case{i}", "comet.state")
            os.mkdir(os.path.dirname(path))
            jobs[case] = Background(check, case, data, path)
        for case, job in jobs.items():
            with self.subTest(case=case):
                job.result(60)

    def test_damage_in_the_middle_exits_1_without_touching_files(self):
        """A bad record followed by good ones: exit 1 with one line naming
        the file and the position; no file changes."""
        server = self.start()
        p = self.port
        name = register(port=p)
        spans = []
        for i in range(5):
            before = state_files(self.path)
            push(name, f"message {i} " + "z" * 40, port=p)
            spans.append(appended(before, state_files(self.path)))
        self.stop(server, signal.SIGKILL)
        file, offset, record = spans[1]
        data = state_files(self.path)[file]
        flip = offset + len(record) // 2
        if data[flip] ^ 1 in (0x0a, 0x0d):
            flip -= 1
        data = data[:flip] + bytes([data[flip] ^ 1]) + data[flip + 1:]
        with open(os.path.join(self.dir, file), "r+b") as f:
            f.write(data)
        message = self.damaged_start()
        self.assertIn(file, message)
        positions = {offset, flip, data[:offset].count(b"\n") + 1}
        self.assertTrue(any(names_number(message, n) for n in positions),
                        (message, positions))
        # Still refused the second time: nothing was "repaired".
        again = self.damaged_start()
        self.assertIn(file, again)
        self.assertTrue(any(names_number(again, n) for n in positions))

    def test_a_file_that_is_not_a_state_file_is_left_alone(self):
        """Only a last record may be dropped as a torn write: PATH holding
        several lines that are not records (a file given by mistake) makes
        the server exit 1 without changing it."""
        with open(self.path, "wb") as f:
            f.write(b"# my notes\nkeep this\n{\"json\": true}\n")
        os.chmod(self.path, 0o644)
        message = self.damaged_start()
        self.assertIn(os.path.basename(self.path), message)
        self.assertEqual(state_modes(self.path)[os.path.basename(self.path)],
                         0o644)

    def test_second_instance_on_the_same_path_exits_1(self):
        """A second server on the same PATH exits 1 within seconds; the
        first keeps working and keeps storing."""
        server = self.start()
        p = self.port
        name = register(port=p)
        push(name, "before", port=p)
        files = state_files(self.path)
        start = time.monotonic()
        # The same PATH, and the same file spelt relative to another
        # working directory.
        for cwd, path in ((None, self.path),
                          (self.dir, os.path.basename(self.path))):
            result = run_server(f"--http-port={free_port()}",
                                f"--state-file={path}", cwd=cwd)
            self.assertLess(time.monotonic() - start, 5)
            self.assertEqual(result.returncode, 1, result.stderr)
            self.assertEqual(result.stderr.strip().count("\n"), 0,
                             result.stderr)
            self.assertNotIn("Traceback", result.stderr)
            self.assertEqual(state_files(self.path), files)
            start = time.monotonic()
        push(name, "after", port=p)
        self.assertEqual([m["content"] for m in messages_of(name, p)],
                         ["before", "after"])
        self.stop(server)
        self.start()
        p = self.port
        self.assertEqual([m["content"] for m in messages_of(name, p)],
                         ["before", "after"])

    @unittest.skipIf(shutil.which("strace") is None,
                     "strace is not installed (needed to see fsync calls)")
    def test_written_data_is_synced_every_second(self):
        """Under a steady trickle of pushes the state file is fsynced (or
        fdatasynced) at least once a second."""
        server = self.start()
        p = self.port
        name = register(port=p)
        push(name, "first", port=p)
        trace = subprocess.Popen(
            ["strace", "-f", "-qq", "-y", "-ttt", "-e",
             "trace=fsync,fdatasync", "-p", str(server.proc.pid)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True)
        try:
            wait_for(lambda: traced(server.proc.pid) or
                     trace.poll() is not None, timeout=10)
            if trace.poll() is not None:
                self.skipTest("strace cannot attach (ptrace needs root or "
                              "CAP_SYS_PTRACE): " + trace.stderr.read())
            start = time.time()
            while time.time() - start < 2.6:
                push(name, "x", port=p)
                time.sleep(0.02)
            end = time.time()
        finally:
            trace.terminate()
            output = trace.communicate(timeout=10)[1]
        real = os.path.realpath(self.path)
        syncs = [float(m.group(1)) for m in re.finditer(
            r"(\d+\.\d+) f(?:data)?sync\((\d+)<([^>]*)>\) += 0", output)
            if os.path.realpath(m.group(3)) == real]
        self.assertGreaterEqual(len(syncs), 2, output[-2000:])
        gaps = [b - a for a, b in zip([start] + syncs, syncs + [end])]
        report(f"state file synced under strace, gaps {gaps}")
        self.assertLess(max(gaps), bound(2.5, 1.5), (gaps, output[-2000:]))

    def test_files_are_0600_whatever_the_umask(self):
        """With umask 0, every file under PATH* is 0600: at start, through
        compactions, and after shutdown."""
        with umask(0):
            server = self.start()
            p = self.port
        name = register(port=p, max_messages="10")
        seen = {}
        for i in range(30):
            pipelined_replies(p, [
                post_request(channel_path(name),
                             {"content": f"{i}-{j}-" + "m" * 300})
                for j in range(200)])
            seen.update(state_modes(self.path))
        # Told by the server (the files' sizes, sampled, can miss one).
        wait_for(lambda: status(p)["state_file"]["compactions"],
                 timeout=10)
        self.stop(server)
        seen.update(state_modes(self.path))
        with umask(0):
            server = self.start()
            p = self.port
        seen.update(state_modes(self.path))
        self.assertTrue(seen)
        self.assertEqual({n: oct(m) for n, m in seen.items()},
                         {n: "0o600" for n in seen})

    def test_compaction_keeps_the_files_small(self):
        """The files stay within 10 times the retained messages: many
        pushes to small windows make the server compact."""
        server = self.start()
        p = self.port
        names = [register(port=p, max_messages="50") for _ in range(3)]
        sizes = []
        for i in range(20):
            pipelined_replies(p, [
                post_request(channel_path(names[j % 3]),
                             {"content": f"{i}-{j}-" + "c" * 500})
                for j in range(300)])
            sizes.append(sum(state_sizes(self.path).values()))
        retained = [m for n in names for m in messages_of(n, p)]
        self.assertEqual(len(retained), 150)
        live = sum(len(json.dumps(m)) for m in retained)
        self.assertTrue(any(b < a for a, b in zip(sizes, sizes[1:])), sizes)
        # Once the compaction under way (if any) is done: a sample taken
        # while one runs also counts what arrived meanwhile.
        try:
            wait_for(lambda: sum(state_sizes(self.path).values()) <
                     10 * live + 64 * 1024, timeout=10)
        except AssertionError:
            self.fail(f"over 10 times the {live} bytes retained: {sizes}")
        sizes.append(sum(state_sizes(self.path).values()))
        report(f"state file under 6,000 pushes of 0.5 KB to 3 channels of "
               f"50: {live // 1024} KiB retained, files {max(sizes) // 1024} "
               f"KiB at most, {sizes[-1] // 1024} KiB at the end")
        self.stop(server)
        self.start()
        p = self.port
        self.assertEqual([m for n in names for m in messages_of(n, p)],
                         retained)

    def test_stream_and_poll_continue_across_a_restart(self):
        """A stream (Last-Event-ID) and a long poll (last_id as since) open
        across a restart continue with no gap and no duplicate."""
        server = self.start()
        p = self.port
        name = register(port=p)
        m1 = push(name, "m1", port=p)["message_id"]
        m2 = push(name, "m2", port=p)["message_id"]
        stream = SSE(p, channel_path(name, ".sse"))
        try:
            self.assertEqual(stream.status, 200)
            self.assertEqual([stream.message()["id"] for _ in range(2)],
                             [m1, m2])
            last_id = read([name], port=p)["last_id"]
            poll = Background(exchange, get_request(
                channel_path(name) + f"?since={last_id}"), p)
            wait_for(lambda: status(p)["held_connections_count"] == 1)
            self.stop(server)
            # Shutdown answers the poll with an empty reply and ends the
            # stream cleanly.
            replies = poll.result()
            self.assertEqual(len(replies), 1)
            reply = json.loads(replies[0][2])
            self.assertEqual(reply["messages"], {name: []})
            self.assertEqual([i for i in stream.rest()
                              if "data" in i or "event" in i], [])
        finally:
            stream.close()
        server = self.start()
        p = self.port
        # Pushed before either client is back.
        m3 = push(name, "m3", port=p)["message_id"]
        stream = SSE(p, channel_path(name, ".sse"),
                     headers=[("Last-Event-ID", str(m2))])
        try:
            self.assertEqual(stream.status, 200)
            self.assertEqual(stream.message()["id"], m3)
            reply = read([name], port=p, since=reply["last_id"])
            self.assertEqual([m["id"] for m in reply["messages"][name]], [m3])
            poll = Background(read, [name], port=p, since=reply["last_id"])
            wait_for(lambda: status(p)["held_connections_count"] == 1)
            m4 = push(name, "m4", port=p)["message_id"]
            self.assertEqual([m["content"] for m in
                              poll.result()["messages"][name]], ["m4"])
            self.assertEqual(stream.message()["id"], m4)
            m5 = push(name, "m5", port=p)["message_id"]
            event = stream.message()       # m5 next: nothing repeated
            self.assertEqual((event["id"], event["content"]), (m5, "m5"))
            self.assertEqual(event["channel"], name)
        finally:
            stream.close()


class StateCrashTests(unittest.TestCase):

    part = "C"                  # run by the second process, see main()

    ROUNDS = 6
    PUSHERS = 4

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="comet-state-")
        self.path = os.path.join(self.dir, "comet.state")
        self.port = free_port()
        self.server = None

    def tearDown(self):
        if self.server is not None:
            self.server.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def test_sigkill_under_push_load_loses_nothing_acknowledged(self):
        """SIGKILL at random moments (during compactions too) under
        concurrent pushes: every acknowledged message that fits its
        channel's window is restored, once, in id order."""
        p = self.port
        rng = random.Random(20240607)
        self.server = state_server(self.path)
        p = self.port = self.server.port
        windows = {register(port=p, max_messages="50"): 50 for _ in range(3)}
        windows[register(port=p, max_messages="10")] = 10   # drives compaction
        names = list(windows)
        stored = {n: {} for n in names}     # id -> content, acknowledged
        in_flight = set()                   # (channel, content) unanswered
        compactions = kills_in_compaction = pushed = 0
        for round_ in range(self.ROUNDS):
            acked, attempts = [], {}
            stop = threading.Event()

            def pusher(t, seed):
                prng = random.Random(seed)
                conn = http.client.HTTPConnection("127.0.0.1", p, timeout=5)
                try:
                    for i in itertools.count():
                        if stop.is_set():
                            return
                        name = prng.choice(names)
                        content = (f"r{round_}-t{t}-{i}|" + "é\n\"" *
                                   prng.randrange(1, 100))
                        attempts[t] = (name, content)
                        conn.request("POST", channel_path(name),
                                     urlencode({"content": content}), FORM)
                        reply = json.loads(conn.getresponse().read())
                        assert reply["return_code"] == 1, reply
                        acked.append((name, reply["message_id"], content))
                        del attempts[t]
                except (OSError, http.client.HTTPException):
                    pass                    # killed mid-request
                finally:
                    conn.close()
            threads = [Background(pusher, t, rng.random())
                       for t in range(self.PUSHERS)]
            wait_for(lambda: len(acked) > 20)
            # Registrations and a deletion acknowledged under the load.
            api("POST", "/clients.json", {"client_id": f"client{round_}"},
                port=p)
            register(f"extra{round_}", port=p)
            if round_:
                self.assertEqual(api("DELETE", f"/channels/extra{round_ - 1}"
                                     ".json", port=p)["return_code"], 2)
            # Even rounds: kill at a random moment; odd rounds: kill at the
            # first sign of a compaction (a file appears, goes or shrinks).
            baseline = state_sizes(self.path)
            deadline = time.monotonic() + (rng.uniform(0.05, 0.8)
                                           if round_ % 2 == 0 else 3)
            while time.monotonic() < deadline:
                sizes = state_sizes(self.path)
                if sizes.keys() != baseline.keys() or any(
                        sizes[n] < baseline[n] for n in sizes):
                    compactions += 1
                    if round_ % 2:
                        break
                baseline = sizes
                time.sleep(0.001)
            self.server.stop(signal.SIGKILL)
            left = set(state_sizes(self.path))
            stop.set()
            for thread in threads:
                thread.result()
            in_flight |= set(attempts.values())
            pushed += len(acked)
            for name, message_id, content in acked:
                stored[name][message_id] = content
            self.assertEqual(set(state_modes(self.path).values()), {0o600})

            self.server = state_server(self.path)
            p = self.port = self.server.port
            self.assertNotIn("Traceback", self.server.output())
            # A file the restart removed (a temporary one) tells that the
            # kill came in the middle of a compaction.
            kills_in_compaction += bool(left - set(state_sizes(self.path)))
            self.check_restored(stored, in_flight, windows, round_)
            st = status(p)
            self.assertEqual(sorted(st["clients"]),
                             sorted(f"client{r}" for r in range(round_ + 1)))
            self.assertEqual(sorted(st["channels"]),
                             sorted(names + [f"extra{round_}"]))
        self.assertEqual(self.server.stop(), 0)
        self.server = state_server(self.path)
        self.port = self.server.port
        self.check_restored(stored, in_flight, windows, "final")
        self.assertGreater(compactions, 0, "no compaction seen")
        self.assertGreater(kills_in_compaction, 0, "no kill in mid-compaction")
        report(f"SIGKILL under push load: {self.ROUNDS} kills, {pushed} "
               f"pushes acknowledged, {compactions} signs of compaction, "
               f"{kills_in_compaction} kills in mid-compaction, all "
               f"acknowledged messages restored")

    def check_restored(self, stored, in_flight, windows, round_):
        top = 0
        for name, window in windows.items():
            got = messages_of(name, self.port)
            ids = [m["id"] for m in got]
            self.assertEqual(ids, sorted(set(ids)), (round_, name))
            for m in got:
                if m["id"] in stored[name]:
                    self.assertEqual(m["content"], stored[name][m["id"]])
                else:
                    # Stored but never answered: it was in flight at a kill.
                    self.assertIn((name, m["content"]), in_flight,
                                  (round_, name, m))
                    in_flight.discard((name, m["content"]))
                    stored[name][m["id"]] = m["content"]
            expected = sorted(stored[name])[-window:]
            self.assertEqual(ids, expected, (round_, name, len(ids),
                                             set(ids) ^ set(expected)))
            top = max([top, *stored[name]])
        # The counter is above every id handed out before the kill.
        name = next(iter(windows))
        probe = push(name, f"probe {round_}", port=self.port)["message_id"]
        self.assertGreater(probe, top)
        stored[name][probe] = f"probe {round_}"


@unittest.skipUnless(os.geteuid() == 0, "mounting a small tmpfs needs root")
class StateDiskFullTests(unittest.TestCase):

    part = "C"                  # run by the second process, see main()

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="comet-tmpfs-")
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k",
                                 "tmpfs", self.dir], capture_output=True,
                                text=True)
        if result.returncode:
            os.rmdir(self.dir)
            self.skipTest("mounting a tmpfs is not permitted here (needs "
                          "root with CAP_SYS_ADMIN): " + result.stderr)
        self.path = os.path.join(self.dir, "comet.state")
        self.port = free_port()
        self.server = None

    def tearDown(self):
        if self.server is not None:
            self.server.close()
        subprocess.run(["umount", self.dir], check=False)
        os.rmdir(self.dir)

    def test_disk_full_refuses_writes_and_recovers(self):
        """On a full disk a push gets 503 and is not stored; reads, held
        polls and streams keep working; /health.json says 503; once there
        is room, writes succeed again within seconds."""
        p = self.port
        filler = os.path.join(self.dir, "filler")
        with open(filler, "wb") as f:
            f.write(b"\0" * 128 * 1024)
        self.server = state_server(self.path, poll_timeout=5)
        p = self.server.port
        name = register(port=p, max_messages="1000")  # keeps them all
        health = call("GET", "/health.json", port=p)
        self.assertEqual(health[0].status, 200)
        self.assertEqual(json.loads(health[1]),
                         {"return_code": 1, "error_message": ""})
        acked, refused = [], []
        for i in range(1000):
            content = f"{i}:" + "d" * 2000
            resp, body = call("POST", channel_path(name), {"content": content},
                              port=p)
            if resp.status == 503:
                refused.append(content)
                refused_at = time.monotonic()
                break
            self.assertEqual(resp.status, 200, body)
            reply = json.loads(body)
            self.assertEqual(reply["return_code"], 1, reply)
            acked.append((reply["message_id"], content))
        self.assertTrue(refused, "the disk never filled")
        self.assertGreater(len(acked), 10)
        error = json.loads(body)
        self.assertEqual(error["return_code"], -1, error)
        self.assertTrue(error["error_message"])
        resp, body = call("GET", "/health.json", port=p)
        self.assertEqual(resp.status, 503, body)
        self.assertEqual(json.loads(body)["return_code"], -1)
        self.assertTrue(json.loads(body)["error_message"])
        # Reads, held polls and streams keep working, without the refused.
        self.assertEqual([(m["id"], m["content"])
                          for m in messages_of(name, p)], acked)
        last = read([name], port=p)["last_id"]
        stream = SSE(p, channel_path(name, ".sse"),
                     headers=[("Last-Event-ID", str(acked[-1][0]))])
        try:
            self.assertEqual(stream.status, 200)
            poll = Background(read, [name], port=p, since=last)
            held = time.monotonic()
            wait_for(lambda: status(p)["held_connections_count"] == 1)
            # While the disk stays full, health stays 503 and writes keep
            # failing (checked past a second, when a server may have
            # retried a small write in the room left in its file's last
            # page).
            time.sleep(max(0, refused_at + 1.5 - time.monotonic()))
            resp, body = call("GET", "/health.json", port=p)
            self.assertEqual(resp.status, 503, "health says 200 while the "
                             "disk is still full")
            resp, body = call("POST", channel_path(name),
                              {"content": refused[0]}, port=p)
            self.assertEqual(resp.status, 503, body)
            # Room again: writes are taken within a few seconds, and
            # /health.json says so without any write being tried (a load
            # balancer that routes by it sends none until it says 200).
            os.unlink(filler)
            freed = time.monotonic()
            wait_for(lambda: call("GET", "/health.json", port=p)[0].status
                     == 200, timeout=5)
            recovered = time.monotonic() - freed
            content = "back " + "e" * 2000
            back = push(name, content, port=p)["message_id"]
            acked.append((back, content))
            event = stream.message()
            self.assertEqual((event["id"], event["content"]), (back, content))
            # The poll held through the failure is answered (unless the
            # recovery took longer than --poll-timeout).
            got = poll.result()["messages"][name]
            if time.monotonic() - held < 4.5:
                self.assertEqual([m["id"] for m in got], [back])
            else:
                self.assertIn([m["id"] for m in got], ([], [back]))
        finally:
            stream.close()
        for i in range(5):
            content = f"more {i}"
            acked.append((push(name, content, port=p)["message_id"], content))
        self.assertEqual(self.server.stop(), 0)
        self.assertNotIn("Traceback", self.server.output())
        self.server = state_server(self.path)
        p = self.server.port
        got = [(m["id"], m["content"]) for m in messages_of(name, p)]
        self.assertEqual(got, acked)
        for content in refused:
            self.assertNotIn(content, [c for _, c in got])
        # No half record was left to drop.
        self.assertEqual(warning_lines(self.server.output()), [])
        report(f"disk full (512 KiB tmpfs): {len(acked)} pushes taken, "
               f"{len(refused)} refused with 503; writes taken again "
               f"{recovered:.2f} s after room was made")

    def test_disk_full_while_compacting(self):
        """Filling the disk while compactions run (and fail for lack of
        room): every push is either acknowledged and kept, or refused with
        503 and absent; after room is made, writes are taken again."""
        p = self.port
        filler = os.path.join(self.dir, "filler")
        with open(filler, "wb") as f:
            f.write(b"\0" * 128 * 1024)
        self.server = state_server(self.path)
        p = self.server.port
        # The small window makes the journal outgrow the live data, so the
        # server compacts; the big one fills the disk.
        windows = {register(port=p, max_messages="5"): 5,
                   register(port=p, max_messages="1000"): 1000}
        small, big = windows
        acked = {small: [], big: []}
        refused = []
        conn = http.client.HTTPConnection("127.0.0.1", p, timeout=10)
        compactions = last_size = 0
        try:
            first_refusal = None
            for i in itertools.count():
                name = small if i % 10 else big
                content = f"{i}:" + "f" * 2000
                conn.request("POST", channel_path(name),
                             urlencode({"content": content}), FORM)
                resp = conn.getresponse()
                body = resp.read()
                if resp.status == 503:
                    self.assertEqual(json.loads(body)["return_code"], -1)
                    refused.append(content)
                    first_refusal = first_refusal or time.monotonic()
                    if time.monotonic() - first_refusal > 1.5:
                        break
                    time.sleep(0.01)
                    continue
                self.assertEqual(resp.status, 200, body)
                acked[name].append((json.loads(body)["message_id"], content))
                self.assertLess(i, 5000, "the disk never filled")
                size = sum(state_sizes(self.path).values())
                compactions += size < last_size
                last_size = size
        finally:
            conn.close()
        self.assertGreater(compactions, 0, "no compaction seen")
        self.assertEqual(call("GET", "/health.json", port=p)[0].status, 503)
        os.unlink(filler)
        wait_for(lambda: call("GET", "/health.json", port=p)[0].status
                 == 200, timeout=5)
        for name in windows:
            content = "after " + name
            acked[name].append((push(name, content, port=p)["message_id"],
                                content))
        self.assertEqual(self.server.stop(), 0)
        self.assertNotIn("Traceback", self.server.output())
        self.server = state_server(self.path)
        p = self.server.port
        for name, window in windows.items():
            got = [(m["id"], m["content"]) for m in messages_of(name, p)]
            self.assertEqual(got, acked[name][-window:])
        stored = {c for n in windows for _, c in acked[n]}
        self.assertFalse(stored & set(refused))
        self.assertEqual(warning_lines(self.server.output()), [])
        report(f"disk full while compacting: {len(acked[small])} + "
               f"{len(acked[big])} pushes taken, {compactions} compactions "
               f"seen, {len(refused)} refused")


# 100,000 retained messages for the figures; fewer in the default run.
RESTART_MESSAGES = 100 if (os.environ.get("SIMPLE_COMET_LONG") or
                           os.environ.get("SIMPLE_COMET_REPORT")) else 20


class StateReliabilityTests(unittest.TestCase):

    part = "C"                  # run by the second process, see main()

    def test_restart_with_many_retained_messages(self):
        """Restart (after SIGTERM and after SIGKILL) with 1,000 channels of
        RESTART_MESSAGES messages (100: 100,000 in all) is quick and
        restores them all."""
        d = tempfile.mkdtemp(prefix="comet-state-")
        path, p = os.path.join(d, "comet.state"), free_port()
        server = None
        try:
            server = state_server(path)
            p = server.port
            names = [f"big{i}" for i in range(1000)]
            registrations = [post_request("/channels.json",
                                          {"channel_id": n}) for n in names]
            for reply in pipelined_replies(p, registrations):
                self.assertEqual(reply["return_code"], 1, reply)
            requests = [post_request(f"/channels/{n}.json",
                                     {"content": f"{n}: message {i}"})
                        for i in range(RESTART_MESSAGES) for n in names]
            start = time.monotonic()
            parts = [Background(pipelined_replies, p, requests[k::4])
                     for k in range(4)]
            replies = [part.result(timeout=300) for part in parts]
            rate = len(requests) / (time.monotonic() - start)
            for part in replies:
                self.assertTrue(all(r["return_code"] == 1 for r in part))
            sample = random.Random(7).sample(names, 5)
            expected = {n: messages_of(n, p) for n in sample}
            self.assertEqual([len(m) for m in expected.values()],
                             [RESTART_MESSAGES] * 5)
            size = sum(state_sizes(path).values())
            times = {}
            for how in (signal.SIGTERM, signal.SIGKILL):
                code = server.stop(how)
                self.assertNotIn("Traceback", server.output())
                if how == signal.SIGTERM:
                    self.assertEqual(code, 0)
                server.close()
                start = time.monotonic()
                server = state_server(path)
                p = server.port
                st = status(p)
                times[how.name] = time.monotonic() - start
                self.assertEqual(len(st["channels"]), 1000)
                for n in sample:
                    self.assertEqual(messages_of(n, p), expected[n])
                self.assertLess(times[how.name], 15)
            report(f"{RESTART_MESSAGES * 1000:,} retained messages in 1,000 "
                   f"channels: pushed at "
                   f"{rate:.0f}/s (4 pipelined connections), files "
                   f"{size / 1e6:.1f} MB, restart {times['SIGTERM']:.2f} s "
                   f"after SIGTERM, {times['SIGKILL']:.2f} s after SIGKILL")
        finally:
            if server is not None:
                server.close()
            shutil.rmtree(d, ignore_errors=True)


# ---------------------------------------------------------------------------
# Helpers for C4 and C5
# ---------------------------------------------------------------------------

_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_SAMPLE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?[ \t]+(\S+)"
                     r"(?:[ \t]+(-?[0-9]+))?[ \t]*")
_LABEL = re.compile(r'[ \t]*([a-zA-Z_][a-zA-Z0-9_]*)[ \t]*=[ \t]*'
                    r'"((?:[^"\\\n]|\\[\\"n])*)"[ \t]*(?:,|$)')
_VALUE = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
                    r"(?:[eE][+-]?[0-9]+)?|[+-]?Inf|NaN")
_TYPES = ("counter", "gauge", "histogram", "summary", "untyped")


class Metrics:
    """A strictly parsed Prometheus text exposition (format 0.0.4)."""

    def __init__(self, text):
        def check(condition, why, line=None):
            if not condition:
                raise AssertionError(f"/metrics: {why}" +
                                     (f" at {line!r}" if line else "") +
                                     "\n" + text)
        check(text.endswith("\n"), "does not end with a newline")
        self.text = text
        self.helps, self.types, self.samples = {}, {}, {}
        finished = set()            # families whose sample group is over
        current = None
        for line in text[:-1].split("\n"):
            if not line.strip():
                continue
            if line.startswith("#"):
                parts = line.split(None, 3)
                if len(parts) < 3 or parts[1] not in ("HELP", "TYPE"):
                    continue                               # a comment
                kind, name = parts[1], parts[2]
                check(_METRIC_NAME.fullmatch(name), "bad metric name", line)
                check(name.startswith("simple_comet_"), "name without the "
                      "simple_comet_ prefix", line)
                check(name not in finished and name != current,
                      f"{kind} after the samples of its family", line)
                if kind == "HELP":
                    check(name not in self.helps, "second HELP", line)
                    doc = parts[3] if len(parts) > 3 else ""
                    check(not re.search(r"\\(?![\\n])", doc),
                          "bad escape in HELP", line)
                    self.helps[name] = doc
                else:
                    check(name not in self.types, "second TYPE", line)
                    check(len(parts) == 4 and parts[3] in _TYPES,
                          "unknown type", line)
                    self.types[name] = parts[3]
                continue
            m = _SAMPLE.fullmatch(line)
            check(m, "malformed sample line", line)
            name, labels_text, value, _ = m.groups()
            family = self.family(name)
            check(family is not None, "sample without a TYPE line before it",
                  line)
            check(family in self.helps, "sample without a HELP line before "
                  "it", line)
            if family != current:
                check(family not in finished, "samples of one family not "
                      "grouped together", line)
                if current is not None:
                    finished.add(current)
                current = family
            labels = {}
            if labels_text:
                position = 0
                while position < len(labels_text):
                    lm = _LABEL.match(labels_text, position)
                    check(lm and lm.end() > position, "malformed labels", line)
                    check(lm.group(1) not in labels, "repeated label", line)
                    labels[lm.group(1)] = re.sub(
                        r"\\(.)", lambda e: "\n" if e.group(1) == "n"
                        else e.group(1), lm.group(2))
                    position = lm.end()
            check(_VALUE.fullmatch(value), "malformed value", line)
            key = (name, tuple(sorted(labels.items())))
            check(key not in self.samples, "repeated sample", line)
            number = float(value)
            if self.types[family] == "counter":
                check(family.endswith("_total"), "counter not ending in "
                      "_total", line)
                check(math.isfinite(number) and number >= 0,
                      "counter not a finite non-negative number", line)
            self.samples[key] = number

    def family(self, name):
        if name in self.types:
            return name
        for suffix in ("_bucket", "_sum", "_count"):
            base = name[:-len(suffix)]
            if name.endswith(suffix) and \
                    self.types.get(base) in ("histogram", "summary"):
                return base
        return None

    def value(self, name, **labels):
        """The sum of the samples of `name` whose labels include `labels`."""
        name = "simple_comet_" + name
        found = [v for (n, ls), v in self.samples.items()
                 if n == name and set(labels.items()) <= set(ls)]
        if not found:
            raise AssertionError(f"no sample {name}{labels or ''} in\n"
                                 + self.text)
        return sum(found)


def fetch_metrics(port=None, unix=None, headers=None):
    """GET /metrics, check its content type, parse it strictly."""
    resp, body = call("GET", "/metrics", headers=headers, port=port,
                      unix=unix)
    assert resp.status == 200, (resp.status, body)
    content_type = resp.getheader("Content-Type", "")
    parts = [p.strip().lower() for p in content_type.split(";")]
    assert parts[0] == "text/plain" and "version=0.0.4" in parts[1:] and \
        set(parts[1:]) <= {"version=0.0.4", "charset=utf-8"}, content_type
    return Metrics(body.decode("utf-8"))


def log_lines(output):
    """(level, message) of each line of a log in the server's format
    "%(asctime)s %(levelname)s %(message)s"; other lines get level None."""
    lines = []
    for line in output.splitlines():
        m = re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ([A-Z]+) (.*)",
                     line)
        lines.append((m.group(1), m.group(2)) if m else (None, line))
    return lines


def _find_other_address(family):
    """An address of this machine that is neither loopback nor link-local,
    and where a socket bound to it reaches a listener on all interfaces:
    (source, target), or None."""
    v6 = family == socket.AF_INET6
    candidates = []
    try:
        out = subprocess.run(["ip", "-6" if v6 else "-4", "-brief", "addr"],
                             capture_output=True, text=True, timeout=5).stdout
        candidates = re.findall(r"([0-9a-f:]+:[0-9a-f:]*)/\d+" if v6 else
                                r"\b(\d+\.\d+\.\d+\.\d+)/\d+", out)
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect(("2001:db8::1" if v6 else "192.0.2.254", 9))
            candidates.append(probe.getsockname()[0])   # no packet is sent
    except OSError:
        pass
    for source in candidates:
        address = ipaddress.ip_address(source)
        if address.is_loopback or address.is_link_local:
            continue
        with socket.socket(family) as listener:
            if v6:
                listener.setsockopt(socket.IPPROTO_IPV6,
                                    socket.IPV6_V6ONLY, 1)
            listener.bind(("::" if v6 else "0.0.0.0", 0))
            listener.listen()
            port = listener.getsockname()[1]
            # Loopback first; else the address itself (it never leaves
            # the machine either).
            for target in ("::1" if v6 else "127.0.0.1", source):
                try:
                    with socket.socket(family) as s:
                        s.settimeout(2)
                        s.bind((source, 0))
                        s.connect((target, port))
                        peer = listener.accept()[0]
                        peer.close()
                        return source, target
                except OSError:
                    continue
    return None


_OTHER = {}


def other_address(family=socket.AF_INET):
    """(source, target) for connections from a non-local address, cached;
    raises SkipTest when the machine has none."""
    if family not in _OTHER:
        _OTHER[family] = _find_other_address(family)
    if _OTHER[family] is None:
        raise unittest.SkipTest(
            "this machine has no non-loopback IPv%d address to connect "
            "from" % (6 if family == socket.AF_INET6 else 4))
    return _OTHER[family]


def connect_from_other(port, timeout=5, family=socket.AF_INET):
    """A TCP connection whose peer address, as the server sees it, is not
    a loopback address."""
    source, target = other_address(family)
    s = socket.socket(family)
    s.settimeout(timeout)
    try:
        s.bind((source, 0))
        s.connect((target, port))
    except OSError:
        s.close()
        raise
    return s


def call_from_other(method, path, port, headers=None, body=None, timeout=5):
    """One request from the non-local address: (response, body bytes)."""
    source, target = other_address()
    conn = http.client.HTTPConnection(target, port, timeout=timeout,
                                      source_address=(source, 0))
    try:
        conn.request(method, path, body, dict(headers or {}))
        resp = conn.getresponse()
        return resp, resp.read()
    finally:
        conn.close()


def served(sock):
    """Send a read on the socket and check it is answered (not 503): the
    connection was taken.  Returns the socket."""
    sock.sendall(get_request("/channels/none.json"))
    f = sock.makefile("rb")
    reply = read_response(f)
    f.close()
    assert reply is not None and reply[0] == 200, reply
    return sock


def refused_at_once(sock, what=""):
    """The server answers a new connection (which sends nothing) with 503
    and closes it, at once (not after --http-timeout, 30 s)."""
    start = time.monotonic()
    sock.settimeout(5)
    f = sock.makefile("rb")
    try:
        reply = read_response(f)
        assert reply is not None, f"{what}: closed without a reply"
        assert reply[0] == 503, (what, reply)
        assert reply[1]["content-type"] == "application/json", reply
        assert json.loads(reply[2])["return_code"] == -1, reply
        assert read_response(f) is None, f"{what}: not closed after the 503"
    except socket.timeout:
        raise AssertionError(f"{what}: no 503 (the connection was taken)")
    finally:
        f.close()
    assert time.monotonic() - start < 3, what


def takes(socks, opener):
    """True when a connection from opener() is served (it is kept in
    socks); False when it is refused."""
    try:
        sock = opener()
    except OSError:
        return False
    try:
        socks.append(served(sock))
        return True
    except (OSError, AssertionError):
        sock.close()
        return False


def connections(port):
    """The status page's count of open connections (its own included),
    or None while the server refuses the connection that asks."""
    try:
        return status(port)["connections"]
    except (OSError, AssertionError, http.client.HTTPException):
        return None


def close_all(socks):
    for s in socks:
        try:
            s.close()
        except OSError:
            pass
    socks.clear()


# Requests that are client mistakes.  KEEP_ALIVE_ERRORS leave the
# connection open (404, 405, 415), so thousands can be pipelined;
# MALFORMED ones get 400 (or 505) and the connection is closed.
KEEP_ALIVE_ERRORS = (
    b"GET /nowhere.json HTTP/1.1\r\nHost: x\r\n\r\n",
    b"PUT /channels/x.json HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    b"GET /channels/x HTTP/1.1\r\nHost: x\r\n\r\n",
    b"POST /channels.json HTTP/1.1\r\nHost: x\r\nContent-Type: text/csv\r\n"
    b"Content-Length: 3\r\n\r\na,b",
)
MALFORMED = (
    b"GARBAGE\r\n\r\n",
    b"GET /channels/x.json HTTP/1.1\r\n\r\n",                 # no Host
    b"GET /channels/x.json HTTP/1.1\r\nHost x\r\n\r\n",
    b"GET /channels/x.json HTTP/7.0\r\nHost: x\r\n\r\n",
    b"GET /a\x01b.json HTTP/1.1\r\nHost: x\r\n\r\n",
)


def _pipelined_errors(port, count, timeout):
    data = b"".join(KEEP_ALIVE_ERRORS[i % len(KEEP_ALIVE_ERRORS)]
                    for i in range(count - 1))
    data += b"GET /last.json HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    received = b""
    with connect(port, timeout) as s:
        writer = Background(s.sendall, data)
        try:
            while chunk := s.recv(65536):
                received += chunk
        except OSError:
            pass
        try:
            writer.result(timeout)
        except OSError:
            pass
    return len(re.findall(rb"HTTP/1\.1 [45]\d\d ", received))


def _malformed_requests(port, count, timeout):
    answered = 0
    for i in range(count):
        received = b""
        try:
            with connect(port, timeout) as s:
                s.sendall(MALFORMED[i % len(MALFORMED)])
                while chunk := s.recv(65536):
                    received += chunk
        except socket.timeout:
            break                  # a stuck server: do not wait on each
        except OSError:
            pass                   # a reset after the reply
        answered += received.startswith(b"HTTP/1.1 ")
    return answered


def flood(port, pipelined, malformed, threads=4, timeout=5):
    """Send `pipelined` keep-alive client errors (pipelined, a few thousand
    per connection) and `malformed` malformed requests (one per
    connection), from a few threads.  Returns how many were answered."""
    jobs = []
    per_connection = 2500
    for start in range(0, pipelined, per_connection):
        jobs.append(Background(_pipelined_errors, port,
                               min(per_connection, pipelined - start),
                               timeout))
    for i in range(threads):
        share = malformed // threads + (i < malformed % threads)
        jobs.append(Background(_malformed_requests, port, share, timeout))
    return sum(job.result(timeout=120) for job in jobs)


# ---------------------------------------------------------------------------
# C4. /metrics
# ---------------------------------------------------------------------------

class MetricsTests(unittest.TestCase):
    """The Prometheus exposition: its format, and its values following
    known activity."""

    @classmethod
    def setUpClass(cls):
        cls.server = ServerProcess("--enable-status", "--poll-timeout=5")
        cls.port = cls.server.port

    @classmethod
    def tearDownClass(cls):
        cls.server.close()

    def metrics(self):
        return fetch_metrics(self.port)

    def test_strict_format_and_required_families(self):
        """Content type, HELP and TYPE before every family, counters in
        _total, the simple_comet_ prefix (all checked by Metrics), and the
        families the SPEC names, with their types."""
        m = self.metrics()
        for gauge in ("connections", "polls_held", "streams_open",
                      "channels", "clients"):
            self.assertEqual(m.types.get("simple_comet_" + gauge), "gauge",
                             gauge)
            m.value(gauge)
        for counter in ("messages_pushed_total", "messages_delivered_total",
                        "requests_total", "connections_refused_total"):
            self.assertEqual(m.types.get("simple_comet_" + counter),
                             "counter", counter)
            m.value(counter)
        for cls in ("2xx", "3xx", "4xx", "5xx"):
            m.value("requests_total", **{"class": cls})
        # The request for /metrics itself is on an open connection.
        self.assertGreaterEqual(m.value("connections"), 1)
        # Every sample of requests_total is split by class.
        for (name, labels), _ in m.samples.items():
            if name == "simple_comet_requests_total":
                self.assertIn("class", dict(labels))

    def test_agrees_with_status(self):
        """The gauges and counters say what /status.json says."""
        register(port=self.port)
        api("POST", "/clients.json", {"client_id": fresh("cl")},
            port=self.port)
        st = status(self.port)
        m = self.metrics()
        self.assertEqual(m.value("channels"), st["channels_count"])
        self.assertEqual(m.value("clients"), st["clients_count"])
        self.assertEqual(m.value("messages_pushed_total"),
                         st["messages_pushed"])
        self.assertEqual(m.value("messages_delivered_total"),
                         st["messages_delivered"])
        self.assertEqual(m.value("polls_held"), st["polls_held"])

    def test_values_follow_activity(self):
        """Register a channel and a client: channels and clients +1; a push
        answering a held poll: pushed +1, delivered +1, polls_held back to
        0; a 404: requests_total{class="4xx"} +1."""
        before = self.metrics()
        name = register(port=self.port)
        api("POST", "/clients.json", {"client_id": fresh("cl")},
            port=self.port)
        after = self.metrics()
        self.assertEqual(after.value("channels"), before.value("channels") + 1)
        self.assertEqual(after.value("clients"), before.value("clients") + 1)

        poll = Background(read, [name], port=self.port)
        wait_for(lambda: self.metrics().value("polls_held") == 1)
        before = self.metrics()
        self.assertEqual(push(name, "x", port=self.port)["delivered"], 1)
        self.assertEqual(poll.result()["messages"][name][0]["content"], "x")
        after = self.metrics()
        self.assertEqual(after.value("messages_pushed_total"),
                         before.value("messages_pushed_total") + 1)
        self.assertEqual(after.value("messages_delivered_total"),
                         before.value("messages_delivered_total") + 1)
        self.assertEqual(after.value("polls_held"), 0)

        before = self.metrics()
        resp, _ = call("GET", "/nowhere.json", port=self.port)
        self.assertEqual(resp.status, 404)
        after = self.metrics()
        four = {"class": "4xx"}
        two = {"class": "2xx"}
        self.assertEqual(after.value("requests_total", **four),
                         before.value("requests_total", **four) + 1)
        # Between the two reads: one /metrics request answered 200.
        self.assertEqual(after.value("requests_total", **two),
                         before.value("requests_total", **two) + 1)
        self.assertEqual(after.value("requests_total", **{"class": "5xx"}),
                         before.value("requests_total", **{"class": "5xx"}))


    def test_streams_open_and_delivered(self):
        """An EventSource stream: streams_open 1 while open; a push it
        receives counts in messages_delivered_total."""
        name = register(port=self.port)
        with connect(self.port) as s:
            s.sendall(get_request(f"/channels/{name}.sse"))
            f = s.makefile("rb")
            self.assertEqual(f.readline().split()[1], b"200")
            wait_for(lambda: self.metrics().value("streams_open") == 1)
            before = self.metrics()
            self.assertEqual(before.value("polls_held"), 0)
            self.assertEqual(push(name, "s", port=self.port)["delivered"], 1)
            while b'"content": "s"' not in f.readline():
                pass
            after = self.metrics()
            self.assertEqual(after.value("messages_delivered_total"),
                             before.value("messages_delivered_total") + 1)
            f.close()
        wait_for(lambda: self.metrics().value("streams_open") == 0)


class MetricsStoreTests(unittest.TestCase):
    """With --state-file or --redis, /metrics (still strict) adds their
    health gauges."""

    def gauges(self, *args):
        server = ServerProcess("--enable-status", *args)
        try:
            wait_for(lambda: call("GET", "/health.json", port=server.port)
                     [0].status == 200)
            m = fetch_metrics(server.port)
            return [name for name, kind in m.types.items() if kind == "gauge"]
        finally:
            server.stop(signal.SIGKILL)   # a clean shutdown is tested elsewhere
            server.close()

    def test_state_file_gauges(self):
        with tempfile.TemporaryDirectory() as d:
            gauges = self.gauges(f"--state-file={d}/state")
        self.assertTrue([g for g in gauges if "state" in g], gauges)

    @unittest.skipUnless(shutil.which("redis-server"),
                         "redis-server is not installed")
    def test_redis_gauges(self):
        redis = RedisProcess()
        try:
            gauges = self.gauges(f"--redis={redis.url}",
                                 f"--redis-prefix={fresh()}:")
        finally:
            redis.close()
        self.assertTrue([g for g in gauges if "redis" in g], gauges)


class MetricsParserTests(unittest.TestCase):
    """The parser the /metrics tests rely on is strict (no server)."""

    GOOD = ("# HELP simple_comet_a_total A.\n# TYPE simple_comet_a_total "
            "counter\nsimple_comet_a_total{class=\"2xx\"} 3\n"
            "simple_comet_a_total{class=\"4xx\",x=\"q\\\"\"} 1e3\n"
            "# HELP simple_comet_g G.\n# TYPE simple_comet_g gauge\n"
            "simple_comet_g -1.5\n")

    def test_accepts_good_text(self):
        m = Metrics(self.GOOD)
        self.assertEqual(m.value("a_total"), 1003)
        self.assertEqual(m.value("a_total", x='q"'), 1000)
        self.assertEqual(m.value("g"), -1.5)

    def test_rejects_bad_text(self):
        bad = {
            "no final newline": self.GOOD[:-1],
            "sample before TYPE": "# HELP simple_comet_g G.\n"
                                  "simple_comet_g 1\n"
                                  "# TYPE simple_comet_g gauge\n",
            "no HELP": "# TYPE simple_comet_g gauge\nsimple_comet_g 1\n",
            "counter without _total": "# HELP simple_comet_c C.\n# TYPE "
                                      "simple_comet_c counter\n"
                                      "simple_comet_c 1\n",
            "no prefix": "# HELP g G.\n# TYPE g gauge\ng 1\n",
            "not grouped": self.GOOD + "simple_comet_a_total{class=\"5xx\"}"
                                       " 0\n",
            "repeated": self.GOOD + self.GOOD,
            "bad label": self.GOOD.replace('class="2xx"', "class=2xx"),
            "bad value": self.GOOD.replace(" -1.5", " 1_5"),
            "CRLF": self.GOOD.replace("\n", "\r\n"),
            "negative counter": self.GOOD.replace("} 3", "} -3"),
        }
        for why, text in bad.items():
            with self.subTest(why=why):
                with self.assertRaises(AssertionError):
                    Metrics(text)


class MetricsAccessTests(unittest.TestCase):
    """/metrics has the status page's access rules."""

    def setUp(self):
        self.dir = tempfile.TemporaryDirectory()
        self.sock = os.path.join(self.dir.name, "comet.sock")
        self.port = None
        self.server = None

    def tearDown(self):
        if self.server:
            self.server.close()
        self.dir.cleanup()

    def test_not_served_without_enable_status(self):
        self.server = ServerProcess()
        self.port = self.server.port
        resp, body = call("GET", "/metrics", port=self.port)
        self.assertEqual(resp.status, 404, body)

    def test_admin_token_needed(self):
        self.server = ServerProcess("--enable-status", "--admin-token=m3trix")
        self.port = self.server.port
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            resp, body = call("GET", "/metrics", headers=headers,
                              port=self.port)
            self.assertEqual(resp.status, 403, body)
            self.assertEqual(json.loads(body)["return_code"], -1)
        fetch_metrics(self.port, headers={"Authorization": "Bearer m3trix"})

    def test_without_token_only_local_clients(self):
        self.server = ServerProcess(f"--unix-socket-path={self.sock}",
                                 "--enable-status")
        self.port = self.server.port
        fetch_metrics(self.port)
        fetch_metrics(unix=self.sock)
        resp, body = call_from_other("GET", "/metrics", self.port)
        self.assertEqual(resp.status, 403, body)
        self.assertIn("--admin-token", json.loads(body)["error_message"])


# ---------------------------------------------------------------------------
# C4. /health.json
# ---------------------------------------------------------------------------

class HealthTests(unittest.TestCase):

    def test_healthy_and_open_to_everyone(self):
        """200 {"return_code": 1, "error_message": ""} without
        --enable-status, without the admin token, from any address."""
        server = ServerProcess("--admin-token=h3alth")
        port = server.port
        try:
            resp, body = call("GET", "/health.json", port=port)
            self.assertEqual(resp.status, 200, body)
            self.assertEqual(resp.getheader("Content-Type"),
                             "application/json")
            self.assertEqual(json.loads(body),
                             {"return_code": 1, "error_message": ""})
            resp, body = call("GET", "/health.json", port=port,
                              headers={"Authorization": "Bearer h3alth"})
            self.assertEqual(json.loads(body)["return_code"], 1)
            try:
                resp, body = call_from_other("GET", "/health.json", port)
            except unittest.SkipTest:
                return
            self.assertEqual(resp.status, 200, body)
            self.assertEqual(json.loads(body)["return_code"], 1)
        finally:
            server.close()


# ---------------------------------------------------------------------------
# C4. The reserve at the connection cap
# ---------------------------------------------------------------------------

class ConnectionReserveTests(unittest.TestCase):
    """With --max-connections=3, local clients get 4 more; the next is
    refused with 503 at once; other addresses never exceed 3."""

    def setUp(self):
        self.dir = tempfile.TemporaryDirectory()
        self.sock = os.path.join(self.dir.name, "comet.sock")
        self.port = None
        self.open = []
        self.server = None

    def tearDown(self):
        close_all(self.open)
        if self.server:
            self.server.close()
        self.dir.cleanup()

    def test_loopback_reserve(self):
        self.server = ServerProcess("--max-connections=3", "--enable-status")
        self.port = self.server.port
        for _ in range(3 + 4):
            self.open.append(served(connect(self.port)))
        with connect(self.port, timeout=2) as extra:
            refused_at_once(extra, "8th loopback connection")
        # The refusal is counted; read on one of the open connections.
        s = self.open[0]
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = read_response(s.makefile("rb"))
        self.assertEqual(reply[0], 200, reply)
        m = Metrics(reply[2].decode())
        self.assertEqual(m.value("connections"), 7)
        self.assertGreaterEqual(m.value("connections_refused_total"), 1)
        # A freed slot is usable again.
        self.open.pop().close()
        wait_for(lambda: self.takes(lambda: connect(self.port)))

    def test_unix_socket_reserve(self):
        self.server = ServerProcess(f"--unix-socket-path={self.sock}",
                                    "--max-connections=3", port=None)
        for _ in range(3 + 4):
            self.open.append(served(connect_unix(self.sock)))
        with connect_unix(self.sock, timeout=2) as extra:
            refused_at_once(extra, "8th unix socket connection")

    def test_other_addresses_never_exceed_the_cap(self):
        other_address()
        self.server = ServerProcess("--max-connections=3", "--enable-status")
        self.port = self.server.port
        for _ in range(3):
            self.open.append(served(connect_from_other(self.port)))
        with connect_from_other(self.port, timeout=2) as extra:
            refused_at_once(extra, "4th connection from another address")
        for _ in range(4):
            self.open.append(served(connect(self.port)))
        with connect(self.port, timeout=2) as extra:
            refused_at_once(extra, "5th loopback connection over the cap")
        # Local clients in the reserve do not open it to others.
        self.open.pop(0).close()
        wait_for(lambda: connections(self.port) == 3 + 4)
        with connect_from_other(self.port, timeout=2) as extra:
            refused_at_once(extra, "another address with 6 open")

    def takes(self, opener):
        return takes(self.open, opener)


# ---------------------------------------------------------------------------
# C4. Logging: never blocking, never flooded
# ---------------------------------------------------------------------------

class LoggingTests(unittest.TestCase):

    def start_with_stuck_log(self, *args):
        """A server whose stderr is a pipe nobody reads, shrunk to one page
        and filled before the server starts, so its first log line already
        finds the pipe full.  Returns (server, read end)."""
        read_end, write_end = os.pipe()
        try:
            fcntl.fcntl(write_end, getattr(fcntl, "F_SETPIPE_SZ", 1031), 4096)
        except OSError:
            pass
        size = fcntl.fcntl(write_end, getattr(fcntl, "F_GETPIPE_SZ", 1032))
        os.write(write_end, b"#" * size)
        try:
            server = ServerProcess("--http-host=127.0.0.1", *args,
                                   stderr=write_end)
        except BaseException:
            os.close(read_end)
            raise
        finally:
            os.close(write_end)
        return server, read_end

    def test_stuck_log_pipe_does_not_stall_serving(self):
        """With stderr stuck, 20,000 bad requests are all answered, and
        reads during and after them are answered (a read stuck behind the
        log would wait for ever: 5 s bounds it; 1 s in LONG runs)."""
        server, read_end = self.start_with_stuck_log()
        port = server.port
        try:
            resp, body = call("POST", "/channels.json", {"channel_id": "a"},
                              port=port, timeout=2)
            self.assertEqual(json.loads(body)["return_code"], 1)
            resp, body = call("POST", "/channels/a.json", {"content": "x"},
                              port=port, timeout=2)
            self.assertEqual(json.loads(body)["return_code"], 1)
            job = Background(flood, port, 18_000, 2_000, timeout=5)
            worst = 0.0
            probes = 0
            while job.is_alive() or probes < 5:
                if not job.is_alive():
                    probes += 1
                start = time.monotonic()
                try:
                    resp, body = call("GET", "/channels/a.json", port=port,
                                      timeout=5)
                    self.assertEqual(json.loads(body)["return_code"], 1)
                    worst = max(worst, time.monotonic() - start)
                except OSError:
                    worst = math.inf
                    break
                time.sleep(0.02)
            report(f"worst read during a 20,000 bad-request flood with a "
                   f"stuck log: {worst * 1000:.1f} ms")
            self.assertLess(worst, bound(5, 1), "a read waited on the stuck log")
            answered = job.result(timeout=120)
            self.assertEqual(answered, 20_000)
        finally:
            os.close(read_end)             # unblocks a server stuck writing
            server.close()

    def test_stuck_log_does_not_stop_shutdown(self):
        """SIGTERM with stderr stuck: the held poll is answered and the
        server exits 0 within a few seconds."""
        server, read_end = self.start_with_stuck_log("--poll-timeout=30",
                                                     "--enable-status")
        port = server.port
        try:
            resp, body = call("POST", "/channels.json", {"channel_id": "a"},
                              port=port, timeout=2)
            self.assertEqual(json.loads(body)["return_code"], 1)
            poll = Background(call, "GET", "/channels/a.json", port=port,
                              timeout=10)
            wait_held(1, port)
            server.send_signal(signal.SIGTERM)
            resp, body = poll.result()
            self.assertEqual(json.loads(body)["messages"], {"a": []})
            self.assertEqual(server.stop(timeout=5), 0)
        finally:
            os.close(read_end)
            server.close()

    def test_bad_request_flood_is_rate_limited(self):
        """5,000 bad requests: at most a few hundred log lines, none at
        WARNING or above, and an INFO line counts what was left out."""
        server = ServerProcess()
        port = server.port
        try:
            self.assertEqual(flood(port, 4_000, 1_000), 5_000)
            self.assertEqual(server.stop(), 0)
            output = server.output()
        finally:
            server.close()
        lines = log_lines(output)
        self.assertLessEqual(len(lines), 300, output[-3000:])
        for level, message in lines:
            self.assertIn(level, ("DEBUG", "INFO"), message)
        # The count of what was left out: the flood took well under 10 s,
        # so one line (or two, across a window) holds most of the 5,000.
        # Numbers glued to ':' or '.' (ports, addresses) are not counts.
        counts = [int(n) for level, message in lines if level == "INFO"
                  for n in re.findall(r"(?<![\w.:])(\d+)(?![\w.:])", message)
                  if int(n) <= 5000]
        self.assertGreaterEqual(max(counts, default=0), 1000,
                                "no line counts the requests not logged:\n"
                                + output[-3000:])


# ---------------------------------------------------------------------------
# C4. Lingering after an early error; bare LF
# ---------------------------------------------------------------------------

class LingerTests(unittest.TestCase):
    """After an error reply sent while the client is still sending, the
    server reads and discards, so the client sees the reply, not a reset."""

    HEAD = (b"POST /channels/up.json HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/x-www-form-urlencoded\r\n")

    @classmethod
    def setUpClass(cls):
        cls.server = ServerProcess("--max-body=1000")
        cls.port = cls.server.port

    @classmethod
    def tearDownClass(cls):
        cls.server.close()

    def upload(self, chunked=False):
        """Send 512 KiB of a body over --max-body, then read the reply:
        (status, headers, body), or a string saying what failed."""
        chunk = b"x" * 65536
        if chunked:
            head = self.HEAD + b"Transfer-Encoding: chunked\r\n\r\n"
            chunk = b"10000\r\n" + chunk + b"\r\n"
        else:
            head = self.HEAD + b"Content-Length: 1000000\r\n\r\n"
        with connect(self.port, timeout=10) as s:
            try:
                s.sendall(head)
                for _ in range(8):
                    s.sendall(chunk)
            except OSError as e:
                return f"sending: {e!r}"
            try:
                return read_response(s.makefile("rb"))
            except OSError as e:
                return f"reading: {e!r}"

    def test_uploads_refused_while_sending_see_the_413(self):
        """20 clients (and 5 more with chunked bodies) send a body over
        --max-body and keep sending (512 KiB of a declared 1 MB) before
        reading: each reads the 413, none gets a reset."""
        uploads = [Background(self.upload, chunked=i >= 20)
                   for i in range(25)]
        for upload in uploads:
            result = upload.result(timeout=30)
            self.assertIsInstance(result, tuple, result)
            self.assertEqual(result[0], 413, result)
            self.assertEqual(result[1].get("connection"), "close", result)
            self.assertTrue(json.loads(result[2])["error_message"]
                            .startswith("413"), result)
        # The server is still fine.
        self.assertEqual(call("GET", "/channels/x.json",
                              port=self.port)[0].status, 200)

    def test_lingering_ends_when_the_client_goes_quiet(self):
        """A client that stops sending and keeps its socket open is let go
        about 2 seconds later (not kept for --http-timeout): bytes sent
        after 3 quiet seconds are answered by a reset."""
        with connect(self.port, timeout=10) as s:
            s.sendall(self.HEAD + b"Content-Length: 1000000\r\n\r\n" +
                      b"x" * 100_000)
            f = s.makefile("rb")
            self.assertEqual(read_response(f)[0], 413)
            answered = time.monotonic()
            # The server closes its socket (the kernel keeps it, orphaned)
            # once the client has been quiet for about 2 s.
            mine = s.getsockname()[1]
            wait_for(lambda: tcp_inode(self.port, mine) in (None, 0),
                     timeout=15, interval=0.02)
            quiet = time.monotonic() - answered
            report(f"lingering ended {quiet:.2f} s after the 413")
            self.assertGreater(quiet, bound(1, 1.5))
            self.assertLess(quiet, bound(10, 3))     # --http-timeout is 30 s
            # A byte to the closed socket draws a reset, and a later send
            # fails; while the server lingered, they were taken.
            def refused():
                try:
                    s.sendall(b"x")
                except (BrokenPipeError, ConnectionResetError):
                    return True
                return False
            wait_for(refused, timeout=5, interval=0.02)


class BareLineFeedTests(unittest.TestCase):
    """Request heads whose lines end in a bare LF are understood."""

    @classmethod
    def setUpClass(cls):
        cls.server = ServerProcess("--poll-timeout=0.2")
        cls.port = cls.server.port
        register("a", port=cls.port)
        push("a", "hello", port=cls.port)

    @classmethod
    def tearDownClass(cls):
        cls.server.close()

    def json_reply(self, reply):
        self.assertEqual(reply[0], 200, reply)
        return json.loads(reply[2])

    def test_http_1_0_read(self):
        """What `printf 'GET /channels/a.json?since=0 HTTP/1.0\\n\\n' | nc`
        sends."""
        replies = exchange(b"GET /channels/a.json?since=0 HTTP/1.0\n\n",
                           port=self.port)
        self.assertEqual(len(replies), 1, replies)
        reply = self.json_reply(replies[0])
        self.assertEqual(reply["return_code"], 1)
        self.assertEqual(reply["messages"]["a"][0]["content"], "hello")

    def test_pipelined_http_1_1_and_mixed_endings(self):
        replies = exchange(
            b"GET /channels/a.json HTTP/1.1\nHost: x\n\n"
            b"GET /channels/a.json HTTP/1.1\r\nHost: x\nAccept: */*\r\n\n"
            b"GET /channels/a.json HTTP/1.1\nHost: x\n\r\n"
            b"GET /channels/a.json HTTP/1.1\nHost: x\nConnection: close\n\n",
            port=self.port)
        self.assertEqual(len(replies), 4, replies)
        for reply in replies:
            self.assertEqual(self.json_reply(reply)["return_code"], 1)

    def test_post_with_body(self):
        body = b"content=lf"
        replies = exchange(
            b"POST /channels/a.json HTTP/1.1\nHost: x\n"
            b"Content-Type: application/x-www-form-urlencoded\n"
            b"Content-Length: %d\nConnection: close\n\n%s" % (len(body), body),
            port=self.port)
        self.assertEqual(len(replies), 1, replies)
        self.assertEqual(self.json_reply(replies[0])["return_code"], 1)
        got = read(["a"], port=self.port)["messages"]["a"]
        self.assertEqual(got[-1]["content"], "lf")


# ---------------------------------------------------------------------------
# C5. The admin token from a file or a systemd credential
# ---------------------------------------------------------------------------

class AdminTokenFileTests(unittest.TestCase):

    def setUp(self):
        self.dir = tempfile.TemporaryDirectory()
        self.port = free_port()         # for the servers that must not start
        self.servers = []

    def tearDown(self):
        for server in self.servers:
            server.close()
        self.dir.cleanup()

    def write(self, name, text):
        path = os.path.join(self.dir.name, name)
        with open(path, "w") as f:
            f.write(text)
        return path

    def start(self, *args, env=None):
        server = ServerProcess("--enable-status", *args, env=env)
        self.port = server.port
        self.servers.append(server)
        return server

    def assertGuarded(self, token, port=None):
        """Writes need `Authorization: Bearer token`."""
        port = port or self.port
        name = fresh()
        for headers in ({}, {"Authorization": "Bearer " + token + "x"}):
            resp, body = call("POST", "/channels.json", {"channel_id": name},
                              headers=headers, port=port)
            self.assertEqual(resp.status, 403, body)
        reply = api("POST", "/channels.json", {"channel_id": name},
                    headers={"Authorization": "Bearer " + token}, port=port)
        self.assertEqual(reply["return_code"], 1)

    def test_token_file(self):
        """Surrounding whitespace and the newline are not part of the
        token, which is not on the command line; no warning."""
        path = self.write("token", "  tok-file-7d1e \r\n")
        server = self.start(f"--admin-token-file={path}")
        self.assertGuarded("tok-file-7d1e")
        with open(f"/proc/{server.proc.pid}/cmdline", "rb") as f:
            cmdline = f.read()
        self.assertIn(path.encode(), cmdline)
        self.assertNotIn(b"tok-file-7d1e", cmdline)
        for level, message in log_lines(server.output()):
            self.assertNotIn(level, ("WARNING", "ERROR", "CRITICAL"), message)

    def test_empty_missing_or_unreadable_file_exits_2(self):
        # The switch is known (an unknown one exits 2 as well).
        self.assertIn("--admin-token-file", run_server("--help").stdout)
        paths = (self.write("empty", ""), self.write("blank", " \n\n"),
                 os.path.join(self.dir.name, "missing"),
                 self.dir.name)                             # a directory
        results = run_servers([([f"--http-port={self.port}",
                                 f"--admin-token-file={path}"], None)
                               for path in paths])
        for path, result in zip(paths, results):
            with self.subTest(path=path):
                self.assertEqual(result.returncode, 2, result.stderr)
                self.assertEqual(result.stdout, "")
                self.assertEqual(result.stderr.count("\n"), 1, result.stderr)
                self.assertNotIn("Traceback", result.stderr)

    def test_systemd_credential(self):
        """$CREDENTIALS_DIRECTORY/admin-token is used with no switch; a
        token given otherwise wins; a credentials directory without one
        leaves the server tokenless."""
        creds = os.path.join(self.dir.name, "creds")
        os.mkdir(creds)
        with open(os.path.join(creds, "admin-token"), "w") as f:
            f.write("cred-tok-42\n")
        env = {"CREDENTIALS_DIRECTORY": creds}
        server = self.start(env=env)
        self.assertGuarded("cred-tok-42")
        for level, message in log_lines(server.output()):
            self.assertNotIn(level, ("WARNING", "ERROR", "CRITICAL"), message)
        server.close()
        self.servers.remove(server)

        path = self.write("token", "file-tok-43\n")
        self.start(f"--admin-token-file={path}", env=env)
        self.assertGuarded("file-tok-43")
        resp, _ = call("POST", "/channels.json", {"channel_id": fresh()},
                       headers={"Authorization": "Bearer cred-tok-42"},
                       port=self.port)
        self.assertEqual(resp.status, 403)
        self.servers.pop().close()

        other = os.path.join(self.dir.name, "other")
        os.mkdir(other)
        self.start(env={"CREDENTIALS_DIRECTORY": other})
        register(port=self.port)        # loopback, no token needed

    def test_token_on_the_command_line_warns(self):
        server = self.start("--admin-token=cli-tok-5c2b")
        self.assertGuarded("cli-tok-5c2b")
        warnings = [m for level, m in log_lines(server.output())
                    if level == "WARNING" and "admin-token" in m]
        self.assertTrue(warnings, server.output())

    def test_token_never_shown(self):
        """Not in the log (from start to shutdown, refusals included), the
        status page, /metrics or a refusal's body."""
        creds = os.path.join(self.dir.name, "creds")
        os.mkdir(creds)
        with open(os.path.join(creds, "admin-token"), "w") as f:
            f.write("zz-cred-secret\n")
        ways = (
            ("zz-cli-secret", ["--admin-token=zz-cli-secret"], None),
            ("zz-file-secret", [f"--admin-token-file="
                                f"{self.write('t', 'zz-file-secret')}"], None),
            ("zz-cred-secret", [], {"CREDENTIALS_DIRECTORY": creds}))
        for token, args, env in ways:
            with self.subTest(token=token):
                server = self.start("--log-level=debug", *args, env=env)
                try:
                    good = {"Authorization": "Bearer " + token}
                    seen = []
                    for headers in ({}, {"Authorization": "Bearer nope"},
                                    {"Authorization": token}):
                        resp, body = call("POST", "/channels.json",
                                          {"channel_id": "s"},
                                          headers=headers, port=self.port)
                        self.assertEqual(resp.status, 403)
                        seen.append(body)
                    api("POST", "/channels.json", {"channel_id": "s"},
                        headers=good, port=self.port)
                    seen.append(call("GET", "/status.json", headers=good,
                                     port=self.port)[1])
                    resp, body = call("GET", "/metrics", headers=good,
                                      port=self.port)
                    self.assertEqual(resp.status, 200, body)
                    seen.append(body)
                    self.assertEqual(server.stop(), 0)
                    seen.append(server.output().encode())
                    for text in seen:
                        self.assertNotIn(token.encode(), text)
                finally:
                    server.close()
                    self.servers.remove(server)


# ---------------------------------------------------------------------------
# C5. A Redis password off the command line and out of sight
# ---------------------------------------------------------------------------

REDIS_SERVER = shutil.which("redis-server")
needs_redis = unittest.skipUnless(REDIS_SERVER, "redis-server is not installed")


@needs_redis
class RedisPasswordTests(unittest.TestCase):
    """A redis-server of the class's own, with a password."""

    PASSWORD = "pw-redis-5e1d"

    @classmethod
    def setUpClass(cls):
        cls.redis = RedisProcess("--requirepass", cls.PASSWORD)
        cls.dir = cls.redis.dir
        cls.redis_port = cls.redis.port

    @classmethod
    def tearDownClass(cls):
        cls.redis.close()

    def url(self, password):
        return f"redis://:{password}@127.0.0.1:{self.redis_port}"

    def setUp(self):
        self.servers = []

    def tearDown(self):
        for server in self.servers:
            server.close()

    def start(self, *args, env=None):
        # A prefix of its own: no state from another test.
        server = ServerProcess("--enable-status", f"--redis-prefix={fresh()}:",
                            *args, env=env)
        self.servers.append(server)
        return server

    def write_url(self, password):
        path = os.path.join(self.dir.name, fresh("url"))
        with open(path, "w") as f:
            f.write(self.url(password) + "\n")
        return path

    def test_password_given_three_ways(self):
        """--redis=URL warns that the password is visible to local users;
        --redis-file and SIMPLE_COMET_REDIS do not, and keep it off the
        command line.  Each way, writes and reads go through Redis, and the
        password is in no reply, the status page, /metrics or the log (up
        to and including shutdown)."""
        url = self.url(self.PASSWORD)
        url_file = self.write_url(self.PASSWORD)
        ways = {"switch": self.start(f"--redis={url}"),
                "file": self.start(f"--redis-file={url_file}"),
                "environment": self.start(env={"SIMPLE_COMET_REDIS": url})}
        seen = {way: [] for way in ways}
        for way, server in ways.items():
            with self.subTest(way=way):
                port = server.port
                wait_for(lambda: call("GET", "/health.json", port=port)[0]
                         .status == 200)
                name = register(port=port)
                push(name, "via redis", port=port)
                self.assertEqual(read([name], port=port)["messages"][name][0]
                                 ["content"], "via redis")
                for path in ("/status.json", "/metrics", "/health.json"):
                    resp, body = call("GET", path, port=port)
                    self.assertEqual(resp.status, 200, (path, body))
                    seen[way].append(body)
                if way != "switch":
                    with open(f"/proc/{server.proc.pid}/cmdline", "rb") as f:
                        self.assertNotIn(self.PASSWORD.encode(), f.read())
        # Stopped together: shutdown lines are checked too.
        for server in ways.values():
            server.send_signal(signal.SIGTERM)
        for way, server in ways.items():
            with self.subTest(way=way):
                self.assertEqual(server.stop(timeout=15), 0)
                output = server.output()
                warned = [m for level, m in log_lines(output)
                          if level == "WARNING" and "redis" in m.lower()]
                if way == "switch":
                    self.assertTrue(warned, output)
                else:
                    for level, message in log_lines(output):
                        self.assertNotIn(level, ("WARNING", "ERROR",
                                                 "CRITICAL"), message)
                for text in seen[way] + [output.encode()]:
                    self.assertNotIn(self.PASSWORD.encode(), text)

    def test_wrong_password_not_logged(self):
        """Redis refusing the password: writes and /health.json answer
        503 (or the server exits with one line); the wrong password is
        never shown either."""
        self.assertIn("--redis-file", run_server("--help").stdout)
        wrong = "bad-pw-9c2a"
        server = ServerProcess("--enable-status",
                               f"--redis-file={self.write_url(wrong)}",
                               wait=False)
        port = server.port
        self.servers.append(server)
        wait_for(lambda: server.proc.poll() is not None
                 or "listening on" in server.output(), timeout=10)
        if server.proc.poll() is not None:          # refused to start
            output = server.output()
            self.assertEqual(server.proc.returncode, 1, output)
            self.assertNotIn(wrong, output)
            self.assertNotIn("Traceback", output)
            return
        seen = []
        for method, path_, params in (("GET", "/health.json", None),
                                      ("POST", "/channels.json",
                                       {"channel_id": "w"})):
            resp, body = call(method, path_, params, port=port)
            self.assertEqual(resp.status, 503, body)
            seen.append(body)
        for path_ in ("/status.json", "/metrics"):
            seen.append(call("GET", path_, port=port)[1])
        # Its attempts to connect are told in the log.
        wait_for(lambda: "cannot connect" in server.output(), timeout=10)
        server.stop()
        output = server.output()
        seen.append(output.encode())
        self.assertNotIn("Traceback", output)
        for text in seen:
            self.assertNotIn(wrong.encode(), text)

    def test_bad_redis_file_exits_2(self):
        self.assertIn("--redis-file", run_server("--help").stdout)
        empty = os.path.join(self.dir.name, fresh("empty"))
        open(empty, "w").close()
        for path in (empty, os.path.join(self.dir.name, "missing")):
            with self.subTest(path=path):
                result = run_server(f"--redis-file={path}")
                self.assertEqual(result.returncode, 2, result.stderr)
                self.assertEqual(result.stderr.count("\n"), 1, result.stderr)
                self.assertNotIn("Traceback", result.stderr)


# ---------------------------------------------------------------------------
# C5. Connections per address
# ---------------------------------------------------------------------------

class PerAddressCapTests(unittest.TestCase):
    """--max-connections-per-ip=5 for a non-local address (this machine's
    own non-loopback address, connecting to the loopback listener)."""

    N = 5

    @classmethod
    def setUpClass(cls):
        other_address()                       # or skip
        cls.dir = tempfile.TemporaryDirectory()
        cls.sock = os.path.join(cls.dir.name, "comet.sock")
        cls.server = ServerProcess(f"--max-connections-per-ip={cls.N}",
                                f"--unix-socket-path={cls.sock}",
                                "--enable-status", "--poll-timeout=5")
        cls.port = cls.server.port
        cls.name = register(port=cls.port)
        cls.last = push(cls.name, "x", port=cls.port)["message_id"]

    @classmethod
    def tearDownClass(cls):
        cls.server.close()
        cls.dir.cleanup()

    def setUp(self):
        self.open = []

    def tearDown(self):
        close_all(self.open)
        self.wait_idle()

    def wait_idle(self):
        """Every connection but the one asking has gone."""
        wait_for(lambda: status(self.port)["connections"] == 1)

    def open_served(self, count):
        """Open `count` connections from the other address at once; each
        is answered a read."""
        socks = [connect_from_other(self.port, timeout=2)
                 for _ in range(count)]
        self.open += socks
        for s in socks:
            served(s)
        return socks

    def test_the_address_is_not_local(self):
        """The sockets these tests use count as another address: writes
        from them need the token."""
        resp, body = call_from_other("POST", "/channels.json", self.port,
                                     body="channel_id=z",
                                     headers={"Content-Type": "application/"
                                              "x-www-form-urlencoded"})
        self.assertEqual(resp.status, 403, body)

    def test_cap_refuses_at_once_and_frees_on_close(self):
        self.open_served(self.N)
        with connect_from_other(self.port, timeout=2) as extra:
            refused_at_once(extra, f"connection {self.N + 1} from the address")
        # Loopback and the unix socket are unaffected, many at once, and
        # so is another address.
        for _ in range(self.N + 3):
            self.open.append(served(connect(self.port)))
            self.open.append(served(connect_unix(self.sock)))
        try:
            for _ in range(self.N):
                self.open.append(served(connect_from_other(
                    self.port, family=socket.AF_INET6)))
        except unittest.SkipTest:
            pass                         # no second address to try
        # The refused connection took no slot; closing one frees one.
        self.open.pop(0).close()
        wait_for(lambda: self.takes_one())
        with connect_from_other(self.port, timeout=2) as extra:
            refused_at_once(extra, "over the cap again")

    def test_held_polls_and_streams_count(self):
        socks = [connect_from_other(self.port, timeout=5)
                 for _ in range(self.N)]
        self.open += socks
        stream, polls = socks[0], socks[1:]
        stream.sendall(get_request(f"/channels/{self.name}.sse?"
                                   f"since={self.last}"))
        for s in polls:
            s.sendall(get_request(f"/channels/{self.name}.json?"
                                  f"since={self.last}"))
        wait_for(lambda: (status(self.port)["polls_held"],
                          status(self.port)["streams_open"])
                 == (self.N - 1, 1))
        with connect_from_other(self.port, timeout=2) as extra:
            refused_at_once(extra, "with N polls and streams open")
        self.last = push(self.name, "y", port=self.port)["message_id"]
        for s in polls:
            reply = read_response(s.makefile("rb"))
            self.assertEqual(json.loads(reply[2])["messages"][self.name][0]
                             ["content"], "y")
        f = stream.makefile("rb")
        self.assertEqual(f.readline().split()[1], b"200")
        while b'"content": "y"' not in f.readline():
            pass
        f.close()

    def test_count_never_leaks(self):
        """10 x N connections opened and closed every way a client can
        (before a request, after a reply, mid-request, with a poll held,
        by reset, by the server after Connection: close); after each round
        N at once are served again, and the N+1st still refused."""
        for round_number in range(10):
            connect_from_other(self.port).close()      # before a request
            self.wait_idle()
            socks = self.open_served(self.N)
            for i, s in enumerate(socks):
                mode = (round_number + i) % 5
                if mode == 1:
                    s.sendall(b"GET /channels/x.json HTT")
                elif mode == 2:
                    s.sendall(get_request(f"/channels/{self.name}.json?"
                                          f"since={self.last + 10**6}"))
                elif mode == 3:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                 b"\x01\x00\x00\x00\x00\x00\x00\x00")
                elif mode == 4:
                    s.sendall(get_request("/channels/x.json",
                                          "Connection: close\r\n"))
                    while s.recv(65536):
                        pass
            close_all(self.open)
            self.wait_idle()
        self.open_served(self.N)
        with connect_from_other(self.port, timeout=2) as extra:
            refused_at_once(extra, "after the churn")

    def takes_one(self):
        return takes(self.open,
                     lambda: connect_from_other(self.port, timeout=2))


class PerAddressDefaultTests(unittest.TestCase):

    def test_default_is_256(self):
        other_address()
        server = ServerProcess()
        port = server.port
        socks = []
        try:
            for _ in range(256):
                socks.append(connect_from_other(port, timeout=5))
                socks[-1].sendall(get_request("/channels/x.json"))
            for s in socks:
                reply = read_response(s.makefile("rb"))
                self.assertEqual(reply[0], 200, reply)
            with connect_from_other(port, timeout=2) as extra:
                refused_at_once(extra, "connection 257")
            served(connect(port)).close()
        finally:
            close_all(socks)
            server.close()


# ---------------------------------------------------------------------------
# Idle state expiry at scale (small count)
# ---------------------------------------------------------------------------

class IdleExpiryScaleTests(unittest.TestCase):
    """Thousands of idle channels and clients expire on time, in one sweep
    that does not hold up serving."""

    def register_many(self, port, count):
        """Register channels c0.. and clients k0.. (interleaved, so c{last}
        and k{last} come last) over one pipelined connection; returns the
        time the last reply came."""
        requests = []
        for i in range(count):
            requests.append(post_request("/channels.json",
                                         {"channel_id": f"c{i}"}))
            requests.append(post_request("/clients.json",
                                         {"client_id": f"k{i}"}))
        replies = pipeline(requests, port)
        done = time.monotonic()
        self.assertEqual(len(replies), len(requests))
        for reply in replies:
            self.assertEqual(json.loads(reply[2])["return_code"], 1, reply)
        return done

    def test_unread_state_goes_read_state_stays(self):
        """2,000 channels and 2,000 clients with 0.5 s timeouts: three
        channels and clients read in a loop stay; the others are gone
        within a few seconds of their timeout (one in LONG runs); an
        expired channel reads -2, an expired client -3."""
        timeout = 0.5
        server = ServerProcess("--enable-status",
                            f"--session-timeout={timeout}",
                            f"--inactive-channel-timeout={timeout}",
                            "--poll-timeout=0.2")
        port = server.port
        try:
            done = self.register_many(port, 2000)
            st = status(port)
            if time.monotonic() - done < timeout / 2:
                # Nothing went early: the last ones registered are there.
                self.assertIn("c1999", st["channels"])
                self.assertIn("k1999", st["clients"])
            kept = [register(f"keep{i}", port=port) for i in range(3)]
            keepers = [f"keeper{i}" for i in range(3)]
            for channel, client in zip(kept, keepers):
                api("POST", "/clients.json", {"client_id": client}, port=port)
                push(channel, "keep", port=port)     # so reads are not held
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            path = "/channels/" + "%7C".join(kept) + ".json?since=0&client_id="

            def read_kept():
                for client in keepers:
                    conn.request("GET", path + client)
                    reply = json.loads(conn.getresponse().read())
                    self.assertEqual(reply["return_code"], 1, reply)
            deadline = done + timeout + bound(4.0, 1.0)
            while True:
                read_kept()
                st = status(port)
                if (st["channels_count"], st["clients_count"]) == (3, 3):
                    break
                self.assertLess(time.monotonic(), deadline,
                                (st["channels_count"], st["clients_count"]))
                time.sleep(0.05)
            report(f"2,000 + 2,000 idle expired "
                   f"{time.monotonic() - done:.2f} s after registration "
                   f"(timeout {timeout} s)")
            # Read ones stay, past several timeouts.
            until = time.monotonic() + 3 * timeout
            while time.monotonic() < until:
                read_kept()
                time.sleep(0.05)
            conn.close()
            st = status(port)
            self.assertEqual(sorted(st["channels"]), kept)
            self.assertEqual(sorted(st["clients"]), keepers)
            self.assertEqual(read(["c1500"], port=port)["return_code"], -2)
            self.assertEqual(read([kept[0]], client_id="k1500", port=port)
                             ["return_code"], -3)
        finally:
            server.close()

    def test_reads_stay_fast_while_state_expires(self):
        """10,000 channels and 10,000 clients expire while a tight loop of
        reads runs: no read waits for the sweep (none takes 0.5 s; 50 ms
        in LONG runs, where a slow read is tried once more)."""
        # A stall from expiry comes every time; a slow read from another
        # process taking the CPU rarely twice: one more try before failing.
        worst = self.worst_read_while_expiring()
        if STRICT and worst >= 0.05:
            worst = self.worst_read_while_expiring()
        self.assertLess(worst, bound(0.5, 0.05))

    def worst_read_while_expiring(self):
        timeout = 1.0
        server = ServerProcess("--enable-status",
                            f"--session-timeout={timeout}",
                            f"--inactive-channel-timeout={timeout}")
        port = server.port
        try:
            done = self.register_many(port, 10_000)
            register("keep", port=port)
            api("POST", "/clients.json", {"client_id": "keeper"}, port=port)
            push("keep", "x", port=port)
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            times = []
            end = done + timeout + 1.0
            gc.collect()
            gc.disable()              # no pause of this process counted
            try:
                while time.monotonic() < end:
                    start = time.monotonic()
                    conn.request("GET", "/channels/keep.json?since=0"
                                 "&client_id=keeper")
                    reply = json.loads(conn.getresponse().read())
                    times.append(time.monotonic() - start)
                    self.assertEqual(reply["return_code"], 1, reply)
            finally:
                gc.enable()
            conn.close()
            # Everything else expired while the loop ran.
            st = status(port)
            self.assertEqual((st["channels_count"], st["clients_count"]),
                             (1, 1))
            worst = max(times)
            report(f"{len(times)} reads while 20,000 channels and clients "
                   f"expired: worst {worst * 1000:.1f} ms, median "
                   f"{sorted(times)[len(times) // 2] * 1000:.2f} ms")
            return worst
        finally:
            server.close()


# ---------------------------------------------------------------------------
# C3. Several processes and hosts (--redis=URL)
# ---------------------------------------------------------------------------
#
# Each class starts a redis-server of its own (loopback, a free port, a
# temporary directory, no persistence) and two or three simple_comet.py
# instances on free ports, all with --redis=redis://127.0.0.1:PORT, as a
# team would run them behind a load balancer. Redis itself is inspected
# and disturbed over raw RESP sockets (KEYS, CLIENT KILL), and stopped,
# paused and restarted by its PID. Skipped when redis-server is missing.

def resp_command(*args):
    """A command as RESP: an array of bulk strings."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        arg = arg if isinstance(arg, bytes) else str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(out)


def resp_reply(f):
    """One RESP2 reply from a socket's binary file; an error reply is
    returned as an Exception (not raised)."""
    line = f.readline()
    if not line.endswith(b"\r\n"):
        raise ConnectionError("redis closed the connection: %r" % line)
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        return Exception(rest.decode())
    if kind == b":":
        return int(rest)
    if kind == b"$":
        size = int(rest)
        return None if size < 0 else f.read(size + 2)[:-2]
    if kind == b"*":
        size = int(rest)
        return None if size < 0 else [resp_reply(f) for _ in range(size)]
    raise ValueError("not RESP: %r" % line)


def redis_call(port, *args, password=None, db=None, timeout=5):
    """One command on a new raw connection to the test's Redis (a TCP
    port, or a unix socket path)."""
    if isinstance(port, str):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        s.connect(port)
    else:
        s = socket.create_connection(("127.0.0.1", port), timeout)
    with s:
        f = s.makefile("rb")
        if password is not None:
            s.sendall(resp_command("AUTH", password))
            assert resp_reply(f) == "OK"
        if db is not None:
            s.sendall(resp_command("SELECT", db))
            assert resp_reply(f) == "OK"
        s.sendall(resp_command(*args))
        reply = resp_reply(f)
    assert not isinstance(reply, Exception), reply
    return reply


def redis_keys(port, password=None, db=None):
    return sorted(k.decode() for k in redis_call(port, "KEYS", "*",
                                                 password=password, db=db))


def redis_size(port, key):
    """How many elements a key holds, whatever its type."""
    kind = redis_call(port, "TYPE", key)
    command = {"list": "LLEN", "stream": "XLEN", "zset": "ZCARD",
               "hash": "HLEN", "set": "SCARD"}.get(kind)
    return redis_call(port, command, key) if command else 1


def comet_servers(redis_url, count, *args, env=None):
    """count instances on free loopback ports, started together, with
    --enable-status, --redis=redis_url (unless None) and args. Returns once
    each is listening (Redis may still be connecting)."""
    switches = ["--http-host=127.0.0.1", "--enable-status", *args]
    if redis_url is not None:
        switches.append(f"--redis={redis_url}")
    servers = []
    try:
        for _ in range(count):
            servers.append(ServerProcess(*switches, env=env, wait=False))
        for server in servers:
            server.wait_listening()
    except BaseException:
        for server in servers:
            stop_process(server.proc, signal.SIGKILL)
            server.close()
        raise
    return servers


def stop_servers(servers):
    """SIGTERM every instance at once: each must exit 0 with no traceback."""
    problems = []
    for server in servers:
        server.send_signal(signal.SIGTERM)
    for server in servers:
        try:
            server.stop_clean()
        except AssertionError as e:
            problems.append(f"instance on port {server.port}: {e}")
        finally:
            server.close()
    assert not problems, "\n".join(problems)


def resume(server):
    """SIGCONT to a server that may have been stopped with SIGSTOP."""
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGCONT)


def health_reply(port):
    """(HTTP status, decoded body) of /health.json."""
    resp, body = call("GET", "/health.json", port=port)
    return resp.status, json.loads(body)


def can_write(port):
    return health_reply(port)[0] == 200


def redis_state(port):
    """The "redis" object of the instance's status page."""
    return status(port).get("redis")


def redis_gauge(port):
    """simple_comet_redis_connected from /metrics (None when absent)."""
    resp, body = call("GET", "/metrics", port=port)
    assert resp.status == 200, (resp.status, body)
    found = re.search(rb"^simple_comet_redis_connected(?:\{[^}]*\})? (\S+)$",
                      body, re.M)
    return None if found is None else float(found.group(1))


def attempt(method, path, params, port, timeout=10):
    """A request that may fail: (HTTP status, decoded JSON or None,
    seconds taken)."""
    start = time.monotonic()
    resp, body = call(method, path, params, port=port, timeout=timeout)
    try:
        decoded = json.loads(body)
    except ValueError:
        decoded = None
    return resp.status, decoded, time.monotonic() - start


def register_client(client_id, port):
    return api("POST", "/clients.json", {"client_id": client_id}, port=port)


def contents(reply, name):
    return [m["content"] for m in reply["messages"][name]]


def timed_read(names, port, **params):
    """read() that also says when the reply came: (reply, monotonic time)."""
    reply = read(names, port=port, **params)
    return reply, time.monotonic()


class RedisTestCase(unittest.TestCase):
    """A redis-server and `instances` simple_comet.py processes on it,
    for the class; self.ports lists the instances' ports (A, B, C)."""

    part = "C"                  # run by the second process, see main()

    instances = 3
    switches = ("--poll-timeout=2",)
    redis_args = ()

    @classmethod
    def setUpClass(cls):
        cls.redis = RedisProcess(*cls.redis_args)
        try:
            cls.servers = comet_servers(cls.redis.url, cls.instances,
                                        *cls.switches)
            cls.ports = [server.port for server in cls.servers]
            for port in cls.ports:
                wait_for(lambda: can_write(port), 10)
        except BaseException:
            for server in getattr(cls, "servers", ()):
                stop_process(server.proc, signal.SIGKILL)
                server.close()
            cls.redis.close()
            raise

    @classmethod
    def tearDownClass(cls):
        try:
            stop_servers(cls.servers)
        finally:
            cls.redis.close()

    def held(self, port):
        return status(port)["held_connections_count"]

    def streams(self, port):
        return status(port)["streams_open"]


@needs_redis
class RedisSharedTests(RedisTestCase):
    """Three instances on one Redis behave as one server: registrations,
    deletions, sessions and pushes made on one are seen on all."""

    def test_connected(self):
        """Each instance says it is connected: status, metrics, health."""
        for port in self.ports:
            self.assertIs(redis_state(port)["connected"], True)
            self.assertEqual(redis_gauge(port), 1)
            self.assertEqual(health_reply(port),
                             (200, {"return_code": 1, "error_message": ""}))

    def test_channels_shared(self):
        """A channel registered on A cannot be registered again on B, takes
        a push on C at once, and every instance reads the message."""
        a, b, c = self.ports
        name = register(fresh("rs"), port=a)
        # Existence is decided in Redis: no instance can accept a duplicate.
        again = api("POST", "/channels.json", {"channel_id": name}, port=b)
        self.assertEqual(again["return_code"], -2, again)
        first = push(name, "one", port=c)
        self.assertEqual(first["return_code"], 1)
        for port in self.ports:
            # An instance that has not applied the push yet waits for it
            # (the channel has a message): never "No valid channels".
            reply = read([name], port=port)
            self.assertEqual(reply["return_code"], 1, (port, reply))
            self.assertEqual(reply["messages"][name][0]["id"],
                             first["message_id"])
            self.assertEqual(contents(reply, name), ["one"])
            self.assertGreaterEqual(reply["last_id"], first["message_id"])

    def test_read_right_after_register_elsewhere(self):
        """A read and a stream on B and C just after the register on A are
        held, not refused; a push on C then answers both."""
        a, b, c = self.ports
        name = register(fresh("rs"), port=a)
        held = self.held(b)
        poll = Background(timed_read, [name], port=b)
        stream = follow(c, [name])
        self.addCleanup(stream.close)
        self.assertEqual(stream.status, 200, stream.body)
        wait_for(lambda: not poll.is_alive() or self.held(b) == held + 1, 5)
        sent = push(name, "hello", port=a)
        reply, _ = poll.result(5)
        self.assertEqual(reply["return_code"], 1, reply)
        self.assertEqual(contents(reply, name), ["hello"])
        self.assertEqual([m["id"] for m in stream.wait_arrived(1)],
                         [sent["message_id"]])

    def test_clients_shared(self):
        """A client registered on B is known on A and C at once (reads of a
        session channel accept it), and cannot be registered again."""
        a, b, c = self.ports
        name = register(fresh("rs"), port=a, use_sessions=1)
        push(name, "secret", port=a)
        client = fresh("rc")
        self.assertEqual(register_client(client, b)["return_code"], 1)
        self.assertEqual(register_client(client, c)["return_code"], -2)
        for port in (a, c):
            reply = read([name], port=port, client_id=client)
            self.assertEqual(reply["return_code"], 1, (port, reply))
            self.assertEqual(contents(reply, name), ["secret"])
        # Session rules stay: no client, or an unknown one, reads nothing.
        self.assertEqual(read([name], port=c)["return_code"], -2)
        self.assertEqual(read([name], port=a, client_id=fresh("rc"))
                         ["return_code"], -3)

    def test_deletes_shared(self):
        """A delete on B: a second delete on C finds nothing, a push on A
        is refused at once, reads everywhere soon say -2, and the name can
        be registered again (empty)."""
        a, b, c = self.ports
        name = register(fresh("rs"), port=a)
        push(name, "old", port=a)
        reply = api("DELETE", channel_path(name), port=b)
        self.assertEqual((reply["return_code"], reply["removed"]), (2, True))
        reply = api("DELETE", channel_path(name), port=c)
        self.assertEqual((reply["return_code"], reply["removed"]), (1, False))
        reply = api("POST", channel_path(name), {"content": "x"}, port=a)
        self.assertEqual(reply["return_code"], -2, reply)
        for port in self.ports:
            # Applying the delete may take a moment (a read meanwhile is
            # answered from a correct prefix of the history).
            wait_for(lambda: read([name], port=port)["return_code"] == -2, 5)
        register(name, port=c)
        push(name, "new", port=c)
        for port in self.ports:
            self.assertEqual(contents(read([name], port=port), name), ["new"])

    def test_push_wakes_every_instance(self):
        """A push on A answers the polls held on A and B and the streams on
        A and C within well under a second; "delivered" counts A's poll and
        stream only, "instances" the three instances."""
        a, b, c = self.ports
        name = register(fresh("rs"), port=a)
        since = push(name, "before", port=a)["message_id"]
        held = {port: self.held(port) for port in self.ports}
        streams = {port: self.streams(port) for port in self.ports}
        poll_a = Background(timed_read, [name], port=a, since=since)
        poll_b = Background(timed_read, [name], port=b, since=since)
        stream_a = follow(a, [name], since=since)
        stream_c = follow(c, [name], since=since)
        for stream in (stream_a, stream_c):
            self.addCleanup(stream.close)
            self.assertEqual(stream.status, 200, stream.body)
        wait_for(lambda: self.held(a) == held[a] + 1
                 and self.held(b) == held[b] + 1
                 and self.streams(a) == streams[a] + 1
                 and self.streams(c) == streams[c] + 1, 5)
        reply = push(name, "wake", port=a)
        pushed = time.monotonic()
        self.assertEqual(reply["delivered"], 2, reply)
        self.assertEqual(reply["instances"], 3, reply)
        # Within well under the poll timeout (2 s); the instances that did
        # not take the push see it as its entry lands, well under 0.5 s
        # on a quiet machine (LONG runs).
        for poll in (poll_a, poll_b):
            answer, at = poll.result(5)
            self.assertEqual(contents(answer, name), ["wake"])
            self.assertLess(at - pushed, bound(1.0, 0.5))
        for stream in (stream_a, stream_c):
            self.assertEqual([m["content"] for m in stream.wait_arrived(1)],
                             ["wake"])
            self.assertLess(stream.events[0]["at"] - pushed, bound(1.0, 0.5))

    def test_delete_releases_every_instance(self):
        """A delete on A answers B's held poll with -2 and ends C's stream
        with "deleted"; a poll on C that has another channel keeps waiting
        on it."""
        a, b, c = self.ports
        name = register(fresh("rs"), port=a)
        other = register(fresh("rs"), port=a)
        since = push(other, "start", port=a)["message_id"]
        held_b, held_c = self.held(b), self.held(c)
        poll_b = Background(read, [name], port=b, since=since)
        poll_c = Background(read, [name, other], port=c, since=since)
        stream = follow(c, [name], since=since)
        self.addCleanup(stream.close)
        self.assertEqual(stream.status, 200, stream.body)
        wait_for(lambda: self.held(b) == held_b + 1
                 and self.held(c) == held_c + 1, 5)
        self.assertEqual(api("DELETE", channel_path(name), port=a)
                         ["return_code"], 2)
        self.assertEqual(poll_b.result(5)["return_code"], -2)
        self.assertTrue(stream.closed.wait(5), "stream not closed")
        self.assertEqual([(e.get("event"), e["data"]) for e in stream.events],
                         [("deleted", {"channel": name})])
        self.assertTrue(poll_c.is_alive())
        push(other, "still here", port=b)
        reply = poll_c.result(5)
        self.assertEqual(list(reply["messages"]), [other])
        self.assertEqual(contents(reply, other), ["still here"])


@needs_redis
class RedisAlternationTests(RedisTestCase):
    """A client whose polls and stream reconnects go to a different
    instance each time, while publishers push through all of them."""

    switches = ("--poll-timeout=0.3", "--messages-per-channel=1000")
    PUBLISHERS = 3
    PER_PUBLISHER = 100

    def test_every_message_once_in_order(self):
        """Polls on A, B, C, A, ... following last_id, and a stream that
        reconnects to the next instance with Last-Event-ID every few
        events, each get every acknowledged message exactly once, in id
        order; no reply echoes a since lower than the one sent."""
        name = register(fresh("ra"), port=self.ports[0])
        acked, lock = {}, threading.Lock()
        done = threading.Event()

        def publisher(k):
            for i in range(self.PER_PUBLISHER):
                content = f"p{k}-{i}"
                reply = push(name, content, port=self.ports[(i + k) % 3])
                with lock:
                    acked[reply["message_id"]] = content
                time.sleep(0.002 * (i % 3))

        def streamer():
            """EventSource behaviour: reconnect with Last-Event-ID, here
            after 15 messages at most (the rest comes again on the next
            instance), however many a replay would bring at once."""
            got, turn, last = [], 0, None
            while not done.is_set() or len(got) < len(acked):
                stream = follow(self.ports[turn % 3], [name],
                                last_event_id=last)
                assert stream.status == 200, stream.body
                wait_for(lambda: len(stream.arrived()) >= 15
                         or done.is_set() and len(got) + len(
                             stream.arrived()) >= len(acked), 10)
                stream.close()
                stream.closed.wait(5)
                got += stream.arrived()[:15]
                if got:
                    last = got[-1]["id"]
                turn += 1
            return got, turn

        publishers = [Background(publisher, k) for k in range(self.PUBLISHERS)]
        stream_reader = Background(streamer)
        polled, since, turn = [], 0, 0
        total = self.PUBLISHERS * self.PER_PUBLISHER
        deadline = time.monotonic() + 20
        while len(polled) < total and time.monotonic() < deadline:
            port = self.ports[turn % 3]
            reply = read([name], port=port, since=since)
            self.assertEqual(reply["return_code"], 1, reply)
            # An instance behind the reader must not clamp its since to
            # its own stale counter (that would replay old messages).
            self.assertEqual(reply["since"], since, (port, reply))
            self.assertGreaterEqual(reply["last_id"], since)
            polled += reply["messages"][name]
            since = reply["last_id"]
            turn += 1
        for publisher in publishers:
            publisher.result(20)
        done.set()
        streamed, reconnects = stream_reader.result(20)
        expected = [(i, acked[i]) for i in sorted(acked)]
        self.assertEqual(len(expected), total)
        self.assertEqual([(m["id"], m["content"]) for m in polled], expected)
        self.assertEqual([(m["id"], m["content"]) for m in streamed], expected)
        self.assertGreaterEqual(turn, 6)
        self.assertGreaterEqual(reconnects, 6)


@needs_redis
class RedisPauseTests(RedisTestCase):
    """An instance that falls behind (its process stopped while thousands
    of pushes go through another) catches up before it answers: no reply
    from its stale view."""

    # Enough log entries that catching up takes B several round trips to
    # Redis, so the requests sent right after SIGCONT find it behind.
    BACKLOG = 3000

    def pause_b(self):
        server = self.servers[1]
        os.kill(server.proc.pid, signal.SIGSTOP)
        self.addCleanup(resume, server)
        filler = register(fresh("rf"), port=self.ports[0], max_messages=5)
        return filler

    def resume_b(self, requests):
        # The requests sent to B wait in its sockets, unread.
        wait_for(lambda: unread_requests(self.ports[1]) >= requests)
        os.kill(self.servers[1].proc.pid, signal.SIGCONT)

    def test_registry_after_pause(self):
        """Channels and a client registered on A while B is stopped: right
        after SIGCONT, reads and a stream on B find them (no -2, no -3)."""
        a, b, c = self.ports
        filler = self.pause_b()
        name = register(fresh("rp"), port=a)
        session = register(fresh("rp"), port=a, use_sessions=1)
        client = fresh("rc")
        register_client(client, a)
        push(name, "open", port=a)
        push(session, "closed", port=a)
        push_many(filler, self.BACKLOG, a)
        # The requests wait in B's socket queues; B sees them as it wakes.
        polls = [Background(read, [name], port=b),
                 Background(read, [session], port=b, client_id=client)]
        opening = Background(follow, b, [name])
        self.resume_b(3)
        stream = opening.result(5)
        self.addCleanup(stream.close)
        self.assertEqual(stream.status, 200, stream.body)
        self.assertEqual(contents(polls[0].result(5), name), ["open"])
        self.assertEqual(contents(polls[1].result(5), session), ["closed"])
        self.assertEqual([m["content"] for m in stream.wait_arrived(1)],
                         ["open"])

    def test_paused_instance_no_duplicates(self):
        """B stopped while A takes pushes and a reader reads them on A;
        right after SIGCONT the reader polls B (and opens a stream on B)
        with A's last_id: only later messages come, none twice."""
        a, b, c = self.ports
        name = register(fresh("rp"), port=a)
        first = push(name, "m0", port=a)["message_id"]
        wait_for(lambda: contents(read([name], port=b), name) == ["m0"], 5)
        filler = self.pause_b()
        for i in range(1, 6):
            push(name, f"m{i}", port=a)
        reply = read([name], port=a, since=first)
        self.assertEqual(contents(reply, name), [f"m{i}" for i in range(1, 6)])
        had = reply["last_id"]
        push_many(filler, self.BACKLOG, a)
        later = [push(name, f"m{i}", port=a)["message_id"] for i in (6, 7)]

        def follow_polls(since):
            """Polls on B following last_id until m7 (a correct prefix of
            the history may come first): (first reply, messages)."""
            got, first_reply = [], None
            while not got or got[-1]["content"] != "m7":
                reply = read([name], port=b, since=since)
                first_reply = first_reply or reply
                assert reply["return_code"] == 1, reply
                got += reply["messages"][name]
                since = reply["last_id"]
            return first_reply, got, since

        poll = Background(follow_polls, had)
        opening = Background(follow, b, [name], last_event_id=had)
        self.resume_b(2)
        stream = opening.result(5)
        self.addCleanup(stream.close)
        first_reply, got, since = poll.result(5)
        # B did not clamp the reader's since to its own stale counter.
        self.assertEqual(first_reply["since"], had)
        self.assertEqual([(m["id"], m["content"]) for m in got],
                         list(zip(later, ["m6", "m7"])))
        self.assertEqual(stream.status, 200)
        self.assertEqual([m["content"] for m in stream.wait_arrived(2)],
                         ["m6", "m7"])
        # And from there on, B follows as usual.
        poll = Background(read, [name], port=b, since=since)
        wait_for(lambda: self.held(b) == 1, 5)
        push(name, "m8", port=a)
        self.assertEqual(contents(poll.result(5), name), ["m8"])
        self.assertEqual([m["content"] for m in stream.wait_arrived(3)],
                         ["m6", "m7", "m8"])
        self.assertEqual(len(stream.events), 3)

    def test_shutdown_of_one_instance(self):
        """SIGTERM to C, holding a poll and a stream: the poll gets its
        empty reply, the stream ends, C exits 0 promptly (as without
        Redis), and "instances" goes from 3 to 2."""
        a, b, c = self.ports
        name = register(fresh("rp"), port=a)
        reply = push(name, "three", port=a)
        self.assertEqual(reply["instances"], 3)
        since = reply["message_id"]
        poll = Background(read, [name], port=c, since=since)
        stream = follow(c, [name], since=since)
        self.addCleanup(stream.close)
        wait_for(lambda: self.held(c) == 1 and self.streams(c) == 1, 5)
        server = self.servers[2]
        server.send_signal(signal.SIGTERM)
        started = time.monotonic()
        self.assertEqual(poll.result(5)["messages"], {name: []})
        self.assertTrue(stream.closed.wait(5))
        self.assertEqual(server.stop(timeout=10), 0)
        # Nothing was in flight: no reason to wait out a grace period (5 s).
        self.assertLess(time.monotonic() - started, 4)
        self.assertNotIn("Traceback", server.output())
        # C left cleanly: it is no longer connected, so no longer counted
        # (a crashed one could only be noticed after a while).
        self.assertEqual(push(name, "two", port=a)["instances"], 2)
        self.assertEqual(push(name, "two", port=b)["instances"], 2)


@needs_redis
class RedisConnectionKillTests(RedisTestCase):
    """Redis drops every instance's connections in the middle of a burst
    of pushes: nothing acknowledged is lost or delivered twice."""

    instances = 2
    switches = ("--poll-timeout=2", "--messages-per-channel=5000")

    def test_killed_mid_burst(self):
        """Pushes on A, a poller and a stream on B; CLIENT KILL TYPE normal
        twice during the burst. Every acknowledged message reaches both
        exactly once, in order; the stream stays open."""
        a, b = self.ports
        name = register(fresh("rk"), port=a)
        since = push(name, "start", port=a)["message_id"]
        stream = follow(b, [name], since=since)
        self.addCleanup(stream.close)
        self.assertEqual(stream.status, 200, stream.body)
        acked, refused = {}, []
        stop = threading.Event()

        def publisher():
            i, deadline = 0, time.monotonic() + 20
            while len(acked) < 300 and time.monotonic() < deadline:
                code, body, _ = attempt("POST", channel_path(name),
                                        {"content": f"m{i}"}, a)
                if code == 200 and body["return_code"] == 1:
                    acked[body["message_id"]] = f"m{i}"
                    time.sleep(0.001)
                else:
                    # 503: not confirmed; it may or may not have been stored.
                    assert code == 503 and body["return_code"] == -1, \
                        (code, body)
                    refused.append(f"m{i}")
                    time.sleep(0.01)        # a publisher backs off
                i += 1

        def poller():
            got, cursor = [], since
            while not stop.is_set():
                reply = read([name], port=b, since=cursor)
                assert reply["return_code"] == 1, reply
                got += reply["messages"][name]
                cursor = reply["last_id"]
                if got and got[-1]["content"] == "end":
                    break
            return got

        polls = Background(poller)
        pushes = Background(publisher)
        kills = []
        for count in (100, 200):
            wait_for(lambda: len(acked) >= count or not pushes.is_alive(), 15)
            kills.append(redis_call(self.redis.port, "CLIENT", "KILL",
                                    "TYPE", "normal"))
        pushes.result(30)
        # The last push, once A takes writes again.
        wait_for(lambda: can_write(a), 10)
        end = push(name, "end", port=a)["message_id"]
        acked[end] = "end"
        try:
            got = polls.result(10)
        finally:
            stop.set()
        wait_for(lambda: "end" in [m["content"] for m in stream.arrived()]
                 or stream.closed.is_set(), 10)
        streamed = stream.arrived()
        # Each kill closed the connections of both instances.
        self.assertTrue(all(count >= 2 for count in kills), kills)
        expected = sorted(acked.items())
        for what, messages in (("poll", got), ("stream", streamed)):
            ids = [m["id"] for m in messages]
            self.assertEqual(ids, sorted(set(ids)), f"{what}: out of order "
                             "or twice")
            delivered = {m["id"]: m["content"] for m in messages}
            missing = [i for i, _ in expected if i not in delivered]
            self.assertEqual(missing, [], f"{what}: acknowledged, not delivered")
            for message_id, content in delivered.items():
                self.assertEqual(acked.get(message_id, content), content)
                self.assertTrue(message_id in acked or content in refused,
                                (what, message_id, content))
        self.assertFalse(stream.closed.is_set(), "the stream was closed")
        self.assertGreater(len(acked), 300)
        # Each kill cost a short outage, not one of seconds.
        self.assertLess(len(refused), 200, len(refused))


@needs_redis
class RedisOutageTests(RedisTestCase):
    """Redis down, stalled, and back empty."""

    instances = 2
    switches = ("--poll-timeout=10",)

    def setUp(self):
        # Each test leaves Redis running; the instances must be back on it.
        for port in self.ports:
            wait_for(lambda: can_write(port), 10)

    def assertRefusedWrite(self, code, body, seconds, limit=8):
        self.assertEqual(code, 503, body)
        self.assertEqual(body["return_code"], -1, body)
        self.assertTrue(body["error_message"].startswith("503"), body)
        self.assertLess(seconds, limit)

    def test_down_then_back_empty(self):
        """Redis stopped: writes on both instances get a quick 503 with a
        JSON body, /health.json 503, held polls and streams stay open,
        reads are answered from what was applied. Redis restarted empty:
        channels and clients are gone (the held poll gets -2, the stream
        ends), registering works again, and new ids are above all before."""
        a, b = self.ports
        name = register(fresh("ro"), port=a)
        session = register(fresh("ro"), port=a, use_sessions=1)
        client = fresh("rc")
        register_client(client, a)
        ids = [push(name, f"m{i}", port=a)["message_id"] for i in range(3)]
        ids.append(push(session, "s", port=a)["message_id"])
        reply = read([name], port=b)
        self.assertEqual(contents(reply, name), ["m0", "m1", "m2"])
        seen = max(ids + [reply["last_id"]])
        poll = Background(read, [name], port=b, since=seen)
        stream = follow(a, [name], since=seen)
        self.addCleanup(stream.close)
        self.assertEqual(stream.status, 200, stream.body)
        wait_for(lambda: self.held(b) == 1 and self.streams(a) == 1, 5)

        self.redis.stop()
        writes = [
            ("POST", channel_path(name), {"content": "lost"}, a),
            ("POST", "/channels.json", {"channel_id": fresh("ro")}, b),
            ("POST", "/clients.json", {"client_id": fresh("rc")}, a),
            ("DELETE", channel_path(name), None, b),
        ]
        for method, path, params, port in writes:
            with self.subTest(method=method, path=path):
                self.assertRefusedWrite(*attempt(method, path, params, port))
        for port in self.ports:
            wait_for(lambda: health_reply(port)[0] == 503, 6)
            code, body = health_reply(port)
            self.assertEqual(body["return_code"], -1)
            self.assertTrue(body["error_message"])
            self.assertIs(redis_state(port)["connected"], False)
            self.assertEqual(redis_gauge(port), 0)
        # Held ones wait on; reads come from what was applied.
        self.assertTrue(poll.is_alive())
        self.assertEqual(self.held(b), 1)
        self.assertFalse(stream.closed.is_set())
        self.assertEqual(self.streams(a), 1)
        self.assertEqual(contents(read([name], port=b), name),
                         ["m0", "m1", "m2"])
        self.assertEqual(contents(read([session], port=a, client_id=client),
                                  session), ["s"])

        self.redis.start()             # same port, no data
        for port in self.ports:
            wait_for(lambda: can_write(port), 8)
        self.assertEqual(poll.result(5)["return_code"], -2)
        self.assertTrue(stream.closed.wait(5), "stream not closed")
        self.assertEqual(self.held(b), 0)
        for port in self.ports:
            self.assertEqual(read([name], port=port)["return_code"], -2)
            self.assertNotIn(name, status(port)["channels"])
            self.assertNotIn(client, status(port)["clients"])
        refused = follow(b, [name])
        self.assertEqual((refused.status, refused.json["return_code"]),
                         (404, -2))
        self.assertEqual(register_client(client, b)["return_code"], 1)
        register(name, port=b)
        new = push(name, "new", port=a)["message_id"]
        self.assertGreater(new, seen)
        reply = read([name], port=b)
        self.assertEqual(contents(reply, name), ["new"])
        self.assertGreaterEqual(reply["last_id"], new)

    def test_stalled_redis(self):
        """Redis paused (SIGSTOP): a push is answered 503 within 6 s, not
        held; once Redis runs again, writes succeed and the channel's
        history has no duplicate."""
        a, b = self.ports
        name = register(fresh("ro"), port=a)
        push(name, "before", port=a)
        self.redis.pause()
        self.addCleanup(self.redis.resume)
        self.assertRefusedWrite(*attempt("POST", channel_path(name),
                                         {"content": "stalled"}, a))
        self.assertEqual(health_reply(a)[0], 503)
        self.redis.resume()
        for port in self.ports:
            wait_for(lambda: can_write(port), 8)
        after = push(name, "after", port=b)["message_id"]
        for port in self.ports:
            reply = read([name], port=port)
            # "stalled" was not confirmed: Redis may have stored it.
            self.assertIn(contents(reply, name),
                          (["before", "after"], ["before", "stalled", "after"]))
            self.assertEqual(reply["messages"][name][-1]["id"], after)


@needs_redis
class RedisHistoryTests(RedisTestCase):
    """History limits and "lost" are the same on every instance."""

    instances = 2

    def test_max_messages_and_lost(self):
        """max_messages=3, five pushes on A; reads on B at once: since an
        early id gives the three kept and "lost"; since 0 gives them
        without "lost"; a stream from the early id says lost first."""
        a, b = self.ports
        name = register(fresh("rh"), port=a, max_messages=3)
        ids = [push(name, f"m{i}", port=a)["message_id"] for i in range(5)]
        reply = read([name], port=b, since=ids[0])
        self.assertEqual(reply["since"], ids[0])
        self.assertEqual(contents(reply, name), ["m2", "m3", "m4"])
        self.assertEqual(reply.get("lost"), [name], reply)
        reply = read([name], port=b, since=ids[1])
        self.assertEqual(contents(reply, name), ["m2", "m3", "m4"])
        self.assertNotIn("lost", reply)
        reply = read([name], port=b)
        self.assertEqual([m["id"] for m in reply["messages"][name]], ids[2:])
        self.assertNotIn("lost", reply)
        stream = follow(b, [name], last_event_id=ids[0])
        self.addCleanup(stream.close)
        stream.wait_arrived(3)
        self.assertEqual([(e.get("event"), e["data"]) for e in stream.events],
                         [("lost", {"channels": [name]})]
                         + [(None, {"channel": name, "id": m["id"],
                                    "ts": m["ts"], "content": m["content"]})
                            for m in reply["messages"][name]])

    def test_redis_history_bounded(self):
        """300 pushes to a channel keeping 3: what Redis keeps under the
        channel's keys stays within 3 plus a small trimming slack."""
        a, b = self.ports
        name = register(fresh("rh"), port=a, max_messages=3)
        for i in range(300):
            push(name, f"m{i}", port=a if i % 2 else b)
        keys = [k for k in redis_keys(self.redis.port) if name in k]
        self.assertTrue(keys, "no Redis key names the channel")
        sizes = {k: redis_size(self.redis.port, k) for k in keys}
        self.assertTrue(all(size <= 3 + 100 for size in sizes.values()), sizes)
        self.assertEqual(contents(read([name], port=b), name),
                         ["m297", "m298", "m299"])


@needs_redis
class RedisExpiryTests(RedisTestCase):
    """Sessions and channels expire as in one server: a read on any
    instance keeps them, and their Redis keys go with them."""

    instances = 2
    switches = ("--poll-timeout=0.3", "--session-timeout=1",
                "--inactive-channel-timeout=1")

    def test_expiry_across_instances(self):
        """A client polling only B keeps its session (its reads on A stay
        valid) and the channels it reads; unread channels (even pushed to)
        and idle clients vanish from both instances within seconds,
        deleted ones at once, and their Redis keys go too."""
        a, b = self.ports
        kept = register(fresh("rx"), port=a)
        session = register(fresh("rx"), port=a, use_sessions=1)
        keeper = fresh("rc")
        register_client(keeper, a)
        push(session, "s", port=a)
        push(kept, "k", port=a)
        unread = register(fresh("rx"), port=a)
        pushed = register(fresh("rx"), port=a)
        deleted = register(fresh("rx"), port=b)
        idle = fresh("rc")
        register_client(idle, b)
        extra = [register(fresh("rx"), port=a) for _ in range(15)]
        for name in extra:
            push(name, "x", port=b)
        extra_clients = [fresh("rc") for _ in range(15)]
        for client in extra_clients:
            register_client(client, a)
        started = time.monotonic()
        stop = threading.Event()

        def reader():
            since = 0
            while not stop.is_set():
                reply = read([kept, session], port=b, since=since,
                             client_id=keeper)
                assert reply["return_code"] == 1, reply
                assert session in reply["messages"], reply
                since = reply["last_id"]

        def pusher():
            # A push is not a read: the channel expires all the same.
            while not stop.is_set():
                reply = api("POST", channel_path(pushed), {"content": "p"},
                            port=a)
                if reply["return_code"] != 1:
                    return reply
                time.sleep(0.1)

        reading, pushing = Background(reader), Background(pusher)
        self.assertEqual(api("DELETE", channel_path(deleted), port=a)
                         ["return_code"], 2)
        gone_channels = [unread, pushed, deleted] + extra
        gone_clients = [idle] + extra_clients

        def all_gone():
            for port in self.ports:
                st = status(port)
                if set(gone_channels) & set(st["channels"]) or \
                        set(gone_clients) & set(st["clients"]):
                    return False
            return True

        wait_for(all_gone, 6, interval=0.05)
        # Kept for 2.5 s, over twice the timeouts, by reads on B only.
        time.sleep(max(0, started + 2.5 - time.monotonic()))
        for port in self.ports:
            st = status(port)
            self.assertLessEqual({kept, session}, set(st["channels"]), port)
            self.assertIn(keeper, st["clients"], port)
        self.assertEqual(pushing.result(5)["return_code"], -2)
        stop.set()
        reading.result(5)
        reply = read([session], port=a, client_id=keeper)
        self.assertEqual(contents(reply, session), ["s"])
        self.assertEqual(read([kept], port=a, client_id=idle)["return_code"],
                         -3)
        for port in self.ports:
            self.assertEqual(read([unread], port=port)["return_code"], -2)
        # Redis forgets them too: no key names them, and what is left is a
        # bounded set (the kept ones and the deployment's own few keys).
        gone = gone_channels + gone_clients

        def keys_left():
            keys = redis_keys(self.redis.port)
            return keys if not [k for k in keys for n in gone if n in k] \
                else None

        keys = wait_for(keys_left, 5, interval=0.05)
        self.assertTrue(all(k.startswith("comet:") or k.startswith("{comet:")
                            for k in keys), keys)
        unnamed = [k for k in keys
                   if not any(n in k for n in (kept, session, keeper))]
        self.assertLessEqual(len(unnamed), 15, keys)


@needs_redis
class RedisPrefixTests(unittest.TestCase):
    """--redis-prefix: deployments sharing one Redis stay apart."""

    part = "C"                  # run by the second process, see main()

    def test_prefixes_apart(self):
        """Two instances with prefix alpha: share channels; one with beta:
        sees none of them, has its own of the same name, and every key
        carries one of the two prefixes."""
        redis = RedisProcess()
        self.addCleanup(redis.close)
        alpha = comet_servers(redis.url, 2, "--poll-timeout=0.3",
                              "--redis-prefix=alpha:")
        self.addCleanup(stop_servers, alpha)
        beta = comet_servers(redis.url, 1, "--poll-timeout=0.3",
                             "--redis-prefix=beta:")
        self.addCleanup(stop_servers, beta)
        a1, a2, b = alpha[0].port, alpha[1].port, beta[0].port
        for port in (a1, a2, b):
            wait_for(lambda: can_write(port), 10)
        name = fresh("rp")
        register(name, port=a1)
        push(name, "alpha", port=a2)
        self.assertEqual(api("POST", channel_path(name), {"content": "x"},
                             port=b)["return_code"], -2)
        self.assertEqual(read([name], port=b)["return_code"], -2)
        register(name, port=b)
        push(name, "beta", port=b)
        for port in (a1, a2):
            self.assertEqual(contents(read([name], port=port), name), ["alpha"])
        self.assertEqual(contents(read([name], port=b), name), ["beta"])
        self.assertEqual(push(name, "n", port=a1)["instances"], 2)
        self.assertEqual(push(name, "n", port=b)["instances"], 1)
        keys = redis_keys(redis.port)
        kinds = {p for k in keys for p in ("alpha:", "beta:")
                 if k.startswith(p) or k.startswith("{" + p)}
        self.assertEqual(kinds, {"alpha:", "beta:"}, keys)
        self.assertTrue(all(k.startswith(("alpha:", "beta:", "{alpha:",
                                          "{beta:")) for k in keys), keys)


@needs_redis
class RedisUnixSocketTests(unittest.TestCase):
    """--redis=unix:///path.sock?db=N: Redis over its unix socket, in
    database N."""

    part = "C"                  # run by the second process, see main()

    def test_unix_socket_and_db(self):
        """Two instances share channels over the socket; the keys are in
        database 3, none in database 0."""
        redis = RedisProcess()
        self.addCleanup(redis.close)
        path = os.path.join(redis.dir.name, "redis.sock")
        redis.stop()
        redis.args = ("--unixsocket", path, "--unixsocketperm", "700")
        redis.start()
        servers = comet_servers(f"unix://{quote(path)}?db=3", 2,
                                "--poll-timeout=0.3")
        self.addCleanup(stop_servers, servers)
        a, b = (server.port for server in servers)
        for port in (a, b):
            wait_for(lambda: can_write(port), 10)
        name = register(fresh("ru"), port=a)
        push(name, "over the socket", port=b)
        self.assertEqual(contents(read([name], port=a), name),
                         ["over the socket"])
        self.assertTrue([k for k in redis_keys(path, db=3) if name in k])
        self.assertEqual(redis_keys(path, db=0), [])


class RedisCommandLineTests(unittest.TestCase):
    """Switches that make the server exit, and a start without Redis."""

    part = "C"                  # run by the second process, see main()

    def run_comet(self, *args, env=None):
        return run_server(f"--http-port={free_port()}",
                          "--http-host=127.0.0.1", *args, env=env)

    def assertExit2(self, result, secret=None):
        output = result.stdout + result.stderr
        self.assertEqual(result.returncode, 2, output)
        self.assertEqual(len(result.stderr.strip().splitlines()), 1, output)
        self.assertNotIn("Traceback", output)
        if secret:
            self.assertNotIn(secret, output)

    def test_with_state_file(self):
        """--redis (or $SIMPLE_COMET_REDIS) with --state-file: exit 2."""
        with tempfile.TemporaryDirectory() as directory:
            state = os.path.join(directory, "state")
            self.assertExit2(self.run_comet("--redis=redis://127.0.0.1:1",
                                            f"--state-file={state}"))
            self.assertExit2(self.run_comet(
                f"--state-file={state}",
                env={"SIMPLE_COMET_REDIS": "redis://127.0.0.1:1"}))
            self.assertEqual(os.listdir(directory), [])

    def test_malformed_url(self):
        """A malformed URL, on the command line, in the environment or in
        --redis-file, and an unreadable --redis-file: exit 2 with one line
        that never shows the password."""
        common = ["--http-port=%d" % free_port(), "--http-host=127.0.0.1"]
        with tempfile.TemporaryDirectory() as directory:
            path = os.path.join(directory, "redis-url")
            with open(path, "w") as f:
                f.write("redis://:secretpw@127.0.0.1:99999\n")
            cases = []
            for url in ("http://127.0.0.1:6379", "127.0.0.1:6379",
                        "redis://127.0.0.1:70000", "redis://127.0.0.1/x",
                        "redis://:secretpw@127.0.0.1:99999",
                        "unix://relative.sock"):
                cases.append((f"--redis={url}", [f"--redis={url}"], None))
                cases.append((f"$SIMPLE_COMET_REDIS={url}", [],
                               {"SIMPLE_COMET_REDIS": url}))
            cases.append(("--redis-file", [f"--redis-file={path}"], None))
            cases.append(("missing --redis-file", [
                f"--redis-file={os.path.join(directory, 'missing')}"], None))
            results = run_servers([(common + args, env)
                                   for _, args, env in cases])
        for (what, _, _), result in zip(cases, results):
            with self.subTest(what):
                self.assertExit2(result, "secretpw")

    @needs_redis
    def test_unreachable_at_start(self):
        """Nothing listening on the Redis port: the server starts all the
        same and says so in its log (no traceback); writes and
        /health.json answer 503; once a redis-server runs on that port,
        writes succeed."""
        redis_port = free_port()
        server, = comet_servers(f"redis://127.0.0.1:{redis_port}", 1,
                                "--poll-timeout=0.3")
        redis = None
        try:
            wait_for(lambda: str(redis_port) in server.output(), 5)
            lines = [line for line in server.output().splitlines()
                     if str(redis_port) in line]
            self.assertTrue(any("WARNING" in line or "ERROR" in line
                                for line in lines), lines)
            self.assertNotIn("Traceback", server.output())
            code, body = health_reply(server.port)
            self.assertEqual(code, 503)
            self.assertEqual(body["return_code"], -1)
            self.assertIs(redis_state(server.port)["connected"], False)
            name = fresh("ru")
            for method, path, params in (
                    ("POST", "/channels.json", {"channel_id": name}),
                    ("POST", "/clients.json", {"client_id": fresh("rc")}),
                    ("POST", channel_path(name), {"content": "x"})):
                code, body, seconds = attempt(method, path, params,
                                              server.port)
                self.assertEqual((code, body["return_code"]), (503, -1), body)
                self.assertLess(seconds, 8)
            redis = RedisProcess(port=redis_port)
            wait_for(lambda: can_write(server.port), 8)
            register(name, port=server.port)
            push(name, "up", port=server.port)
            self.assertEqual(contents(read([name], port=server.port), name),
                             ["up"])
        finally:
            try:
                stop_servers([server])
            finally:
                if redis is not None:
                    redis.close()


PASSWORD = "hunter2-secret"


@needs_redis
class RedisSecretTests(unittest.TestCase):
    """A Redis that wants a password (SPEC C5): from the command line (a
    warning), --redis-file or $SIMPLE_COMET_REDIS (no warning); the
    password never shows in logs, the status page or /metrics."""

    part = "C"                  # run by the second process, see main()

    def test_password_sources(self):
        """Three instances, one per way of giving the URL, share one Redis;
        only the command line one warns; with Redis gone, no refusal,
        health reply, status, metrics or log line shows the password."""
        redis = RedisProcess("--requirepass", PASSWORD)
        self.addCleanup(redis.close)
        url = f"redis://:{PASSWORD}@127.0.0.1:{redis.port}/0"
        directory = tempfile.TemporaryDirectory()
        self.addCleanup(directory.cleanup)
        path = os.path.join(directory.name, "redis-url")
        with open(path, "w") as f:
            f.write(url + "\n")
        os.chmod(path, 0o600)
        on_line, = comet_servers(url, 1, "--poll-timeout=0.3")
        self.addCleanup(stop_servers, [on_line])
        in_file, = comet_servers(None, 1, "--poll-timeout=0.3",
                                 f"--redis-file={path}")
        self.addCleanup(stop_servers, [in_file])
        in_env, = comet_servers(None, 1, "--poll-timeout=0.3",
                                env={"SIMPLE_COMET_REDIS": url})
        self.addCleanup(stop_servers, [in_env])
        servers = (on_line, in_file, in_env)
        for server in servers:
            wait_for(lambda: can_write(server.port), 10)
        # All three reached the same Redis (so they authenticated).
        name = register(fresh("rs"), port=in_file.port)
        push(name, "shared", port=in_env.port)
        self.assertEqual(contents(read([name], port=on_line.port), name),
                         ["shared"])
        # Warnings about the command line, not the 503s of a health check
        # made while an instance was still loading.
        warnings = [[line for line in server.output().splitlines()
                     if "WARNING" in line and " 503 " not in line]
                    for server in servers]
        self.assertTrue(any(re.search(r"command line|visible", line, re.I)
                            for line in warnings[0]), warnings[0])
        self.assertEqual(len(warnings[1]), len(warnings[0]) - 1, warnings)
        self.assertEqual(len(warnings[2]), len(warnings[0]) - 1, warnings)
        # Redis gone: the refusals and the health page name no password.
        redis.stop()
        for server in servers:
            code, body, _ = attempt("POST", channel_path(name),
                                    {"content": "x"}, server.port)
            self.assertEqual(code, 503)
            self.assertNotIn(PASSWORD, json.dumps(body))
            wait_for(lambda: health_reply(server.port)[0] == 503, 6)
            self.assertNotIn(PASSWORD, json.dumps(health_reply(server.port)))
            for path in ("/status.json", "/metrics"):
                resp, body = call("GET", path, port=server.port)
                self.assertNotIn(PASSWORD.encode(), body)
            self.assertNotIn(PASSWORD, server.output())


# ---------------------------------------------------------------------------
# C3. The Redis client: URLs, the RESP reader, connections
# ---------------------------------------------------------------------------

from simple_comet import (  # noqa: E402
    INCOMPLETE, RedisBackoff, RedisClient, RedisConnection,
    RedisConnectionError, RedisProtocolError, RedisReader, RedisReplyError,
    RedisTimeout, encode_command, parse_redis_url, script_sha)

LOGGER = "simple_comet.redis"


def plain(reply):
    """A reply with its errors made comparable."""
    if isinstance(reply, list):
        return [plain(item) for item in reply]
    if isinstance(reply, RedisReplyError):
        return ("error", str(reply))
    return reply


def parse_all(chunks):
    """Every reply in the chunks, feeding them one by one."""
    reader, replies = RedisReader(), []
    for chunk in chunks:
        reader.feed(chunk)
        while (reply := reader.gets()) is not INCOMPLETE:
            replies.append(plain(reply))
    return replies


# ---------------------------------------------------------------------------
# URLs
# ---------------------------------------------------------------------------

class RedisURLTests(unittest.TestCase):

    def test_good(self):
        """Every accepted form gives the right parts and defaults."""
        cases = {
            "redis://localhost": ("localhost", 6379, None, None, None, 0),
            "REDIS://h.example:7000/3": ("h.example", 7000, None, None, None, 3),
            "redis://:s%40c%3Ar%2Fet@127.0.0.1/0": ("127.0.0.1", 6379, None, None, "s@c:r/et", 0),
            "redis://alice:pw@10.0.0.1:6380/15": ("10.0.0.1", 6380, None, "alice", "pw", 15),
            "redis://al%20ice:@h": ("h", 6379, None, "al ice", "", 0),
            "redis://:@h": ("h", 6379, None, None, None, 0),
            "redis://[::1]:6390/2": ("::1", 6390, None, None, None, 2),
            "redis://[::1]": ("::1", 6379, None, None, None, 0),
            "redis://h/": ("h", 6379, None, None, None, 0),
            "redis://h?db=4&password=x%26y": ("h", 6379, None, None, "x&y", 4),
            "unix:///var/run/redis.sock": (None, None, "/var/run/redis.sock", None, None, 0),
            "unix:///tmp/r%20s.sock?db=2": (None, None, "/tmp/r s.sock", None, None, 2),
            "unix:///r.sock?password=pw&username=bob": (None, None, "/r.sock", "bob", "pw", 0),
            "unix://:pw@/r.sock": (None, None, "/r.sock", None, "pw", 0),
        }
        for text, expected in cases.items():
            with self.subTest(text):
                self.assertEqual(tuple(parse_redis_url(text)), expected)

    def test_bad(self):
        """Malformed URLs raise one-line ValueErrors that never show the
        password."""
        bad = [
            "", "localhost:6379", "http://h", "redis:/h", "rediss://h",
            "redis://", "redis://:6379", "redis://h:0", "redis://h:65536",
            "redis://h:+80", "redis://h:port", "redis://h:", "redis://h/x",
            "redis://h/-1", "redis://h/1/2", "redis://h/99999999999",
            "redis://h/1?db=2", "redis://h?db=", "redis://h?bogus=1",
            "redis://h?db=1&db=1", "redis://::1/0", "redis://[::1/0",
            "redis://[nothost]:1", "redis://[::1]x", "redis://bad_host!",
            "redis://user@h", "redis://h ost", "redis://h\n", "redis://h#x",
            "redis://:secretpw@h?password=secretpw", "unix://", "unix://h/r.sock",
            "unix://relative.sock", "unix:///r.sock?db=x", "unix:///a%00b",
            "redis://:secretpw@h:99999", "redis://:secretpw@h/x",
            "redis://:%ZZsecretpw@h", "redis://:secretpw%ff@h",
            "redis://:secret?pw=1@h", "redis://:secret?secretpw@h",
            "redis://:secretpw@h?db", "unix:///r.sock?password=secretpw%",
        ]
        for text in bad:
            with self.subTest(text):
                with self.assertRaises(ValueError) as caught:
                    parse_redis_url(text)
                message = str(caught.exception)
                self.assertNotIn("\n", message)
                self.assertNotIn("secretpw", message)
                self.assertTrue(message.startswith("redis URL"), message)

    def test_password_hidden(self):
        """repr, str and redacted() show *** for the password, not it."""
        url = parse_redis_url("redis://bob:hunter2@[::1]:7000/3")
        for shown in (repr(url), str(url), url.redacted(), f"{url}", "%s" % (url,)):
            self.assertNotIn("hunter2", shown)
        self.assertEqual(url.redacted(), "redis://bob:***@[::1]:7000/3")
        self.assertEqual(parse_redis_url("redis://h").redacted(), "redis://h:6379/0")
        self.assertEqual(parse_redis_url("unix://:pw@/r.sock?db=2").redacted(),
                         "unix://:***@/r.sock?db=2")
        self.assertEqual(parse_redis_url(str(url)).password, "***")


# ---------------------------------------------------------------------------
# RESP2
# ---------------------------------------------------------------------------

SAMPLE = (b"+OK\r\n" b"-ERR unknown command 'X'\r\n" b":0\r\n" b":-42\r\n"
          b":9223372036854775807\r\n" b"$5\r\nhe\r\no\r\n" b"$0\r\n\r\n"
          b"$-1\r\n" b"*-1\r\n" b"*0\r\n"
          b"*3\r\n$1\r\na\r\n*2\r\n:1\r\n*1\r\n-WRONGTYPE no\r\n$-1\r\n"
          b"*2\r\n*0\r\n+\xc3\xa9t\xc3\xa9\r\n" b"+\r\n")
SAMPLE_REPLIES = [
    "OK", ("error", "ERR unknown command 'X'"), 0, -42, 2 ** 63 - 1,
    b"he\r\no", b"", None, None, [],
    [b"a", [1, [("error", "WRONGTYPE no")]], None],
    [[], "été"], "",
]


class RedisReaderTests(unittest.TestCase):

    def test_sample_split_everywhere(self):
        """Every reply type, nested arrays, errors and nulls parse the same
        whole, split in two at every byte, split in three, and byte by byte."""
        self.assertEqual(parse_all([SAMPLE]), SAMPLE_REPLIES)
        for i in range(len(SAMPLE) + 1):
            self.assertEqual(parse_all([SAMPLE[:i], SAMPLE[i:]]), SAMPLE_REPLIES, i)
        for i in range(0, len(SAMPLE), 7):
            for j in range(i, len(SAMPLE), 5):
                self.assertEqual(parse_all([SAMPLE[:i], SAMPLE[i:j], SAMPLE[j:]]),
                                 SAMPLE_REPLIES, (i, j))
        self.assertEqual(parse_all([bytes([b]) for b in SAMPLE]), SAMPLE_REPLIES)

    def test_errors_returned_not_raised(self):
        """An error reply comes back as a RedisReplyError with its code."""
        reader = RedisReader()
        reader.feed(b"-NOSCRIPT No matching script.\r\n:1\r\n")
        error = reader.gets()
        self.assertIsInstance(error, RedisReplyError)
        self.assertEqual(error.code, "NOSCRIPT")
        self.assertEqual(reader.gets(), 1)
        self.assertIs(reader.gets(), INCOMPLETE)

    def test_large_bulk_in_pieces(self):
        """A 3 MB bulk string inside an array, in uneven pieces."""
        payload = os.urandom(3 * 1024 * 1024)
        data = b"*2\r\n$%d\r\n%b\r\n:7\r\n" % (len(payload), payload)
        chunks = [data[i:i + 65521] for i in range(0, len(data), 65521)]
        self.assertEqual(parse_all(chunks), [[payload, 7]])

    def test_garbage(self):
        """Anything that is not RESP2 raises RedisProtocolError."""
        deep = b"*1\r\n" * (simple_comet.REDIS_MAX_DEPTH + 1) + b":1\r\n"
        garbage = [
            b"HTTP/1.1 400 Bad Request\r\n", b"!3\r\nabc\r\n", b":12a\r\n",
            b": 12\r\n", b":1_0\r\n", b":\r\n", b"$-2\r\n", b"$+3\r\nabc\r\n",
            b"$3\r\nabcd\r\n", b"$3\r\nabc\n\r", b"*-2\r\n", b"$536870913\r\n",
            b"*x\r\n", b"+a\nb\r\n", b"-a\rb\r\n", deep,
            b"+" + b"x" * (simple_comet.REDIS_MAX_LINE + 1),
        ]
        for data in garbage:
            with self.subTest(data[:30]):
                reader = RedisReader()
                reader.feed(data)
                with self.assertRaises(RedisProtocolError):
                    while reader.gets() is not INCOMPLETE:
                        pass
        # At the limits themselves all is well.
        self.assertEqual(parse_all([b"*1\r\n" * simple_comet.REDIS_MAX_DEPTH + b":1\r\n"]),
                         [_nest(simple_comet.REDIS_MAX_DEPTH)])

    def test_encode_command(self):
        """Arguments become a RESP array of bulk strings."""
        self.assertEqual(encode_command("SET", "clé", b"\x00\r\n", 12, -1.5),
                         b"*5\r\n$3\r\nSET\r\n$4\r\ncl\xc3\xa9\r\n$3\r\n\x00\r\n\r\n"
                         b"$2\r\n12\r\n$4\r\n-1.5\r\n")
        self.assertEqual(encode_command("GET", bytearray(b"k")), b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n")
        for bad in (None, True, [1], float("nan")):
            with self.subTest(bad):
                with self.assertRaises((TypeError, ValueError)):
                    encode_command("SET", "k", bad)
        with self.assertRaises(ValueError):
            encode_command()

    def test_backoff(self):
        """Back-off starts near 0.2 s, roughly doubles, never passes 5 s,
        and keeps its jitter at the cap."""
        for _ in range(200):
            backoff = RedisBackoff()
            delays = [backoff.next() for _ in range(12)]
            self.assertTrue(0.16 <= delays[0] <= 0.24, delays)
            self.assertTrue(0.32 <= delays[1] <= 0.48, delays)
            self.assertTrue(all(d <= simple_comet.REDIS_RECONNECT_MAX for d in delays), delays)
            self.assertTrue(all(d >= 5.0 / 1.2 * 0.8 - 1e-9 for d in delays[6:]), delays)
            backoff.reset()
            self.assertLessEqual(backoff.next(), 0.24)
        self.assertNotEqual(len({RedisBackoff().next() for _ in range(20)}), 1)


def _nest(depth):
    value = 1
    for _ in range(depth):
        value = [value]
    return value


# ---------------------------------------------------------------------------
# Connections (one redis-server for the class)
# ---------------------------------------------------------------------------

@needs_redis
class RedisConnectionTests(unittest.IsolatedAsyncioTestCase):

    @classmethod
    def setUpClass(cls):
        cls.redis = RedisProcess()

    @classmethod
    def tearDownClass(cls):
        cls.redis.close()

    async def asyncSetUp(self):
        self.conn = RedisConnection(self.redis.url)
        await self.conn.connect()

    async def asyncTearDown(self):
        self.conn.close()

    def test_recorded_replies_split_everywhere(self):
        """Real replies of every type (nested XREAD, EXEC with an error
        inside, a Lua table with a status and an error, nulls) parse the
        same split at every byte."""
        commands = [
            ("PING",), ("SET", "rec:k", "v"), ("GET", "rec:k"), ("GET", "rec:none"),
            ("INCR", "rec:n"), ("INCRBY", "rec:n", -5), ("DEL", "rec:l"),
            ("RPUSH", "rec:l", "a", "", "é"), ("LRANGE", "rec:l", 0, -1),
            ("LRANGE", "rec:none", 0, -1), ("GET", "rec:l"), ("DEL", "rec:s"),
            ("XADD", "rec:s", "1-1", "f", "v"), ("XRANGE", "rec:s", "-", "+"),
            ("XREAD", "STREAMS", "rec:s", "0"), ("MULTI",), ("INCR", "rec:k"),
            ("SET", "rec:n2", "x"), ("EXEC",), ("BLPOP", "rec:none", "0.01"),
            ("EVAL", "return {1, {2, {3, 'x'}}, redis.status_reply('FINE'),"
                     " redis.error_reply('MYERR boom')}", 0),
        ]
        expected = [
            "PONG", "OK", b"v", None, 1, -4, 0, 3, [b"a", b"", "é".encode()], [],
            ("error", "WRONGTYPE Operation against a key holding the wrong kind of value"),
            0, b"1-1", [[b"1-1", [b"f", b"v"]]], [[b"rec:s", [[b"1-1", [b"f", b"v"]]]]],
            "OK", "QUEUED", "QUEUED",
            [("error", "ERR value is not an integer or out of range"), "OK"], None,
            [1, [2, [3, b"x"]], "FINE", ("error", "MYERR boom")],
        ]
        with socket.create_connection(("127.0.0.1", self.redis.port), 5) as s:
            s.sendall(b"".join(encode_command(*c) for c in commands))
            recording, reader, count = b"", RedisReader(), 0
            while count < len(commands):
                data = s.recv(65536)
                self.assertTrue(data, "redis closed the connection")
                recording += data
                reader.feed(data)
                while reader.gets() is not INCOMPLETE:
                    count += 1
        self.assertEqual(parse_all([recording]), expected)
        for i in range(len(recording) + 1):
            self.assertEqual(parse_all([recording[:i], recording[i:]]), expected, i)

    async def test_pipelining_in_order(self):
        """10,000 commands issued at once get their own replies, in order;
        an error reply raises in its caller only."""
        # Debug mode records a traceback per future: ten times slower here.
        asyncio.get_running_loop().set_debug(False)
        await self.conn.execute("DEL", "pipe:n")
        futures = []
        for i in range(10_000):
            futures.append(self.conn.execute("INCR", "pipe:n"))
            futures.append(self.conn.execute("ECHO", f"m{i}"))
        results = await asyncio.gather(*futures)
        self.assertEqual(results[0::2], list(range(1, 10_001)))
        self.assertEqual(results[1::2], [f"m{i}".encode() for i in range(10_000)])

        first = self.conn.execute("SET", "pipe:s", "x")
        bad = self.conn.execute("INCR", "pipe:s")
        last = self.conn.execute("GET", "pipe:s")
        self.assertEqual(await first, "OK")
        with self.assertRaises(RedisReplyError) as caught:
            await bad
        self.assertEqual(caught.exception.code, "ERR")
        self.assertEqual(await last, b"x")
        self.assertTrue(self.conn.connected)

    async def test_cancelled_caller_keeps_order(self):
        """A caller that gives up does not shift the replies of the others."""
        slow = asyncio.ensure_future(self.conn.execute("BLPOP", "cancel:none", "0.2"))
        after = self.conn.execute("ECHO", "after")
        await asyncio.sleep(0.05)
        slow.cancel()
        self.assertEqual(await after, b"after")
        self.assertEqual(await self.conn.execute("ECHO", "next"), b"next")

    async def test_unix_socket_and_select(self):
        """unix:// with ?db=N reaches the same server, in database N."""
        conn = RedisConnection(f"unix://{self.redis.socket_path}?db=3")
        await conn.connect()
        try:
            self.assertEqual(await conn.execute("SET", "unix:k", "in3"), "OK")
            self.assertIsNone(await self.conn.execute("GET", "unix:k"))
            tcp3 = RedisConnection(self.redis.url + "/3")
            await tcp3.connect()
            self.assertEqual(await tcp3.execute("GET", "unix:k"), b"in3")
            tcp3.close()
        finally:
            conn.close()
        bad = RedisConnection(f"unix://{self.redis.socket_path}.none")
        with self.assertRaises(RedisConnectionError):
            await bad.connect()

    async def test_select_refused(self):
        """A database that does not exist fails the connect, not later."""
        conn = RedisConnection(self.redis.url + "/99")
        with self.assertRaises(RedisConnectionError) as caught:
            await conn.connect()
        self.assertIn("DB index is out of range", str(caught.exception))
        self.assertTrue(conn.closed)

    async def test_command_timeout(self):
        """A command not answered in time raises RedisTimeout, closes the
        connection and fails every pending command at once."""
        conn = RedisConnection(self.redis.url, command_timeout=0.3)
        await conn.connect()
        start = time.monotonic()
        # Long enough that waiting it out is told from the 0.3 s timeout
        # on a busy machine.
        sleeping = conn.execute("DEBUG", "SLEEP", "2")
        behind = conn.execute("PING", timeout=10)
        with self.assertRaises(RedisTimeout):
            await sleeping
        with self.assertRaises(RedisConnectionError) as caught:
            await behind
        self.assertNotIsInstance(caught.exception, RedisTimeout)
        self.assertLess(time.monotonic() - start, bound(1.5, 0.6))
        self.assertTrue(conn.closed)
        self.assertIn("no reply within 0.3 s", conn.close_reason)
        with self.assertRaises(RedisConnectionError):
            conn.execute("PING")
        # The shared connection waits out the sleep; then all is well.
        self.assertEqual(await self.conn.execute("PING"), "PONG")

    async def test_connection_killed(self):
        """CLIENT KILL from another connection fails the pending command."""
        victim = RedisConnection(self.redis.url)
        await victim.connect()
        victim_id = await victim.execute("CLIENT", "ID")
        waiting = victim.execute("BLPOP", "kill:none", 5)
        self.assertEqual(await self.conn.execute("CLIENT", "KILL", "ID", victim_id), 1)
        with self.assertRaises(RedisConnectionError):
            await asyncio.wait_for(waiting, 5)
        await asyncio.wait_for(victim.wait_closed(), 5)
        self.assertEqual(victim.close_reason, "connection closed by the server")
        with self.assertRaises(RedisConnectionError):
            victim.execute("PING")

    async def test_nothing_listening(self):
        """No server: connect fails at once; an unconnected connection
        refuses commands instead of queueing them."""
        conn = RedisConnection(f"redis://127.0.0.1:{free_port()}")
        start = time.monotonic()
        with self.assertRaises(RedisConnectionError) as caught:
            await conn.connect()
        self.assertIn("refused", str(caught.exception))
        self.assertLess(time.monotonic() - start, 3)     # not the 5 s timeout
        with self.assertRaises(RedisConnectionError):
            conn.execute("PING")
        with self.assertRaises(RedisConnectionError):
            RedisConnection(self.redis.url).execute("PING")

    async def test_not_redis(self):
        """A server that answers garbage: the connect fails with a
        protocol error; one that never answers: a timeout."""
        async def http(reader, writer):
            await reader.read(100)
            writer.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
            await reader.read(100)
            writer.close()
        async def silent(reader, writer):
            await reader.read(100)
            await reader.read(100)
            writer.close()
        for handler, expected in ((http, "protocol error"), (silent, "no reply within")):
            server = await asyncio.start_server(handler, "127.0.0.1", 0)
            port = server.sockets[0].getsockname()[1]
            conn = RedisConnection(f"redis://127.0.0.1:{port}", connect_timeout=0.3)
            with self.assertRaises(RedisConnectionError) as caught:
                await conn.connect()
            self.assertIn(expected, str(caught.exception))
            server.close()
            await server.wait_closed()


AUTH_PASSWORD = "p@ss:w/rd%"     # every character a URL would misread


@needs_redis
class RedisAuthTests(unittest.IsolatedAsyncioTestCase):

    @classmethod
    def setUpClass(cls):
        cls.redis = RedisProcess("--requirepass", AUTH_PASSWORD)
        with socket.create_connection(("127.0.0.1", cls.redis.port), 5) as s:
            s.sendall(encode_command("AUTH", AUTH_PASSWORD)
                      + encode_command("ACL", "SETUSER", "alice", "on", ">alice pw",
                                       "~*", "+@all"))
            reply = b""
            while reply.count(b"\r\n") < 2:
                reply += s.recv(100)
            assert reply == b"+OK\r\n+OK\r\n", reply

    @classmethod
    def tearDownClass(cls):
        cls.redis.close()

    def url(self, login="", db=""):
        return f"redis://{login}127.0.0.1:{self.redis.port}{db}"

    async def test_password(self):
        """AUTH with a percent-encoded password, then SELECT."""
        conn = RedisConnection(self.url(":p%40ss%3Aw%2Frd%25@", "/2"))
        await conn.connect()
        self.assertEqual(await conn.execute("SET", "auth:k", "v"), "OK")
        info = (await conn.execute("CLIENT", "INFO")).decode()
        self.assertIn(" db=2 ", info)
        self.assertIn(" user=default ", info)
        conn.close()

    async def test_acl_user(self):
        """AUTH with a user name (Redis 6 ACL)."""
        conn = RedisConnection(self.url("alice:alice%20pw@"))
        await conn.connect()
        self.assertEqual(await conn.execute("ACL", "WHOAMI"), b"alice")
        conn.close()

    async def test_refused(self):
        """A wrong or missing password fails the connect, and the message
        names the reason without the password."""
        for login, reason in (("", "NOAUTH"), (":wrongsecret@", "WRONGPASS"),
                              ("alice:wrongsecret@", "WRONGPASS")):
            with self.subTest(login):
                conn = RedisConnection(self.url(login))
                with self.assertRaises(RedisConnectionError) as caught:
                    await conn.connect()
                self.assertIn(reason, str(caught.exception))
                self.assertNotIn("wrongsecret", str(caught.exception))
                self.assertTrue(conn.closed)


# ---------------------------------------------------------------------------
# The client that reconnects (a redis-server per test: they stop it)
# ---------------------------------------------------------------------------

@needs_redis
class RedisClientTests(unittest.IsolatedAsyncioTestCase):

    def setUp(self):
        self.redis = RedisProcess("--requirepass", "topsecret")
        self.url = f"redis://:topsecret@127.0.0.1:{self.redis.port}/1"
        self.hooks = 0

    def tearDown(self):
        self.redis.close()

    async def on_connect(self, client):
        self.hooks += 1
        self.assertFalse(client.connected)           # not before the catch-up
        await client.execute("SET", "hook:ran", self.hooks)

    async def client(self, **settings):
        client = RedisClient(self.url, on_connect=self.on_connect, **settings)
        client.start()
        self.addAsyncCleanup(client.close)
        self.assertTrue(await client.wait_connected(5))
        return client

    async def blocked(self, client, count=1):
        """Wait until Redis has `count` clients blocked (XREAD BLOCK sent)."""
        deadline = time.monotonic() + 5
        while True:
            info = (await client.execute("INFO", "clients")).decode()
            if re.search(r"^blocked_clients:%d\r?$" % count, info, re.M):
                return
            self.assertLess(time.monotonic(), deadline, info)
            await asyncio.sleep(0.01)

    async def until(self, condition, timeout=5):
        deadline = time.monotonic() + timeout
        while not condition():
            self.assertLess(time.monotonic(), deadline, "condition not reached")
            await asyncio.sleep(0.01)

    def assertQuietLog(self, records):
        for record in records:
            self.assertNotIn("topsecret", record.getMessage())
            self.assertIsNone(record.exc_info)

    async def test_reconnect_after_restart(self):
        """Redis stopped: pending commands fail, new ones fail at once;
        Redis back on the same port: the client reconnects by itself and
        runs on_connect again.  The log says so, without the password."""
        with self.assertLogs(LOGGER, "INFO") as logs:
            client = await self.client()
            self.assertEqual(self.hooks, 1)
            self.assertEqual(await client.execute("GET", "hook:ran"), b"1")
            waiting = client.execute("BLPOP", "restart:none", 5)
            await asyncio.to_thread(self.redis.stop)
            with self.assertRaises(RedisConnectionError):
                await asyncio.wait_for(waiting, 5)
            await self.until(lambda: not client.connected)
            with self.assertRaises(RedisConnectionError):
                client.execute("PING")
            # A failed attempt or two (the first says so in the log).
            await self.until(lambda: any("cannot connect" in r.getMessage()
                                         for r in logs.records))
            await asyncio.to_thread(self.redis.start)
            start = time.monotonic()
            self.assertTrue(await client.wait_connected(5))
            # At the next attempt: the back-off is still short (0.8 s at
            # most by now), not at its 5 s cap.
            self.assertLess(time.monotonic() - start, bound(3, 1.5))
            self.assertEqual(self.hooks, 2)
            self.assertEqual(await client.execute("GET", "hook:ran"), b"2")
        text = "\n".join(logs.output)
        self.assertIn("connection to redis://:***@127.0.0.1", text)
        self.assertIn("lost", text)
        self.assertIn("cannot connect", text)
        self.assertEqual(text.count("connected to"), 2, text)
        self.assertEqual(text.count("cannot connect"), 1, text)   # not per attempt
        self.assertQuietLog(logs.records)

    async def test_started_while_down(self):
        """A client started with Redis down says so once, keeps trying,
        and connects when Redis comes up."""
        await asyncio.to_thread(self.redis.stop)
        client = RedisClient(self.url)
        with self.assertLogs(LOGGER, "INFO") as logs:
            client.start()
            self.addAsyncCleanup(client.close)
            self.assertFalse(await client.wait_connected(0.5))
            self.assertFalse(client.connected)
            self.assertIn("refused", client.last_error)
            with self.assertRaises(RedisConnectionError):
                client.execute("PING")
            await asyncio.to_thread(self.redis.start)
            self.assertTrue(await client.wait_connected(3))
        self.assertEqual(await client.execute("PING"), "PONG")
        self.assertIn("WARNING", logs.output[0])
        self.assertQuietLog(logs.records)

    async def test_on_connect_failure_retried(self):
        """An on_connect that fails (here a Redis error) drops the
        connection and is retried with the back-off."""
        calls = []
        async def hook(client):
            calls.append(time.monotonic())
            if len(calls) < 3:
                await client.execute("NO-SUCH-COMMAND")
        client = RedisClient(self.url, on_connect=hook)
        with self.assertLogs(LOGGER, "INFO") as logs:
            client.start()
            self.addAsyncCleanup(client.close)
            self.assertTrue(await client.wait_connected(3))
        self.assertEqual(len(calls), 3)
        self.assertGreater(calls[1] - calls[0], 0.15)
        self.assertIn("unknown command", "\n".join(logs.output))
        self.assertQuietLog(logs.records)

    async def test_evalsha_noscript(self):
        """evalsha falls back to EVAL after SCRIPT FLUSH, which caches the
        script again; other script errors still raise."""
        client = await self.client()
        script = "return {KEYS[1], ARGV[1], redis.call('INCR', KEYS[1])}"
        sha = script_sha(script)
        self.assertEqual(await client.evalsha(sha, script, ["lua:n"], ["a"]),
                         [b"lua:n", b"a", 1])
        self.assertEqual(await client.execute("SCRIPT", "FLUSH"), "OK")
        self.assertEqual(await client.execute("SCRIPT", "EXISTS", sha), [0])
        self.assertEqual(await client.evalsha(None, script, ["lua:n"], [2]),
                         [b"lua:n", b"2", 2])
        self.assertEqual(await client.execute("SCRIPT", "EXISTS", sha), [1])
        await client.execute("SET", "lua:s", "x")
        with self.assertRaises(RedisReplyError):
            await client.evalsha(None, "return redis.call('INCR', KEYS[1])", ["lua:s"])

    async def test_blocking_on_own_connection(self):
        """XREAD BLOCK runs on a dedicated connection: other commands pass
        meanwhile, a push wakes it, and its timeout is block plus the
        command timeout."""
        client = await self.client(command_timeout=0.3)
        reading = asyncio.ensure_future(client.execute_blocking(
            "XREAD", "BLOCK", 2000, "STREAMS", "blk:s", "$", block=2))
        await self.blocked(client)
        start = time.monotonic()
        self.assertEqual(await client.execute("PING"), "PONG")
        # Not behind the 2 s block.
        self.assertLess(time.monotonic() - start, bound(1, 0.1))
        first = await client.execute("XADD", "blk:s", "*", "f", "v")
        self.assertEqual(await asyncio.wait_for(reading, 5),
                         [[b"blk:s", [[first, [b"f", b"v"]]]]])
        # BLOCK 500 ms with a 0.3 s command timeout: no RedisTimeout.
        self.assertIsNone(await client.execute_blocking(
            "XREAD", "BLOCK", 500, "STREAMS", "blk:s", first, block=0.5))
        # Cancelled mid-block: its connection is dropped so a later call
        # cannot receive the stale reply.
        reading = asyncio.ensure_future(client.execute_blocking(
            "XREAD", "BLOCK", 1000, "STREAMS", "blk:s", "$", block=1))
        await self.blocked(client)
        reading.cancel()
        await client.execute("XADD", "blk:s", "*", "g", "w")
        self.assertEqual(await client.execute_blocking(
            "XREAD", "COUNT", 1, "BLOCK", 500, "STREAMS", "blk:s", "0-0", block=0.5),
            [[b"blk:s", [[first, [b"f", b"v"]]]]])
        with self.assertRaises(ValueError):
            await client.execute_blocking("XREAD", "BLOCK", 0, "STREAMS", "blk:s", "$", block=0)
        # Its connection killed mid-block: the call fails, the next one
        # opens a new connection.
        blocking_id = await client.execute_blocking("CLIENT", "ID", block=0.1)
        reading = asyncio.ensure_future(client.execute_blocking(
            "XREAD", "BLOCK", 1000, "STREAMS", "blk:s", "$", block=1))
        await self.blocked(client)
        self.assertEqual(await client.execute("CLIENT", "KILL", "ID", blocking_id), 1)
        with self.assertRaises(RedisConnectionError):
            await asyncio.wait_for(reading, 5)
        self.assertNotEqual(await client.execute_blocking("CLIENT", "ID", block=0.1),
                            blocking_id)
        # Not answered within block + command timeout (0.1 + 0.3 s); the
        # sleep is long enough to tell on a busy machine.
        start = time.monotonic()
        with self.assertRaises(RedisTimeout):
            await client.execute_blocking("DEBUG", "SLEEP", "2", block=0.1)
        self.assertLess(time.monotonic() - start, bound(1.5, 0.6))


@needs_redis
class RedisLogTailTests(unittest.IsolatedAsyncioTestCase):
    """How one instance follows the shared log, in process, against a real
    Redis: two stores on one prefix stand for two instances."""

    def setUp(self):
        self.redis = RedisProcess()
        self.addCleanup(self.redis.close)      # after the stores' cleanups

    async def store(self):
        loop = asyncio.get_running_loop()
        config = simple_comet.Config(redis=self.redis.url)
        store = simple_comet.RedisStore(config, loop)
        simple_comet.Hub(config, loop, store)
        store.open()
        self.addAsyncCleanup(store.close)
        self.assertTrue(await store.client.wait_connected(5))
        self.assertTrue(await store.catch_up())
        return store

    def ids(self, store, name):
        return [message_id for message_id, _ in store.channels[name].messages]

    async def test_gap_in_a_push_reply_reads_the_log_at_once(self):
        """While a push of its own is unanswered an instance does not read
        the log (it would read its own entries back); an entry pushed
        elsewhere meanwhile shows as a gap in its next push's reply, and
        it reads the log then, rather than after its idle wait of 1 s."""
        a, b = await self.store(), await self.store()
        await a.add_channel("t", 100, 0)
        first = await a.push("t", "one")
        self.assertTrue(await b.catch_up())
        a.replica.writing += 1            # as if a push were under way
        second = await a.push("t", "two")  # ends the read that was waiting
        await asyncio.sleep(0.05)
        elsewhere = await b.push("t", "three")
        await asyncio.sleep(0.3)
        self.assertEqual(len(self.ids(a, "t")), 2)    # not read yet
        start = time.monotonic()
        mine = await a.push("t", "four")
        report(f"a gap in a push reply read in {time.monotonic() - start:.3f} s")
        self.assertLess(time.monotonic() - start, bound(0.5, 0.25))
        self.assertEqual(self.ids(a, "t"), [first[0], second[0],
                                            elsewhere[0], mine[0]])
        a.replica.writing -= 1

    async def test_pushes_together(self):
        """Pushes made in one turn of the loop go in scripts of up to
        REDIS_PUSH_BATCH: each gets its own id, in the order made, its own
        refusal for a channel that does not exist, and they are applied in
        order; after SCRIPT FLUSH they are sent again with the script."""
        a, b = await self.store(), await self.store()
        await a.add_channel("p", 1000, 0)
        count = simple_comet.REDIS_PUSH_BATCH * 2 + 7

        async def together(names):
            return await asyncio.gather(
                *[a.push(name, f"m{i}") for i, name in enumerate(names)],
                return_exceptions=True)

        for flush in (False, True):
            if flush:
                self.assertEqual(await a.client.execute("SCRIPT", "FLUSH"), "OK")
            names = ["p"] * count
            names[5] = "nowhere"
            names[count - 1] = "bad|name"
            replies = await together(names)
            self.assertEqual(replies[5].return_code, simple_comet.NO_CHANNEL)
            self.assertEqual(replies[5].message, "Nonexistent channel")
            self.assertEqual(replies[-1].return_code, simple_comet.BAD_PARAMETER)
            pushed = [r[0] for i, r in enumerate(replies) if i not in (5, count - 1)]
            self.assertEqual(pushed, sorted(set(pushed)))
            self.assertEqual(self.ids(a, "p")[-len(pushed):], pushed)
            self.assertTrue(await b.catch_up())
            self.assertEqual(self.ids(b, "p")[-len(pushed):], pushed)
            contents = [json.loads(text)["content"] for _, text in
                        list(b.channels["p"].messages)[-len(pushed):]]
            self.assertEqual(contents, [f"m{i}" for i in range(count)
                                        if i not in (5, count - 1)])

    async def evalsha_calls(self, store):
        stats = (await store.client.execute("INFO", "commandstats")).decode()
        found = re.search(r"cmdstat_evalsha:calls=(\d+)", stats)
        return int(found.group(1)) if found else 0

    async def test_large_pushes_split(self):
        """Messages together over REDIS_PUSH_BYTES go in several scripts,
        so that one script never holds Redis long; a message larger than
        that goes alone."""
        a = await self.store()
        await a.add_channel("big", 10, 0)
        third = simple_comet.REDIS_PUSH_BYTES // 3 - 100
        sizes = [third] * 6 + [simple_comet.REDIS_PUSH_BYTES + 1, 10]
        before = await self.evalsha_calls(a)
        replies = await asyncio.gather(
            *[a.push("big", str(i) * size) for i, size in enumerate(sizes)])
        self.assertEqual(await self.evalsha_calls(a) - before, 4)
        self.assertEqual([r[0] for r in replies], sorted(r[0] for r in replies))
        texts = [json.loads(text)["content"]
                 for _, text in a.channels["big"].messages]
        self.assertEqual([len(t) for t in texts], sizes)


class RedisLogBoundTests(unittest.IsolatedAsyncioTestCase):
    """The shared log is bounded in bytes as well as in entries, exactly:
    its byte count is what its entries hold, and instances go on."""

    part = "C"                  # run by the second process, see main()

    def setUp(self):
        self.redis = RedisProcess()
        self.addCleanup(self.redis.close)

    async def test_log_is_bounded_in_bytes(self):
        loop = asyncio.get_running_loop()
        config = simple_comet.Config(redis=self.redis.url)
        stores = []
        for _ in range(2):
            store = simple_comet.RedisStore(config, loop)
            simple_comet.Hub(config, loop, store)
            store.open()
            self.addAsyncCleanup(store.close)
            self.assertTrue(await store.client.wait_connected(5))
            self.assertTrue(await store.catch_up())
            stores.append(store)
        a, b = stores
        await a.add_channel("big", 2, 0)
        size = 700 * 1024
        count = simple_comet.REDIS_LOG_BYTES // size + 30   # past the bound
        for i in range(count):
            await a.push("big", str(i % 10) * size)
        log_key = a.k["log"]
        entries = await a.client.execute("XRANGE", log_key, "-", "+")
        held = sum(len(fields[1]) for _, fields in entries)
        self.assertLessEqual(held, simple_comet.REDIS_LOG_BYTES)
        self.assertGreater(held, simple_comet.REDIS_LOG_BYTES * 7 // 8)
        self.assertEqual(int(await a.client.execute("GET", log_key + ":bytes")),
                         held)
        # The other instance followed, and both agree on the history.
        self.assertTrue(await b.catch_up())
        last = await a.push("big", "last")
        self.assertTrue(await b.catch_up())
        self.assertEqual([i for i, _ in b.channels["big"].messages],
                         [i for i, _ in a.channels["big"].messages])
        self.assertEqual(b.channels["big"].messages[-1][0], last.id)


# ---------------------------------------------------------------------------
# The change core, the state file's records and the stores, in process
# ---------------------------------------------------------------------------

class FakeLoop:
    def __init__(self):
        self.now = 100.0

    def time(self):
        return self.now


class FakeHub:
    def __init__(self):
        self.delivered = []
        self.removed = []

    def deliver(self, channel, message_id, text, ephemeral=False, kind=None):
        self.delivered.append((channel.name, message_id))
        return len(channel.waiters)

    def channel_removed(self, channel):
        self.removed.append(channel.name)


def core_state(core):
    """What a core holds, comparable."""
    return ({name: (c.max_messages, c.options, c.dropped_id,
                    list(c.messages or ()))
             for name, c in core.channels.items()},
            list(core.clients), core.last_id)


class CoreTests(unittest.TestCase):
    """Core applies every change, idempotently, for every store."""

    def setUp(self):
        self.core = simple_comet.Core(simple_comet.Config(), FakeLoop())
        self.hub = self.core.hub = FakeHub()

    def test_channels_and_clients(self):
        core = self.core
        first = core.apply_channel("a", 3, False)
        self.assertIs(core.apply_channel("a", 9, 1, dropped_id=7), first)
        self.assertEqual((first.max_messages, first.options,
                          first.dropped_id), (3, 0, 7))
        core.apply_channel("a", 3, False, dropped_id=2)
        self.assertEqual(first.dropped_id, 7)          # never goes back
        core.apply_client("c")
        core.apply_client("c")
        self.assertEqual(list(core.clients), ["c"])
        self.assertEqual(core.added, 2)
        core.apply_forget("c")
        core.apply_forget("c")
        core.apply_remove("a")
        core.apply_remove("a")
        self.assertEqual((dict(core.channels), dict(core.clients)), ({}, {}))
        self.assertEqual(self.hub.removed, [])         # nobody waited

    def test_pushes(self):
        core = self.core
        channel = core.apply_channel("a", 2, False)
        base = core.last_id
        self.assertEqual(core.apply_push(channel, base + 1, "m1"), 0)
        self.assertEqual(core.apply_push(channel, base + 1, "again"), 0)
        self.assertEqual(core.apply_push(channel, base, "older"), 0)
        self.assertEqual(list(channel.messages), [(base + 1, "m1")])
        # A channel not known here: only the counter moves.
        self.assertEqual(core.apply_push(None, base + 5, "x"), 0)
        self.assertEqual(core.last_id, base + 5)
        channel.waiters = {object(): None, object(): None}
        self.assertEqual(core.apply_push(channel, base + 6, "m2"), 2)
        self.assertEqual(core.apply_push(channel, base + 7, "m3"), 2)
        self.assertEqual(self.hub.delivered, [("a", base + 6), ("a", base + 7)])
        self.assertEqual(channel.dropped_id, base + 1)
        self.assertEqual(list(channel.messages),
                         [(base + 6, "m2"), (base + 7, "m3")])
        core.apply_counter(base)                       # never backwards
        self.assertEqual(core.last_id, base + 7)
        core.apply_remove("a")
        self.assertEqual(self.hub.removed, ["a"])

    def test_message_layout(self):
        text = simple_comet.message_text(1234567, "h\u00e9 \"q\"\n")
        self.assertEqual(simple_comet.message_id_of(text), 1234567)
        self.assertEqual(json.loads(text)["content"], "h\u00e9 \"q\"\n")
        self.assertNotIn("\n", text)


class RecordTests(unittest.TestCase):
    """The state file's records, and their replay through the core."""

    def journal(self):
        sc = simple_comet
        channel = sc.Channel("r\u00e9\tom", 2, True, 0)
        return b"".join([
            sc.counter_record(500),
            sc.channel_record("r\u00e9\tom", 2, True),
            sc.channel_record("gone", 5, False, 40),
            sc.client_record("c|1"),
            sc.client_record("c2"),
            sc.message_record(channel, 600, '{"id": 600, "ts": 1, "content": "a"}'),
            sc.message_record(channel, 601, '{"id": 601, "ts": 1, "content": "b"}'),
            sc.message_record(channel, 602, '{"id": 602, "ts": 1, "content": "c"}'),
            sc.removal_record("gone"),
            sc.client_record("c2", "x"),
            sc.counter_record(900, padding=20),
        ])

    def replayed(self, data):
        core = simple_comet.Core(simple_comet.Config(), FakeLoop())
        end = simple_comet.replay(core, data, "PATH")
        return core, end

    def test_replay(self):
        data = self.journal()
        core, end = self.replayed(data)
        self.assertEqual(end, len(data))
        channels, clients, last_id = core_state(core)
        self.assertEqual(list(channels), ["r\u00e9\tom"])
        max_messages, use_sessions, dropped, messages = channels["r\u00e9\tom"]
        self.assertEqual((max_messages, use_sessions, dropped), (2, 1, 600))
        self.assertEqual([i for i, _ in messages], [601, 602])
        self.assertEqual(clients, ["c|1"])
        self.assertGreaterEqual(last_id, 900)
        self.assertTrue(all(line.endswith(b"\n") and line[8:9] == b" "
                            for line in data.splitlines(True)))

    def test_replay_is_idempotent(self):
        """A journal replayed after its own snapshot (what compaction
        relies on) changes nothing."""
        data = self.journal()
        once, _ = self.replayed(data)
        twice, _ = self.replayed(data + data[data.index(b"\n") + 1:])
        self.assertEqual(core_state(once)[:2], core_state(twice)[:2])

    def test_torn_last_record_is_dropped(self):
        data = self.journal()
        last = data.rindex(b"\n", 0, len(data) - 1) + 1
        for cut in (last + 1, last + 9, len(data) - 1):
            core, end = self.replayed(data[:cut])
            self.assertEqual(end, last, cut)
        damaged = data[:last + 12] + b"X" + data[last + 13:]
        core, end = self.replayed(damaged)
        self.assertEqual(end, last)

    def test_damage_in_the_middle_stops(self):
        data = bytearray(self.journal())
        second = data.index(b"\n") + 1
        data[second + 12] ^= 1
        with self.assertRaises(simple_comet.StartupError) as caught:
            self.replayed(bytes(data))
        self.assertIn(f"PATH: damaged record at byte {second}",
                      str(caught.exception))
        unknown = simple_comet.record("z\tnothing")
        with self.assertRaises(simple_comet.StartupError):
            self.replayed(unknown + simple_comet.counter_record(1))


class DeadlinesTests(unittest.TestCase):
    def test_order(self):
        queue = simple_comet.Deadlines()
        for name, when in (("a", 1.0), ("b", 2.0), ("c", 3.0)):
            queue.add(name, when)
        self.assertEqual(queue.expired(2.0), ["a", "b"])
        queue.move("a", 4.0)
        queue.move("nobody", 5.0)                      # gone: nothing
        self.assertEqual(list(queue), ["b", "c", "a"])
        self.assertTrue(queue.remove("b"))
        self.assertFalse(queue.remove("b"))
        self.assertEqual(queue.expired(3.5), ["c"])
        self.assertEqual(len(queue), 2)
        self.assertEqual(queue.expired(0), [])


class StoreContractTests(unittest.IsolatedAsyncioTestCase):
    """The memory store and the state-file store answer writes alike, and
    the state file keeps what was acknowledged."""

    async def store(self, kind, path=None):
        loop = asyncio.get_running_loop()
        config = simple_comet.Config(state_file=path)
        store = kind(config, loop)
        store.hub = FakeHub()
        store.open()
        self.addAsyncCleanup(store.close)
        return store

    async def check_writes(self, store):
        sc = simple_comet
        self.assertIsNone(await store.add_channel("a", 2, 0))
        with self.assertRaises(sc.APIError) as caught:
            await store.add_channel("a", 2, 0)
        self.assertEqual(caught.exception.return_code, sc.NO_CHANNEL)
        self.assertIsNone(await store.add_client("c"))
        with self.assertRaises(sc.APIError):
            await store.add_client("c")
        pushed = await store.push("a", "one")
        self.assertIsInstance(pushed, sc.Pushed)
        self.assertEqual((pushed.delivered, pushed.instances), (0, None))
        self.assertEqual(pushed.id, store.last_id)
        with self.assertRaises(sc.APIError) as caught:
            await store.push("nowhere", "x")
        self.assertEqual(caught.exception.message, "Nonexistent channel")
        await store.add_channel("b", 5, simple_comet.SESSIONS)
        self.assertTrue(await store.remove_channel("b"))
        self.assertFalse(await store.remove_channel("b"))
        self.assertTrue(await store.catch_up())
        return pushed

    async def test_memory(self):
        await self.check_writes(await self.store(simple_comet.MemoryStore))

    async def test_state_file(self):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "state")
            store = await self.store(simple_comet.StateFileStore, path)
            pushed = await self.check_writes(store)
            before = core_state(store)
            await store.close()
            again = await self.store(simple_comet.StateFileStore, path)
            self.assertEqual(core_state(again)[:2], before[:2])
            self.assertGreaterEqual(again.last_id, pushed.id)
            # A journal that cannot be trusted refuses, with nothing kept.
            with self.assertLogs("simple_comet", "ERROR"):
                again.journal.trouble(again.journal.BROKEN, "test")
            with self.assertRaises(simple_comet.HTTPError) as caught:
                await again.push("a", "two")
            self.assertEqual(caught.exception.status, 503)
            self.assertEqual(len(again.channels["a"].messages), 1)
            self.assertEqual(again.health(), "state file not writable: test")


# ---------------------------------------------------------------------------
# D1. Tokens in process: key files, verification, interop with PyJWT and
# Node's jsonwebtoken, forgeries, limits, the cache
# ---------------------------------------------------------------------------

NOW = 1_700_000_000.0

try:
    import jwt as pyjwt
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import padding
except ImportError:
    pyjwt = None
# Node's jsonwebtoken, as .ci/run installs it (npm install --prefix .ci/node).
NODE_DIR = os.path.join(HERE, ".ci", "node")
HAVE_NODE = (shutil.which("node") is not None and os.path.isdir(
    os.path.join(NODE_DIR, "node_modules", "jsonwebtoken")))
HAVE_OPENSSL = shutil.which("openssl") is not None
needs_pyjwt = unittest.skipUnless(pyjwt, "PyJWT and cryptography missing")
needs_node = unittest.skipUnless(HAVE_NODE, "node or jsonwebtoken missing")

SECRET1 = "s1-" + "0123456789abcdef" * 4           # 67 bytes: fine for HS512
SECRET2 = "s2-" + "fedcba9876543210" * 4
SECRET3 = "s3-" + "not configured anywhere!" * 3
PEM = {}        # name -> PEM text: rsa1, rsa2 (private), rsa1.pub, ...
PRIVATE = {}    # name -> loaded private key (cryptography)
TMP = None


def openssl(*args, stdin=None):
    return subprocess.run(("openssl",) + args, input=stdin, check=True,
                          capture_output=True, text=True).stdout


def make_token_keys():
    """RSA keys for the token tests, made once by openssl."""
    global TMP
    if TMP is not None:
        return
    if not HAVE_OPENSSL:
        raise unittest.SkipTest("openssl missing")
    TMP = tempfile.mkdtemp(prefix="tokens-test-")
    atexit.register(shutil.rmtree, TMP, True)
    for name, options in (("rsa1", ["-pkeyopt", "rsa_keygen_bits:2048"]),
                          ("rsa2", ["-pkeyopt", "rsa_keygen_bits:2048"]),
                          ("rsa1024", ["-pkeyopt", "rsa_keygen_bits:1024"]),
                          ("rsa_e3", ["-pkeyopt", "rsa_keygen_bits:2048",
                                      "-pkeyopt", "rsa_keygen_pubexp:3"])):
        PEM[name] = openssl("genpkey", "-algorithm", "RSA", *options)
        PEM[name + ".pub"] = openssl("pkey", "-pubout", stdin=PEM[name])
    PEM["rsa1.pkcs1"] = openssl("rsa", "-pubin", "-RSAPublicKey_out",
                                stdin=PEM["rsa1.pub"])
    PEM["ec"] = openssl("genpkey", "-algorithm", "EC",
                        "-pkeyopt", "ec_paramgen_curve:P-256")
    PEM["ec.pub"] = openssl("pkey", "-pubout", stdin=PEM["ec"])


# Tokens minted by hand

def b64u(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def token_part(value):
    """A JSON value (or raw bytes) as a base64url part."""
    if not isinstance(value, bytes):
        value = json.dumps(value).encode()
    return b64u(value)


def mint_hs(payload, secret=SECRET1, alg="HS256", header=None):
    header = {"alg": alg, "typ": "JWT"} if header is None else header
    signed = token_part(header) + "." + token_part(payload)
    digest = {"HS256": "sha256", "HS384": "sha384", "HS512": "sha512"}
    key = secret.encode() if isinstance(secret, str) else secret
    return signed + "." + b64u(hmac.digest(key, signed.encode(),
                                           digest.get(alg, "sha256")))


def rsa_numbers(name):
    key = simple_comet.parse_key_file(PEM[name + ".pub"], name).rsa[0]
    return key.n, key.e, key.size


def mint_rs(payload, name="rsa1", header=None, signature=None):
    """An RS256 token signed with cryptography, or with a given signature
    (bytes, or a function of the right one)."""
    header = {"alg": "RS256", "typ": "JWT"} if header is None else header
    signed = token_part(header) + "." + token_part(payload)
    if callable(signature) or signature is None:
        if name not in PRIVATE:             # loading checks the key: slow
            PRIVATE[name] = serialization.load_pem_private_key(
                PEM[name].encode(), None)
        right = PRIVATE[name].sign(signed.encode(), padding.PKCS1v15(),
                             hashes.SHA256())
        signature = signature(right) if signature else right
    return signed + "." + b64u(signature)


NODE_SIGN = """
const jwt = require('jsonwebtoken');
const specs = JSON.parse(require('fs').readFileSync(0, 'utf8'));
process.stdout.write(JSON.stringify(
    specs.map(s => jwt.sign(s.payload, s.key, s.options))));
"""


def node_sign(*specs):
    """Tokens minted by jsonwebtoken: specs are (payload, key, options)."""
    specs = [{"payload": p, "key": k, "options": o} for p, k, o in specs]
    out = subprocess.run(["node", "-e", NODE_SIGN], cwd=NODE_DIR, check=True,
                         input=json.dumps(specs), capture_output=True,
                         text=True).stdout
    return json.loads(out)


def key_file(*names):
    """Key file text: names are "h1"/"h2" (SECRET1/2), or PEM names;
    "name=kid" gives a kid line."""
    lines = ["# made by the tests", ""]
    for item in names:
        name, _, kid = item.partition("=")
        if kid:
            lines.append(f"kid {kid}")
        lines.append({"h1": SECRET1, "h2": SECRET2}.get(name)
                     or PEM.get(name + ".pub") or PEM[name])
        lines.append("")
    return "\n".join(lines)


def claims_payload(**extra):
    return {"sub": "alice", "exp": NOW + 3600, **extra}


class TokenTestCase(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        make_token_keys()

    def setUp(self):
        self.keys = simple_comet.parse_key_file(
            key_file("h1=h1", "h2=h2", "rsa1=r1", "rsa2=r2"), "keys")
        self.unnamed = simple_comet.parse_key_file(key_file("h1", "rsa1"), "unnamed")

    def accept(self, token, keys=None, now=NOW, **options):
        return simple_comet.verify_token(token, keys or self.unnamed, now, **options)

    def refuse(self, token, reason, keys=None, now=NOW, **options):
        with self.assertRaises(simple_comet.TokenError) as caught:
            simple_comet.verify_token(token, keys or self.unnamed, now, **options)
        self.assertEqual(caught.exception.reason, reason,
                         caught.exception.detail)
        self.assertEqual(str(caught.exception), f"token {reason}")
        return caught.exception


# Key files

def der_length(n):
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def tlv(tag, body, long=False):
    length = der_length(len(body))
    if long and len(length) == 1:       # the long form where DER forbids it
        length = b"\x81" + length
    return bytes([tag]) + length + body


def der_int(value):
    return tlv(2, value.to_bytes(value.bit_length() // 8 + 1, "big"))


def spki(n, e, oid=bytes.fromhex("2a864886f70d010101"), params=b"\x05\x00",
         unused=b"\0", n_der=None, long=False, after=b""):
    rsa = tlv(0x30, (n_der or der_int(n)) + der_int(e))
    return tlv(0x30, tlv(0x30, tlv(6, oid) + params, long)
               + tlv(3, unused + rsa) + after)


def pem(der, label="PUBLIC KEY"):
    body = base64.b64encode(der).decode()
    lines = [body[i:i + 64] for i in range(0, len(body), 64)]
    return "\n".join([f"-----BEGIN {label}-----", *lines,
                      f"-----END {label}-----", ""])


class TokenKeyFileTests(TokenTestCase):

    part = "D"                  # run by the third process, see main()
    def test_several_keys_with_kids_and_comments(self):
        keys = self.keys
        self.assertEqual((len(keys.hmac), len(keys.rsa), len(keys)), (2, 2, 4))
        self.assertEqual(sorted(keys.named), ["h1", "h2", "r1", "r2"])
        self.assertEqual(keys.named["h2"].secret, SECRET2.encode())
        self.assertEqual(keys.named["r2"].n, rsa_numbers("rsa2")[0])
        self.assertEqual(repr(keys), "<TokenKeys: 2 HMAC, 2 RSA>")
        self.assertNotIn(SECRET1, repr(keys.hmac) + repr(keys.named))
        self.assertEqual(self.unnamed.named, {})

    def test_kid_may_be_separated_by_comments_and_blank_lines(self):
        text = f"kid one\n\n# the first one\n  {SECRET1}  \r\n"
        self.assertEqual(simple_comet.parse_key_file(text, "k").named["one"].secret,
                         SECRET1.encode())

    def test_crlf_and_bom(self):
        text = "\ufeff# comment\r\n" + PEM["rsa1.pub"].replace("\n", "\r\n")
        self.assertEqual(simple_comet.parse_key_file(text, "k").rsa[0].n,
                         rsa_numbers("rsa1")[0])

    def test_secret_of_32_bytes_counts_utf8_bytes(self):
        self.assertEqual(len(simple_comet.parse_key_file("a" * 32, "k")), 1)
        self.assertEqual(len(simple_comet.parse_key_file("é" * 16, "k")), 1)  # 32 bytes
        with self.assertRaisesRegex(simple_comet.KeyFileError, "31 bytes"):
            simple_comet.parse_key_file("é" * 15 + "a", "k")

    def test_blank_lines_inside_a_pem_block_are_ignored(self):
        text = PEM["rsa1.pub"].replace("\n", "\n\n", 3)
        self.assertEqual(simple_comet.parse_key_file(text, "k").rsa[0].n,
                         rsa_numbers("rsa1")[0])

    def test_pkcs1_public_key_gives_the_same_numbers(self):
        key = simple_comet.parse_key_file(PEM["rsa1.pkcs1"], "k").rsa[0]
        self.assertIn("BEGIN RSA PUBLIC KEY", PEM["rsa1.pkcs1"])
        self.assertEqual((key.n, key.e), rsa_numbers("rsa1")[:2])

    @needs_pyjwt
    def test_numbers_match_cryptography(self):
        for name in ("rsa1", "rsa2", "rsa_e3"):
            numbers = serialization.load_pem_public_key(
                PEM[name + ".pub"].encode()).public_numbers()
            self.assertEqual(rsa_numbers(name)[:2], (numbers.n, numbers.e))
        self.assertEqual(rsa_numbers("rsa_e3")[1], 3)

    def assertKeyFileError(self, text, *phrases):
        with self.assertRaises(simple_comet.KeyFileError) as caught:
            simple_comet.parse_key_file(text, "/etc/comet/keys")
        message = str(caught.exception)
        self.assertTrue(message.startswith("/etc/comet/keys: "), message)
        self.assertNotIn("\n", message)
        for phrase in phrases:
            self.assertIn(phrase, message)
        for secret in (SECRET1, "a" * 31, "MII"):
            self.assertNotIn(secret, message)
        return message

    def test_errors(self):
        pub = PEM["rsa1.pub"]
        der = base64.b64decode("".join(pub.splitlines()[1:-1]))
        cases = [
            ("", "no key"),
            ("# only a comment\n\n   \n", "no key"),
            ("a" * 31, "line 1", "31 bytes", "at least 32"),
            ("# one\n" + pub.rsplit("-----END", 1)[0], "line 2", "END line"),
            (pub.replace("MII", "M*I", 1), "base64"),
            (pem(der[:-10]), "unparsable public key"),
            (pem(der + b"\0\0"), "trailing"),
            (PEM["rsa1"], "private key", "give the public key", "-pubout"),
            (PEM["rsa1"].replace(" PRIVATE", " RSA PRIVATE"), "private key"),
            ("-----BEGIN ENCRYPTED PRIVATE KEY-----\n", "private key"),
            ("-----BEGIN CERTIFICATE-----\nMII\n-----END CERTIFICATE-----",
             "certificate", "-pubkey"),
            (PEM["ec.pub"], "not an RSA public key"),
            (PEM["rsa1024.pub"], "1024 bits", "2048"),
            ("-----BEGIN EC PARAMETERS-----\n", "not an RSA public key"),
            ("-----END PUBLIC KEY-----\n", "END"),
            ("-----BEGIN PUBLIC KEY----\n", "BEGIN"),
            (f"{SECRET1}\nkid last\n", "line 2", "not followed by a key"),
            (f"kid a\nkid b\n{SECRET1}\n", "line 1", "'a'",
             "not followed by a key"),
            (f"kid a\n{SECRET1}\nkid a\n{SECRET2}\n", "line 3", "two keys"),
            (f"kid\n{SECRET1}\n", "kid without a name"),
            ("ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQC user@host", "OpenSSH"),
        ]
        for text, *phrases in cases:
            with self.subTest(phrases=phrases):
                self.assertKeyFileError(text, *phrases)

    def test_der_is_read_strictly(self):
        n, e, _ = rsa_numbers("rsa1")
        self.assertEqual(simple_comet.parse_key_file(pem(spki(n, e)), "k").rsa[0].n, n)
        big = simple_comet.parse_key_file(pem(spki(2 ** 4095 + 1, e)), "k").rsa[0]
        self.assertEqual((big.n.bit_length(), big.size), (4096, 512))
        self.assertEqual(   # parameters may be absent (seen in the wild)
            simple_comet.parse_key_file(pem(spki(n, e, params=b"")), "k").rsa[0].n, n)
        good = spki(n, e)
        cases = {
            "long form for a short length": spki(n, e, long=True),
            "leading zero in a length": b"\x30\x83\0" + good[2:],
            "indefinite length": b"\x30\x80" + good[4:] + b"\0\0",
            "negative modulus": spki(
                n, e, n_der=tlv(2, n.to_bytes(256, "big"))),
            "non-minimal integer": spki(
                n, e, n_der=tlv(2, b"\0\0" + n.to_bytes(256, "big"))),
            "unused bits": spki(n, e, unused=b"\x01"),
            "empty BIT STRING": tlv(0x30, tlv(0x30, tlv(
                6, simple_comet.RSA_ENCRYPTION_OID) + b"\x05\x00") + b"\x03\x00"),
            "element after the key": spki(n, e, after=b"\x05\x00"),
            "other parameters": spki(n, e, params=b"\x02\x01\x00"),
            "PSS key": spki(n, e, oid=bytes.fromhex("2a864886f70d01010a")),
            "exponent 1": spki(n, 1),
            "even exponent": spki(n, 65536),
            "even modulus": spki(n + 1, e),
            "4097 bits": spki(2 ** 4096 + 1, e),
            "huge exponent": spki(n, 2 ** 300 + 1),
            "bad tag": b"\x31" + good[1:],
        }
        self.assertEqual(good[1], 0x82)
        for name, der in cases.items():
            with self.subTest(name):
                self.assertKeyFileError(pem(der))
        self.assertKeyFileError(pem(rsa_der := tlv(0x30, der_int(n)
                                                   + der_int(e)) + b"\0",
                                    "RSA PUBLIC KEY"), "trailing")
        self.assertTrue(rsa_der)


# Accepted tokens

@needs_pyjwt
class TokenPyJWTTests(TokenTestCase):

    part = "D"                  # run by the third process, see main()
    def test_hmac_algorithms(self):
        for alg in ("HS256", "HS384", "HS512"):
            token = pyjwt.encode(claims_payload(), SECRET1, algorithm=alg)
            self.assertEqual(self.accept(token).sub, "alice")
            token = pyjwt.encode(claims_payload(), SECRET2, algorithm=alg,
                                 headers={"kid": "h2"})
            self.assertEqual(self.accept(token, self.keys).sub, "alice")

    def test_rs256_with_kid_picks_among_two_keys(self):
        for name, kid in (("rsa1", "r1"), ("rsa2", "r2")):
            token = pyjwt.encode(claims_payload(), PEM[name],
                                 algorithm="RS256", headers={"kid": kid})
            self.assertEqual(self.accept(token, self.keys).sub, "alice")
            wrong = {"r1": "r2", "r2": "r1"}[kid]
            token = pyjwt.encode(claims_payload(), PEM[name],
                                 algorithm="RS256", headers={"kid": wrong})
            self.refuse(token, "signature", self.keys)

    def test_without_kid_every_key_of_the_family_is_tried(self):
        for name in ("rsa1", "rsa2"):
            token = pyjwt.encode(claims_payload(), PEM[name],
                                 algorithm="RS256")
            self.accept(token, self.keys)
        for secret in (SECRET1, SECRET2):
            self.accept(pyjwt.encode(claims_payload(), secret), self.keys)
        self.refuse(pyjwt.encode(claims_payload(), SECRET3), "signature",
                    self.keys)

    def test_kid_naming_no_key_is_refused(self):
        token = pyjwt.encode(claims_payload(), SECRET1,
                             headers={"kid": "h9"})
        self.refuse(token, "signature", self.keys)
        self.refuse(token, "signature", self.unnamed)   # names no key either

    def test_claims_are_read(self):
        payload = {
            "sub": "alice", "jti": "t-42", "iat": int(NOW) - 10,
            "nbf": NOW - 10.5, "exp": int(NOW) + 60, "iss": "https://idp",
            "aud": ["comet", "other"], "subscribe": ["room:*", "user:alice"],
            "publish": ["*"], "info": {"name": "Alice", "émoji": "☺"},
            "unknown": {"is": "ignored"}}
        claims = self.accept(pyjwt.encode(payload, SECRET1))
        self.assertEqual((claims.sub, claims.jti, claims.iss),
                         ("alice", "t-42", "https://idp"))
        self.assertEqual((claims.iat, claims.nbf, claims.exp),
                         (NOW - 10, NOW - 10.5, NOW + 60))
        self.assertIsInstance(claims.exp, float)
        self.assertEqual(claims.aud, ("comet", "other"))
        self.assertTrue(claims.subscribe.covers("room:1"))
        self.assertTrue(claims.subscribe.covers("user:alice"))
        self.assertFalse(claims.subscribe.covers("user:bob"))
        self.assertTrue(claims.publish.covers("anything"))
        self.assertEqual(claims.info_json, '{"name":"Alice","émoji":"☺"}')
        self.assertEqual(claims.expiry(), NOW + 65)
        self.assertEqual(simple_comet.describe_token(claims), "sub alice jti t-42")

    def test_absent_claims(self):
        claims = self.accept(pyjwt.encode({}, SECRET1))
        for name in ("sub", "info_json", "jti", "iat", "exp", "nbf", "aud",
                     "iss"):
            self.assertIsNone(getattr(claims, name), name)
        self.assertFalse(claims.subscribe.covers("a"))
        self.assertFalse(claims.publish.covers("a"))
        self.assertIsNone(claims.expiry())
        self.assertEqual(simple_comet.describe_token(claims), "")
        self.assertEqual(repr(claims), "<Claims anonymous>")

    def test_alg_none_from_pyjwt(self):
        token = pyjwt.encode(claims_payload(), None, algorithm="none")
        self.assertTrue(token.endswith("."))
        self.refuse(token, "algorithm")


@needs_node
class TokenJsonwebtokenTests(TokenTestCase):

    part = "D"                  # run by the third process, see main()
    def test_all_algorithms_with_and_without_kid(self):
        payload = claims_payload(subscribe=["room:*"], jti="n1",
                                 info={"n": 1})
        specs = [(payload, SECRET1, {"algorithm": alg})
                 for alg in ("HS256", "HS384", "HS512")]
        specs += [(payload, SECRET2, {"algorithm": "HS512", "keyid": "h2"}),
                  (payload, PEM["rsa1"], {"algorithm": "RS256"}),
                  (payload, PEM["rsa2"], {"algorithm": "RS256",
                                          "keyid": "r2"})]
        tokens = node_sign(*specs)
        for token in tokens:
            with self.subTest(token=token[:40]):
                claims = self.accept(token, self.keys)
                self.assertEqual((claims.sub, claims.jti, claims.info_json),
                                 ("alice", "n1", '{"n":1}'))
                self.assertTrue(claims.subscribe.covers("room:7"))
                self.assertAlmostEqual(claims.iat, time.time(), delta=60)
        for token in tokens[:3] + tokens[4:5]:   # no kid: unnamed keys too
            self.accept(token, self.unnamed)

    def test_registered_claims_from_options(self):
        token, = node_sign(({"subscribe": ["*"]}, SECRET1, {
            "audience": ["comet", "other"], "issuer": "idp", "subject": "bob",
            "jwtid": "n2", "notBefore": 0, "expiresIn": "1h"}))
        claims = self.accept(token, now=time.time(), audience="comet",
                             issuer="idp")
        self.assertEqual((claims.sub, claims.jti, claims.aud, claims.iss),
                         ("bob", "n2", ("comet", "other"), "idp"))
        self.assertEqual(claims.nbf, claims.iat)
        self.refuse(token, "audience", now=time.time(), audience="x")

    def test_expiry_from_expires_in(self):
        token, = node_sign(({"sub": "bob"}, SECRET1, {"expiresIn": 60}))
        claims = self.accept(token, now=time.time())
        self.assertEqual(claims.exp, claims.iat + 60)
        self.refuse(token, "expired", now=claims.exp + simple_comet.TOKEN_LEEWAY)


# Refused tokens

class TokenAlgorithmTests(TokenTestCase):

    part = "D"                  # run by the third process, see main()
    def test_alg_none_and_others(self):
        for header in ({"alg": "none"}, {"alg": "None"}, {"alg": "NONE"},
                       {"alg": "nOnE"}, {"typ": "JWT"}, {"alg": None},
                       {"alg": ["HS256"]}, {"alg": "hs256"},
                       {"alg": "HS256 "}, {"alg": "ES256"}, {"alg": "PS256"},
                       {"alg": "RS512"}, {"alg": "EdDSA"}, {"alg": 256}):
            with self.subTest(header=header):
                body = token_part(header) + "." + token_part(claims_payload())
                self.refuse(body + ".", "algorithm")
                # with a signature that would verify as HS256
                self.refuse(mint_hs(claims_payload(), header=header),
                            "algorithm")

    def test_hs256_signed_with_the_rsa_public_key(self):
        rsa_only = simple_comet.parse_key_file(key_file("rsa1=r1"), "k")
        pub = PEM["rsa1.pub"]
        for secret in (pub, pub.strip(), pub.replace("\n", "\r\n"),
                       pub.encode().replace(b"\n", b"")):
            plain = mint_hs(claims_payload(), secret, header={"alg": "HS256"})
            named = mint_hs(claims_payload(), secret,
                            header={"alg": "HS256", "kid": "r1"})
            self.refuse(plain, "algorithm", rsa_only)   # no HMAC key at all
            self.refuse(named, "algorithm", rsa_only)   # kid names an RSA key
            self.refuse(named, "algorithm", self.keys)
            self.refuse(plain, "signature", self.unnamed)  # not SECRET1

    def test_rs256_with_only_hmac_keys(self):
        hmac_only = simple_comet.parse_key_file(key_file("h1=h1"), "k")
        token = token_part({"alg": "RS256"}) + "." + token_part(claims_payload()) + "."
        self.refuse(token + b64u(b"\1" * 256), "algorithm", hmac_only)
        token = token_part({"alg": "RS256", "kid": "h1"}) + "."
        self.refuse(token + token_part(claims_payload()) + ".AAAA", "algorithm",
                    hmac_only)

    def test_no_keys_means_disabled(self):
        for keys in (None, simple_comet.TokenKeys([])):
            with self.assertRaises(simple_comet.TokenError) as caught:
                simple_comet.verify_token(mint_hs(claims_payload()), keys, NOW)
            self.assertEqual(caught.exception.reason, "disabled")


class TokenSignatureTests(TokenTestCase):

    part = "D"                  # run by the third process, see main()
    def test_wrong_secret(self):
        self.refuse(mint_hs(claims_payload(), SECRET3), "signature")
        error = self.refuse(mint_hs(claims_payload(jti="x"), SECRET3),
                            "signature")
        self.assertEqual((error.sub, error.jti), (None, None))  # unverified

    def test_tampered_payload(self):
        token = mint_hs(claims_payload())
        head, _, sig = token.split(".")
        forged = head + "." + token_part(claims_payload(sub="mallory")) + "." + sig
        self.refuse(forged, "signature")

    def test_empty_and_truncated_signature(self):
        token = mint_hs(claims_payload())
        self.refuse(token.rsplit(".", 1)[0] + ".", "signature")
        self.refuse(token[:-4], "signature")     # 39 characters: canonical
        self.refuse(token[:-1], "malformed")     # 42: last one not canonical
        self.assertIn(self.refuse_any(token[:len(token) // 2]),
                      ("malformed", "signature"))

    def refuse_any(self, token):
        with self.assertRaises(simple_comet.TokenError) as caught:
            simple_comet.verify_token(token, self.unnamed, NOW)
        return caught.exception.reason

    @needs_pyjwt
    def test_rs256_wrong_key(self):
        rsa1_only = simple_comet.parse_key_file(key_file("rsa1"), "k")
        self.refuse(mint_rs(claims_payload(), "rsa2"), "signature", rsa1_only)
        self.accept(mint_rs(claims_payload(), "rsa1"), rsa1_only)

    @needs_pyjwt
    def test_rs256_signature_length_must_be_the_modulus_length(self):
        self.accept(mint_rs(claims_payload()))
        self.refuse(mint_rs(claims_payload(), signature=lambda s: b"\0" + s),
                    "signature")
        self.refuse(mint_rs(claims_payload(), signature=lambda s: s[:-1]),
                    "signature")
        # A signature whose value fits in fewer bytes, given short: refused.
        for attempt in range(3000):         # about 1 in 200 has a zero
            token = mint_rs(claims_payload(jti=str(attempt)))
            signature = base64.urlsafe_b64decode(token.split(".")[2] + "==")
            if signature[0] == 0:
                break
        else:
            self.skipTest("no signature with a leading zero byte")
        self.accept(token)
        short = token.rsplit(".", 1)[0] + "." + b64u(signature[1:])
        self.refuse(short, "signature")

    @needs_pyjwt
    def test_rs256_signature_not_below_the_modulus(self):
        # The key with the smallest modulus leaves most room above it.
        name = min(("rsa1", "rsa2", "rsa_e3"), key=rsa_numbers)
        keys = simple_comet.parse_key_file(key_file(name), "k")
        n, _, size = rsa_numbers(name)
        self.refuse(mint_rs(claims_payload(), name,
                            signature=n.to_bytes(size, "big")), "signature",
                    keys)
        self.refuse(mint_rs(claims_payload(), name,
                            signature=b"\xff" * size), "signature", keys)
        # s + n is the same signature modulo n: refused all the same.
        for attempt in range(3000):
            token = mint_rs(claims_payload(jti=str(attempt)), name)
            s = int.from_bytes(base64.urlsafe_b64decode(
                token.split(".")[2] + "=="), "big")
            if s + n < 256 ** size:
                break
        else:
            self.skipTest("no signature small enough to add n to")
        self.accept(token, keys)
        self.refuse(token.rsplit(".", 1)[0] + "."
                    + b64u((s + n).to_bytes(size, "big")), "signature", keys)

    def test_bleichenbacher_forgery_for_exponent_3(self):
        # An encoded message with the right prefix and hash but garbage
        # after it has an exact cube root: a verifier that parses the
        # message instead of comparing it whole would accept it.
        keys = simple_comet.parse_key_file(key_file("rsa_e3"), "k")
        key = keys.rsa[0]
        self.assertEqual(key.e, 3)
        signed = token_part({"alg": "RS256"}) + "." + token_part(claims_payload())
        digest = hashlib.sha256(signed.encode()).digest()
        prefix = b"\0\1" + b"\xff" * 8 + b"\0" + simple_comet.SHA256_DIGEST_INFO + digest
        target = int.from_bytes(prefix + b"\xff" * (key.size - len(prefix)),
                                "big")
        s = cube_root(target)
        forged = (s ** 3).to_bytes(key.size, "big")
        self.assertTrue(forged.startswith(prefix))     # the lax parse passes
        self.refuse(signed + "." + b64u(s.to_bytes(key.size, "big")),
                    "signature", keys)


    def test_suffix_forgery_for_exponent_3(self):
        # A cube root modulo 2**256 of the hash: its cube ends with the hash
        # and is all zeros before, so a verifier that only looks at the end
        # of the message would accept it.
        keys = simple_comet.parse_key_file(key_file("rsa_e3"), "k")
        size = keys.rsa[0].size
        for attempt in range(100):
            signed = token_part({"alg": "RS256"}) + "." + token_part({"jti": attempt})
            digest = hashlib.sha256(signed.encode()).digest()
            if digest[-1] & 1:
                break
        h, s = int.from_bytes(digest, "big"), 1
        for bit in range(1, 256):
            if (s ** 3 - h) >> bit & 1:
                s += 1 << bit
        self.assertTrue((s ** 3).to_bytes(size, "big").endswith(digest))
        self.refuse(signed + "." + b64u(s.to_bytes(size, "big")),
                    "signature", keys)


def cube_root(value):
    """The largest integer whose cube is at most value (Newton)."""
    root = 1 << (value.bit_length() // 3 + 1)
    while True:
        better = (2 * root + value // (root * root)) // 3
        if better >= root:
            break
        root = better
    while root ** 3 > value:
        root -= 1
    return root


class TokenFormTests(TokenTestCase):

    part = "D"                  # run by the third process, see main()
    def test_bad_base64(self):
        token = mint_hs(claims_payload())
        head, body, sig = token.split(".")
        self.assertEqual(len(sig) % 4, 3)
        alphabet = ("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
                    "0123456789-_")
        unused_bits_set = token[:-1] + alphabet[alphabet.index(token[-1]) | 1]
        cases = [token + "=", head + "=." + body + "." + sig,
                 token[:-2] + "+A", head + "." + body + "." + "/" + sig[1:],
                 token[:10] + " " + token[10:], " " + token, token + " ",
                 token + "\n", token[:-1] + "é", token[:5] + "\0" + token[5:],
                 unused_bits_set, "x" + token, token.replace(".", "\u2024")]
        for case in cases:
            with self.subTest(case=case):
                self.refuse(case, "malformed")
        self.assertTrue(simple_comet.looks_like_token(token))
        self.assertFalse(simple_comet.looks_like_token(token + "="))

    def test_number_of_parts(self):
        token = mint_hs(claims_payload())
        head, body, sig = token.split(".")
        for case in (token + "." + sig, head + "." + body, head,
                     "." + body + "." + sig, head + ".." + sig, "", "..",
                     token + "."):
            with self.subTest(case=case):
                self.refuse(case, "malformed")

    def test_size_limit(self):
        for extra in range(2000, 3200):
            token = mint_hs(claims_payload(pad="x" * extra))
            if len(token) == simple_comet.MAX_TOKEN_BYTES:
                break
        self.assertEqual(len(token), 4096)
        self.accept(token)
        self.refuse(mint_hs(claims_payload(pad="x" * (extra + 1))),
                    "malformed")
        huge = mint_hs(claims_payload(pad="x" * 100_000))
        self.refuse(huge, "malformed")
        self.assertTrue(simple_comet.looks_like_token(huge))   # a token, not ignored

    def test_header_not_json(self):
        for header in (b"not json", b'{"alg":"HS256"', b"[1]", b'"HS256"',
                       b"\xff\xfe{}", b'{"alg":"HS256","alg":"none"}',
                       b'{"alg":"HS256"} x', '{"alg":"HS256"}'.encode(
                           "utf-16")):
            with self.subTest(header=header):
                self.refuse(mint_hs(claims_payload(), header=header),
                            "malformed")

    def test_header_fields(self):
        for header in ({"alg": "HS256", "crit": ["exp"]},
                       {"alg": "HS256", "crit": []},
                       {"alg": "HS256", "typ": 1},
                       {"alg": "HS256", "kid": 5},
                       {"alg": "none", "kid": None}):
            with self.subTest(header=header):
                self.refuse(mint_hs(claims_payload(), header=header),
                            "malformed")
        for header in ({"alg": "HS256", "typ": "at+jwt", "cty": "x"},
                       {"alg": "HS256", "jku": "https://evil/keys",
                        "jwk": {"kty": "oct", "k": b64u(SECRET3.encode())}}):
            self.accept(mint_hs(claims_payload(), header=header))

    def test_payload_not_a_json_object(self):
        deep = b"[" * 2000 + b"]" * 2000
        for payload in (b"not json", b"[]", b'"alice"', b"1", b"null",
                        b"\xc3\x28", b'{"sub":"a","sub":"b"}',
                        b'{"sub":"a","info":{"x":1,"x":2}}',
                        b'{"exp":NaN}', b'{"exp":Infinity}',
                        b'{"exp":-Infinity}', b'{"exp":1e400}',
                        b'{"exp":1' + b"0" * 400 + b"}",
                        b'{"a":' + deep + b"}",
                        b'{"info":' + b'{"a":' * 600 + b"1" + b"}" * 601):
            with self.subTest(payload=payload[:40]):
                self.refuse(mint_hs(payload), "malformed")

    def test_claim_types(self):
        cases = {
            "exp": ["1700000000", True, None, [1]],
            "nbf": ["1", False, {}],
            "iat": [[], "now"],
            "sub": [5, "", "a\x01b", "a\nb", "tab\t", "a" * 201, "é" * 101,
                    ["alice"], "\ud800"],
            "jti": [5, "", "x\x7f"],
            "subscribe": ["room:*", [1], ["a"] * 101, ["a*b"], ["**"], [""],
                          ["a|b"], ["a/b*"], ["*a"], ["x" * 201], [None],
                          {"room": 1}],
            "publish": ["*", ["a", 2], ["ro*m:*"]],
            "info": [[], "x", 1, {"big": "x" * 1015}, {"s": "\ud800"},
                     {"n": 1e400}],
            "aud": [5, [1], ["a", None], {"a": 1}, None],
            "iss": [5, ["a"], None],
        }
        for name, values in cases.items():
            for value in values:
                with self.subTest(name=name, value=repr(value)[:30]):
                    self.refuse(mint_hs({name: value}), "malformed")

    def test_claims_at_their_limits(self):
        claims = self.accept(mint_hs({
            "sub": "é" * 100, "jti": "j" * 200, "exp": 2 ** 40,
            "nbf": -1.5, "iat": 0, "subscribe": [f"{i}" for i in range(100)],
            "publish": ["x" * 200, "*"], "info": {"big": "x" * 1014},
            "aud": [], "iss": ""}))
        self.assertEqual(len(claims.info_json.encode()), 1024)
        self.assertTrue(claims.subscribe.covers("99"))
        self.accept(mint_hs({"subscribe": ["y" * 200 + "*"]}))
        self.assertEqual(claims.exp, 2.0 ** 40)

    def test_malformed_claims_name_the_verified_sub(self):
        error = self.refuse(mint_hs({"sub": "alice", "jti": "j1",
                                     "exp": "soon"}), "malformed")
        self.assertEqual((error.sub, error.jti), ("alice", "j1"))
        self.assertIn("exp", error.detail)
        self.assertEqual(simple_comet.describe_token(error), "sub alice jti j1")
        error = self.refuse(mint_hs({"sub": "a\nb", "jti": "j1"}),
                            "malformed")
        self.assertEqual((error.sub, error.jti), (None, "j1"))


class TokenTimeTests(TokenTestCase):

    part = "D"                  # run by the third process, see main()
    def test_expiry_edge(self):
        exp = NOW + 100
        token = mint_hs({"sub": "a", "exp": exp})
        self.accept(token, now=exp + simple_comet.TOKEN_LEEWAY - 0.001)
        error = self.refuse(token, "expired", now=exp + simple_comet.TOKEN_LEEWAY)
        self.assertEqual(error.sub, "a")
        self.refuse(token, "expired", now=exp + 10 ** 6)
        self.accept(token, now=exp, leeway=0.001)
        self.refuse(token, "expired", now=exp, leeway=0)

    def test_not_before_edge(self):
        nbf = NOW + 100
        token = mint_hs({"nbf": nbf, "exp": nbf + 60})
        self.accept(token, now=nbf - simple_comet.TOKEN_LEEWAY)
        self.refuse(token, "not_yet_valid", now=nbf - simple_comet.TOKEN_LEEWAY - 0.001)
        self.accept(token, now=nbf, leeway=0)
        self.refuse(token, "not_yet_valid", now=nbf - 0.001, leeway=0)

    def test_iat_in_the_future_is_not_judged(self):
        self.accept(mint_hs({"iat": NOW + 10 ** 6}))

    def test_expired_before_audience(self):
        token = mint_hs({"exp": NOW - 60, "aud": "other"})
        self.refuse(token, "expired", audience="comet")


class TokenAudienceIssuerTests(TokenTestCase):

    part = "D"                  # run by the third process, see main()
    def test_audience(self):
        for aud in ("comet", ["x", "comet"], ["comet"]):
            self.accept(mint_hs({"aud": aud}), audience="comet")
        for payload in ({}, {"aud": "other"}, {"aud": []},
                        {"aud": "xcomet"}, {"aud": "comet-x"},
                        {"aud": ["other", "come"]}, {"aud": "Comet"}):
            with self.subTest(payload=payload):
                self.refuse(mint_hs(payload), "audience", audience="comet")
                self.accept(mint_hs(payload))      # not configured: ignored

    def test_issuer(self):
        self.accept(mint_hs({"iss": "https://idp"}), issuer="https://idp")
        for payload in ({}, {"iss": "https://idp/"}, {"iss": "evil"}):
            self.refuse(mint_hs(payload), "issuer", issuer="https://idp")
            self.accept(mint_hs(payload))

    def test_both(self):
        token = mint_hs({"aud": "comet", "iss": "idp"})
        self.accept(token, audience="comet", issuer="idp")
        self.refuse(token, "issuer", audience="comet", issuer="other")
        self.refuse(token, "audience", audience="other", issuer="idp")


# Patterns, cache, timing

class TokenPatternsTests(unittest.TestCase):

    part = "D"                  # run by the third process, see main()
    def test_covers(self):
        patterns = simple_comet.Patterns(["room:*", "lobby", "a*"])
        for name in ("room:1", "room:", "room:x:y", "lobby", "a", "abc"):
            self.assertTrue(patterns.covers(name), name)
        for name in ("roo", "room", "lobby2", "Lobby", "b", "xroom:1"):
            self.assertFalse(patterns.covers(name), name)
        self.assertTrue(simple_comet.Patterns(["*"]).covers("whatever|really"))
        self.assertFalse(simple_comet.Patterns([]).covers("a"))
        self.assertFalse(simple_comet.NO_PATTERNS.covers(""))
        self.assertEqual(repr(simple_comet.Patterns(["b", "a", "r:*", "*"])),
                         "Patterns(['*', 'a', 'b', 'r:*'])")

    def test_rules(self):
        for bad in ("", "**", "a*b", "*a", "a|b", "a/b", "x" * 201, "a\x00"):
            with self.subTest(bad=bad), self.assertRaises(ValueError):
                simple_comet.Patterns([bad])


class TokenCacheTests(TokenTestCase):

    part = "D"                  # run by the third process, see main()
    def setUp(self):
        super().setUp()
        self.calls = 0
        real = simple_comet.read_token

        def counted(token, keys):
            self.calls += 1
            return real(token, keys)
        patcher = mock.patch.object(simple_comet, "read_token", counted)
        patcher.start()
        self.addCleanup(patcher.stop)

    def test_second_check_is_a_hit(self):
        cache = simple_comet.TokenCache(self.unnamed)
        token = mint_hs(claims_payload())
        first = cache.check(token, NOW)
        self.assertIs(cache.check(token, NOW + 1), first)
        self.assertEqual(self.calls, 1)
        self.assertEqual(len(cache), 1)

    def test_expiry_is_judged_on_every_hit(self):
        cache = simple_comet.TokenCache(self.unnamed)
        exp = NOW + 10
        token = mint_hs({"sub": "a", "exp": exp, "nbf": NOW})
        self.assertRaisesReason("not_yet_valid", cache, token, NOW - 6)
        cache.check(token, NOW - 5)
        cache.check(token, exp + simple_comet.TOKEN_LEEWAY - 0.001)
        self.assertRaisesReason("expired", cache, token, exp + simple_comet.TOKEN_LEEWAY)
        self.assertRaisesReason("expired", cache, token, exp + 3600)
        self.assertEqual(self.calls, 1)

    def test_refusals_are_cached_as_new_exceptions(self):
        cache = simple_comet.TokenCache(self.unnamed)
        token = mint_hs(claims_payload(), SECRET3)
        one = self.assertRaisesReason("signature", cache, token, NOW)
        two = self.assertRaisesReason("signature", cache, token, NOW)
        self.assertIsNot(one, two)
        self.assertEqual(self.calls, 1)

    def test_audience_and_issuer(self):
        cache = simple_comet.TokenCache(self.unnamed, audience="comet", issuer="idp")
        good = mint_hs({"aud": ["comet"], "iss": "idp"})
        bad = mint_hs({"aud": "comet", "iss": "other"})
        cache.check(good, NOW)
        self.assertRaisesReason("issuer", cache, bad, NOW)
        self.assertRaisesReason("issuer", cache, bad, NOW)
        self.assertEqual(self.calls, 2)

    def test_bounded(self):
        cache = simple_comet.TokenCache(self.unnamed, size=4)
        tokens = [mint_hs({"jti": str(i)}) for i in range(10)]
        for token in tokens:
            cache.check(token, NOW)
            self.assertLessEqual(len(cache), 4)
        self.assertIn(tokens[-1], cache.entries)
        self.assertNotIn(tokens[0], cache.entries)
        calls = self.calls
        cache.check(tokens[-1], NOW)
        self.assertEqual(self.calls, calls)

    def assertRaisesReason(self, reason, cache, token, now):
        with self.assertRaises(simple_comet.TokenError) as caught:
            cache.check(token, now)
        self.assertEqual(caught.exception.reason, reason)
        return caught.exception


class TokenTimingTests(TokenTestCase):
    """Printed, not asserted tightly: SPEC wants HS256 well under 100 us
    and RS256 under 1 ms for a first check."""

    part = "D"                  # run by the third process, see main()

    def per_call(self, function, runs):
        function()
        start = time.perf_counter()
        for _ in range(runs):
            function()
        return (time.perf_counter() - start) / runs * 1e6

    @needs_pyjwt
    def test_timing(self):
        payload = claims_payload(jti="j1", iat=int(NOW),
                                 subscribe=["room:*", "user:alice"],
                                 info={"name": "Alice"})
        hs = pyjwt.encode(payload, SECRET1, algorithm="HS256")
        rs = pyjwt.encode(payload, PEM["rsa1"], algorithm="RS256")
        cache = simple_comet.TokenCache(self.unnamed)
        cache.check(hs, NOW)
        results = {
            "HS256 first check": self.per_call(
                lambda: simple_comet.verify_token(hs, self.unnamed, NOW), 5000),
            "RS256 first check (2048 bits)": self.per_call(
                lambda: simple_comet.verify_token(rs, self.unnamed, NOW), 2000),
            "cached hit": self.per_call(lambda: cache.check(hs, NOW), 50000),
            "refused (bad base64)": self.per_call(
                lambda: self.swallow(hs + "="), 5000),
        }
        report("token checks: " + ", ".join(
            f"{name} {micros:.1f} us" for name, micros in results.items()))
        self.assertLess(results["HS256 first check"], 1000)
        self.assertLess(results["RS256 first check (2048 bits)"], 10_000)
        self.assertLess(results["cached hit"], results["HS256 first check"])

    def swallow(self, token):
        try:
            simple_comet.verify_token(token, self.unnamed, NOW)
        except simple_comet.TokenError:
            pass


# ---------------------------------------------------------------------------
# D1. Tokens on a server: private channels, refusals, expiry, revocation
# ---------------------------------------------------------------------------

TOKEN_SECRET = "server-secret-" + "abcdefghijklmnop" * 3
OTHER_SECRET = "other-secret--" + "qrstuvwxyz012345" * 3


def write_key_file(directory, *lines):
    path = os.path.join(directory, "token-keys")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def token_for(secret=TOKEN_SECRET, kid=None, **claims):
    """An HS256 token minted by PyJWT (the library users use)."""
    claims.setdefault("iat", int(time.time()) - 1)
    return pyjwt.encode(claims, secret, algorithm="HS256",
                        headers={"kid": kid} if kid else None)


def with_token(path, token, **params):
    return path + "?" + urlencode({**params, "token": token})


def chan(name, suffix=".json"):
    return f"/channels/{quote(name, safe='')}{suffix}"


def stream_head_and_events(port, path, count, timeout=10):
    """Open a stream, read ``count`` events (or to its end): (status,
    headers, events without their raw bytes and times, ended)."""
    sse = SSE(port, path, timeout=timeout)
    try:
        if sse.status != 200:
            return sse.status, sse.headers, sse.json, True
        events = []
        while len(events) < count:
            item = sse.next(timeout)
            if item is None:
                return sse.status, sse.headers, events, True
            if "comment" not in item:
                events.append({k: v for k, v in item.items()
                               if k not in ("raw", "at")})
        return sse.status, sse.headers, events, False
    finally:
        sse.close()


@needs_pyjwt
class TokenServerTests(unittest.TestCase):
    """A server with --token-key-file: what a token lets a reader see, and
    every way a token is refused (never read as anonymous)."""

    part = "D"                  # run by the third process, see main()

    @classmethod
    def setUpClass(cls):
        make_token_keys()
        cls.dir = tempfile.TemporaryDirectory(prefix="comet-tokens-")
        cls.keys = write_key_file(
            cls.dir.name, "# rotation: both are accepted", "kid new",
            TOKEN_SECRET, "kid old", OTHER_SECRET, "kid rsa",
            PEM["rsa1.pub"].strip())
        cls.server = ServerProcess(f"--token-key-file={cls.keys}",
                                   "--enable-status", "--poll-timeout=20")
        cls.port = cls.server.port

    @classmethod
    def tearDownClass(cls):
        cls.server.close()
        cls.dir.cleanup()

    def get(self, path, **kw):
        return api("GET", path, port=self.port, **kw)

    def private(self, name=None):
        return register(name or fresh("user:"), port=self.port, private=1)

    def test_private_channel_in_every_form(self):
        name = self.private()
        public = register(port=self.port)
        message = push(name, "for alice", port=self.port)["message_id"]
        push(public, "for all", port=self.port)
        alice = token_for(sub="alice", subscribe=[name])
        # Without a token it is left out, as if it did not exist.
        self.assertEqual(self.get(chan(name))["return_code"], -2)
        both = self.get(chan(name + "|" + public).replace("|", "%7C"))
        self.assertEqual(list(both["messages"]), [public])
        # With the token: the query, and the bearer header.
        for reply in (self.get(with_token(chan(name), alice)),
                      self.get(chan(name), headers={
                          "Authorization": f"Bearer {alice}"})):
            self.assertEqual([m["content"] for m in reply["messages"][name]],
                             ["for alice"])
        resp, body = call("GET", with_token(chan(name, ".jsonp"), alice,
                                            cb="_JSONP_x"), port=self.port)
        self.assertTrue(body.startswith(b"/**/_JSONP_x("), body)
        self.assertIn(b"for alice", body)
        status_code, _, events, _ = stream_head_and_events(
            self.port, with_token(chan(name, ".sse"), alice), 1)
        self.assertEqual(status_code, 200)
        self.assertEqual(json.loads(events[0]["data"])["id"], message)
        # Another user's token, and no token at all, on a stream: 404.
        bob = token_for(sub="bob", subscribe=["user:bob"])
        self.assertEqual(self.get(with_token(chan(name), bob))["return_code"],
                         -2)
        for path in (chan(name, ".sse"), with_token(chan(name, ".sse"), bob)):
            self.assertEqual(stream_head_and_events(self.port, path, 1)[0],
                             404)
        # Admin rights do not read it either.
        self.assertEqual(self.get(chan(name))["return_code"], -2)

    def test_token_reads_take_the_short_path_alike(self):
        """A read with a token answers what the general route answers (a
        parameter nobody reads, x, sends it there), and a refused token is
        counted once."""
        name = self.private()
        public = register(port=self.port)
        push(name, "for alice", port=self.port)
        push(public, "for all", port=self.port)
        alice = token_for(sub="alice", subscribe=[name])
        expired = token_for(sub="alice", exp=time.time() - 60)
        before = fetch_metrics(self.port)
        for channel in (name, public):
            for token in (alice, expired):
                for suffix, extra in ((".json", {}),
                                      (".jsonp", {"cb": "_JSONP_x"})):
                    replies = [call("GET", with_token(
                        chan(channel, suffix), token, since=0, **extra, **x),
                        port=self.port) for x in ({}, {"x": 1})]
                    self.assertEqual(*[(r.status, r.getheaders(), body)
                                       for r, body in replies])
                    self.assertIn(b"for " if token is alice else b"-4",
                                  replies[0][1])
        after = fetch_metrics(self.port)
        self.assertEqual(after.value("tokens_refused_total", reason="expired")
                         - before.value("tokens_refused_total",
                                        reason="expired"), 8)

    def test_patterns(self):
        room = self.private(fresh("room:"))
        push(room, "in the room", port=self.port)
        for patterns, readable in ((["room:*"], True), (["*"], True),
                                   (["roo"], False), (["room:x*"], False)):
            token = token_for(sub="carol", subscribe=patterns)
            reply = self.get(with_token(chan(room), token))
            self.assertEqual(reply["return_code"] == 1, readable, patterns)

    def test_a_bad_token_is_refused_never_anonymous(self):
        public = register(port=self.port)
        push(public, "hello", port=self.port)
        good = token_for(sub="dave")
        bad = {
            "signature": token_for(secret="s" * 40, sub="dave"),
            "malformed": good + ".x",
            "expired": token_for(sub="dave", exp=time.time() - 60),
            "not_yet_valid": token_for(sub="dave", nbf=time.time() + 60),
            "algorithm": jwt_none({"sub": "dave"}),
        }
        before = fetch_metrics(self.port)
        for reason, token in bad.items():
            reply = self.get(with_token(chan(public), token))
            self.assertEqual(reply, {"return_code": -4, "error_message":
                                     f"Refused: token {reason}"})
            resp, body = call("GET", with_token(chan(public, ".jsonp"),
                                                token), port=self.port)
            self.assertEqual(resp.status, 200)
            self.assertIn(b'"return_code": -4', body)
            status_code, headers, body, _ = stream_head_and_events(
                self.port, with_token(chan(public, ".sse"), token), 1)
            self.assertEqual(status_code, 401)
            self.assertEqual(headers["www-authenticate"], "Bearer")
            self.assertEqual(body["return_code"], -4)
            self.assertTrue(body["error_message"].endswith(f"token {reason}"))
            # A write that carries it (in the form; as a bearer value when
            # it has a JWT's form): 401, and nothing is stored.
            resp, body = call("POST", chan(public), {"content": "x",
                                                     "token": token},
                              port=self.port)
            self.assertEqual(resp.status, 401, reason)
            if reason != "malformed":
                resp, body = call("POST", chan(public), {"content": "x"},
                                  headers={"Authorization": f"Bearer {token}"},
                                  port=self.port)
                self.assertEqual(resp.status, 401, reason)
        after = fetch_metrics(self.port)
        for reason in bad:
            self.assertEqual(
                after.value("tokens_refused_total", reason=reason) -
                before.value("tokens_refused_total", reason=reason),
                4 if reason == "malformed" else 5, reason)
        # A valid token on a write still gives no admin rights (from
        # loopback too): judged by the token alone.
        resp, body = call("POST", "/channels.json", {"channel_id": fresh()},
                          headers={"Authorization": f"Bearer {good}"},
                          port=self.port)
        self.assertEqual(resp.status, 403)
        self.assertEqual(len(self.get(with_token(chan(public), good))
                             ["messages"][public]), 1)

    def test_rotation_kid_and_rs256(self):
        name = self.private()
        push(name, "m", port=self.port)
        rsa = pyjwt.encode({"sub": "erin", "subscribe": [name]},
                           PEM["rsa1"], algorithm="RS256")
        tokens = [token_for(sub="erin", subscribe=[name]),
                  token_for(secret=OTHER_SECRET, sub="erin", subscribe=[name]),
                  token_for(kid="old", secret=OTHER_SECRET, sub="erin",
                            subscribe=[name]), rsa]
        for token in tokens:
            self.assertEqual(self.get(with_token(chan(name), token))
                             ["return_code"], 1)
        # A kid names one key: another key's signature is refused.
        wrong = token_for(kid="new", secret=OTHER_SECRET, sub="erin")
        self.assertEqual(self.get(with_token(chan(name), wrong))
                         ["error_message"], "Refused: token signature")
        nobody = token_for(kid="gone", sub="erin")
        self.assertEqual(self.get(with_token(chan(name), nobody))
                         ["return_code"], -4)

    @needs_node
    def test_token_from_node_jsonwebtoken(self):
        name = self.private()
        push(name, "from node", port=self.port)
        token = node_sign(({"sub": "frank", "subscribe": [name]},
                           TOKEN_SECRET, {"expiresIn": 60, "keyid": "new"}))[0]
        self.assertEqual(self.get(with_token(chan(name), token))
                         ["messages"][name][0]["content"], "from node")

    def test_held_poll_and_stream_end_at_exp(self):
        """A token that expires while its poll is held or its stream open:
        -4 "token expired" / event: expired, at exp plus the leeway, then
        the page goes on from its cursor with a new token."""
        name = self.private()
        last = push(name, "before", port=self.port)["message_id"]
        # exp 4.5 s ago: with the 5 s leeway, valid for half a second more.
        soon = token_for(sub="gina", subscribe=[name], exp=time.time() - 4.5)
        started = time.monotonic()
        poll = Background(self.get, with_token(chan(name), soon, since=last))
        stream = Background(stream_head_and_events, self.port,
                            with_token(chan(name, ".sse"), soon, since=last),
                            5)
        self.assertEqual(poll.result(), {"return_code": -4, "error_message":
                                         "Refused: token expired"})
        status_code, _, events, ended = stream.result()
        self.assertEqual((status_code, ended), (200, True))
        self.assertEqual(events, [{"event": "expired", "data": "{}"}])
        # Never later than needed (the poll timeout is 20 s).
        self.assertLess(time.monotonic() - started, 10)
        # A new token goes on from the cursor: nothing lost or repeated.
        after = push(name, "after", port=self.port)["message_id"]
        fresh_token = token_for(sub="gina", subscribe=[name],
                                exp=time.time() + 60)
        reply = self.get(with_token(chan(name), fresh_token, since=last))
        self.assertEqual([m["id"] for m in reply["messages"][name]], [after])

    def test_revocation_by_sub_and_jti(self):
        name = self.private()
        last = push(name, "m", port=self.port)["message_id"]
        henry = token_for(sub="henry", subscribe=[name], jti="h-1")
        poll = Background(self.get, with_token(chan(name), henry, since=last))
        stream = Background(stream_head_and_events, self.port,
                            with_token(chan(name, ".sse"), henry, since=last),
                            5)
        wait_for(lambda: status(self.port)["polls_held"] >= 1 and
                 status(self.port)["streams_open"] >= 1)
        reply = api("POST", "/tokens/revoke.json", {"sub": "henry"},
                    port=self.port)
        self.assertEqual(reply["sub"], "henry")
        self.assertGreater(reply["until"], time.time() + 29 * 24 * 3600)
        self.assertEqual(poll.result()["error_message"],
                         "Refused: token revoked")
        self.assertEqual(stream.result()[2], [{"event": "revoked",
                                               "data": "{}"}])
        self.assertEqual(self.get(with_token(chan(name), henry))
                         ["error_message"], "Refused: token revoked")
        # Tokens issued after the revocation are accepted; one without iat
        # cannot be told apart, and is refused.
        later = token_for(sub="henry", subscribe=[name], jti="h-2",
                          iat=int(time.time()) + 2)
        self.assertEqual(self.get(with_token(chan(name), later))
                         ["return_code"], 1)
        no_iat = pyjwt.encode({"sub": "henry", "subscribe": [name]},
                              TOKEN_SECRET, algorithm="HS256")
        self.assertEqual(self.get(with_token(chan(name), no_iat))
                         ["return_code"], -4)
        # By jti: that token only.
        api("POST", "/tokens/revoke.json", {"jti": "h-2"}, port=self.port)
        self.assertEqual(self.get(with_token(chan(name), later))
                         ["return_code"], -4)
        for params in ({}, {"sub": "a", "jti": "b"}, {"sub": "a",
                                                      "until": "12"}):
            self.assertEqual(api("POST", "/tokens/revoke.json", params,
                                 port=self.port)["return_code"], -1, params)

    def test_registration_rules(self):
        reply = api("POST", "/channels.json", {"channel_id": fresh(),
                                               "private": "1",
                                               "use_sessions": "1"},
                    port=self.port)
        self.assertEqual(reply["return_code"], -1)
        reply = api("POST", "/channels.json", {"channel_id": fresh(),
                                               "private": "maybe"},
                    port=self.port)
        self.assertEqual(reply["return_code"], -1)

    def test_no_token_or_key_in_the_log_status_or_metrics(self):
        name = self.private()
        push(name, "m", port=self.port)
        token = token_for(sub="ivan", subscribe=[name])
        self.get(with_token(chan(name), token))
        self.get(with_token(chan(name), token[:-2]))
        text = (self.server.output() + json.dumps(status(self.port)) +
                call("GET", "/metrics", port=self.port)[1].decode())
        for secret in (token, token[:-2], TOKEN_SECRET, OTHER_SECRET,
                       token.split(".")[2]):
            self.assertNotIn(secret, text)
        self.assertIn("token refused: signature", self.server.output())


def jwt_none(claims):
    return (base64.urlsafe_b64encode(b'{"alg":"none","typ":"JWT"}').rstrip(
        b"=").decode() + "." + base64.urlsafe_b64encode(
        json.dumps(claims).encode()).rstrip(b"=").decode() + ".")


class TokenSwitchTests(unittest.TestCase):
    """Key files that cannot be used stop the server with exit 2 and one
    line naming the file; without a key, tokens are disabled."""

    part = "D"                  # run by the third process, see main()

    def test_bad_key_files(self):
        with tempfile.TemporaryDirectory() as directory:
            cases = {"missing": None, "short": "x" * 31,
                     "broken pem": "-----BEGIN PUBLIC KEY-----\nAAAA\n",
                     "kid alone": "kid lonely", "empty": "# nothing\n"}
            for what, text in cases.items():
                path = os.path.join(directory, what.replace(" ", "-"))
                if text is not None:
                    with open(path, "w") as f:
                        f.write(text)
                result = run_server(f"--token-key-file={path}",
                                    f"--http-port={free_port()}")
                self.assertEqual(result.returncode, 2, what)
                lines = result.stderr.strip().splitlines()
                self.assertEqual(len(lines), 1, result.stderr)
                self.assertIn(path, lines[0])
                self.assertNotIn("Traceback", result.stderr)

    def test_audience_and_issuer_switches(self):
        with tempfile.TemporaryDirectory() as directory:
            server = ServerProcess(
                "--token-key-file=" + write_key_file(directory, TOKEN_SECRET),
                "--token-audience=comet", "--token-issuer=backend")
            try:
                name = register(port=server.port)
                push(name, "m", port=server.port)
                cases = {
                    "audience": token_for(sub="x", iss="backend"),
                    "issuer": token_for(sub="x", aud="comet"),
                    None: token_for(sub="x", aud=["web", "comet"],
                                    iss="backend"),
                }
                for reason, token in cases.items():
                    reply = api("GET", with_token(chan(name), token),
                                port=server.port)
                    if reason is None:
                        self.assertEqual(reply["return_code"], 1)
                    else:
                        self.assertEqual(reply["error_message"],
                                         f"Refused: token {reason}")
            finally:
                server.close()

    def test_without_a_key_tokens_are_disabled(self):
        server = ServerProcess()
        port = server.port
        try:
            reply = api("POST", "/channels.json", {"channel_id": fresh(),
                                                   "private": "1"}, port=port)
            self.assertEqual(reply["return_code"], -1)
            name = register(port=port)
            push(name, "m", port=port)
            token = mint_hs({"sub": "x"})
            self.assertEqual(api("GET", with_token(chan(name), token),
                                 port=port),
                             {"return_code": -4, "error_message":
                              "Refused: token disabled"})
        finally:
            server.close()


@needs_pyjwt
class TokenStateTests(unittest.TestCase):
    """Revocations survive a restart with --state-file, and private
    channels stay private."""

    part = "D"                  # run by the third process, see main()

    def test_revocation_survives_a_restart(self):
        with tempfile.TemporaryDirectory() as directory:
            keys = write_key_file(directory, TOKEN_SECRET)
            state = os.path.join(directory, "state")
            switches = (f"--token-key-file={keys}", f"--state-file={state}")
            server = ServerProcess(*switches)
            port = server.port
            name = fresh("user:")
            try:
                register(name, port=port, private=1)
                push(name, "m", port=port)
                token = token_for(sub="jane", subscribe=[name], jti="j-1")
                api("POST", "/tokens/revoke.json", {"jti": "j-1"}, port=port)
            finally:
                server.stop(signal.SIGKILL)
                server.close()
            for _ in range(2):               # after SIGKILL, after SIGTERM
                server = ServerProcess(*switches)
                port = server.port
                try:
                    self.assertEqual(api("GET", with_token(chan(name), token),
                                         port=port)["error_message"],
                                     "Refused: token revoked")
                    other = token_for(sub="jane", subscribe=[name])
                    self.assertEqual(api("GET", with_token(chan(name), other),
                                         port=port)["return_code"], 1)
                    self.assertEqual(api("GET", chan(name), port=port)
                                     ["return_code"], -2)
                finally:
                    server.close()


class TokenRedisTestCase(RedisTestCase):
    """Two instances on one Redis, with a token key."""

    instances = 2

    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.TemporaryDirectory(prefix="comet-tokens-")
        cls.switches = ("--poll-timeout=20", "--token-key-file=" +
                        write_key_file(cls.dir.name, TOKEN_SECRET))
        super().setUpClass()

    @classmethod
    def tearDownClass(cls):
        super().tearDownClass()
        cls.dir.cleanup()


@needs_pyjwt
class TokenRedisTests(TokenRedisTestCase):
    """A revocation on one instance ends the polls and streams of its
    tokens on every instance, and is refused there from then on."""

    part = "D"                  # run by the third process, see main()

    def test_revocation_on_every_instance(self):
        a, b = self.ports
        name = fresh("user:")
        register(name, port=a, private=1)
        last = push(name, "m", port=a)["message_id"]
        token = token_for(sub="kate", subscribe=[name])
        wait_for(lambda: api("GET", with_token(chan(name), token), port=b)
                 ["return_code"] == 1)
        poll = Background(api, "GET", with_token(chan(name), token,
                                                 since=last), port=b)
        stream = Background(stream_head_and_events, b,
                            with_token(chan(name, ".sse"), token, since=last),
                            5)
        wait_for(lambda: self.held(b) == 1 and self.streams(b) == 1)
        api("POST", "/tokens/revoke.json", {"sub": "kate"}, port=a)
        self.assertEqual(poll.result()["error_message"],
                         "Refused: token revoked")
        self.assertEqual(stream.result()[2], [{"event": "revoked",
                                               "data": "{}"}])
        for port in (a, b):
            self.assertEqual(api("GET", with_token(chan(name), token),
                                 port=port)["return_code"], -4)


# ---------------------------------------------------------------------------
# D3. Publishing from the browser: token pushes, from, bounds, ephemeral
# ---------------------------------------------------------------------------

def token_push(port, name, token, content="hi", via_form=True, other=False,
               **params):
    """A push carrying a token (in the form, or as a bearer value), from
    loopback or from another address: (status, headers, decoded body)."""
    fields = {"content": content, **params}
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    if via_form:
        fields["token"] = token
    else:
        headers["Authorization"] = f"Bearer {token}"
    if content is None:
        del fields["content"]
    body = urlencode(fields)
    if other:
        resp, data = call_from_other("POST", chan(name), port, headers, body)
    else:
        resp, data = call("POST", chan(name), headers=headers, body=body,
                          port=port)
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, \
        json.loads(data)


@needs_pyjwt
class BrowserPublishTests(unittest.TestCase):
    """Token pushes, as a page's fetch makes them: the sender stamped by
    the server, real statuses, bounds, CORS; ephemeral messages."""

    part = "D"                  # run by the third process, see main()

    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.TemporaryDirectory(prefix="comet-publish-")
        cls.keys = write_key_file(cls.dir.name, TOKEN_SECRET)
        cls.server = ServerProcess(
            f"--token-key-file={cls.keys}", "--enable-status",
            "--poll-timeout=20", "--client-max-message=100",
            "--client-publish-rate=5")
        cls.port = cls.server.port

    @classmethod
    def tearDownClass(cls):
        cls.server.close()
        cls.dir.cleanup()

    def room(self, **params):
        return register(fresh("room:"), port=self.port, **params)

    def test_token_push_from_another_address(self):
        name = self.room()
        alice = token_for(sub="alice", publish=["room:*"])
        for via_form in (True, False):
            status_code, headers, reply = token_push(
                self.port, name, alice, "from the page", via_form, other=True)
            self.assertEqual(status_code, 200)
            self.assertEqual(list(reply), ["return_code", "error_message",
                                           "message_id"])
            self.assertEqual(headers["access-control-allow-origin"], "*")
            self.assertEqual(headers["access-control-expose-headers"],
                             "Retry-After")
        refusals = {
            403: token_for(sub="alice", publish=["other:*"]),
            401: token_for(sub="alice", publish=["room:*"],
                           exp=time.time() - 60),
        }
        for expected, token in refusals.items():
            status_code, headers, reply = token_push(self.port, name, token,
                                                     other=True)
            self.assertEqual(status_code, expected, reply)
            self.assertEqual(headers["access-control-allow-origin"], "*")
        no_sub = pyjwt.encode({"publish": ["room:*"]}, TOKEN_SECRET,
                              algorithm="HS256")
        self.assertEqual(token_push(self.port, name, no_sub, other=True)[0],
                         403)
        # Without a token, another address may not push (version 2 rules).
        resp, _ = call_from_other("POST", chan(name), self.port, {
            "Content-Type": "application/x-www-form-urlencoded"},
            "content=x")
        self.assertEqual(resp.status, 403)
        contents = [m["content"] for m in read([name], port=self.port)
                    ["messages"][name]]
        self.assertEqual(contents, ["from the page"] * 2)

    def test_from_in_every_form(self):
        name = self.room()
        last = push(name, "first", port=self.port)["message_id"]
        stream = SSE(self.port, chan(name, f".sse?since={last}"))
        alice = token_for(sub="alice", publish=[name])
        message_id = token_push(self.port, name, alice, "hello")[2][
            "message_id"]
        expected = {"id": message_id, "from": "alice", "content": "hello"}
        event = stream.message()
        self.assertEqual({k: event[k] for k in expected}, expected)
        stream.close()
        got = read([name], port=self.port, since=last)["messages"][name][0]
        self.assertEqual({k: got[k] for k in expected}, expected)
        resp, body = call("GET", chan(name, f".jsonp?since={last}&cb=_JSONP_f"),
                          port=self.port)
        self.assertIn(b'"from": "alice"', body)
        # The sender is the server's to say: a token push may not set it,
        # the admin may (a backend relaying for a user).
        status_code, _, reply = token_push(self.port, name, alice, "x",
                                           **{"from": "mallory"})
        self.assertEqual((status_code, reply["return_code"]), (400, -1))
        relayed = api("POST", chan(name), {"content": "relayed",
                                           "from": "bob"}, port=self.port)
        got = read([name], port=self.port, since=message_id)["messages"][name]
        self.assertEqual([(m["from"], m["content"]) for m in got],
                         [("bob", "relayed")])
        self.assertEqual(set(relayed), {"return_code", "error_message",
                                        "message_id", "delivered"})
        self.assertNotIn("from", read([name], port=self.port)["messages"][
            name][0])                    # the admin's own push has none
        bad = api("POST", chan(name), {"content": "x", "from": "a|\x01"},
                  port=self.port)
        self.assertEqual(bad["return_code"], -1)

    def test_statuses_of_token_writes(self):
        name = self.room()
        carol = token_for(sub="carol", publish=["*"])
        cases = [
            (400, -1, {"content": None}),
            (404, -2, {"name": fresh("room:")}),
            (413, -1, {"content": "x" * 101}),
        ]
        for status_code, return_code, change in cases:
            target = change.pop("name", name)
            got, headers, reply = token_push(self.port, target, carol,
                                             **({"content": change["content"]}
                                                if "content" in change else {}))
            self.assertEqual((got, reply["return_code"]),
                             (status_code, return_code), reply)
            self.assertEqual(headers["access-control-allow-origin"], "*")
        self.assertEqual(token_push(self.port, name, carol, "é" * 51)[0], 413)
        self.assertEqual(token_push(self.port, name, carol, "é" * 50)[0], 200)

    def test_rate_per_sub_with_retry_after(self):
        name = self.room(max_messages=100)
        dave = token_for(sub="dave", publish=[name])
        erin = token_for(sub="erin", publish=[name])
        statuses = []
        for _ in range(15):
            status_code, headers, _ = token_push(self.port, name, dave)
            statuses.append(status_code)
            if status_code == 429:
                break
        # The burst is twice the rate (5 a second here): 10 at once.
        self.assertEqual(statuses[-1], 429)
        self.assertGreaterEqual(statuses.count(200), 10)
        retry = int(headers["retry-after"])
        self.assertGreaterEqual(retry, 1)
        self.assertIn("Retry-After", headers["access-control-expose-headers"])
        # Another sub is not held back; dave is, after waiting Retry-After.
        self.assertEqual(token_push(self.port, name, erin)[0], 200)
        time.sleep(retry)                # what a client is told to do
        self.assertEqual(token_push(self.port, name, dave)[0], 200)

    def test_ephemeral(self):
        """Delivered to the polls and streams open now, kept nowhere: a
        later read or a replay does not see it, and it causes no lost."""
        name = self.room(max_messages=1)
        last = push(name, "kept", port=self.port)["message_id"]
        poll = Background(read, [name], port=self.port, since=last)
        stream = SSE(self.port, chan(name, f".sse?since={last}"))
        wait_for(lambda: status(self.port)["polls_held"] >= 1 and
                 status(self.port)["streams_open"] >= 1)
        frank = token_for(sub="frank", publish=[name])
        typing = token_push(self.port, name, frank, "typing…",
                            ephemeral=1)[2]["message_id"]
        got = poll.result()["messages"][name]
        self.assertEqual([(m["id"], m["from"], m["content"]) for m in got],
                         [(typing, "frank", "typing…")])
        self.assertEqual(stream.message()["content"], "typing…")
        stream.close()
        again = read([name], port=self.port)
        self.assertEqual([m["content"] for m in again["messages"][name]],
                         ["kept"])
        self.assertGreaterEqual(again["last_id"], typing)
        later = read([name], port=self.port, since=last - 1)
        self.assertNotIn("lost", later)
        replay = SSE(self.port, chan(name, f".sse?since={last - 1}"))
        self.assertEqual(replay.message()["content"], "kept")
        self.assertEqual(replay.within(0.3), [])
        replay.close()

    def test_preflight_allows_post_with_authorization(self):
        resp, _ = call("OPTIONS", chan(fresh("room:")), headers={
            "Origin": "http://page.example", "Access-Control-Request-Method":
            "POST", "Access-Control-Request-Headers": "authorization"},
            port=self.port)
        self.assertEqual(resp.status, 204)
        self.assertIn("POST", resp.getheader("Access-Control-Allow-Methods"))
        self.assertIn("Authorization",
                      resp.getheader("Access-Control-Allow-Headers"))


@needs_pyjwt
class BrowserPublishStateTests(unittest.TestCase):
    """from survives a restart; an ephemeral message is not in the file."""

    part = "D"                  # run by the third process, see main()

    def test_from_kept_and_ephemeral_not(self):
        with tempfile.TemporaryDirectory() as directory:
            keys = write_key_file(directory, TOKEN_SECRET)
            state = os.path.join(directory, "state")
            switches = (f"--token-key-file={keys}", f"--state-file={state}")
            server = ServerProcess(*switches)
            name = fresh("room:")
            try:
                register(name, port=server.port)
                token = token_for(sub="gina", publish=[name])
                token_push(server.port, name, token, "stays")
                token_push(server.port, name, token, "PASSING-BY",
                           ephemeral=1)
            finally:
                server.stop(signal.SIGKILL)
                server.close()
            with open(state, "rb") as f:
                self.assertNotIn(b"PASSING-BY", f.read())
            server = ServerProcess(*switches)
            try:
                got = read([name], port=server.port)["messages"][name]
                self.assertEqual([(m["from"], m["content"]) for m in got],
                                 [("gina", "stays")])
            finally:
                server.close()


@needs_pyjwt
class BrowserPublishRedisTests(TokenRedisTestCase):
    """from and ephemeral messages across instances on one Redis."""

    part = "D"                  # run by the third process, see main()

    def test_from_and_ephemeral_on_another_instance(self):
        a, b = self.ports
        name = fresh("room:")
        register(name, port=a)
        last = push(name, "before", port=a)["message_id"]
        wait_for(lambda: read([name], port=b)["return_code"] == 1)
        stream = SSE(b, chan(name, f".sse?since={last}"))
        wait_for(lambda: self.streams(b) == 1)
        token = token_for(sub="hank", publish=[name])
        token_push(a, name, token, "PASSING-BY", ephemeral=1)
        token_push(a, name, token, "stays")
        first, second = stream.message(), stream.message()
        stream.close()
        self.assertEqual([(m["from"], m["content"]) for m in (first, second)],
                         [("hank", "PASSING-BY"), ("hank", "stays")])
        got = read([name], port=b)["messages"][name]
        self.assertEqual([m["content"] for m in got], ["before", "stays"])
        history = redis_call(self.redis.port, "LRANGE",
                             "comet:h:" + name, 0, -1)
        self.assertFalse(any(b"PASSING-BY" in m for m in history))
        self.assertIn(b'"from": "hank"', history[-1])


def readme_block(kind, needle):
    """The README's ```kind block that holds ``needle``."""
    with open(README, encoding="utf-8") as f:
        text = f.read()
    for block in re.findall(r"^```%s[ \t]*\n(.*?)^```" % kind, text,
                            re.M | re.S):
        if needle in block:
            return block
    raise AssertionError(f"no {kind} block with {needle!r} in the README")


def readme_publish_nginx_conf():
    """The README's nginx block for publishing from the browser."""
    return readme_block("nginx", "limit_except GET POST OPTIONS")


@needs_pyjwt
@unittest.skipIf(NGINX is None, "nginx is not installed (looked for nginx on "
                 "PATH and in /usr/sbin)")
class NginxPublishTests(unittest.TestCase):
    """The README's public server for publishing from the browser, in a real
    nginx, before a server with --admin-token and --token-key-file."""

    part = "D"                  # run by the third process, see main()

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="comet-nginx-publish-")
        os.chmod(cls.tmp, 0o755)
        cls.sock = os.path.join(cls.tmp, "comet.sock")
        admin = os.path.join(cls.tmp, "admin-token")
        with open(admin, "w") as f:
            f.write("publish-admin-token-of-the-test\n")
        cls.server = ServerProcess(
            f"--unix-socket-path={cls.sock}", f"--admin-token-file={admin}",
            "--token-key-file=" + write_key_file(cls.tmp, TOKEN_SECRET))
        cls.port = free_port()
        prefix = os.path.join(cls.tmp, "nginx")
        os.mkdir(prefix, 0o755)
        block = _replace(readme_publish_nginx_conf(), "    listen 80;\n",
                         "    listen 127.0.0.1:%d;\n" % cls.port)
        group = "nogroup"
        try:
            grp.getgrnam(group)
        except KeyError:
            group = "nobody"
        temps = "".join("    %s_temp_path %s/%s_temp;\n" % (kind, prefix, kind)
                        for kind in ("client_body", "proxy", "fastcgi",
                                     "uwsgi", "scgi"))
        conf = os.path.join(prefix, "nginx.conf")
        with open(conf, "w") as f:
            f.write("daemon off;\nmaster_process on;\nworker_processes 1;\n"
                    f"user nobody {group};\npid {prefix}/nginx.pid;\n"
                    f"error_log {prefix}/error.log warn;\n"
                    "events { worker_connections 64; }\n"
                    "http {\n    access_log off;\n" + temps +
                    "    upstream simple_comet {\n"
                    f"        server unix:{cls.sock};\n"
                    "        keepalive 4;\n    }\n" + block + "}\n")
        cls.nginx = subprocess.Popen(
            [NGINX, "-p", prefix, "-c", conf, "-e", prefix + "/error.log"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        wait_for(lambda: cls.answers(), 10)

    @classmethod
    def answers(cls):
        try:
            connect(cls.port, timeout=1).close()
            return True
        except OSError:
            return False

    @classmethod
    def tearDownClass(cls):
        stop_process(cls.nginx, signal.SIGQUIT)
        cls.server.close()
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def test_token_pushes_pass_and_nothing_else(self):
        name = fresh("room:")
        # The admin registers through the socket (or the private server).
        resp, _ = call("POST", "/channels.json", {"channel_id": name},
                       unix=self.sock, headers={
                           "Authorization":
                           "Bearer publish-admin-token-of-the-test"})
        self.assertEqual(resp.status, 200)
        token = token_for(sub="lena", publish=[name])
        status_code, headers, reply = token_push(self.port, name, token,
                                                 "through nginx")
        self.assertEqual(status_code, 200, reply)
        self.assertEqual(headers["access-control-allow-origin"], "*")
        got = read([name], port=self.port)["messages"][name]
        self.assertEqual([(m["from"], m["content"]) for m in got],
                         [("lena", "through nginx")])
        # Local to the server, yet refused: a push without a token, a
        # registration, a token that does not cover the channel; DELETE
        # does not even pass nginx.
        for path, params in ((chan(name), {"content": "x"}),
                             ("/channels.json", {"channel_id": fresh()})):
            resp, _ = call("POST", path, params, port=self.port)
            self.assertEqual(resp.status, 403 if path != "/channels.json"
                             else 404, path)
        other = token_for(sub="lena", publish=["elsewhere"])
        self.assertEqual(token_push(self.port, name, other)[0], 403)
        resp, _ = call("DELETE", chan(name), port=self.port)
        self.assertEqual(resp.status, 403)
        resp, _ = call("OPTIONS", chan(name), headers={
            "Origin": "http://page.example", "Access-Control-Request-Method":
            "POST", "Access-Control-Request-Headers": "authorization"},
            port=self.port)
        self.assertEqual(resp.status, 204)
        self.assertIn("POST", resp.getheader("Access-Control-Allow-Methods"))
        self.assertEqual(len(read([name], port=self.port)["messages"][name]),
                         1)


# ---------------------------------------------------------------------------
# D2. Presence: who reads a channel, with join and leave
# ---------------------------------------------------------------------------

def presence_of(port, name, **params):
    return api("GET", f"/channels/{quote(name, safe='')}/presence.json"
               + ("?" + urlencode(params) if params else ""), port=port)


def entries_since(port, name, since):
    """The join and leave entries after ``since`` (a read that must not be
    held: the caller knows there are some)."""
    reply = read([name], port=port, since=since)
    return [(e["event"], e["from"]) for e in reply["messages"][name]
            if "event" in e], reply["last_id"]


@needs_pyjwt
class PresenceTests(unittest.TestCase):
    """presence=1 channels: members, counts, join and leave in every form,
    the grace, the snapshot's cursor."""

    part = "D"                  # run by the third process, see main()
    GRACE = 1.0

    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.TemporaryDirectory(prefix="comet-presence-")
        cls.server = ServerProcess(
            "--token-key-file=" + write_key_file(cls.dir.name, TOKEN_SECRET),
            "--enable-status", "--poll-timeout=0.5",
            f"--presence-grace={cls.GRACE}")
        cls.port = cls.server.port

    @classmethod
    def tearDownClass(cls):
        cls.server.close()
        cls.dir.cleanup()

    def room(self, **params):
        return register(fresh("room:"), port=self.port, presence=1, **params)

    def stream(self, name, user=None, info=None, since=None):
        query = {}
        if user is not None:
            claims = {"sub": user}
            if info is not None:
                claims["info"] = info
            query["token"] = token_for(**claims)
        if since is not None:
            query["since"] = since
        return SSE(self.port, chan(name, ".sse") +
                   ("?" + urlencode(query) if query else ""))

    def wait_members(self, name, members):
        return wait_for(lambda: (lambda p: p if p["members"] == members
                                 else None)(presence_of(self.port, name)))

    def test_members_and_counts(self):
        name = self.room()
        start = presence_of(self.port, name)["last_id"]
        tabs = [self.stream(name, "alice", {"name": "Alice"}) for _ in (1, 2)]
        bob = self.stream(name, "bob")
        nobody = [self.stream(name), self.stream(name)]
        snapshot = self.wait_members(name, 2)
        wait_for(lambda: presence_of(self.port, name)["anonymous"] == 2)
        snapshot = presence_of(self.port, name)
        self.assertEqual(
            {k: snapshot[k] for k in ("channel", "members", "connections",
                                      "anonymous", "users")},
            {"channel": name, "members": 2, "connections": 3, "anonymous": 2,
             "users": {"alice": {"info": {"name": "Alice"}, "connections": 2},
                       "bob": {"info": None, "connections": 1}}})
        # One join each, in every form: JSON (and JSON-P) entries, and
        # stream events with an event: line (which onmessage skips).
        entries, _ = entries_since(self.port, name, start)
        self.assertEqual(entries, [("join", "alice"), ("join", "bob")])
        resp, body = call("GET", chan(name, f".jsonp?since={start}&cb=_JSONP_p"),
                          port=self.port)
        self.assertIn(b'"event": "join", "from": "alice"', body)
        event = nobody[0].event()
        self.assertEqual(event["event"], "join")
        data = json.loads(event["data"])
        self.assertEqual((data["channel"], data["from"], data["info"]),
                         (name, "alice", {"name": "Alice"}))
        self.assertEqual(event["id"], str(data["id"]))
        for sse in tabs + [bob] + nobody:
            sse.close()
        self.wait_members(name, 0)
        entries, _ = entries_since(self.port, name, start)
        self.assertEqual(sorted(entries), [("join", "alice"), ("join", "bob"),
                                           ("leave", "alice"),
                                           ("leave", "bob")])
        # Not a presence channel: -2.
        plain = register(port=self.port)
        self.assertEqual(presence_of(self.port, plain)["return_code"], -2)

    def test_grace(self):
        name = self.room()
        start = presence_of(self.port, name)["last_id"]
        first = self.stream(name, "carol")
        self.wait_members(name, 1)
        first.close()
        # A reload: back well within the grace.
        again = self.stream(name, "carol")
        wait_for(lambda: presence_of(self.port, name)["connections"] == 1)
        cursor = presence_of(self.port, name)["last_id"]
        again.close()
        left = self.wait_members(name, 0)
        entries, _ = entries_since(self.port, name, start)
        self.assertEqual(entries, [("join", "carol"), ("leave", "carol")])
        self.assertGreater(left["last_id"], cursor)

    def test_long_poller_in_a_loop(self):
        """A user polling in a loop (0.5 s poll timeout here) stays one
        member: one join, no leave while it polls, one leave after."""
        name = self.room()
        start = presence_of(self.port, name)["last_id"]
        token = token_for(sub="dave")
        since = start
        deadline = time.monotonic() + 2.5
        while time.monotonic() < deadline:
            reply = api("GET", with_token(chan(name), token, since=since),
                        port=self.port)
            since = reply["last_id"]
        self.assertEqual(presence_of(self.port, name)["members"], 1)
        self.wait_members(name, 0)
        entries, _ = entries_since(self.port, name, start)
        self.assertEqual(entries, [("join", "dave"), ("leave", "dave")])

    def test_snapshot_cursor_lines_up_with_the_events(self):
        name = self.room()
        erin = self.stream(name, "erin")
        self.wait_members(name, 1)
        snapshot = presence_of(self.port, name)
        follow = self.stream(name, since=snapshot["last_id"])
        frank = self.stream(name, "frank")
        erin.close()
        frank.close()
        seen = []
        while len(seen) < 3:
            event = follow.event(timeout=10)
            if "event" in event:
                seen.append((event["event"], json.loads(event["data"])["from"]))
        follow.close()
        self.assertEqual(sorted(seen), [("join", "frank"), ("leave", "erin"),
                                        ("leave", "frank")])
        self.assertEqual(seen[0], ("join", "frank"))

    def test_sessions_identify_readers(self):
        name = self.room(use_sessions=1)
        client = fresh("client")
        api("POST", "/clients.json", {"client_id": client}, port=self.port)
        sse = SSE(self.port, chan(name, f".sse?client_id={client}"))
        # presence.json follows the channel's read rules.
        self.assertEqual(presence_of(self.port, name)["return_code"], -2)
        got = wait_for(lambda: (lambda p: p if p["members"] == 1 else None)(
            presence_of(self.port, name, client_id=client)))
        self.assertEqual(list(got["users"]), [client])
        sse.close()


@needs_pyjwt
class PresenceRedisTests(unittest.TestCase):
    """Presence across instances on one Redis: one view everywhere, each
    event once, a user on two instances one member, and no ghost after an
    instance is killed."""

    part = "D"                  # run by the third process, see main()

    def setUp(self):
        self.dir = tempfile.TemporaryDirectory(prefix="comet-presence-")
        self.addCleanup(self.dir.cleanup)
        self.redis = RedisProcess()
        self.addCleanup(self.redis.close)
        self.servers = comet_servers(
            self.redis.url, 3, "--presence-grace=1", "--poll-timeout=20",
            "--token-key-file=" + write_key_file(self.dir.name, TOKEN_SECRET))
        for server in self.servers:
            self.addCleanup(server.close)
        self.ports = [server.port for server in self.servers]
        for port in self.ports:
            wait_for(lambda: can_write(port), 10)

    def stream(self, port, name, user=None):
        query = f"?token={token_for(sub=user)}" if user else ""
        sse = SSE(port, chan(name, ".sse") + query)
        self.addCleanup(sse.close)
        return sse

    def test_one_view_and_no_ghost(self):
        a, b, c = self.ports
        name = fresh("room:")
        register(name, port=a, presence=1)
        for port in self.ports:
            wait_for(lambda: presence_of(port, name)["return_code"] == 1)
        start = presence_of(a, name)["last_id"]
        follow = self.stream(c, name)                 # anonymous, on C
        ivy_a = self.stream(a, name, "ivy")
        ivy_b = self.stream(b, name, "ivy")           # one user, two instances
        jack = self.stream(a, name, "jack")
        expected = {"members": 2, "connections": 3, "anonymous": 1}
        for port in self.ports:
            wait_for(lambda: all(presence_of(port, name)[k] == v
                                 for k, v in expected.items()), 10)
            users = presence_of(port, name)["users"]
            self.assertEqual({u: d["connections"] for u, d in users.items()},
                             {"ivy": 2, "jack": 1})
        # Kill A: ivy stays (she is on B too), jack leaves after the grace
        # plus the 5 s in which A is taken for dead.  No ghost stays.
        killed_at = time.monotonic()
        self.servers[0].stop(signal.SIGKILL)
        for port in (b, c):
            wait_for(lambda: presence_of(port, name)["members"] == 1, 15)
        self.assertLess(time.monotonic() - killed_at, 12)
        self.assertEqual(list(presence_of(b, name)["users"]), ["ivy"])
        events = []
        while len(events) < 3:
            event = follow.event(timeout=15)
            if "event" in event:
                events.append((event["event"],
                               json.loads(event["data"])["from"]))
        # Each event once, on every instance, in one order.
        self.assertEqual(sorted(events[:2]), [("join", "ivy"), ("join", "jack")])
        self.assertEqual(events[2], ("leave", "jack"))
        for port in (b, c):
            entries, _ = entries_since(port, name, start)
            self.assertEqual(entries, events)
        ivy_a.close(), ivy_b.close(), jack.close()


@needs_pyjwt
class PresenceRestartTests(unittest.TestCase):
    """A restart with --state-file within the grace changes nothing; a
    reader that does not come back leaves, counted from the restart."""

    part = "D"                  # run by the third process, see main()

    def test_restart_within_the_grace(self):
        with tempfile.TemporaryDirectory() as directory:
            keys = write_key_file(directory, TOKEN_SECRET)
            switches = (f"--token-key-file={keys}", "--presence-grace=3",
                        "--state-file=" + os.path.join(directory, "state"))
            server = ServerProcess(*switches)
            name = fresh("room:")
            try:
                register(name, port=server.port, presence=1)
                start = presence_of(server.port, name)["last_id"]
                streams = [SSE(server.port, with_token(
                    chan(name, ".sse"), token_for(sub=user)))
                    for user in ("gina", "hank")]
                wait_for(lambda: presence_of(server.port, name)["members"]
                         == 2)
            finally:
                server.stop(signal.SIGKILL)
                server.close()
            for sse in streams:
                sse.close()
            server = ServerProcess(*switches)
            try:
                port = server.port
                self.assertEqual(presence_of(port, name)["members"], 2)
                back = SSE(port, with_token(chan(name, ".sse"),
                                            token_for(sub="gina")))
                wait_for(lambda: presence_of(port, name)["members"] == 1,
                         timeout=10)
                entries, _ = entries_since(port, name, start)
                self.assertEqual(entries, [("join", "gina"), ("join", "hank"),
                                           ("leave", "hank")])
                back.close()
            finally:
                server.close()


def readme_chat_page():
    """The README's chat page: its one HTML block that holds a chat."""
    return readme_block("html", "<title>Chat</title>")


@needs_pyjwt
@unittest.skipUnless(CHROMIUM, "Chromium not installed (apt-get install chromium)")
class TokenBrowserTests(BrowserPages, unittest.TestCase):
    """A page streams a private channel with a short-lived token: at its
    expiry the stream says so, the page asks a tiny backend for a new token
    and goes on from its cursor, with no gap and no duplicate; the JS
    client does the same with a function for its URL."""

    part = "D"                  # run by the third process, see main()

    PAGE = """<!DOCTYPE html><html><head><meta charset="utf-8">
<script src="/simple-comet.js"></script><script>
var COMET = "http://127.0.0.1:%(port)d/channels/%(name)s", got = [],
    renewals = 0, token = %(token)s, last = 0;
function open_stream() {
  var events = new EventSource(COMET + ".sse?token=" + token + "&since=" + last);
  events.onmessage = function (e) { last = e.lastEventId; got.push(+e.lastEventId); };
  events.addEventListener("expired", function () {
    events.close();
    fetch("/token").then(function (r) { return r.text(); }).then(function (t) {
      token = t; renewals++; open_stream(); });
  });
}
%(script)s
</script></head><body></body></html>"""

    def setUp(self):
        directory = tempfile.TemporaryDirectory(prefix="comet-token-page-")
        self.addCleanup(directory.cleanup)
        self.server = ServerProcess(
            "--token-key-file=" + write_key_file(directory.name, TOKEN_SECRET),
            "--enable-status", "--poll-timeout=20")
        self.addCleanup(self.server.close)
        self.name = fresh("user:")
        register(self.name, port=self.server.port, private=1,
                 max_messages=1000)
        # Each token is valid for about 1.5 s (exp in the past, within the
        # 5 s leeway), so the page renews it several times.
        PageHandler.minted = staticmethod(lambda: token_for(
            sub="alice", subscribe=[self.name], exp=time.time() - 3.5))
        self.addCleanup(setattr, PageHandler, "minted", None)
        self.tab = self.browser.new_tab()
        self.addCleanup(self.tab.close)

    def open_page(self, script):
        path = "/%s.html" % self.id().rsplit(".", 1)[-1]
        PageHandler.pages[path] = self.PAGE % {
            "port": self.server.port, "name": self.name,
            "token": json.dumps(PageHandler.minted()), "script": script}
        self.tab.navigate(self.page_origin + path)
        self.assertTrue(self.tab.wait_for("window.got !== undefined"))

    def push_until(self, condition, timeout=20):
        """Push a numbered message every 50 ms until the page says
        ``condition``; the ids pushed."""
        pushed = []
        deadline = time.monotonic() + timeout
        while not self.tab.js(condition):
            self.assertLess(time.monotonic(), deadline, self.tab.js("got"))
            pushed.append(push(self.name, str(len(pushed)),
                               port=self.server.port)["message_id"])
            time.sleep(0.05)
        return pushed

    def test_eventsource_renews_its_token(self):
        self.open_page("open_stream();")
        pushed = self.push_until("renewals >= 2")
        wait_for(lambda: self.tab.js("got.length") >= len(pushed), 10)
        self.assertEqual(self.tab.js("got"), pushed)

    def test_js_client_url_function(self):
        self.open_page(
            "SimpleComet.backoff = 50;"
            "SimpleComet.subscribe(function () {"
            "  return COMET + '.jsonp?token=' + token; },"
            " function (reply) { var m = reply.messages[Object.keys("
            "  reply.messages)[0]]; for (var i = 0; i < m.length; i++)"
            "  got.push(m[i].id); },"
            " null, function (reply) { if (reply && reply.return_code === -4)"
            "  fetch('/token').then(function (r) { return r.text(); })"
            "  .then(function (t) { token = t; renewals++; }); });"
            "SimpleComet.start();")
        pushed = self.push_until("renewals >= 2")
        wait_for(lambda: self.tab.js("got.length") >= len(pushed), 10)
        self.assertEqual(self.tab.js("got"), pushed)


@needs_pyjwt
@unittest.skipUnless(CHROMIUM, "Chromium not installed (apt-get install chromium)")
class ChatPageTests(BrowserPages, unittest.TestCase):
    """The README's chat page, copied as it stands, in two Chromium tabs of
    another origin: messages with their senders, who is online, typing."""

    part = "D"                  # run by the third process, see main()

    def setUp(self):
        directory = tempfile.TemporaryDirectory(prefix="comet-chat-")
        self.addCleanup(directory.cleanup)
        self.server = ServerProcess(
            "--token-key-file=" + write_key_file(directory.name, TOKEN_SECRET),
            "--presence-grace=1", "--client-publish-rate=5")
        self.addCleanup(self.server.close)
        self.room = fresh("chat")
        register(self.room, port=self.server.port, presence=1)
        page = readme_chat_page()
        page = page.replace('"http://127.0.0.1:4080"',
                            f'"http://127.0.0.1:{self.server.port}"')
        page = page.replace('ROOM = "chat"', f'ROOM = "{self.room}"')
        PageHandler.pages["/chat.html"] = page

    def open(self, user):
        tab = self.browser.new_tab()
        self.addCleanup(tab.close)
        token = token_for(sub=user, publish=[self.room],
                          info={"name": user.title()}, exp=time.time() + 600)
        tab.navigate(f"{self.page_origin}/chat.html#{token}")
        return tab

    def text_of(self, tab, element):
        return tab.js(f"document.getElementById({element!r}).textContent")

    def wait_text(self, tab, element, expected, timeout=10):
        expression = (f"document.getElementById({element!r}).textContent"
                      f".includes({json.dumps(expected)})")
        self.assertTrue(tab.wait_for(expression, timeout),
                        f"{element}: {self.text_of(tab, element)!r}")

    def test_two_users_chat(self):
        alice = self.open("alice")
        self.wait_text(alice, "online", "Alice")
        bob = self.open("bob")
        self.wait_text(alice, "online", "Bob")
        self.wait_text(bob, "online", "Alice")
        # Bob types: Alice sees "typing…"; he sends: she sees his message
        # with his name, and the typing line goes.
        bob.js('document.getElementById("text").value = "hi Alice";'
               'document.getElementById("text").dispatchEvent('
               'new Event("input"))')
        self.wait_text(alice, "typing", "bob typing")
        bob.js('document.getElementById("say").requestSubmit()')
        self.wait_text(alice, "log", "bobhi Alice")
        self.assertNotIn("bob", self.text_of(alice, "typing"))
        self.wait_text(bob, "log", "bobhi Alice")
        # A reload replays the message, never the typing.
        alice.navigate(f"{self.page_origin}/chat.html#" + alice.js(
            "location.hash.slice(1)"))
        self.wait_text(alice, "log", "bobhi Alice")
        self.assertEqual(self.text_of(alice, "typing"), "")
        # Bob leaves: once his grace is over, Alice sees him go.
        bob.navigate("about:blank")
        self.wait_text(alice, "online", "Online: Alice")
        stored = read([self.room], port=self.server.port)["messages"][self.room]
        contents = [m["content"] for m in stored if "content" in m]
        self.assertEqual(contents, ['{"text":"hi Alice"}'])


# ---------------------------------------------------------------------------
# D4. The dashboard
# ---------------------------------------------------------------------------

# Put into every page before its own script: what the page did wrong
# (errors, exceptions, CSP violations) lands in window.__problems.
RECORD_PROBLEMS = """
window.__problems = [];
window.addEventListener("error", function (e) {
  window.__problems.push("error: " + e.message); });
window.addEventListener("securitypolicyviolation", function (e) {
  window.__problems.push("CSP: " + e.violatedDirective + " " + e.blockedURI); });
var __error = console.error;
console.error = function () {
  window.__problems.push("console.error: " + Array.from(arguments).join(" "));
  return __error.apply(console, arguments); };
"""

# The figures the page shows: {name: text of its value}.
DASHBOARD_FIGURES = """(function () {
  var figs = {};
  document.querySelectorAll("[data-figure]").forEach(function (c) {
    figs[c.getAttribute("data-figure")] = c.querySelector(".val").textContent;
  });
  return figs; })()"""


@unittest.skipUnless(CHROMIUM, "Chromium not installed (apt-get install chromium)")
class DashboardTests(BrowserPages, unittest.TestCase):
    """/dashboard in Chromium, on a real server: it loads clean, asks for
    nothing outside the server, shows the status page's figures and moves
    within two seconds; with an admin token it asks for it once."""

    part = "D"                  # run by the third process, see main()

    def open(self, port):
        tab = self.browser.new_tab()
        self.addCleanup(tab.close)
        self.browser.send("Page.enable", {}, tab.session)
        self.browser.send("Page.addScriptToEvaluateOnNewDocument",
                          {"source": RECORD_PROBLEMS}, tab.session)
        tab.navigate(f"http://127.0.0.1:{port}/dashboard")
        return tab

    def figures(self, tab):
        return {name: int(re.sub(r"\D", "", text) or 0)
                for name, text in tab.js(DASHBOARD_FIGURES).items()}

    def clean(self, tab, port):
        self.assertEqual(tab.js("window.__problems"), [])
        urls = tab.js("performance.getEntriesByType('resource')"
                      ".map(function (e) { return e.name; })")
        self.assertTrue(urls)
        for url in urls:
            self.assertTrue(url.startswith(f"http://127.0.0.1:{port}/"), url)

    def test_shows_the_server_as_it_happens(self):
        server = ServerProcess("--enable-status")
        self.addCleanup(server.close)
        port = server.port
        name = register(port=port)
        push(name, "m", port=port)
        tab = self.open(port)
        self.assertTrue(tab.wait_for("document.querySelectorAll("
                                     "'[data-figure]').length >= 5"))
        self.assertTrue(tab.wait_for(
            f"/^[0-9]/.test(({DASHBOARD_FIGURES}).channels)"))
        now = status(port)
        shown = self.figures(tab)
        self.assertEqual(shown["channels"], now["channels_count"])
        self.assertEqual(shown["streams_open"], now["streams_open"])
        # A new stream and a push move the figures within two seconds.
        stream = SSE(port, chan(name, ".sse"))
        self.addCleanup(stream.close)
        started = time.monotonic()
        self.assertTrue(tab.wait_for(
            f"({DASHBOARD_FIGURES}).streams_open === '1'", 5))
        self.assertLess(time.monotonic() - started, 2.5)
        self.assertTrue(tab.wait_for(
            "document.getElementById('top').textContent.includes(%s)"
            % json.dumps(name), 5))
        self.clean(tab, port)
        shot = tab.browser.send("Page.captureScreenshot", {}, tab.session)
        path = os.path.join(tempfile.gettempdir(), "simple-comet-dashboard.png")
        with open(path, "wb") as f:
            f.write(base64.b64decode(shot["data"]))
        report(f"dashboard screenshot: {path}")

    def test_access(self):
        token = "dashboard-admin-token-for-the-test"
        server = ServerProcess("--enable-status", f"--admin-token={token}")
        self.addCleanup(server.close)
        port = server.port
        # The page holds no data; what it reads follows the status rules.
        resp, _ = call("GET", "/dashboard.json", port=port)
        self.assertEqual(resp.status, 403)
        resp, _ = call("GET", "/dashboard", port=port)
        self.assertEqual(resp.status, 200)
        csp = resp.getheader("Content-Security-Policy")
        self.assertIn("default-src 'none'", csp)
        tab = self.open(port)
        self.assertTrue(tab.wait_for(
            "!document.getElementById('login').hidden"), "no token form")
        tab.js("document.getElementById('token').value = %s;"
               "document.getElementById('login').requestSubmit()"
               % json.dumps(token))
        self.assertTrue(tab.wait_for(
            "!document.getElementById('main').hidden", 5))
        self.assertEqual(tab.js("sessionStorage.getItem("
                                "'simple-comet-admin-token')"), token)
        self.clean(tab, port)

    def test_from_another_address(self):
        server = ServerProcess("--enable-status")
        self.addCleanup(server.close)
        resp, body = call_from_other("GET", "/dashboard.json", server.port)
        self.assertEqual(resp.status, 403)
        resp, body = call("GET", "/dashboard.json", port=server.port)
        self.assertEqual(resp.status, 200)
        reply = json.loads(body)
        self.assertEqual(set(reply), {"return_code", "error_message", "time",
                                      "uptime", "version", "figures", "top",
                                      "store", "instances"})


# ---------------------------------------------------------------------------
# B. Reliability: slow clients, churn, exactly-once under load, shutdown
# ---------------------------------------------------------------------------

class Subscriber(threading.Thread):
    """Follows last_id on a channel set until told to stop; reconnects every
    few polls, as a browser does after a network hiccup."""

    def __init__(self, port, channels, reconnect_every=0):
        super().__init__(daemon=True)
        self.port, self.channels = port, channels
        self.reconnect_every = reconnect_every
        self.got = {name: [] for name in channels}
        self.stop = threading.Event()
        self.polls = self.empty_replies = 0
        self.error = None
        self.start()

    def run(self):
        path = "/channels/" + "%7C".join(self.channels) + ".json?since="
        since = 0
        conn = None
        try:
            while not self.stop.is_set():
                if conn is None or (self.reconnect_every and
                                    self.polls % self.reconnect_every == 0):
                    if conn is not None:
                        conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", self.port,
                                                      timeout=10)
                conn.request("GET", path + str(since))
                reply = json.loads(conn.getresponse().read())
                self.polls += 1
                assert reply["return_code"] == 1, reply
                assert reply["since"] == since, (reply, since)
                empty = True
                for name, messages in reply["messages"].items():
                    self.got[name] += [m["id"] for m in messages]
                    empty = empty and not messages
                self.empty_replies += empty
                since = reply["last_id"]
        except BaseException as e:                   # reported by the test
            self.error = e
        finally:
            if conn is not None:
                conn.close()


class ReliabilityTests(unittest.TestCase):

    part = "D"                  # run by the third process, see main()

    def test_stalled_clients_do_not_slow_others_and_are_closed(self):
        server = ServerProcess("--enable-status",
                               "--http-timeout=1")
        stalled = []
        try:
            name = register(port=server.port)
            push(name, "x", port=server.port)
            for i in range(300):
                s = connect(server.port)
                s.sendall(b"POST /channels/" + name.encode() +
                          b".json HTTP/1.1\r\nHost: x\r\nContent-Length: 100"
                          b"\r\n\r\ncontent=half" if i % 2 else
                          b"GET /channels/" + name.encode() + b".json?sin")
                stalled.append(s)
            times = []
            conn = http.client.HTTPConnection("127.0.0.1", server.port,
                                              timeout=5)
            for _ in range(200):
                start = time.monotonic()
                conn.request("GET", f"/channels/{name}.json")
                self.assertEqual(conn.getresponse().read().count(b'"x"'), 1)
                times.append(time.monotonic() - start)
            conn.close()
            times.sort()
            p99 = times[int(len(times) * 0.99)]
            # Reads wait for no stalled client (that would be until
            # --http-timeout, 1 s): 50 ms for 99 % in LONG runs.
            self.assertLess(p99, bound(0.5, 0.05), f"p99 {p99 * 1000:.1f} ms")
            closing = time.monotonic()
            # --http-timeout closes every stalled one (and nothing answered
            # them: there was no whole request).
            deadline = time.monotonic() + 5
            for s in stalled:
                s.settimeout(max(0.1, deadline - time.monotonic()))
                self.assertEqual(s.recv(100), b"")
            wait_for(lambda: status(server.port)["connections"] == 1)
            report(f"{len(stalled)} stalled clients: 200 reads beside them, "
                   f"p50 {times[100] * 1000:.2f} ms, p99 {p99 * 1000:.2f} ms; "
                   f"all closed {time.monotonic() - closing:.2f} s later "
                   "(--http-timeout=1)")
        finally:
            for s in stalled:
                s.close()
            server.close()

    def test_client_that_never_reads_cannot_grow_memory(self):
        server = ServerProcess("--http-timeout=3")
        try:
            name = register(port=server.port)
            push(name, "y" * 2000, port=server.port)   # 2 KB per reply
            before = rss_kib(server.proc.pid)
            request = get_request(f"/channels/{name}.json")
            with connect(server.port) as s:
                s.setblocking(False)
                sent = 0
                deadline = time.monotonic() + 1.5
                while time.monotonic() < deadline:
                    try:
                        sent += s.send(request * 100)
                    except BlockingIOError:
                        time.sleep(0.01)
                replies_owed = sent // len(request) * 2000
                grown = rss_kib(server.proc.pid) - before
                # Unbounded buffering would hold every reply owed.
                self.assertGreater(replies_owed, 50_000_000)
                self.assertLess(grown, 20_000, f"grew {grown} KiB")
                report(f"client that never reads: sent {sent} bytes of "
                       f"requests ({replies_owed // 1_000_000} MB of replies "
                       f"owed), server RSS grew {grown} KiB")
                # And the stuck connection is dropped after --http-timeout
                # (the server closes its socket), with a reset.
                mine = s.getsockname()[1]
                start = time.monotonic()
                wait_for(lambda: tcp_inode(server.port, mine) in (None, 0),
                         timeout=30, interval=0.02)
                dropped = time.monotonic() - start
                report(f"the client that never reads dropped {dropped:.2f} "
                       "s after it stopped sending (--http-timeout=3)")
                self.assertLess(dropped, bound(20, 5))
                s.setblocking(True)
                s.settimeout(30)
                with self.assertRaises((ConnectionResetError, AssertionError)):
                    while s.recv(1 << 20):
                        pass
                    raise AssertionError("closed cleanly")
        finally:
            server.close()

    def test_churn_of_dropped_polls_leaves_nothing_behind(self):
        server = ServerProcess("--enable-status")
        try:
            name = register(port=server.port)
            last = push(name, "x", port=server.port)["message_id"]
            request = get_request(f"/channels/{name}.json?since={last}")
            sizes = []
            for _ in range(12):
                socks = [connect(server.port) for _ in range(500)]
                for s in socks:
                    s.sendall(request)
                wait_held(500, server.port)
                for s in socks:
                    s.close()
                wait_held(0, server.port)
                sizes.append(rss_kib(server.proc.pid))
            self.assertEqual(status(server.port)["connections"], 1)
            # After warm-up (the allocator's and the interpreter's: up to
            # eight rounds here), the size stays flat for four rounds.
            self.assertLess(sizes[-1] - sizes[7], 1024, sizes)
            report(f"churn: 12 rounds of 500 polls opened and dropped, "
                   f"RSS KiB per round {sizes}")
            self.assertEqual(push(name, "y", port=server.port)["delivered"], 0)
        finally:
            server.close()

    def test_exactly_once_under_load(self):
        server = ServerProcess("--poll-timeout=0.1",
                               "--messages-per-channel=10000")
        try:
            names = [register(port=server.port) for _ in range(4)]
            # Overlapping channel sets: every pair, and each one alone.
            sets = [[a, b] for i, a in enumerate(names) for b in names[i + 1:]]
            sets += [[n] for n in names]
            subscribers = [Subscriber(server.port, sets[i % len(sets)],
                                      reconnect_every=(i % 3) * 4)
                           for i in range(100)]
            # Every subscriber polling (each had a reply, empty at least).
            wait_for(lambda: all(sub.polls or sub.error
                                 for sub in subscribers), timeout=10)
            pushed = {n: [] for n in names}
            lock = threading.Lock()

            def publish(seed):
                rng = random.Random(seed)
                for i in range(40):
                    name = rng.choice(names)
                    with lock:   # ids of one channel are recorded in order
                        message_id = push(name, f"{seed}-{i}",
                                          port=server.port)["message_id"]
                        pushed[name].append(message_id)
                    time.sleep(rng.random() * 0.02)
            publishers = [Background(publish, seed) for seed in range(4)]
            for p in publishers:
                p.result(timeout=60)
            for sub in subscribers:
                wait_for(lambda: all(sub.got[n] == pushed[n]
                                     for n in sub.channels) or sub.error,
                         timeout=5)
            empty = 0
            for sub in subscribers:
                sub.stop.set()
            for sub in subscribers:
                sub.join(5)
                self.assertIsNone(sub.error)
                for name in sub.channels:
                    self.assertEqual(sub.got[name], pushed[name])
                empty += sub.empty_replies
            self.assertEqual(sum(map(len, pushed.values())), 160)
            self.assertGreater(empty, 100)         # timeouts happened
            checked = sum(len(sub.got[n]) for sub in subscribers
                          for n in sub.channels)
            report(f"exactly once: 4 publishers, 160 messages, 100 "
                   f"subscribers on 10 channel sets, {checked} deliveries "
                   f"checked, {empty} empty replies (poll timeouts), "
                   f"{sum(s.polls for s in subscribers)} polls")
        finally:
            server.close()

    def test_shutdown_under_load(self):
        server = ServerProcess("--poll-timeout=5")
        name = register(port=server.port)
        acked = []
        stop = threading.Event()

        def publish():
            conn = http.client.HTTPConnection("127.0.0.1", server.port,
                                              timeout=5)
            try:
                while not stop.is_set():
                    conn.request("POST", f"/channels/{name}.json",
                                 "content=m", {"Content-Type":
                                               "application/x-www-form-"
                                               "urlencoded"})
                    acked.append(json.loads(conn.getresponse().read())
                                 ["message_id"])
            except (OSError, http.client.HTTPException):
                pass                  # the server went away mid-request
            finally:
                conn.close()
        try:
            subscribers = [Subscriber(server.port, [name]) for _ in range(50)]
            publisher = Background(publish)
            # Under load: pushes going on, every subscriber answered once.
            wait_for(lambda: len(acked) > 20 and
                     all(sub.polls or sub.error for sub in subscribers),
                     timeout=10)
            self.assertEqual(server.stop(timeout=10), 0)
            stop.set()
            publisher.result()
            self.assertGreater(len(acked), 20)
            for sub in subscribers:
                sub.join(5)
                # Each poll was answered (errors come only after the last
                # reply, from the next poll finding the server gone).
                self.assertIsInstance(sub.error, (OSError,
                                                  http.client.HTTPException))
                got = sub.got[name]
                self.assertEqual(len(got), len(set(got)))
                # What a subscriber got is every acknowledged message, in
                # order, up to where it stopped: nothing skipped.
                self.assertEqual(got, acked[:len(got)])
            self.assertNotIn("Traceback", server.output())
            report(f"shutdown under load: {len(acked)} pushes acknowledged, "
                   f"50 held polls answered, exit 0")
        finally:
            stop.set()
            server.close()


# The suite runs in three processes at once (the machine has two cores and
# most tests wait on servers): this one runs parts A and B with the main
# server, a second one (PART == "C") the classes that say part = "C":
# streams read over sockets and nginx, the state file and Redis
# instances, and a third (PART == "D") those that say part = "D": tokens,
# presence, publishing from the browser, the dashboard; the last two start
# servers of their own.

def part_of(cls):
    return getattr(cls, "part", "AB")


def run(classes, stream):
    loader = unittest.defaultTestLoader
    suite = unittest.TestSuite(loader.loadTestsFromTestCase(c)
                               for c in classes)
    result = unittest.TextTestRunner(stream=stream, verbosity=2).run(suite)
    failed = len(result.failures) + len(result.errors)
    skipped = len(result.skipped)
    if skipped and os.environ.get("SIMPLE_COMET_NO_SKIP"):
        for test, reason in result.skipped:
            print(f"not allowed to skip here: {test}: {reason}", file=stream)
        failed += skipped
    return result.testsRun - failed - skipped, failed, skipped


def main():
    """Run every test; print one closing line with the counts.  With
    SIMPLE_COMET_NO_SKIP set (CI), a skipped test is a failure.  The
    classes that say part = "C" or part = "D" run in processes of their
    own, beside this one (most tests wait on servers, so three processes
    share two cores well)."""
    classes = [c for c in globals().values() if isinstance(c, type)
               and issubclass(c, unittest.TestCase) and c.__module__ == __name__
               and unittest.defaultTestLoader.getTestCaseNames(c)]
    if PART in ("C", "D"):
        counts = run([c for c in classes if part_of(c) == PART], sys.stderr)
        print("part %s: %d passed, %d failed, %d skipped" % (PART, *counts))
        return 0
    children = []
    with tempfile.TemporaryFile("w+") as out_c, \
            tempfile.TemporaryFile("w+") as out_d:
        try:
            for part, out in (("C", out_c), ("D", out_d)):
                children.append((part, out, subprocess.Popen(
                    [sys.executable, os.path.abspath(__file__)], stdout=out,
                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    env={**os.environ, "SIMPLE_COMET_PART": part})))
            counts = run([c for c in classes if part_of(c) == "AB"],
                         sys.stderr)
            for _, _, child in children:
                child.wait(timeout=600)
        finally:
            for _, _, child in children:
                if child.poll() is None:
                    child.kill()
                    child.wait()
        for part, out, _ in children:
            out.seek(0)
            output = out.read()
            print(output, end="", file=sys.stderr)
            found = re.search(r"^part %s: (\d+) passed, (\d+) failed, "
                              r"(\d+) skipped$" % part, output, re.M)
            part_counts = tuple(map(int, found.groups())) if found \
                else (0, 1, 0)
            counts = tuple(a + b for a, b in zip(counts, part_counts))
    passed, failed, skipped = counts
    print(f"{passed} passed, {failed} failed, {skipped} skipped")
    return 1 if failed else 0


# "from test_simple_comet import *" gives the helpers, not the tests or the
# module's setup (which would start the main server on port 4080 again).
__all__ = [name for name, value in list(globals().items())
           if not name.startswith("_")
           and name not in ("setUpModule", "tearDownModule", "main")
           and not (isinstance(value, type)
                    and issubclass(value, unittest.TestCase))]


if __name__ == "__main__":
    sys.exit(main())
