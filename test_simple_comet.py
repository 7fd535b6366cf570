"""Tests for simple_comet.py: the server is started as users start it, as a
subprocess on port 4080 (others on nearby ports and unix sockets), and
driven with http.client and raw sockets.

    python3 -m unittest -v test_simple_comet
"""

import http.client
import itertools
import json
import os
import random
import re
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
        server = ServerProcess(f"--http-port={OTHER_PORT}",
                               "--log-level=warning", wait=False)
        try:
            wait_for(lambda: self._accepts(OTHER_PORT))
            call("GET", "/nowhere.json", port=OTHER_PORT)
            self.assertEqual(server.stop(), 0)
            output = server.output()
            self.assertNotIn("INFO", output)
            self.assertIn("WARNING", output)
            self.assertIn("404", output)
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
        reply = push(b, "new")
        self.assertEqual(reply["delivered"], 3)
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
                     b"GET / HTTP/1.1\r\nHost: x\nX: y\r\n\r\n",
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
        for path in ("/", "/nothing", "/channels", "/channels/a",
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
        server = ServerProcess(f"--http-port={OTHER_PORT}",
                               "--max-connections=3", "--enable-status")
        held = []
        try:
            for _ in range(3):
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
            # The first three are unaffected.
            for s, f in held:
                s.sendall(get_request("/status.json"))
                reply = json.loads(read_response(f)[2])
                self.assertEqual(reply["status"]["connections"], 3)
            s, f = held.pop()
            f.close()
            s.close()
            # A freed slot is usable again.
            wait_for(lambda: self.accepted(OTHER_PORT))
        finally:
            for s, f in held:
                f.close()
                s.close()
            server.close()

    @staticmethod
    def accepted(port):
        try:
            return status(port)["connections"] == 3
        except (OSError, http.client.HTTPException, AssertionError):
            return False


FUZZ_REQUESTS = int(os.environ.get("SIMPLE_COMET_FUZZ", "400"))


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
            for name in ("fz", "other"):
                register(name, port=OTHER_PORT)
            pushed = [push("fz", f"keep {i} \u2028é", port=OTHER_PORT)
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
            self.assertGreater(statuses.get(b"200", 0), 10, statuses)
            self.assertGreater(statuses.get(b"400", 0), 10, statuses)
            reply = read(["fz"], port=OTHER_PORT)
            kept = [m for m in reply["messages"]["fz"] if m["id"] in pushed]
            self.assertEqual([m["content"] for m in kept],
                             [f"keep {i} \u2028é" for i in range(5)])
            self.assertEqual(server.stop(), 0)
            self.assertNotIn("Traceback", server.output())
            self.assertNotIn(" ERROR ", server.output())
        finally:
            server.close()
