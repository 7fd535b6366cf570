"""Tests for simple_comet.py: the server is started as users start it, as a
subprocess on port 4080 (others on nearby ports and unix sockets), and
driven with http.client and raw sockets. The JavaScript client is run in
headless Chromium, and the README's nginx configuration in a real nginx;
those tests are skipped when Chromium or nginx is not installed.

    python3 -m unittest -v test_simple_comet
"""

import asyncio
import atexit
import contextlib
import fcntl
import gc
import grp
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
from urllib.parse import quote, urlencode

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "simple_comet.py")
sys.path.insert(0, HERE)
import simple_comet  # noqa: E402  (unit checks of a few pure functions)

PORT = 4080
OTHER_PORT = 4081          # servers started with other switches
MAIN_POLL_TIMEOUT = 3.0    # long enough to push into a held poll calmly

_names = itertools.count()


def fresh(prefix="ch"):
    """A channel or client id no other test uses."""
    return f"{prefix}{next(_names)}_{os.getpid()}"


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------

class ServerProcess:
    """simple_comet.py in a subprocess; its log goes to a temporary file."""

    def __init__(self, *args, listeners=1, env=None, wait=True):
        self.log = tempfile.NamedTemporaryFile(prefix="comet-log-")
        self.proc = subprocess.Popen(
            [sys.executable, SCRIPT, *args], stdin=subprocess.DEVNULL,
            stdout=self.log, stderr=self.log,
            env=None if env is None else {**os.environ, **env})
        if wait:
            self.wait_listening(listeners)

    def output(self):
        with open(self.log.name, encoding="utf-8", errors="replace") as f:
            return f.read()

    def wait_listening(self, listeners=1, timeout=10):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.output().count("listening on") >= listeners:
                return
            if self.proc.poll() is not None:
                raise RuntimeError("server exited: " + self.output())
            time.sleep(0.02)
        raise RuntimeError("server did not start: " + self.output())

    def stop(self, sig=signal.SIGTERM, timeout=10):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def close(self):
        try:
            self.stop()
        finally:
            self.log.close()


def run_server(*args, timeout=10):
    """Run the server to completion (for switches that make it exit)."""
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


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


def wait_for(predicate, timeout=5.0, interval=0.01):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("condition not reached in time")


def wait_held(count, port=PORT):
    wait_for(lambda: status(port)["held_connections_count"] == count)


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


def connect(port=PORT, timeout=5):
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def read_response(f):
    """Read one response from a socket's binary file: (status, headers, body)
    with lower-case header names; None on a closed connection."""
    line = f.readline()
    if not line:
        return None
    status = int(line.split()[1])
    headers = {}
    while True:
        line = f.readline()
        if line in (b"\r\n", b""):
            break
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    body = f.read(int(headers.get("content-length", 0)))
    return status, headers, body


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


def open_stream(port, path, last_event_id=None, timeout=5):
    """Send a stream's GET on a raw socket and read the reply's head:
    (socket, its binary file, status, headers with lower-case names)."""
    sock = connect(port, timeout)
    extra = ("" if last_event_id is None
             else f"Last-Event-ID: {last_event_id}\r\n")
    sock.sendall(get_request(path, extra))
    f = sock.makefile("rb")
    status = int(f.readline().split()[1])
    headers = {}
    while (line := f.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return sock, f, status, headers


def stream_events(f):
    """The events of a stream's body read from f, as the EventSource
    standard splits them: a dict of the fields of each block that has any
    (comments left out), until the stream ends."""
    event = {}
    while True:
        try:
            line = f.readline()
        except ConnectionResetError:
            return
        if not line:
            return
        line = line.decode().rstrip("\n")
        if line == "":
            if event:
                yield event
            event = {}
        elif not line.startswith(":"):
            field, _, value = line.partition(":")
            event[field] = value[1:] if value.startswith(" ") else value


# ---------------------------------------------------------------------------
# The main server, shared by most tests
# ---------------------------------------------------------------------------

MAIN = None
PART = os.environ.get("SIMPLE_COMET_PART")


def setUpModule():
    global MAIN
    if PART == "C":
        return                   # the other process runs the main server
    MAIN = ServerProcess(f"--http-port={PORT}", "--enable-status",
                         f"--poll-timeout={MAIN_POLL_TIMEOUT}", listeners=2)


def tearDownModule():
    if MAIN is None:
        return
    output = MAIN.output()
    code = MAIN.stop()
    MAIN.log.close()
    assert code == 0, (code, output)
    assert "Traceback" not in output, output


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
        for args in (["--http-port=70000"], ["--http-port=0"],
                     ["--http-timeout=0"], ["--poll-timeout=-1"],
                     ["--session-timeout=nan"], ["--messages-per-channel=0"],
                     ["--max-messages-per-channel", "x"],
                     ["--max-connections=0"], ["--unix-socket-mode=999"],
                     ["--inactive-channel-timeout=inf"], ["--no-such-switch"]):
            with self.subTest(args=args):
                result = run_server(*args)
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
        server = ServerProcess("--http-port", str(OTHER_PORT), "--http-host",
                               "127.0.0.1", "--max-messages-per-channel", "2")
        try:
            self.assertIn(f"listening on http://127.0.0.1:{OTHER_PORT}",
                          server.output())
            name = register(port=OTHER_PORT)
            for i in range(3):
                push(name, f"m{i}", port=OTHER_PORT)
            got = read([name], port=OTHER_PORT)["messages"][name]
            self.assertEqual([m["content"] for m in got], ["m1", "m2"])
        finally:
            server.close()

    def test_messages_per_channel(self):
        server = ServerProcess(f"--http-port={OTHER_PORT}",
                               "--messages-per-channel=3")
        try:
            name = register(port=OTHER_PORT)
            for i in range(5):
                push(name, f"m{i}", port=OTHER_PORT)
            got = read([name], port=OTHER_PORT)["messages"][name]
            self.assertEqual([m["content"] for m in got], ["m2", "m3", "m4"])
        finally:
            server.close()

    def test_quote_json(self):
        server = ServerProcess(f"--http-port={OTHER_PORT}", "--quote-json",
                               "--poll-timeout=0.2")
        try:
            resp, body = call("POST", "/channels.json", {"channel_id": "q"},
                              port=OTHER_PORT)
            text = body.decode()
            self.assertTrue(text.startswith("/*-secure- "), text)
            self.assertTrue(text.endswith(" */"), text)
            self.assertEqual(json.loads(text[11:-3])["channel_id"], "q")
            # JSON-P is already a script and is not wrapped.
            resp, body = call("GET", "/channels/q.jsonp?since=99999999999999",
                              port=OTHER_PORT)
            self.assertTrue(body.startswith(b"/**/_JSONP_comet_cb("), body)
        finally:
            server.close()

    def test_status_is_off_by_default(self):
        server = ServerProcess(f"--http-port={OTHER_PORT}")
        try:
            for path in ("/status.json", "/stats.json"):
                resp, _ = call("GET", path, port=OTHER_PORT)
                self.assertEqual(resp.status, 404)
        finally:
            server.close()

    def test_log_level(self):
        # Client mistakes are logged at INFO (SPEC C4): hidden at WARNING,
        # shown at INFO.
        for level, shown in (("warning", False), ("info", True)):
            server = ServerProcess(f"--http-port={OTHER_PORT}",
                                   f"--log-level={level}", wait=False)
            try:
                wait_for(lambda: self._accepts(OTHER_PORT))
                call("GET", "/nowhere.json", port=OTHER_PORT)
                self.assertEqual(server.stop(), 0)
                output = server.output()
                self.assertNotIn("WARNING", output)
                self.assertEqual("INFO" in output, shown)
                self.assertEqual("404 No resource at /nowhere.json" in output,
                                 shown)
            finally:
                server.close()

    @staticmethod
    def _accepts(port):
        try:
            connect(port).close()
            return True
        except OSError:
            return False


class UnixSocketTests(unittest.TestCase):

    def setUp(self):
        self.dir = tempfile.TemporaryDirectory()
        self.path = os.path.join(self.dir.name, "comet.sock")

    def tearDown(self):
        self.dir.cleanup()

    def test_socket_mode_serving_and_removal(self):
        server = ServerProcess(f"--unix-socket-path={self.path}")
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
                               "--unix-socket-mode=660",
                               f"--http-port={OTHER_PORT}", listeners=2)
        try:
            self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o660)
            register(port=OTHER_PORT)             # TCP too
        finally:
            server.close()

    def test_stale_socket_replaced_live_one_refused(self):
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(self.path)
        stale.close()                              # file left, nobody listens
        server = ServerProcess(f"--unix-socket-path={self.path}")
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


def register_unix(path):
    name = fresh()
    reply = api("POST", "/channels.json", {"channel_id": name}, unix=path)
    assert reply["return_code"] == 1, reply
    return name


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
        server = ServerProcess(f"--http-port={OTHER_PORT}",
                               "--poll-timeout=0.2")
        try:
            a, b = register(port=OTHER_PORT), register(port=OTHER_PORT)
            last = push(a, "x", port=OTHER_PORT)["message_id"]
            start = time.monotonic()
            reply = read([a, b], since=last, port=OTHER_PORT)
            elapsed = time.monotonic() - start
            self.assertGreaterEqual(elapsed, 0.15)
            self.assertLess(elapsed, 2)
            self.assertEqual(reply, {"return_code": 1, "error_message": "",
                                     "since": last, "last_id": last,
                                     "messages": {a: [], b: []}})
            # JSON-P too, through its callback.
            resp, body = call("GET", f"/channels/{a}.jsonp?since={last}&cb="
                              "_JSONP_t", port=OTHER_PORT)
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
        server = ServerProcess(f"--http-port={OTHER_PORT}", "--enable-status",
                               "--session-timeout=0.4",
                               "--inactive-channel-timeout=0.6",
                               "--poll-timeout=0.9")
        p = OTHER_PORT
        try:
            kept, idle = fresh("kept"), fresh("idle")
            for client in (kept, idle):
                api("POST", "/clients.json", {"client_id": client}, port=p)
            read_ch, push_ch, held_ch = (register(port=p) for _ in range(3))
            push(read_ch, "r", port=p)
            last = push(held_ch, "h", port=p)["message_id"]
            # A held poll keeps its client and channel alive past both
            # timeouts; reads keep read_ch alive; pushes do not count.
            poll = Background(read, [held_ch], since=last, client_id=kept,
                              port=p)
            deadline = time.monotonic() + 0.85
            while time.monotonic() < deadline:
                read([read_ch], port=p)
                api("POST", f"/channels/{push_ch}.json", {"content": "p"},
                    port=p)               # -2 once the channel has expired
                time.sleep(0.05)
            st = status(p)
            self.assertIn(kept, st["clients"])
            self.assertNotIn(idle, st["clients"])
            self.assertIn(read_ch, st["channels"])
            self.assertIn(held_ch, st["channels"])
            self.assertNotIn(push_ch, st["channels"])
            self.assertEqual(read([push_ch], port=p)["return_code"], -2)
            self.assertEqual(poll.result()["messages"], {held_ch: []})
            self.assertEqual(read([read_ch], client_id=idle, port=p)
                             ["return_code"], -3)
            # Once nobody reads, everything goes.
            wait_for(lambda: status(p)["channels"] == [] and
                     status(p)["clients"] == [], timeout=3)
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
        cls.server = ServerProcess(f"--http-port={OTHER_PORT}",
                                   "--admin-token=s3cret", "--enable-status",
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
                                      port=OTHER_PORT)
                    self.assertEqual(resp.status, 403)
                    self.assertEqual(resp.getheader("Content-Type"),
                                     "application/json")
                    self.assertIn("token", json.loads(body)["error_message"])
        resp, body = call("POST", "/channels.json", {"channel_id": "t"},
                          headers=good, port=OTHER_PORT)
        self.assertEqual(json.loads(body)["return_code"], 1)
        resp, body = call("POST", "/channels/t.json", {"content": "x"},
                          headers={"Authorization": "bearer s3cret"},
                          port=OTHER_PORT)
        self.assertEqual(json.loads(body)["return_code"], 1)
        # Reads stay open.
        reply = read(["t"], port=OTHER_PORT)
        self.assertEqual(reply["messages"]["t"][0]["content"], "x")
        resp, body = call("GET", "/status.json", headers=good, port=OTHER_PORT)
        self.assertEqual(resp.status, 200)

    def test_token_from_environment(self):
        server = ServerProcess(f"--http-port={OTHER_PORT + 1}",
                               env={"SIMPLE_COMET_ADMIN_TOKEN": "envtok"})
        try:
            resp, _ = call("POST", "/channels.json", {"channel_id": "e"},
                           port=OTHER_PORT + 1)
            self.assertEqual(resp.status, 403)
            resp, body = call("POST", "/channels.json", {"channel_id": "e"},
                              headers={"Authorization": "Bearer envtok"},
                              port=OTHER_PORT + 1)
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
        app = simple_comet.App(config, None, None)

        class Remote:
            local = False
        request = simple_comet.Request("POST", "/channels.json", "",
                                       "HTTP/1.1", {"host": "x"})
        with self.assertRaises(simple_comet.HTTPError) as caught:
            app.authorize(request, Remote())
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
        server = ServerProcess(f"--http-port={OTHER_PORT}", "--max-body=20")
        try:
            self.assertEqual(api("POST", "/channels.json", {"channel_id": "m"},
                                 port=OTHER_PORT)["return_code"], 1)
            resp, body = call("POST", "/channels/m.json", {"content": "x" * 20},
                              port=OTHER_PORT)
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
        cls.server = ServerProcess(f"--http-port={OTHER_PORT}",
                                   "--http-timeout=0.4", "--poll-timeout=0.2")

    @classmethod
    def tearDownClass(cls):
        cls.server.close()

    def closed_after(self, data):
        with connect(OTHER_PORT) as s:
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
        self.assertLess(elapsed, 2)

    def test_partial_request_closed(self):
        elapsed, received = self.closed_after(b"GET /channels/a.json HTTP/1.1"
                                              b"\r\nHost: x\r\n")
        self.assertGreaterEqual(elapsed, 0.35)
        self.assertLess(elapsed, 2)

    def test_keep_alive_idle_after_reply(self):
        request = b"GET /nope.json HTTP/1.1\r\nHost: x\r\n\r\n"
        elapsed, received = self.closed_after(request)
        self.assertTrue(received.startswith(b"HTTP/1.1 404"))
        self.assertGreaterEqual(elapsed, 0.35)

    def test_held_polls_outlive_the_http_timeout(self):
        # Polls answered by --poll-timeout keep their connection going.
        name = register(port=OTHER_PORT)
        with connect(OTHER_PORT) as s:
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
                server = ServerProcess(f"--http-port={OTHER_PORT}",
                                       f"--unix-socket-path={path}",
                                       listeners=2)
                try:
                    name = register(port=OTHER_PORT)
                    last = push(name, "x", port=OTHER_PORT)["message_id"]
                    target = f"/channels/{name}.json?since={last}"
                    polls = [Background(exchange, get_request(target),
                                        OTHER_PORT),
                             Background(exchange, f"GET {target} HTTP/1.0\r\n"
                                        "\r\n".encode(), OTHER_PORT)]
                    idle = connect(OTHER_PORT)
                    time.sleep(0.3)
                    server.proc.send_signal(sig)
                    self.assertEqual(server.proc.wait(5), 0)
                    for poll in polls:
                        replies = poll.result()
                        self.assertEqual(len(replies), 1)
                        status, headers, body = replies[0]
                        self.assertEqual(headers["connection"], "close")
                        self.assertEqual(json.loads(body)["messages"],
                                         {name: []})
                    self.assertEqual(idle.recv(10), b"")
                    idle.close()
                    self.assertFalse(os.path.exists(path))
                    self.assertNotIn("Traceback", server.output())
                    with self.assertRaises(OSError):
                        connect(OTHER_PORT).close()
                finally:
                    server.close()


class ConnectionCapTests(unittest.TestCase):

    def test_connections_beyond_the_cap_are_refused_at_once(self):
        # Loopback may go LOCAL_RESERVE beyond the cap (SPEC C4), so that a
        # saturated server can still be looked at; then 503.
        cap = 3 + simple_comet.LOCAL_RESERVE
        server = ServerProcess(f"--http-port={OTHER_PORT}",
                               "--max-connections=3", "--enable-status")
        held = []
        try:
            for _ in range(cap):
                s = connect(OTHER_PORT)
                held.append((s, s.makefile("rb")))
                s.sendall(get_request("/status.json"))
                self.assertEqual(read_response(held[-1][1])[0], 200)
            with connect(OTHER_PORT) as extra:
                start = time.monotonic()
                f = extra.makefile("rb")
                status_code, headers, body = read_response(f)
                self.assertEqual(status_code, 503)
                self.assertIn("too many connections",
                              json.loads(body)["error_message"])
                self.assertIsNone(read_response(f))
                self.assertLess(time.monotonic() - start, 1)
            # The first ones are unaffected.
            for s, f in held:
                s.sendall(get_request("/status.json"))
                reply = json.loads(read_response(f)[2])
                self.assertEqual(reply["status"]["connections"], cap)
            s, f = held.pop()
            f.close()
            s.close()
            # A freed slot is usable again.
            wait_for(lambda: self.accepted(OTHER_PORT, cap))
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
        server = ServerProcess(f"--http-port={OTHER_PORT}", "--enable-status",
                               "--poll-timeout=0.05", "--http-timeout=0.3")
        try:
            for name in ("fz", "other", "kept"):
                register(name, port=OTHER_PORT)
            # On a channel the mutated requests do not name, so its short
            # history is not pushed out by their pushes.
            pushed = [push("kept", f"keep {i} \u2028é", port=OTHER_PORT)
                      ["message_id"] for i in range(5)]
            rng = random.Random(20261121)
            statuses = {}
            for _ in range(FUZZ_REQUESTS):
                data = self.mutate(rng, rng.choice(self.SEEDS))
                try:
                    with connect(OTHER_PORT, timeout=3) as s:
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
            reply = read(["kept"], port=OTHER_PORT)
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
BROWSER_PORT = 4091          # comet servers for these tests: 4091 and 4092


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

    def wait_for(self, expression, timeout=5):
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

    def do_GET(self):
        if self.path == "/simple-comet.js":
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
            cls.browser.send("Target.getTargets")
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

    def start_server(self, port, poll_timeout):
        server = ServerProcess(f"--http-port={port}", "--enable-status",
                               f"--poll-timeout={poll_timeout}")
        self.addCleanup(server.close)
        return server

    def setUp(self):
        self.port = BROWSER_PORT
        self.server = self.start_server(self.port, 0.2)
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

    def wait_got(self, expected, timeout=5):
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
        port = BROWSER_PORT + 1
        self.start_server(port, 5)
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
        self.server = self.start_server(self.port, 0.2)
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


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _stop(proc, sig, timeout=5):
    if proc is None or proc.poll() is not None:
        return
    try:
        proc.send_signal(sig)
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
    except OSError:
        pass


def _output(path, tail=3000):
    try:
        with open(path, errors='replace') as f:
            text = f.read()
    except OSError:
        return ''
    return text[-tail:] if tail else text


FORM = {'Content-Type': 'application/x-www-form-urlencoded'}


class ReadmeNginx:
    """A class's own server on a unix socket behind a real nginx running the
    README's configuration: a keep-alive upstream on public_port, the
    minimal HTTP/1.0 form on http10_port, the private server on
    private_port."""

    SERVER_ARGS = (f'--poll-timeout={NGINX_POLL_TIMEOUT}',)


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
                                   *cls.SERVER_ARGS)

        prefix = os.path.join(cls.tmp, 'nginx')
        os.mkdir(prefix, 0o755)
        os.chmod(prefix, 0o755)
        cls.public_port = _free_port()
        cls.private_port = _free_port()
        cls.http10_port = _free_port()
        while len({cls.public_port, cls.private_port, cls.http10_port}) < 3:
            cls.http10_port = _free_port()
            cls.private_port = _free_port()
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
        deadline = time.monotonic() + 5
        pending = [cls.public_port, cls.private_port, cls.http10_port]
        while pending:
            if cls.nginx.poll() is not None:
                raise RuntimeError('nginx exited with %s:\n%s\n%s' % (
                    cls.nginx.returncode, _output(cls.nginx_out),
                    _output(cls.nginx_log)))
            try:
                connect(pending[0], timeout=1).close()
                pending.pop(0)
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError('nginx never listened:\n'
                                       + _output(cls.nginx_log))
                time.sleep(0.02)

    @classmethod
    def tearDownClass(cls):
        _stop(cls.nginx, signal.SIGQUIT)    # graceful shutdown
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
            conn = http.client.HTTPConnection('127.0.0.1', port, timeout=5)
            try:
                conn.request('GET', '/channels/%s.json?since=%d'
                             % (name, last))
                # Give the poll time to reach the server and be held.
                time.sleep(0.08 + 0.04 * attempt)
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
            for port in (self.public_port, self.http10_port) * 3:
                conn = http.client.HTTPConnection('127.0.0.1', port,
                                                  timeout=5)
                conn.request('GET', '/channels/%s.json?since=%d'
                             % (name, last))
                conns.append(conn)
            time.sleep(0.1)
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

    def server_side_connections(self):
        """Connected sockets on the server's side of the unix socket."""
        count = 0
        with open('/proc/net/unix') as f:
            next(f)
            for line in f:
                fields = line.split()
                if len(fields) >= 8 and fields[7] == self.sock \
                        and fields[5] == '03':
                    count += 1
        return count

    @unittest.skipUnless(os.path.exists('/proc/net/unix'),
                         'needs /proc/net/unix (Linux)')
    def test_upstream_connections(self):
        # The keep-alive form reuses one connection for sequential requests
        # and keeps it open; the HTTP/1.0 form leaves none open.
        name = self.new_channel()
        self.push(name, 'x')
        path = '/channels/%s.json' % name
        self.json_via(self.public_port, path)
        time.sleep(0.05)
        kept = self.server_side_connections()
        self.assertGreaterEqual(kept, 1, 'no upstream connection kept alive')
        for _ in range(5):
            self.json_via(self.public_port, path)
        time.sleep(0.05)
        self.assertEqual(self.server_side_connections(), kept,
                         'sequential requests did not reuse the connection')
        for _ in range(5):
            self.json_via(self.http10_port, path)
        deadline = time.monotonic() + 2
        while self.server_side_connections() > kept \
                and time.monotonic() < deadline:
            time.sleep(0.02)
        self.assertEqual(self.server_side_connections(), kept,
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
        lines = [line for line in _output(self.nginx_log, None).splitlines()
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


def start_on_free_port(*args, **kw):
    """A ServerProcess on a free TCP port: (server, port). A port found free
    can be taken (as a connection's ephemeral port) before the server binds
    it; then another is tried."""
    for attempt in range(5):
        port = _free_port()
        try:
            return ServerProcess(f"--http-port={port}", *args, **kw), port
        except RuntimeError as e:
            if "in use" not in str(e) or attempt == 4:
                raise


def sse_path(names, query=""):
    """The stream URL of a list of channels (%7C between them)."""
    return ("/channels/" + "%7C".join(quote(n, safe="") for n in names)
            + ".sse" + query)


class SSE:
    """One EventSource stream on a raw socket.

    The request is sent and the response head parsed at once (status,
    headers with lower-case names). For a 200 the opening block is read
    into .opening; for any other status the whole body into .body (and
    .json when it is JSON). next() then returns the body's items one by
    one: {"comment": text, "raw": bytes} for a comment line, or, at the
    blank line that ends an event, {"id"|"event"|"data"|"retry": str, ...,
    "raw": bytes} with raw the exact bytes from its first line through the
    blank line. next() returns None once the stream has ended (.reset tells
    whether it ended with a reset rather than a clean close)."""

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
        head = head.decode("latin-1").split("\r\n")
        self.status_line = head[0]
        self.status = int(head[0].split()[1])
        self.headers = {}
        for line in head[1:]:
            name, _, value = line.partition(":")
            self.headers[name.strip().lower()] = value.strip()
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

    def next(self, timeout=3):
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

    def event(self, timeout=3):
        """The next event (comments skipped); fails if the stream ends."""
        while True:
            item = self.next(timeout)
            if item is None:
                raise AssertionError("stream ended; body so far: %r"
                                     % self.body[-300:])
            if "comment" not in item:
                return item

    def message(self, timeout=3):
        """The next event, which must be a message: its decoded data."""
        item = self.event(timeout)
        assert "event" not in item and "id" in item, item
        return json.loads(item["data"])

    def messages(self, count, timeout=3):
        return [self.message(timeout) for _ in range(count)]

    def contents_until(self, last, timeout=3):
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

    def close(self):
        self.sock.close()


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
        cls.server, cls.port = start_on_free_port(
            "--enable-status", "--poll-timeout=1",
            f"--sse-heartbeat={SSE_HEARTBEAT}")

    @classmethod
    def tearDownClass(cls):
        output = cls.server.output()
        code = cls.server.stop()
        cls.server.log.close()
        assert code == 0, (code, output)
        assert "Traceback" not in output, output

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
        stream = self.open([name])
        self.assertStreamOpened(stream)
        start = len(stream.body)
        opened = time.monotonic()
        items = stream.within(SSE_HEARTBEAT * 3.5)
        self.assertTrue(items and all("comment" in i for i in items), items)
        # Comment lines and nothing else, at about the set interval.
        self.assertRegex(stream.body[start:], SSE_HEARTBEATS)
        self.assertEqual(SSE_HEARTBEATS.fullmatch(stream.body[start:]).group(),
                         stream.body[start:])
        times = [opened] + [i["at"] for i in items]
        gaps = [b - a for a, b in zip(times, times[1:])]
        self.assertGreaterEqual(len(items), 2, gaps)
        self.assertGreater(min(gaps), SSE_HEARTBEAT * 0.6, gaps)
        self.assertLess(max(gaps), SSE_HEARTBEAT * 3, gaps)
        # While events keep coming, no heartbeat is needed (one may still
        # be on its way when the first event is pushed).
        for i in range(7):
            push(name, f"busy{i}", port=self.port)
            item = stream.event() if i == 0 else stream.next()
            self.assertNotIn("comment", item)
            time.sleep(SSE_HEARTBEAT / 4)
        # And once they stop, heartbeats come again.
        self.assertIn("comment", stream.next(SSE_HEARTBEAT * 3))

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
        server, port = start_on_free_port("--enable-status",
                               "--session-timeout=0.4",
                               "--inactive-channel-timeout=0.4",
                               "--http-timeout=0.6", "--poll-timeout=0.3",
                               f"--sse-heartbeat={SSE_HEARTBEAT}")
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
        # Past every timeout (and past --http-timeout for the connection).
        stream.within(1.0)
        st = status(port)
        self.assertEqual(st["streams_open"], 1)
        self.assertIn(kept, st["clients"])
        self.assertIn(private, st["channels"])
        self.assertIn(public, st["channels"])
        self.assertNotIn(idle, st["clients"])        # the timeouts do work
        self.assertNotIn(unread, st["channels"])
        push(private, "still", port=port)
        self.assertEqual(stream.message()["content"], "still")
        # Once the stream is gone, so are they.
        stream.close()
        wait_for(lambda: status(port)["channels"] == [] and
                 status(port)["clients"] == [], timeout=3)

    def test_streams_count_in_max_connections(self):
        """Streams count in --max-connections."""
        server, port = start_on_free_port("--enable-status",
                                          "--max-connections=2")
        self.addCleanup(server.close)
        name = register(port=port)
        streams = []

        def open_stream():
            """A new stream, or None when the connection is refused."""
            s = connect(port)
            self.addCleanup(s.close)
            # A refused connection is answered 503 at once, unasked.
            if select.select([s], [], [], 0.2)[0]:
                status_code, _, body = read_response(s.makefile("rb"))
                self.assertEqual(status_code, 503, body)
                return None
            stream = SSE(port, sse_path([name]), sock=s)
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
            server, port = start_on_free_port("--enable-status",
                                              "--poll-timeout=30")
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
                server, port = start_on_free_port(
                    f"--unix-socket-path={sock}", "--enable-status",
                    "--poll-timeout=5", f"--sse-heartbeat={SSE_HEARTBEAT}",
                    listeners=2)
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
        server.proc.send_signal(sig)
        self.assertEqual(server.proc.wait(5), 0)
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
        server, port = start_on_free_port("--enable-status",
                                    f"--sse-heartbeat={SSE_HEARTBEAT}")
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
        server.proc.send_signal(signal.SIGTERM)
        items = normal.rest(timeout=3)
        self.assertLess(time.monotonic() - signalled, 1)
        self.assertEqual(len(items), 1, items)
        self.assertRegex(items[0]["raw"], rb"^retry: \d+\n\n?$")
        self.assertEqual(server.proc.wait(15), 0)
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
            server, self.port = start_on_free_port(*args)
        else:
            server = ServerProcess(f"--http-port={self.port}", *args)
        self.addCleanup(server.close)
        return server

    def open_page(self, script):
        path = "/%s.html" % self.id().rsplit(".", 1)[-1]
        PageHandler.pages[path] = SSE_PAGE % {"port": self.port,
                                              "script": script}
        self.tab.navigate(self.page_origin + path)
        self.assertTrue(self.tab.wait_for("window.got !== undefined"),
                        "page did not load")

    def wait_got(self, expected, timeout=5):
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
        # Each event arrives as soon as it is pushed, not batched.
        for i in range(5):
            pushed_at = time.monotonic()
            self.push(name, 'live %d' % i)
            item = stream.event(timeout=2)
            self.assertEqual(json.loads(item['data'])['content'],
                             'live %d' % i)
            self.assertLess(item['at'] - pushed_at, 0.25)
        # Heartbeats pass through too.
        items = stream.within(SSE_HEARTBEAT * 4)
        self.assertTrue(items and all('comment' in i for i in items), items)
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
        lines = [line for line in _output(self.nginx_log, None).splitlines()
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


def status_unix(path):
    return api('GET', '/status.json', unix=path)['status']


# ---------------------------------------------------------------------------
# C2. State that survives restarts and crashes (--state-file=PATH)
# ---------------------------------------------------------------------------

def state_server(path, port, *args, poll_timeout=0.5, env=None):
    """A server keeping its state under path, listening on port (its .port).
    A restart on the same port can find it blocked: the port is free while
    the server is down, and an outgoing connection (of any process) that
    happens to get it as its ephemeral port leaves a TIME_WAIT entry that
    keeps the port from being bound for a minute; then a new port is used."""
    for attempt in range(5):
        try:
            server = ServerProcess(f"--http-port={port}",
                                   f"--state-file={path}", "--enable-status",
                                   f"--poll-timeout={poll_timeout}", *args,
                                   env=env)
        except RuntimeError as e:
            if "address already in use" not in str(e).lower() or \
                    attempt == 4:
                raise
            port = _free_port()
        else:
            server.port = port
            return server


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


def channel_path(name, suffix=".json"):
    return f"/channels/{quote(name, safe='')}{suffix}"


def post_request(path, params):
    body = urlencode(params).encode()
    return (f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: "
            f"application/x-www-form-urlencoded\r\nContent-Length: "
            f"{len(body)}\r\n\r\n").encode() + body


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


def messages_of(name, port, **params):
    reply = read([name], port=port, **params)
    assert reply["return_code"] == 1, reply
    return reply["messages"][name]


def warning_lines(output):
    return [line for line in output.splitlines() if "WARNING" in line]


def names_number(line, number):
    return re.search(rf"(?<![0-9]){number}(?![0-9])", line) is not None


class SSEReader:
    """An EventSource-like reader on a raw socket: .next_event() parses
    the stream (id, event, data) until the server closes it."""

    def __init__(self, port, path, last_event_id=None, timeout=5):
        self.sock, self.f, self.status, self.headers = open_stream(
            port, path, last_event_id, timeout)
        self.blocks = stream_events(self.f)
        self.retry = None

    def next_event(self):
        """The next event as a dict, or None when the stream ends."""
        for event in self.blocks:
            if "retry" in event:
                self.retry = int(event.pop("retry"))
            if "data" in event or "event" in event:
                return event
        return None

    def message(self):
        event = self.next_event()
        assert event is not None and "event" not in event, event
        return json.loads(event["data"])

    def close(self):
        self.f.close()
        self.sock.close()


class StateFileTests(unittest.TestCase):

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="comet-state-")
        self.path = os.path.join(self.dir, "comet.state")
        self.port = _free_port()
        self.servers = []

    def tearDown(self):
        for server in self.servers:
            server.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def start(self, *args, **kw):
        server = state_server(self.path, self.port, *args, **kw)
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
        args = ("--session-timeout=1.2", "--inactive-channel-timeout=1.2")
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
        # Most of their timeout passes before the restart.
        time.sleep(0.7)
        self.stop(server)
        restart = time.monotonic()
        server = self.start(*args)
        p = self.port
        st = status(p)
        self.assertEqual(st["clients"], [kept_client])
        self.assertEqual(st["channels"], [kept_channel])
        # With the old deadlines both would be gone 0.5 s after the restart.
        time.sleep(max(0, restart + 0.9 - time.monotonic()))
        st = status(p)
        self.assertEqual(st["clients"], [kept_client])
        self.assertEqual(st["channels"], [kept_channel])
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
        proc = subprocess.Popen(
            [sys.executable, SCRIPT, f"--http-port={self.port}",
             f"--state-file={self.path}"], stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            stderr = proc.communicate(timeout=5)[1]
        except subprocess.TimeoutExpired:
            proc.kill()
            stderr = proc.communicate()[1]
            self.fail("the server started instead of refusing: " + stderr)
        self.assertEqual(proc.returncode, 1, stderr)
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
        for case, data in damaged.items():
            with self.subTest(case=case):
                restore_files(self.path, {**after, file: data})
                dropped = len(data) - offset
                server = self.start()
                p = self.port
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
                self.stop(server)
                # The file was cut back: the next start is clean.
                server = self.start()
                p = self.port
                self.assertEqual([m["content"] for m in messages_of(name, p)],
                                 expected)
                self.assertEqual(messages_of(name, p)[0]["id"],
                                 first["message_id"])
                self.assertEqual(warning_lines(server.output()), [])
                self.stop(server)

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
            result = subprocess.run(
                [sys.executable, SCRIPT, f"--http-port={_free_port()}",
                 f"--state-file={path}"], capture_output=True, text=True,
                timeout=10, stdin=subprocess.DEVNULL, cwd=cwd)
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
            time.sleep(0.3)                  # strace attaches
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
        self.assertLess(max(gaps), 1.5, (gaps, output[-2000:]))

    def test_files_are_0600_whatever_the_umask(self):
        """With umask 0, every file under PATH* is 0600: at start, through
        compactions, and after shutdown."""
        with umask(0):
            server = self.start()
            p = self.port
        name = register(port=p, max_messages="10")
        seen, shrank, last = {}, False, 0
        for i in range(30):
            pipelined_replies(p, [
                post_request(channel_path(name),
                             {"content": f"{i}-{j}-" + "m" * 300})
                for j in range(200)])
            seen.update(state_modes(self.path))
            size = sum(state_sizes(self.path).values())
            shrank = shrank or size < last
            last = size
        self.assertTrue(shrank, "no compaction seen")
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
        self.assertLess(sizes[-1], 10 * live + 64 * 1024, (sizes, live))
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
        stream = SSEReader(p, channel_path(name, ".sse"))
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
            self.assertIsNone(stream.next_event())
        finally:
            stream.close()
        server = self.start()
        p = self.port
        # Pushed before either client is back.
        m3 = push(name, "m3", port=p)["message_id"]
        stream = SSEReader(p, channel_path(name, ".sse"), last_event_id=m2)
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

    ROUNDS = 6
    PUSHERS = 4

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="comet-state-")
        self.path = os.path.join(self.dir, "comet.state")
        self.port = _free_port()
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
        self.server = state_server(self.path, p)
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
            self.server.proc.kill()
            self.server.proc.wait()
            left = set(state_sizes(self.path))
            stop.set()
            for thread in threads:
                thread.result()
            in_flight |= set(attempts.values())
            pushed += len(acked)
            for name, message_id, content in acked:
                stored[name][message_id] = content
            self.assertEqual(set(state_modes(self.path).values()), {0o600})

            self.server = state_server(self.path, p)
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
        self.server = state_server(self.path, p)
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
        self.port = _free_port()
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
        self.server = state_server(self.path, p, poll_timeout=5)
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
        stream = SSEReader(p, channel_path(name, ".sse"),
                           last_event_id=acked[-1][0])
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
        self.server = state_server(self.path, p)
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
        self.server = state_server(self.path, p)
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
        self.server = state_server(self.path, p)
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

    def test_restart_with_many_retained_messages(self):
        """Restart (after SIGTERM and after SIGKILL) with 1,000 channels of
        RESTART_MESSAGES messages (100: 100,000 in all) is quick and
        restores them all."""
        d = tempfile.mkdtemp(prefix="comet-state-")
        path, p = os.path.join(d, "comet.state"), _free_port()
        server = None
        try:
            server = state_server(path, p)
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
                server = state_server(path, p)
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


def serve_free(*args, **kw):
    """ServerProcess on a port from _free_port() (in .port); another port
    is tried when that one was taken meanwhile by other tests' sockets."""
    for attempt in range(3):
        port = _free_port()
        try:
            server = ServerProcess(f"--http-port={port}", *args, **kw)
        except RuntimeError as e:
            if "in use" in str(e) and attempt < 2:
                continue
            raise
        server.port = port
        return server


def form_post(path, **params):
    """The bytes of one form POST (for pipelining)."""
    body = urlencode(params).encode()
    return (f"POST {path} HTTP/1.1\r\nHost: localhost\r\n"
            "Content-Type: application/x-www-form-urlencoded\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


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


def log_lines(output):
    """(level, message) of each line of a log in the server's format
    "%(asctime)s %(levelname)s %(message)s"; other lines get level None."""
    lines = []
    for line in output.splitlines():
        m = re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ([A-Z]+) (.*)",
                     line)
        lines.append((m.group(1), m.group(2)) if m else (None, line))
    return lines


def wait_accepting(port, timeout=10, proc=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError("server exited")
        try:
            connect(port, timeout=1).close()
            return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError("server did not start")


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


def connect_unix(path, timeout=5):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(path)
    return s


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
    and closes it, within a second."""
    start = time.monotonic()
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
    assert time.monotonic() - start < 1, what


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
        cls.server = serve_free("--enable-status", "--poll-timeout=5")
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
        server = serve_free("--enable-status", *args)
        try:
            wait_for(lambda: call("GET", "/health.json", port=server.port)
                     [0].status == 200)
            m = fetch_metrics(server.port)
            return [name for name, kind in m.types.items() if kind == "gauge"]
        finally:
            server.proc.kill()     # a clean shutdown is tested elsewhere
            server.close()

    def test_state_file_gauges(self):
        with tempfile.TemporaryDirectory() as d:
            gauges = self.gauges(f"--state-file={d}/state")
        self.assertTrue([g for g in gauges if "state" in g], gauges)

    @unittest.skipUnless(shutil.which("redis-server"),
                         "redis-server is not installed")
    def test_redis_gauges(self):
        with tempfile.TemporaryDirectory() as d:
            port = _free_port()
            redis = subprocess.Popen(
                ["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                 "--save", "", "--appendonly", "no", "--dir", d],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL)
            try:
                gauges = self.gauges(f"--redis=redis://127.0.0.1:{port}",
                                     f"--redis-prefix={fresh()}:")
            finally:
                _stop(redis, signal.SIGTERM)
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
        self.server = serve_free()
        self.port = self.server.port
        resp, body = call("GET", "/metrics", port=self.port)
        self.assertEqual(resp.status, 404, body)

    def test_admin_token_needed(self):
        self.server = serve_free("--enable-status", "--admin-token=m3trix")
        self.port = self.server.port
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            resp, body = call("GET", "/metrics", headers=headers,
                              port=self.port)
            self.assertEqual(resp.status, 403, body)
            self.assertEqual(json.loads(body)["return_code"], -1)
        fetch_metrics(self.port, headers={"Authorization": "Bearer m3trix"})

    def test_without_token_only_local_clients(self):
        self.server = serve_free(f"--unix-socket-path={self.sock}",
                                 "--enable-status", listeners=2)
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
        server = serve_free("--admin-token=h3alth")
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
        self.server = serve_free("--max-connections=3", "--enable-status")
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
                                    "--max-connections=3")
        for _ in range(3 + 4):
            self.open.append(served(connect_unix(self.sock)))
        with connect_unix(self.sock, timeout=2) as extra:
            refused_at_once(extra, "8th unix socket connection")

    def test_other_addresses_never_exceed_the_cap(self):
        other_address()
        self.server = serve_free("--max-connections=3", "--enable-status")
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
        finds the pipe full.  Returns (process, port, read end)."""
        for attempt in range(3):
            read_end, write_end = os.pipe()
            try:
                fcntl.fcntl(write_end, getattr(fcntl, "F_SETPIPE_SZ", 1031),
                            4096)
            except OSError:
                pass
            size = fcntl.fcntl(write_end, getattr(fcntl, "F_GETPIPE_SZ", 1032))
            os.write(write_end, b"#" * size)
            port = _free_port()
            proc = subprocess.Popen(
                [sys.executable, SCRIPT, f"--http-port={port}",
                 "--http-host=127.0.0.1", *args],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=write_end)
            os.close(write_end)
            try:
                wait_accepting(port, proc=proc)
                return proc, port, read_end
            except RuntimeError:
                os.close(read_end)
                _stop(proc, signal.SIGTERM)
                if attempt == 2:
                    raise

    def test_stuck_log_pipe_does_not_stall_serving(self):
        """With stderr stuck, 20,000 bad requests are all answered, and
        reads during and after them take under a second."""
        proc, port, read_end = self.start_with_stuck_log()
        try:
            resp, body = call("POST", "/channels.json", {"channel_id": "a"},
                              port=port, timeout=2)
            self.assertEqual(json.loads(body)["return_code"], 1)
            resp, body = call("POST", "/channels/a.json", {"content": "x"},
                              port=port, timeout=2)
            self.assertEqual(json.loads(body)["return_code"], 1)
            job = Background(flood, port, 18_000, 2_000, timeout=3)
            worst = 0.0
            probes = 0
            while job.is_alive() or probes < 5:
                if not job.is_alive():
                    probes += 1
                start = time.monotonic()
                try:
                    resp, body = call("GET", "/channels/a.json", port=port,
                                      timeout=2)
                    self.assertEqual(json.loads(body)["return_code"], 1)
                    worst = max(worst, time.monotonic() - start)
                except OSError:
                    worst = math.inf
                    break
                time.sleep(0.02)
            report(f"worst read during a 20,000 bad-request flood with a "
                   f"stuck log: {worst * 1000:.1f} ms")
            self.assertLess(worst, 1.0, "a read waited on the stuck log")
            answered = job.result(timeout=120)
            self.assertEqual(answered, 20_000)
        finally:
            os.close(read_end)             # unblocks a server stuck writing
            _stop(proc, signal.SIGTERM)

    def test_stuck_log_does_not_stop_shutdown(self):
        """SIGTERM with stderr stuck: the held poll is answered and the
        server exits 0 within a few seconds."""
        proc, port, read_end = self.start_with_stuck_log("--poll-timeout=30")
        try:
            resp, body = call("POST", "/channels.json", {"channel_id": "a"},
                              port=port, timeout=2)
            self.assertEqual(json.loads(body)["return_code"], 1)
            poll = Background(call, "GET", "/channels/a.json", port=port,
                              timeout=10)
            time.sleep(0.3)                # no status page: let it be held
            self.assertTrue(poll.is_alive(), "the poll was not held")
            proc.send_signal(signal.SIGTERM)
            resp, body = poll.result()
            self.assertEqual(json.loads(body)["messages"], {"a": []})
            try:
                code = proc.wait(5)
            except subprocess.TimeoutExpired:
                code = "still running 5 s after SIGTERM"
            self.assertEqual(code, 0)
        finally:
            os.close(read_end)
            _stop(proc, signal.SIGTERM)

    def test_bad_request_flood_is_rate_limited(self):
        """5,000 bad requests: at most a few hundred log lines, none at
        WARNING or above, and an INFO line counts what was left out."""
        server = serve_free()
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
        cls.server = serve_free("--max-body=1000")
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
            time.sleep(3)
            # A byte to a closed socket draws a reset, and the next send
            # fails; while the server lingers, both are taken.
            s.sendall(b"x")
            time.sleep(0.2)
            with self.assertRaises((BrokenPipeError, ConnectionResetError)):
                s.sendall(b"x")


class BareLineFeedTests(unittest.TestCase):
    """Request heads whose lines end in a bare LF are understood."""

    @classmethod
    def setUpClass(cls):
        cls.server = serve_free("--poll-timeout=0.2")
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
        self.port = _free_port()         # for the servers that must not start
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
        server = serve_free("--enable-status", *args, env=env)
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
        for path in (self.write("empty", ""), self.write("blank", " \n\n"),
                     os.path.join(self.dir.name, "missing"),
                     self.dir.name):                        # a directory
            with self.subTest(path=path):
                result = run_server(f"--http-port={self.port}",
                                    f"--admin-token-file={path}")
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
        cls.dir = tempfile.TemporaryDirectory()
        cls.redis_port = _free_port()
        cls.redis = subprocess.Popen(
            [REDIS_SERVER, "--port", str(cls.redis_port), "--bind",
             "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", cls.dir.name, "--requirepass", cls.PASSWORD],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)

        def up():
            try:
                with socket.create_connection(("127.0.0.1", cls.redis_port),
                                              1) as s:
                    s.sendall(b"PING\r\n")
                    return s.recv(100)[:1] == b"-"      # -NOAUTH
            except OSError:
                return False
        try:
            wait_for(up, timeout=10)
        except AssertionError:
            _stop(cls.redis, signal.SIGTERM)
            cls.dir.cleanup()
            raise

    @classmethod
    def tearDownClass(cls):
        _stop(cls.redis, signal.SIGTERM)
        cls.dir.cleanup()

    def url(self, password):
        return f"redis://:{password}@127.0.0.1:{self.redis_port}"

    def setUp(self):
        self.servers = []

    def tearDown(self):
        for server in self.servers:
            server.close()

    def start(self, *args, env=None):
        # A prefix of its own: no state from another test.
        server = serve_free("--enable-status", f"--redis-prefix={fresh()}:",
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
            server.proc.send_signal(signal.SIGTERM)
        for way, server in ways.items():
            with self.subTest(way=way):
                # (stop() would send a second SIGTERM.)
                self.assertEqual(server.proc.wait(15), 0)
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
        port = _free_port()
        server = ServerProcess(f"--http-port={port}", "--enable-status",
                               f"--redis-file={self.write_url(wrong)}",
                               wait=False)
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
        time.sleep(1)                           # a few reconnect attempts
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
        cls.server = serve_free(f"--max-connections-per-ip={cls.N}",
                                f"--unix-socket-path={cls.sock}",
                                "--enable-status", "--poll-timeout=5",
                                listeners=2)
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
        server = serve_free()
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
            requests.append(form_post("/channels.json", channel_id=f"c{i}"))
            requests.append(form_post("/clients.json", client_id=f"k{i}"))
        replies = pipeline(requests, port)
        done = time.monotonic()
        self.assertEqual(len(replies), len(requests))
        for reply in replies:
            self.assertEqual(json.loads(reply[2])["return_code"], 1, reply)
        return done

    def test_unread_state_goes_read_state_stays(self):
        """2,000 channels and 2,000 clients with 0.5 s timeouts: three
        channels and clients read in a loop stay; the others are gone
        within about a second of their timeout; an expired channel reads
        -2, an expired client -3."""
        timeout = 0.5
        server = serve_free("--enable-status",
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
            deadline = done + timeout + 1.0
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
        reads runs: no read takes 50 ms."""
        # A stall from expiry comes every time; a slow read from another
        # process taking the CPU rarely twice: one more try before failing.
        worst = self.worst_read_while_expiring()
        if worst >= 0.05:
            worst = self.worst_read_while_expiring()
        self.assertLess(worst, 0.05)

    def worst_read_while_expiring(self):
        timeout = 1.0
        server = serve_free("--enable-status",
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

class RedisProcess:
    """A redis-server of the test's own: loopback only, no persistence (so
    a restart comes back empty), files in a temporary directory. stop()
    and start() again reuse the same port."""

    def __init__(self, *args, port=None):
        self.dir = tempfile.TemporaryDirectory(prefix="comet-redis-")
        self.port = port or _free_port()
        self.socket_path = os.path.join(self.dir.name, "redis.sock")
        self.args = args
        self.proc = self.log = None
        # A run cut short skips tearDownClass; redis-server would outlive it.
        atexit.register(self.stop)
        self.start()

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
        return _output(os.path.join(self.dir.name, "redis.log"))

    def pause(self):
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)     # in case it was paused
        _stop(self.proc, signal.SIGTERM, 10)
        if self.log is not None and not self.log.closed:
            self.log.close()

    def close(self):
        self.stop()
        atexit.unregister(self.stop)
        self.dir.cleanup()

    @property
    def url(self):
        return f"redis://127.0.0.1:{self.port}"


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
    --enable-status, --redis=redis_url (unless None) and args; each gets
    .port. Returns once each is listening (Redis may still be connecting)."""
    started = []

    def start(port):
        switches = [f"--http-port={port}", "--http-host=127.0.0.1",
                    "--enable-status", *args]
        if redis_url is not None:
            switches.append(f"--redis={redis_url}")
        server = ServerProcess(*switches, env=env, wait=False)
        server.port = port
        started.append(server)
        return server

    try:
        servers = [start(_free_port()) for _ in range(count)]
        for i, server in enumerate(servers):
            for tries in range(5):
                try:
                    server.wait_listening()
                    break
                except RuntimeError as e:
                    # A port found free can be taken before the server
                    # binds it (as some connection's ephemeral port).
                    if "in use" not in str(e) or tries == 4:
                        raise
                    server = servers[i] = start(_free_port())
    except BaseException:
        for server in started:
            _stop(server.proc, signal.SIGKILL)
            server.log.close()
        raise
    return servers


def stop_servers(servers):
    """SIGTERM every instance at once: each must exit 0 with no traceback."""
    problems = []
    for server in servers:
        _stop_paused(server)
        if server.proc.poll() is None:
            server.proc.send_signal(signal.SIGTERM)
    for server in servers:
        try:
            code = server.proc.wait(10)     # one signal: a second may force
        except subprocess.TimeoutExpired:
            server.proc.kill()
            code = f"no exit within 10 s: {server.proc.wait()}"
        output = server.output()
        server.log.close()
        if code != 0 or "Traceback" in output:
            problems.append(f"instance on port {server.port} exited {code}: "
                            f"{output[-3000:]}")
    assert not problems, "\n".join(problems)


def _stop_paused(server):
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


def push_many(name, count, port):
    """count pushes pipelined on one connection (fast): their ids."""
    body = b"content=filler"
    request = (f"POST {channel_path(name)} HTTP/1.1\r\nHost: localhost\r\n"
               "Content-Type: application/x-www-form-urlencoded\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    ids = []
    with connect(port, timeout=30) as s:
        f = s.makefile("rb")
        for start in range(0, count, 200):
            batch = min(200, count - start)
            s.sendall(request * batch)
            for _ in range(batch):
                code, headers, data = read_response(f)
                reply = json.loads(data)
                assert code == 200 and reply["return_code"] == 1, reply
                ids.append(reply["message_id"])
    return ids


def timed_read(names, port, **params):
    """read() that also says when the reply came: (reply, monotonic time)."""
    reply = read(names, port=port, **params)
    return reply, time.monotonic()


class EventStream:
    """An EventSource stream on a raw socket, read by a thread of its own:
    .events fills with dicts ({"id", "data"} for a message, data decoded
    from JSON; {"event", "data"} for the others) each with "at", the
    monotonic time it arrived; .ended is set when the server closes it."""

    def __init__(self, port, names, since=None, last_event_id=None,
                 client_id=None):
        params = {}
        if since is not None:
            params["since"] = since
        if client_id is not None:
            params["client_id"] = client_id
        path = ("/channels/" + "%7C".join(quote(n, safe="") for n in names)
                + ".sse" + ("?" + urlencode(params) if params else ""))
        self.sock, self.f, self.status, self.headers = open_stream(
            port, path, last_event_id, timeout=30)
        self.events = []
        self.ended = threading.Event()
        self.body = None
        if self.status != 200:
            self.body = json.loads(self.f.read(int(self.headers.get(
                "content-length", 0))))
            self.close()
            return
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        try:
            for event in stream_events(self.f):
                if "data" in event:
                    event["data"] = json.loads(event["data"])
                    event["at"] = time.monotonic()
                    self.events.append(event)
        except (OSError, ValueError):
            pass
        finally:
            self.ended.set()

    def messages(self):
        """The message events' data, in order of arrival."""
        return [e["data"] for e in list(self.events) if "event" not in e]

    def wait_messages(self, count, timeout=5):
        wait_for(lambda: len(self.messages()) >= count or self.ended.is_set(),
                 timeout)
        return self.messages()

    def close(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.f.close()
        self.sock.close()


class RedisTestCase(unittest.TestCase):
    """A redis-server and `instances` simple_comet.py processes on it,
    for the class; self.ports lists the instances' ports (A, B, C)."""

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
                _stop(server.proc, signal.SIGKILL)
                server.log.close()
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
        stream = EventStream(c, [name])
        self.addCleanup(stream.close)
        self.assertEqual(stream.status, 200, stream.body)
        wait_for(lambda: not poll.is_alive() or self.held(b) == held + 1, 3)
        sent = push(name, "hello", port=a)
        reply, _ = poll.result(3)
        self.assertEqual(reply["return_code"], 1, reply)
        self.assertEqual(contents(reply, name), ["hello"])
        self.assertEqual([m["id"] for m in stream.wait_messages(1)],
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
            wait_for(lambda: read([name], port=port)["return_code"] == -2, 1)
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
        stream_a = EventStream(a, [name], since=since)
        stream_c = EventStream(c, [name], since=since)
        for stream in (stream_a, stream_c):
            self.addCleanup(stream.close)
            self.assertEqual(stream.status, 200, stream.body)
        wait_for(lambda: self.held(a) == held[a] + 1
                 and self.held(b) == held[b] + 1
                 and self.streams(a) == streams[a] + 1
                 and self.streams(c) == streams[c] + 1, 3)
        reply = push(name, "wake", port=a)
        pushed = time.monotonic()
        self.assertEqual(reply["delivered"], 2, reply)
        self.assertEqual(reply["instances"], 3, reply)
        for poll in (poll_a, poll_b):
            answer, at = poll.result(3)
            self.assertEqual(contents(answer, name), ["wake"])
            self.assertLess(at - pushed, 0.5)
        for stream in (stream_a, stream_c):
            self.assertEqual([m["content"] for m in stream.wait_messages(1)],
                             ["wake"])
            self.assertLess(stream.events[0]["at"] - pushed, 0.5)

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
        stream = EventStream(c, [name], since=since)
        self.addCleanup(stream.close)
        self.assertEqual(stream.status, 200, stream.body)
        wait_for(lambda: self.held(b) == held_b + 1
                 and self.held(c) == held_c + 1, 3)
        self.assertEqual(api("DELETE", channel_path(name), port=a)
                         ["return_code"], 2)
        self.assertEqual(poll_b.result(1)["return_code"], -2)
        self.assertTrue(stream.ended.wait(1), "stream not closed")
        self.assertEqual([(e.get("event"), e["data"]) for e in stream.events],
                         [("deleted", {"channel": name})])
        self.assertTrue(poll_c.is_alive())
        push(other, "still here", port=b)
        reply = poll_c.result(1)
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
            """EventSource behaviour: reconnect with Last-Event-ID."""
            got, turn, last = [], 0, None
            while not done.is_set() or len(got) < len(acked):
                stream = EventStream(self.ports[turn % 3], [name],
                                     last_event_id=last)
                assert stream.status == 200, stream.body
                wait_for(lambda: len(stream.messages()) >= 7
                         or done.is_set() and len(got) + len(
                             stream.messages()) >= len(acked), 10)
                stream.close()
                stream.ended.wait(2)
                got += stream.messages()
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
        self.addCleanup(_stop_paused, server)
        filler = register(fresh("rf"), port=self.ports[0], max_messages=5)
        return filler

    def resume_b(self):
        time.sleep(0.1)             # the requests sent to B have arrived
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
        opening = Background(EventStream, b, [name])
        self.resume_b()
        stream = opening.result(3)
        self.addCleanup(stream.close)
        self.assertEqual(stream.status, 200, stream.body)
        self.assertEqual(contents(polls[0].result(3), name), ["open"])
        self.assertEqual(contents(polls[1].result(3), session), ["closed"])
        self.assertEqual([m["content"] for m in stream.wait_messages(1)],
                         ["open"])

    def test_paused_instance_no_duplicates(self):
        """B stopped while A takes pushes and a reader reads them on A;
        right after SIGCONT the reader polls B (and opens a stream on B)
        with A's last_id: only later messages come, none twice."""
        a, b, c = self.ports
        name = register(fresh("rp"), port=a)
        first = push(name, "m0", port=a)["message_id"]
        wait_for(lambda: contents(read([name], port=b), name) == ["m0"], 2)
        filler = self.pause_b()
        for i in range(1, 6):
            push(name, f"m{i}", port=a)
        reply = read([name], port=a, since=first)
        self.assertEqual(contents(reply, name), [f"m{i}" for i in range(1, 6)])
        had = reply["last_id"]
        push_many(filler, self.BACKLOG, a)
        later = [push(name, f"m{i}", port=a)["message_id"] for i in (6, 7)]

        def follow(since):
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

        poll = Background(follow, had)
        opening = Background(EventStream, b, [name], last_event_id=had)
        self.resume_b()
        stream = opening.result(3)
        self.addCleanup(stream.close)
        first_reply, got, since = poll.result(5)
        # B did not clamp the reader's since to its own stale counter.
        self.assertEqual(first_reply["since"], had)
        self.assertEqual([(m["id"], m["content"]) for m in got],
                         list(zip(later, ["m6", "m7"])))
        self.assertEqual(stream.status, 200)
        self.assertEqual([m["content"] for m in stream.wait_messages(2)],
                         ["m6", "m7"])
        # And from there on, B follows as usual.
        poll = Background(read, [name], port=b, since=since)
        wait_for(lambda: self.held(b) == 1, 2)
        push(name, "m8", port=a)
        self.assertEqual(contents(poll.result(2), name), ["m8"])
        self.assertEqual([m["content"] for m in stream.wait_messages(3)],
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
        stream = EventStream(c, [name], since=since)
        self.addCleanup(stream.close)
        wait_for(lambda: self.held(c) == 1 and self.streams(c) == 1, 2)
        server = self.servers[2]
        server.proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        self.assertEqual(poll.result(3)["messages"], {name: []})
        self.assertTrue(stream.ended.wait(3))
        self.assertEqual(server.proc.wait(10), 0)
        # Nothing was in flight: no reason to wait out a grace period.
        self.assertLess(time.monotonic() - started, 3)
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
        stream = EventStream(b, [name], since=since)
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
        wait_for(lambda: "end" in [m["content"] for m in stream.messages()]
                 or stream.ended.is_set(), 10)
        streamed = stream.messages()
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
        self.assertFalse(stream.ended.is_set(), "the stream was closed")
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

    def assertRefusedWrite(self, code, body, seconds, limit=6):
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
        stream = EventStream(a, [name], since=seen)
        self.addCleanup(stream.close)
        self.assertEqual(stream.status, 200, stream.body)
        wait_for(lambda: self.held(b) == 1 and self.streams(a) == 1, 3)

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
        self.assertFalse(stream.ended.is_set())
        self.assertEqual(self.streams(a), 1)
        self.assertEqual(contents(read([name], port=b), name),
                         ["m0", "m1", "m2"])
        self.assertEqual(contents(read([session], port=a, client_id=client),
                                  session), ["s"])

        self.redis.start()             # same port, no data
        for port in self.ports:
            wait_for(lambda: can_write(port), 8)
        self.assertEqual(poll.result(3)["return_code"], -2)
        self.assertTrue(stream.ended.wait(3), "stream not closed")
        self.assertEqual(self.held(b), 0)
        for port in self.ports:
            self.assertEqual(read([name], port=port)["return_code"], -2)
            self.assertNotIn(name, status(port)["channels"])
            self.assertNotIn(client, status(port)["clients"])
        refused = EventStream(b, [name])
        self.assertEqual((refused.status, refused.body["return_code"]),
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
        stream = EventStream(b, [name], last_event_id=ids[0])
        self.addCleanup(stream.close)
        stream.wait_messages(3)
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
        and idle clients vanish from both instances within about 2 s,
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

        wait_for(all_gone, 3, interval=0.05)
        self.assertLess(time.monotonic() - started, 3)
        # Kept for 2.5 s, over twice the timeouts, by reads on B only.
        time.sleep(max(0, started + 2.5 - time.monotonic()))
        for port in self.ports:
            st = status(port)
            self.assertLessEqual({kept, session}, set(st["channels"]), port)
            self.assertIn(keeper, st["clients"], port)
        self.assertEqual(pushing.result(1)["return_code"], -2)
        stop.set()
        reading.result(2)
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

        keys = wait_for(keys_left, 3, interval=0.05)
        self.assertTrue(all(k.startswith("comet:") or k.startswith("{comet:")
                            for k in keys), keys)
        unnamed = [k for k in keys
                   if not any(n in k for n in (kept, session, keeper))]
        self.assertLessEqual(len(unnamed), 15, keys)


@needs_redis
class RedisPrefixTests(unittest.TestCase):
    """--redis-prefix: deployments sharing one Redis stay apart."""

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

    def run_comet(self, *args, env=None):
        return subprocess.run([sys.executable, SCRIPT,
                               f"--http-port={_free_port()}",
                               "--http-host=127.0.0.1", *args],
                              capture_output=True, text=True, timeout=10,
                              stdin=subprocess.DEVNULL,
                              env=None if env is None else {**os.environ, **env})

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
        for url in ("http://127.0.0.1:6379", "127.0.0.1:6379",
                    "redis://127.0.0.1:70000", "redis://127.0.0.1/x",
                    "redis://:secretpw@127.0.0.1:99999",
                    "unix://relative.sock"):
            with self.subTest(url=url):
                self.assertExit2(self.run_comet(f"--redis={url}"), "secretpw")
                self.assertExit2(self.run_comet(
                    env={"SIMPLE_COMET_REDIS": url}), "secretpw")
        with tempfile.TemporaryDirectory() as directory:
            path = os.path.join(directory, "redis-url")
            with open(path, "w") as f:
                f.write("redis://:secretpw@127.0.0.1:99999\n")
            self.assertExit2(self.run_comet(f"--redis-file={path}"), "secretpw")
            self.assertExit2(self.run_comet(
                f"--redis-file={os.path.join(directory, 'missing')}"))

    @needs_redis
    def test_unreachable_at_start(self):
        """Nothing listening on the Redis port: the server starts all the
        same and says so in its log (no traceback); writes and
        /health.json answer 503; once a redis-server runs on that port,
        writes succeed."""
        redis_port = _free_port()
        server, = comet_servers(f"redis://127.0.0.1:{redis_port}", 1,
                                "--poll-timeout=0.3")
        redis = None
        try:
            wait_for(lambda: str(redis_port) in server.output(), 3)
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
                self.assertLess(seconds, 6)
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
        sleeping = conn.execute("DEBUG", "SLEEP", "0.8")
        behind = conn.execute("PING", timeout=10)
        with self.assertRaises(RedisTimeout):
            await sleeping
        with self.assertRaises(RedisConnectionError) as caught:
            await behind
        self.assertNotIsInstance(caught.exception, RedisTimeout)
        self.assertLess(time.monotonic() - start, 0.6)
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
            await asyncio.wait_for(waiting, 2)
        await asyncio.wait_for(victim.wait_closed(), 1)
        self.assertEqual(victim.close_reason, "connection closed by the server")
        with self.assertRaises(RedisConnectionError):
            victim.execute("PING")

    async def test_nothing_listening(self):
        """No server: connect fails at once; an unconnected connection
        refuses commands instead of queueing them."""
        conn = RedisConnection(f"redis://127.0.0.1:{_free_port()}")
        start = time.monotonic()
        with self.assertRaises(RedisConnectionError) as caught:
            await conn.connect()
        self.assertIn("refused", str(caught.exception))
        self.assertLess(time.monotonic() - start, 1)
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
                await asyncio.wait_for(waiting, 2)
            await asyncio.sleep(0.01)
            self.assertFalse(client.connected)
            with self.assertRaises(RedisConnectionError):
                client.execute("PING")
            await asyncio.sleep(0.6)                 # a few failed attempts
            await asyncio.to_thread(self.redis.start)
            start = time.monotonic()
            self.assertTrue(await client.wait_connected(5))
            self.assertLess(time.monotonic() - start, 1.5)
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
        await asyncio.sleep(0.05)
        start = time.monotonic()
        self.assertEqual(await client.execute("PING"), "PONG")
        self.assertLess(time.monotonic() - start, 0.1)
        first = await client.execute("XADD", "blk:s", "*", "f", "v")
        self.assertEqual(await asyncio.wait_for(reading, 1),
                         [[b"blk:s", [[first, [b"f", b"v"]]]]])
        # BLOCK 500 ms with a 0.3 s command timeout: no RedisTimeout.
        self.assertIsNone(await client.execute_blocking(
            "XREAD", "BLOCK", 500, "STREAMS", "blk:s", first, block=0.5))
        # Cancelled mid-block: its connection is dropped so a later call
        # cannot receive the stale reply.
        reading = asyncio.ensure_future(client.execute_blocking(
            "XREAD", "BLOCK", 1000, "STREAMS", "blk:s", "$", block=1))
        await asyncio.sleep(0.05)
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
        await asyncio.sleep(0.05)
        self.assertEqual(await client.execute("CLIENT", "KILL", "ID", blocking_id), 1)
        with self.assertRaises(RedisConnectionError):
            await asyncio.wait_for(reading, 1)
        self.assertNotEqual(await client.execute_blocking("CLIENT", "ID", block=0.1),
                            blocking_id)
        # Not answered within block + command timeout (0.1 + 0.3 s).
        start = time.monotonic()
        with self.assertRaises(RedisTimeout):
            await client.execute_blocking("DEBUG", "SLEEP", "0.7", block=0.1)
        self.assertLess(time.monotonic() - start, 0.6)


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
        await a.add_channel("t", 100, False)
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
        self.assertLess(time.monotonic() - start, 0.25)
        self.assertEqual(self.ids(a, "t"), [first[0], second[0],
                                            elsewhere[0], mine[0]])
        a.replica.writing -= 1

    async def test_pushes_together(self):
        """Pushes made in one turn of the loop go in scripts of up to
        REDIS_PUSH_BATCH: each gets its own id, in the order made, its own
        refusal for a channel that does not exist, and they are applied in
        order; after SCRIPT FLUSH they are sent again with the script."""
        a, b = await self.store(), await self.store()
        await a.add_channel("p", 1000, False)
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
        await a.add_channel("big", 10, False)
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


# ---------------------------------------------------------------------------
# B. Reliability: slow clients, churn, exactly-once under load, shutdown
# ---------------------------------------------------------------------------

def report(text):
    """Figures for the README's Reliability section, with SIMPLE_COMET_REPORT=1."""
    if os.environ.get("SIMPLE_COMET_REPORT"):
        print(f"\n  figure: {text}", file=sys.stderr)


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


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

    def test_stalled_clients_do_not_slow_others_and_are_closed(self):
        server = ServerProcess(f"--http-port={OTHER_PORT}", "--enable-status",
                               "--http-timeout=1")
        stalled = []
        try:
            name = register(port=OTHER_PORT)
            push(name, "x", port=OTHER_PORT)
            for i in range(300):
                s = connect(OTHER_PORT)
                s.sendall(b"POST /channels/" + name.encode() +
                          b".json HTTP/1.1\r\nHost: x\r\nContent-Length: 100"
                          b"\r\n\r\ncontent=half" if i % 2 else
                          b"GET /channels/" + name.encode() + b".json?sin")
                stalled.append(s)
            times = []
            conn = http.client.HTTPConnection("127.0.0.1", OTHER_PORT,
                                              timeout=5)
            for _ in range(200):
                start = time.monotonic()
                conn.request("GET", f"/channels/{name}.json")
                self.assertEqual(conn.getresponse().read().count(b'"x"'), 1)
                times.append(time.monotonic() - start)
            conn.close()
            times.sort()
            p99 = times[int(len(times) * 0.99)]
            self.assertLess(p99, 0.05, f"p99 {p99 * 1000:.1f} ms")
            closing = time.monotonic()
            # --http-timeout closes every stalled one (and nothing answered
            # them: there was no whole request).
            deadline = time.monotonic() + 5
            for s in stalled:
                s.settimeout(max(0.1, deadline - time.monotonic()))
                self.assertEqual(s.recv(100), b"")
            wait_for(lambda: status(OTHER_PORT)["connections"] == 1)
            report(f"{len(stalled)} stalled clients: 200 reads beside them, "
                   f"p50 {times[100] * 1000:.2f} ms, p99 {p99 * 1000:.2f} ms; "
                   f"all closed {time.monotonic() - closing:.2f} s later "
                   "(--http-timeout=1)")
        finally:
            for s in stalled:
                s.close()
            server.close()

    def test_client_that_never_reads_cannot_grow_memory(self):
        server = ServerProcess(f"--http-port={OTHER_PORT}", "--http-timeout=3")
        try:
            name = register(port=OTHER_PORT)
            push(name, "y" * 2000, port=OTHER_PORT)   # 2 KB per reply
            before = rss_kib(server.proc.pid)
            request = get_request(f"/channels/{name}.json")
            with connect(OTHER_PORT) as s:
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
                # And the stuck connection is dropped after --http-timeout.
                s.setblocking(True)
                s.settimeout(5)
                start = time.monotonic()
                with self.assertRaises((ConnectionResetError, AssertionError)):
                    while s.recv(1 << 20):
                        pass
                    raise AssertionError("closed cleanly")
                self.assertLess(time.monotonic() - start, 5)
        finally:
            server.close()

    def test_churn_of_dropped_polls_leaves_nothing_behind(self):
        server = ServerProcess(f"--http-port={OTHER_PORT}", "--enable-status")
        try:
            name = register(port=OTHER_PORT)
            last = push(name, "x", port=OTHER_PORT)["message_id"]
            request = get_request(f"/channels/{name}.json?since={last}")
            sizes = []
            for _ in range(6):
                socks = [connect(OTHER_PORT) for _ in range(500)]
                for s in socks:
                    s.sendall(request)
                wait_held(500, OTHER_PORT)
                for s in socks:
                    s.close()
                wait_held(0, OTHER_PORT)
                sizes.append(rss_kib(server.proc.pid))
            self.assertEqual(status(OTHER_PORT)["connections"], 1)
            # After warm-up, the size stays flat.
            self.assertLess(sizes[-1] - sizes[1], 1024, sizes)
            report(f"churn: 6 rounds of 500 polls opened and dropped, "
                   f"RSS KiB per round {sizes}")
            self.assertEqual(push(name, "y", port=OTHER_PORT)["delivered"], 0)
        finally:
            server.close()

    def test_exactly_once_under_load(self):
        server = ServerProcess(f"--http-port={OTHER_PORT}",
                               "--poll-timeout=0.1",
                               "--messages-per-channel=10000")
        try:
            names = [register(port=OTHER_PORT) for _ in range(4)]
            # Overlapping channel sets: every pair, and each one alone.
            sets = [[a, b] for i, a in enumerate(names) for b in names[i + 1:]]
            sets += [[n] for n in names]
            subscribers = [Subscriber(OTHER_PORT, sets[i % len(sets)],
                                      reconnect_every=(i % 3) * 4)
                           for i in range(100)]
            time.sleep(0.3)
            pushed = {n: [] for n in names}
            lock = threading.Lock()

            def publish(seed):
                rng = random.Random(seed)
                for i in range(40):
                    name = rng.choice(names)
                    with lock:   # ids of one channel are recorded in order
                        message_id = push(name, f"{seed}-{i}",
                                          port=OTHER_PORT)["message_id"]
                        pushed[name].append(message_id)
                    time.sleep(rng.random() * 0.02)
            publishers = [Background(publish, seed) for seed in range(4)]
            for p in publishers:
                p.result(timeout=60)
            time.sleep(0.3)      # past a poll timeout: all caught up
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
        server = ServerProcess(f"--http-port={OTHER_PORT}",
                               "--poll-timeout=5")
        name = register(port=OTHER_PORT)
        acked = []
        stop = threading.Event()

        def publish():
            conn = http.client.HTTPConnection("127.0.0.1", OTHER_PORT,
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
            subscribers = [Subscriber(OTHER_PORT, [name]) for _ in range(50)]
            publisher = Background(publish)
            time.sleep(0.5)
            server.proc.send_signal(signal.SIGTERM)
            self.assertEqual(server.proc.wait(10), 0)
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


# The suite runs in two processes at once (the machine has two cores and
# most tests wait on servers): this one runs parts A and B with the main
# server, a second one (PART == "C") the part C classes, which start servers
# of their own.

def part_c(cls):
    """True for the classes under the C1, C2 and C3 (instances) banners:
    streams, the state file and Redis, which start servers of their own."""
    import inspect
    banner = ""
    lines = open(__file__, encoding="utf-8").read().splitlines()
    for line in lines[:inspect.getsourcelines(cls)[1]]:
        if re.match(r"# [ABC][0-9]*\. ", line):
            banner = line
    return banner.startswith(("# C1. ", "# C2. ", "# C3. Several"))


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
    SIMPLE_COMET_NO_SKIP set (CI), a skipped test is a failure."""
    classes = [c for c in globals().values() if isinstance(c, type)
               and issubclass(c, unittest.TestCase) and c.__module__ == __name__
               and unittest.defaultTestLoader.getTestCaseNames(c)]
    if PART == "C":
        counts = run([c for c in classes if part_c(c)], sys.stderr)
        print("part C: %d passed, %d failed, %d skipped" % counts)
        return 0
    with tempfile.TemporaryFile("w+") as out:
        child = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__)], stdout=out,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, "SIMPLE_COMET_PART": "C"})
        try:
            counts = run([c for c in classes if not part_c(c)], sys.stderr)
            child.wait(timeout=600)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
        out.seek(0)
        child_output = out.read()
    print(child_output, end="", file=sys.stderr)
    found = re.search(r"^part C: (\d+) passed, (\d+) failed, (\d+) skipped$",
                      child_output, re.M)
    child_counts = tuple(map(int, found.groups())) if found else (0, 1, 0)
    passed, failed, skipped = (a + b for a, b in zip(counts, child_counts))
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
