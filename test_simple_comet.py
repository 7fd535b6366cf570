"""Tests for simple_comet.py: the server is started as users start it, as a
subprocess on port 4080 (others on nearby ports and unix sockets), and
driven with http.client and raw sockets. The JavaScript client is run in
headless Chromium, and the README's nginx configuration in a real nginx;
those tests are skipped when Chromium or nginx is not installed.

    python3 -m unittest -v test_simple_comet
"""

import fcntl
import grp
import http.client
import http.server
import itertools
import json
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


# ---------------------------------------------------------------------------
# The main server, shared by most tests
# ---------------------------------------------------------------------------

MAIN = None


def setUpModule():
    global MAIN
    MAIN = ServerProcess(f"--http-port={PORT}", "--enable-status",
                         f"--poll-timeout={MAIN_POLL_TIMEOUT}", listeners=2)


def tearDownModule():
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


@unittest.skipUnless(CHROMIUM, "Chromium not installed (apt-get install chromium)")
class BrowserTests(unittest.TestCase):
    """simple-comet.js in a real browser, on a page of another origin."""

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


@unittest.skipIf(NGINX is None, 'nginx is not installed (looked for nginx on '
                 'PATH and in /usr/sbin)')
class NginxTests(unittest.TestCase):

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
                                   f'--poll-timeout={NGINX_POLL_TIMEOUT}')

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


def main():
    """Run every test; print one closing line with the counts.  With
    SIMPLE_COMET_NO_SKIP set (CI), a skipped test is a failure."""
    suite = unittest.defaultTestLoader.loadTestsFromModule(sys.modules[__name__])
    result = unittest.TextTestRunner(verbosity=2).run(suite)
    failed = len(result.failures) + len(result.errors)
    skipped = len(result.skipped)
    passed = result.testsRun - failed - skipped
    if skipped and os.environ.get("SIMPLE_COMET_NO_SKIP"):
        for test, reason in result.skipped:
            print(f"not allowed to skip here: {test}: {reason}")
        failed += skipped
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
