#!/usr/bin/env python3
"""Simple Comet: a long-polling publish/subscribe server in one file.

Browsers long-poll channels over plain HTTP (JSON or JSON-P); the
application publishes to a channel with one POST.  Python 3.11+, standard
library only:

    python3 simple_comet.py --http-port=4080

The REST API (every resource answers JSON with a ``.json`` suffix and
JSON-P with ``.jsonp``; API failures are HTTP 200 with a negative
``return_code``: -1 bad parameter, -2 no such / already existing channel or
client, -3 unregistered client):

    POST   /channels.json        channel_id=ID [use_sessions=1] [max_messages=N]
    POST   /channels/ID.json     content=TEXT        -> message_id, delivered
    DELETE /channels/ID.json                         -> channel_id, removed
    POST   /clients.json         client_id=ID
    GET    /channels/A%7CB.json  [since=N] [client_id=ID]
                                 -> since, last_id, messages {ID: [...]}, [lost]
    GET    /status.json          (with --enable-status)

A read with nothing newer than ``since`` is held until a message is pushed
to one of its channels or ``--poll-timeout`` passes (then every list is
empty).  Message ids come from one counter shared by all channels; a reader
passes the reply's ``last_id`` as its next ``since`` and so sees every
message once.  Writes and the status page need ``--admin-token`` or, without
one, a client on loopback or the unix socket.

The file reads top to bottom: configuration, errors, HTTP parsing, the
pub/sub hub, routes, connection handling, server lifecycle, command line.
"""

import argparse
import asyncio
import hmac
import ipaddress
import json
import logging
import math
import os
import re
import signal
import socket
import stat
import sys
import time
from collections import deque
from urllib.parse import parse_qsl, unquote_to_bytes

__version__ = "1.0.0"

log = logging.getLogger("simple_comet")


# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------

DEFAULT_PORT = 4080

# HTTP limits (RFC 9112 leaves them to the server; these match common servers).
MAX_REQUEST_LINE = 8 * 1024          # 414 above
MAX_HEADER_BYTES = 16 * 1024         # 431 above (all header lines together)
MAX_HEADER_LINES = 100               # 431 above
MAX_CHUNK_LINE = 1024                # a chunk-size line with its extensions
MAX_QUERY_FIELDS = 100               # parameters in a query string or form

# API limits.
MAX_ID_BYTES = 200                   # channel and client ids, UTF-8
MAX_CHANNELS_PER_READ = 100
MAX_CALLBACK_LENGTH = 64
MAX_MESSAGES_PARAM = 10_000          # largest max_messages a POST may ask for
JSONP_PREFIX = "_JSONP_"
DEFAULT_CALLBACK = "_JSONP_comet_cb"

# Message ids count in units of 10 us from the epoch, so they keep growing
# across restarts while the average rate stays below 100,000 per second.
ID_UNITS_PER_SECOND = 100_000
MAX_SAFE_ID = 2 ** 53 - 1            # largest integer JavaScript keeps exact

# A connection that has this much unsent reply data stops being read until
# the client catches up, so a client that never reads cannot grow memory.
WRITE_BUFFER_HIGH = 64 * 1024

SHUTDOWN_GRACE = 5.0                 # seconds to flush replies on shutdown


class Config:
    """The settings, with the defaults of the original server."""

    http_host = None                 # all interfaces
    http_port = None
    unix_socket_path = None
    unix_socket_mode = 0o666
    http_timeout = 30.0
    session_timeout = 60.0
    inactive_channel_timeout = 90.0
    poll_timeout = 25.0
    messages_per_channel = 100
    quote_json = False
    enable_status = False
    admin_token = None
    max_body = 1024 * 1024
    max_connections = 10_000
    log_level = "INFO"

    def __init__(self, **settings):
        for name, value in settings.items():
            if not hasattr(Config, name):
                raise TypeError(f"unknown setting {name!r}")
            setattr(self, name, value)


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------

class HTTPError(Exception):
    """A request that cannot be served; the reply carries ``status``.

    ``close`` is true where the byte stream can no longer be trusted (or was
    not read to its end), so the connection must be closed after the reply.
    """

    def __init__(self, status, message, close=True, headers=()):
        super().__init__(message)
        self.status = status
        self.message = message
        self.close = close
        self.headers = headers


class APIError(Exception):
    """An API-level failure: HTTP 200 with a negative ``return_code``."""

    def __init__(self, return_code, message):
        super().__init__(message)
        self.return_code = return_code
        self.message = message


BAD_PARAMETER = -1
NO_CHANNEL = -2          # nonexistent, already existing, or no valid channel
UNREGISTERED_CLIENT = -3

REASONS = {
    100: "Continue", 200: "OK", 204: "No Content",
    400: "Bad Request", 403: "Forbidden", 404: "Not Found",
    405: "Method Not Allowed", 408: "Request Timeout",
    413: "Content Too Large", 414: "URI Too Long",
    415: "Unsupported Media Type", 417: "Expectation Failed",
    431: "Request Header Fields Too Large", 500: "Internal Server Error",
    501: "Not Implemented", 503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}


# ---------------------------------------------------------------------------
# HTTP parsing
# ---------------------------------------------------------------------------

TOKEN = ("!#$%&'*+-.^_`|~0123456789"
         "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
TOKEN_CHARS = TOKEN.encode()
# Bytes never allowed in a request head (CR and LF are checked separately).
_BAD_HEAD_BYTE = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")


class Request:
    __slots__ = ("method", "path", "query", "version", "headers", "body",
                 "keep_alive")

    def __init__(self, method, path, query, version, headers):
        self.method = method
        self.path = path
        self.query = query
        self.version = version
        self.headers = headers
        self.body = b""
        # HTTP/1.1 keeps the connection by default, HTTP/1.0 only on request.
        connection = headers.get("connection", "").lower()
        if version == "HTTP/1.1":
            self.keep_alive = "close" not in connection
        else:
            self.keep_alive = "keep-alive" in connection


def parse_head(head):
    """Parse a request line and headers (``head`` ends with CRLF CRLF)."""
    crlf = head.count(b"\r\n")
    if head.count(b"\n") != crlf or head.count(b"\r") != crlf:
        raise HTTPError(400, "Lines must end with CRLF")
    if _BAD_HEAD_BYTE.search(head):
        raise HTTPError(400, "Control character in request head")
    lines = head[:-4].split(b"\r\n")
    request_line = lines[0]
    if len(request_line) > MAX_REQUEST_LINE:
        raise HTTPError(414, f"Request line over {MAX_REQUEST_LINE} bytes")
    if len(head) - len(request_line) > MAX_HEADER_BYTES:
        raise HTTPError(431, f"Headers over {MAX_HEADER_BYTES} bytes")
    if len(lines) - 1 > MAX_HEADER_LINES:
        raise HTTPError(431, f"More than {MAX_HEADER_LINES} header lines")

    try:
        method, target, version = request_line.decode("ascii").split(" ")
    except UnicodeDecodeError:
        raise HTTPError(400, "Non-ASCII byte in request line") from None
    except ValueError:
        raise HTTPError(400, "Malformed request line") from None
    # The head holds no control character but tab; a token holds neither.
    if not method or method.strip(TOKEN) or not target or "\t" in target:
        raise HTTPError(400, "Malformed request line")
    if version != "HTTP/1.1" and version != "HTTP/1.0":
        if re.fullmatch(r"HTTP/\d\.\d", version):
            raise HTTPError(505, f"{version} is not supported; use HTTP/1.1")
        raise HTTPError(400, "Malformed HTTP version")
    if target[0] != "/":
        # The absolute form (what a proxy sends) names the path after the
        # authority; the asterisk form only makes sense for OPTIONS.
        scheme, sep, rest = target.partition("://")
        if not sep or scheme.lower() not in ("http", "https"):
            if target == "*" and method == "OPTIONS":
                target = "/*"
            else:
                raise HTTPError(400, "Malformed request target")
        else:
            slash = rest.find("/")
            target = rest[slash:] if slash >= 0 else "/"
    path, _, query = target.partition("?")
    path = path.partition("#")[0]

    headers = {}
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not name or name.strip(TOKEN_CHARS):
            # Also catches obsolete line folding and space before the colon,
            # both of which RFC 9112 tells servers to reject.
            raise HTTPError(400, "Malformed header line")
        name = name.decode("ascii").lower()
        value = value.strip(b" \t").decode("latin-1")
        if name in headers:
            if name in ("host", "content-length"):
                if name == "host" or headers[name] != value:
                    raise HTTPError(400, f"Conflicting {name} headers")
                continue
            headers[name] += ", " + value
        else:
            headers[name] = value
    if version == "HTTP/1.1" and "host" not in headers:
        raise HTTPError(400, "HTTP/1.1 request without Host header")
    return Request(method, path, query, version, headers)


def body_length(request, max_body):
    """Return the Content-Length to read, or None for a chunked body."""
    headers = request.headers
    coding = headers.get("transfer-encoding")
    length = headers.get("content-length")
    if coding is not None:
        if request.version == "HTTP/1.0":
            raise HTTPError(400, "Transfer-Encoding in an HTTP/1.0 request")
        if length is not None:
            # Both at once is how requests are smuggled past proxies.
            raise HTTPError(400, "Both Content-Length and Transfer-Encoding")
        if coding.lower() != "chunked":
            raise HTTPError(501, f"Transfer coding not supported: {coding[:40]}"
                                 " (only chunked)")
        return None
    if length is None:
        return 0
    if not (length.isascii() and length.isdigit()) or len(length) > 18:
        raise HTTPError(400, "Malformed Content-Length")
    length = int(length)
    if length > max_body:
        raise HTTPError(413, f"Body over {max_body} bytes")
    return length


async def read_chunked(reader, max_body):
    """Read a chunked body (RFC 9112 section 7.1), trailers discarded."""
    body = bytearray()
    while True:
        line = await reader.readuntil(b"\r\n")
        if len(line) > MAX_CHUNK_LINE:
            raise HTTPError(400, "Chunk size line too long")
        size = line[:-2].split(b";", 1)[0].strip(b" \t")
        if not size or size.translate(None, b"0123456789abcdefABCDEF") \
                or len(size) > 16:
            raise HTTPError(400, "Malformed chunk size")
        size = int(size, 16)
        if size == 0:
            break
        if len(body) + size > max_body:
            raise HTTPError(413, f"Body over {max_body} bytes")
        body += await reader.readexactly(size)
        if await reader.readexactly(2) != b"\r\n":
            raise HTTPError(400, "Chunk data not followed by CRLF")
    trailer_bytes = 0
    while True:
        line = await reader.readuntil(b"\r\n")
        trailer_bytes += len(line)
        if trailer_bytes > MAX_HEADER_BYTES:
            raise HTTPError(431, "Trailers too large")
        if line == b"\r\n":
            return bytes(body)


def decode_params(text, where):
    """Decode an urlencoded query string or form into a dict of str."""
    if not text:
        return {}
    fields = text.split("&")
    if len(fields) > MAX_QUERY_FIELDS:
        raise HTTPError(400, f"More than {MAX_QUERY_FIELDS} fields in {where}")
    if "%" in text or "+" in text:
        if _BAD_PERCENT.search(text):
            raise HTTPError(400, f"Malformed percent-escape in {where}")
        try:
            pairs = parse_qsl(text, keep_blank_values=True, errors="strict")
        except UnicodeDecodeError:
            raise HTTPError(400, f"Invalid UTF-8 in {where}") from None
    else:
        # The usual query (ids, numbers, callback names) needs no unquoting.
        pairs = [field.partition("=")[::2] for field in fields if field]
    params = {}
    for name, value in pairs:
        if name in params and params[name] != value:
            raise APIError(BAD_PARAMETER, f"Parameter {name} given twice")
        params[name] = value
    return params


def decode_segment(segment):
    """Percent-decode one path segment to str."""
    if "%" not in segment:
        return segment
    if _BAD_PERCENT.search(segment):
        raise HTTPError(400, "Malformed percent-escape in path")
    try:
        return unquote_to_bytes(segment).decode("utf-8")
    except UnicodeDecodeError:
        raise HTTPError(400, "Invalid UTF-8 in path") from None


# ---------------------------------------------------------------------------
# Replies
# ---------------------------------------------------------------------------

_CALLBACK = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")
NO_CACHE = b"Cache-Control: no-cache, no-store, no-transform\r\n"
CORS = b"Access-Control-Allow-Origin: *\r\n"


def callback_error(name):
    """Why ``name`` may not be a JSON-P callback, or None if it may."""
    if len(name) > MAX_CALLBACK_LENGTH:
        return f"JSONP callback name longer than {MAX_CALLBACK_LENGTH}"
    if not name.startswith(JSONP_PREFIX):
        return f"JSONP callback name must start with {JSONP_PREFIX}"
    if not _CALLBACK.fullmatch(name):
        return "invalid JSONP callback name"
    return None


def frame_body(text, callback, quote):
    """Wrap a JSON text for JSON-P (callback set) or --quote-json; returns
    (content type, bytes)."""
    if callback is not None:
        return (b"application/javascript",
                f"/**/{callback}({text});".encode())
    if quote:
        return b"application/json", f"/*-secure- {text} */".encode()
    return b"application/json", text.encode()


def render(status, content_type, body, keep_alive, version,
           cors=False, extra=b"", head_only=False):
    """The bytes of a whole response."""
    out = [b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n"
           % (status, REASONS[status].encode(), content_type, len(body)),
           NO_CACHE, b"X-Content-Type-Options: nosniff\r\n"]
    if cors:
        out.append(CORS)
    if extra:
        out.append(extra)
    if not keep_alive:
        out.append(b"Connection: close\r\n")
    elif version == "HTTP/1.0":
        out.append(b"Connection: keep-alive\r\n")
    out.append(b"\r\n")
    if not head_only:
        out.append(body)
    return b"".join(out)


def api_text(fields):
    return json.dumps(fields)


def success_text(return_code=1, **fields):
    return api_text({"return_code": return_code, "error_message": "", **fields})


def error_text(return_code, message):
    return api_text({"return_code": return_code, "error_message": message})


# ---------------------------------------------------------------------------
# The pub/sub hub
# ---------------------------------------------------------------------------

class Channel:
    """A channel owns its retained messages and the polls waiting on it."""

    __slots__ = ("name", "key", "messages", "use_sessions", "polls",
                 "last_read", "dropped_id")

    def __init__(self, name, max_messages, use_sessions, now):
        self.name = name
        self.key = json.dumps(name)          # encoded once, used per reply
        # Each message is (id, its JSON text), encoded once at push time.
        self.messages = deque(maxlen=max_messages)
        self.use_sessions = use_sessions
        self.polls = {}                      # Poll -> None, in arrival order
        self.last_read = now
        self.dropped_id = 0                  # newest id the history dropped

    def since(self, since):
        """JSON texts of the messages with id > since, oldest first."""
        messages = self.messages
        if not messages or messages[-1][0] <= since:
            return []
        if messages[0][0] > since:
            return [text for _, text in messages]
        newer = []
        for message_id, text in reversed(messages):
            if message_id <= since:
                break
            newer.append(text)
        newer.reverse()
        return newer


class Client:
    """A registered client: alive while it reads or holds a poll."""

    __slots__ = ("client_id", "last_read", "held")

    def __init__(self, client_id, now):
        self.client_id = client_id
        self.last_read = now
        self.held = 0


class Poll:
    """A held read, waiting for a push to one of its channels."""

    __slots__ = ("conn", "channels", "since", "client", "callback",
                 "deadline")

    def __init__(self, conn, channels, since, client, callback):
        self.conn = conn
        self.channels = channels
        self.since = since
        self.client = client
        self.callback = callback         # JSON-P callback, None for JSON
        self.deadline = None


class Hub:
    """All channels and clients; the only place pub/sub state lives."""

    def __init__(self, config, loop):
        self.config = config
        self.loop = loop
        self.channels = {}
        self.clients = {}
        # Every held poll, oldest first.  They all share one timeout, so this
        # is also deadline order: one sweep answers the expired ones, where a
        # timer per poll would cost more memory and time than the poll.
        self.polls = {}
        self.sweep_interval = min(1.0, config.poll_timeout / 10)
        self.pushed = 0
        self.delivered = 0
        self.started = time.time()
        self.last_id = min(int(self.started * ID_UNITS_PER_SECOND), MAX_SAFE_ID)
        self.sweeper = loop.call_later(self.sweep_interval, self.sweep)

    # -- channels and clients -------------------------------------------

    def add_channel(self, name, max_messages, use_sessions):
        if name in self.channels:
            raise APIError(NO_CHANNEL, "Channel already exists")
        self.channels[name] = Channel(name, max_messages, use_sessions,
                                      self.loop.time())

    def remove_channel(self, name):
        channel = self.channels.pop(name, None)
        if channel is None:
            return False
        for poll in list(channel.polls):
            remaining = tuple(c for c in poll.channels if c is not channel)
            if remaining:
                poll.channels = remaining
            else:
                self.answer(poll, error_text(NO_CHANNEL, "No valid channels"))
        return True

    def add_client(self, client_id):
        if client_id in self.clients:
            raise APIError(NO_CHANNEL, "Client already exists")
        self.clients[client_id] = Client(client_id, self.loop.time())

    # -- messages ---------------------------------------------------------

    def push(self, channel, content):
        """Store a message and answer every poll held on the channel."""
        if self.last_id >= MAX_SAFE_ID:
            raise APIError(BAD_PARAMETER, "Message id space exhausted")
        self.last_id += 1
        message_id = self.last_id
        messages = channel.messages
        if len(messages) == messages.maxlen:
            channel.dropped_id = messages[0][0]
        messages.append((message_id, '{"id": %d, "ts": %d, "content": %s}' % (
            message_id, time.time(), json.dumps(content))))
        self.pushed += 1
        polls = channel.polls
        if not polls:
            return message_id, 0
        # Polls that share channels, since and format get the same bytes:
        # the reply is built once per distinct kind, not once per poll.
        cache = {}
        now = self.loop.time()
        count = len(polls)
        for poll in list(polls):
            conn = poll.conn
            key = (poll.channels, poll.since, poll.callback, conn.keep_alive,
                   conn.version)
            data = cache.get(key)
            if data is None:
                data = cache[key] = conn.poll_reply(
                    poll.callback, self.read_text(poll.channels, poll.since))
            self.release(poll, now)
            conn.finish_poll(data)
        self.delivered += count
        return message_id, count

    def read_text(self, channels, since):
        """The JSON reply of a read, or None when there is nothing newer."""
        parts = []
        lost = []
        empty = True
        for channel in channels:
            newer = channel.since(since)
            if newer:
                empty = False
                if since and channel.dropped_id > since:
                    lost.append(channel.key)
            parts.append(self.part(channel, newer))
        if empty:
            return None
        return self.reply_text(since, parts, lost)

    @staticmethod
    def part(channel, texts=()):
        """A channel's entry in a reply's "messages"."""
        return channel.key + ": [" + ", ".join(texts) + "]"

    def reply_text(self, since, parts, lost=()):
        lost = ', "lost": [%s]' % ", ".join(lost) if lost else ""
        return ('{"return_code": 1, "error_message": "", "since": %d, '
                '"last_id": %d, "messages": {%s}%s}' % (
                    since, self.last_id, ", ".join(parts), lost))

    def empty_text(self, channels, since):
        """A read's reply with every list empty."""
        return self.reply_text(since, [self.part(c) for c in channels])

    # -- held polls -------------------------------------------------------

    @property
    def held(self):
        return len(self.polls)

    def hold(self, poll):
        # Answered by the sweep that follows the deadline, so never later
        # than --poll-timeout.
        poll.deadline = (self.loop.time() + self.config.poll_timeout -
                         self.sweep_interval)
        self.polls[poll] = None
        for channel in poll.channels:
            channel.polls[poll] = None
        if poll.client is not None:
            poll.client.held += 1
        poll.conn.poll = poll

    def release(self, poll, now=None):
        """Forget a held poll: it was answered or its client went away."""
        if now is None:
            now = self.loop.time()
        del self.polls[poll]
        for channel in poll.channels:
            channel.polls.pop(poll, None)
            channel.last_read = now
        if poll.client is not None:
            poll.client.held -= 1
            poll.client.last_read = now
        poll.conn.poll = None

    def answer(self, poll, text):
        """Send a held poll its reply (a JSON text) and forget it."""
        self.release(poll)
        conn = poll.conn
        conn.finish_poll(conn.poll_reply(poll.callback, text))

    def time_out(self, poll):
        self.answer(poll, self.empty_text(poll.channels, poll.since))

    def sweep(self):
        now = self.loop.time()
        expired = []
        for poll in self.polls:
            if poll.deadline > now:
                break
            expired.append(poll)
        for poll in expired:
            self.time_out(poll)
        self.sweeper = self.loop.call_later(self.sweep_interval, self.sweep)

    def answer_all(self):
        """Shutdown: every held poll gets its empty reply now."""
        self.sweeper.cancel()
        for poll in list(self.polls):
            poll.conn.keep_alive = False
            self.time_out(poll)

    # -- expiry -----------------------------------------------------------

    def reap(self):
        """Forget idle clients and channels nobody has read."""
        now = self.loop.time()
        limit = now - self.config.session_timeout
        idle = [c for c in self.clients.values()
                if not c.held and c.last_read < limit]
        for client in idle:
            del self.clients[client.client_id]
        limit = now - self.config.inactive_channel_timeout
        idle = [c for c in self.channels.values()
                if not c.polls and c.last_read < limit]
        for channel in idle:
            del self.channels[channel.name]
        if idle:
            log.debug("removed %d inactive channels", len(idle))


# ---------------------------------------------------------------------------
# Routes
# ---------------------------------------------------------------------------

def check_id(value, what, channel=False):
    if not value:
        raise APIError(BAD_PARAMETER, f"Missing {what}")
    if len(value.encode()) > MAX_ID_BYTES:
        raise APIError(BAD_PARAMETER, f"{what} longer than {MAX_ID_BYTES} bytes")
    if not value.isprintable():
        raise APIError(BAD_PARAMETER, f"Control character in {what}")
    if channel and ("|" in value or "/" in value):
        raise APIError(BAD_PARAMETER, f"{what} contains | or /")
    return value


def parse_count(value, what, lowest):
    if not (value.isascii() and value.isdigit()):
        raise APIError(BAD_PARAMETER, f"Invalid {what}: not an integer")
    # Past 20 digits the exact value cannot matter (ids stay below 2**53),
    # and int() of thousands of digits would be slow.
    number = int(value) if len(value) <= 20 else 10 ** 20
    if number < lowest:
        raise APIError(BAD_PARAMETER, f"Invalid {what}: below {lowest}")
    return number


TRUE_WORDS = {"1", "true", "yes", "on"}
FALSE_WORDS = {"", "0", "false", "no", "off"}


class App:
    """Routes a parsed request to the hub and builds the reply."""

    def __init__(self, config, hub, server_state):
        self.config = config
        self.hub = hub
        self.state = server_state
        self.token = config.admin_token.encode() if config.admin_token else None

    def route(self, request, conn):
        """Return (status, content type, body, cors, extra headers), or None
        when the read is held.  Raises HTTPError."""
        segments = request.path.split("/")
        allowed = None
        if len(segments) == 2 and segments[0] == "":
            resource, fmt = self.split_format(segments[1])
            name = None
            if resource in ("channels", "clients"):
                allowed = ("POST",)
            elif resource in ("status", "stats") and self.config.enable_status:
                allowed = ("GET", "HEAD")
        elif len(segments) == 3 and segments[:2] == ["", "channels"]:
            resource = "channel"
            name, fmt = self.split_format(decode_segment(segments[2]))
            allowed = ("GET", "HEAD", "POST", "DELETE", "OPTIONS")
        if allowed is None:
            raise HTTPError(404, f"No resource at {request.path[:100]}",
                            close=False)
        method = request.method
        if fmt is None:
            raise HTTPError(404, "Resources end in .json or .jsonp",
                            close=False)
        if method not in allowed:
            raise HTTPError(405, f"{method} not allowed here", close=False,
                            headers=[("Allow", ", ".join(allowed))])
        if method == "OPTIONS":
            return self.preflight(request)

        reading = method in ("GET", "HEAD")
        # Until the callback is known, errors go through the default one.
        callback = DEFAULT_CALLBACK if fmt == "jsonp" else None
        try:
            params = self.parameters(request)
            if callback is not None:
                callback = params.get("cb", DEFAULT_CALLBACK)
                refused = callback_error(callback)
                if refused:
                    # Never echo the caller's text, and do not act on a
                    # request whose answer could not be read.
                    return 200, b"application/javascript", \
                        f"/* {refused} */".encode(), reading, b""
            if not reading or resource != "channel":
                self.authorize(request, conn)
            if resource == "channel":
                if method == "POST":
                    text = self.push(name, params)
                elif method == "DELETE":
                    text = self.delete(name)
                else:
                    text = self.read(name, params, conn, callback,
                                     hold=(method == "GET"))
                    if text is None:
                        return None
            elif resource == "channels":
                text = self.register_channel(params)
            elif resource == "clients":
                text = self.register_client(params)
            else:
                text = self.status()
        except APIError as e:
            text = error_text(e.return_code, e.message)
        content_type, body = frame_body(text, callback, self.config.quote_json)
        return 200, content_type, body, reading, b""

    @staticmethod
    def parameters(request):
        """The query string's parameters, and a POST's form on top."""
        params = decode_params(request.query, "query string")
        if request.method != "POST" or not request.body:
            return params
        content_type = request.headers.get("content-type", "")
        mime = content_type.partition(";")[0].strip().lower()
        if mime not in ("", "application/x-www-form-urlencoded"):
            raise HTTPError(415, "Send application/x-www-form-urlencoded",
                            close=False)
        try:
            form = request.body.decode("utf-8")
        except UnicodeDecodeError:
            raise HTTPError(400, "Invalid UTF-8 in body") from None
        # As in the original, the query string counts too; the form wins.
        return {**params, **decode_params(form, "body")}

    @staticmethod
    def split_format(segment):
        if segment.endswith(".jsonp"):
            return segment[:-6], "jsonp"
        if segment.endswith(".json"):
            return segment[:-5], "json"
        return segment, None

    def preflight(self, request):
        requested = request.headers.get("access-control-request-headers", "")
        extra = (b"Access-Control-Allow-Methods: GET, HEAD, OPTIONS\r\n"
                 b"Access-Control-Max-Age: 86400\r\n")
        if requested and not requested.strip(TOKEN + ", "):
            extra += b"Access-Control-Allow-Headers: %s\r\n" % requested.encode()
        return 204, b"text/plain", b"", True, extra

    def authorize(self, request, conn):
        """Writes and status need the admin token, or a local client."""
        if self.token is not None:
            given = request.headers.get("authorization", "")
            scheme, _, credential = given.partition(" ")
            if scheme.lower() == "bearer" and hmac.compare_digest(
                    credential.strip().encode(), self.token):
                return
            raise HTTPError(403, "Missing or wrong admin token "
                                 "(Authorization: Bearer ...)", close=False)
        if not conn.local:
            raise HTTPError(403, "Writes are accepted only from loopback and "
                                 "the unix socket; set --admin-token to allow "
                                 "them from elsewhere", close=False)

    # -- resources --------------------------------------------------------

    def register_channel(self, params):
        name = check_id(params.get("channel_id"), "channel_id", channel=True)
        word = params.get("use_sessions", "0").lower()
        if word not in TRUE_WORDS and word not in FALSE_WORDS:
            raise APIError(BAD_PARAMETER, "Invalid use_sessions: use 1 or 0")
        max_messages = self.config.messages_per_channel
        if "max_messages" in params:
            max_messages = parse_count(params["max_messages"], "max_messages",
                                       1)
            if max_messages > MAX_MESSAGES_PARAM:
                raise APIError(BAD_PARAMETER, "Invalid max_messages: above "
                                              f"{MAX_MESSAGES_PARAM}")
        self.hub.add_channel(name, max_messages, word in TRUE_WORDS)
        return success_text(channel_id=name)

    def register_client(self, params):
        client_id = check_id(params.get("client_id"), "client_id")
        self.hub.add_client(client_id)
        return success_text(client_id=client_id)

    def push(self, name, params):
        channel = self.hub.channels.get(name)
        if channel is None:
            check_id(name, "channel id", channel=True)
            raise APIError(NO_CHANNEL, "Nonexistent channel")
        content = params.get("content")
        if content is None:
            raise APIError(BAD_PARAMETER, "Missing content")
        # The hottest write: formatted directly rather than through a dict.
        return ('{"return_code": 1, "error_message": "", "message_id": %d, '
                '"delivered": %d}' % self.hub.push(channel, content))

    def delete(self, name):
        check_id(name, "channel id", channel=True)
        removed = self.hub.remove_channel(name)
        return success_text(2 if removed else 1, channel_id=name,
                            removed=removed)

    def read(self, names, params, conn, callback, hold):
        hub = self.hub
        names = list(dict.fromkeys(names.split("|")))
        if len(names) > MAX_CHANNELS_PER_READ:
            raise APIError(BAD_PARAMETER, "More than "
                           f"{MAX_CHANNELS_PER_READ} channels in one read")
        since = params.get("since", "0")
        since = min(parse_count(since, "since", 0), hub.last_id)
        client = None
        if "client_id" in params:
            client_id = check_id(params["client_id"], "client_id")
            client = hub.clients.get(client_id)
            if client is None:
                raise APIError(UNREGISTERED_CLIENT, "Unregistered client_id")
        now = hub.loop.time()
        if client is not None:
            client.last_read = now
        channels = []
        for name in names:
            channel = hub.channels.get(name)
            if channel is None:
                # Existing names were checked when registered; an unknown
                # one is left out, unless no channel could have it.
                check_id(name, "channel id", channel=True)
            elif client or not channel.use_sessions:
                channel.last_read = now
                channels.append(channel)
        if not channels:
            raise APIError(NO_CHANNEL, "No valid channels")
        channels = tuple(channels)
        # No await between this check and hold(): a push cannot slip between.
        text = hub.read_text(channels, since) if since < hub.last_id else None
        if text is not None:
            return text
        if not hold:
            return hub.empty_text(channels, since)
        hub.hold(Poll(conn, channels, since, client, callback))
        return None

    def status(self):
        hub = self.hub
        return success_text(status={
            "channels": list(hub.channels),
            "clients": list(hub.clients),
            "held_connections_count": hub.held,
            "uptime": round(time.time() - hub.started, 3),
            "connections": len(self.state.connections),
            "polls_held": hub.held,
            "channels_count": len(hub.channels),
            "clients_count": len(hub.clients),
            "messages_pushed": hub.pushed,
            "messages_delivered": hub.delivered,
            "last_id": hub.last_id,
        })


# ---------------------------------------------------------------------------
# Connection handling
# ---------------------------------------------------------------------------

def is_local(peer):
    """True for the unix socket and loopback addresses."""
    if not isinstance(peer, tuple):
        return True                      # unix socket: peer is '' or a path
    try:
        address = ipaddress.ip_address(peer[0].partition("%")[0])
    except ValueError:
        return False
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


class Connection:
    """One client connection: a keep-alive loop of requests and replies.

    A held poll does not block the loop: it goes back to reading, so a
    client that goes away is noticed at once, and the push that answers the
    poll writes straight to the transport.
    """

    __slots__ = ("server", "reader", "writer", "transport", "local", "peer",
                 "poll", "keep_alive", "version", "deadline",
                 "waiter", "busy")

    def __init__(self, server, reader, writer):
        self.server = server
        self.reader = reader
        self.writer = writer
        self.transport = writer.transport
        peer = writer.get_extra_info("peername")
        self.peer = peer
        self.local = is_local(peer)
        self.poll = None
        self.keep_alive = True
        self.version = "HTTP/1.1"
        self.waiter = None               # set while a request waits on a poll
        self.busy = False                # a request read but not answered
        # Checked by Server.tick(): one sweep for all connections costs less
        # than a timer each, and a held poll is never idle.
        self.deadline = server.loop.time() + server.config.http_timeout

    def poll_reply(self, callback, text):
        """The bytes that answer this connection's held poll."""
        content_type, body = frame_body(text, callback,
                                        self.server.config.quote_json)
        return render(200, content_type, body, self.keep_alive, self.version,
                      cors=True)

    def finish_poll(self, data):
        self.send(data)
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def send(self, data):
        self.busy = False
        self.transport.write(data)
        if not self.keep_alive or self.server.closing:
            self.transport.close()
        self.deadline = self.server.loop.time() + self.server.config.http_timeout

    def peer_text(self):
        if isinstance(self.peer, tuple):
            return f"{self.peer[0]}:{self.peer[1]}"
        return "unix socket"

    async def run(self):
        reader = self.reader
        try:
            while True:
                try:
                    # While a poll is held the connection waits here, and
                    # only here: this frame is part of every held poll's
                    # memory, so it keeps no request and the rest of the
                    # work is in serve().
                    if not await self.serve(
                            await reader.readuntil(b"\r\n\r\n")):
                        break
                except asyncio.LimitOverrunError:
                    self.fail(await self.head_too_long())
                    break
                except HTTPError as e:
                    self.fail(e)
                    if not self.keep_alive:
                        break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass                             # the client went away
        except Exception:
            log.exception("internal error serving %s", self.peer_text())
            self.fail(HTTPError(500, "Internal server error"))
        finally:
            await self.close()

    async def head_too_long(self):
        buffered = await self.reader.read(MAX_REQUEST_LINE + 2)
        if b"\r\n" in buffered:
            return HTTPError(431, f"Request head over {MAX_HEADER_BYTES} bytes")
        return HTTPError(414, f"Request line over {MAX_REQUEST_LINE} bytes")

    async def serve(self, head):
        """Answer (or hold) one request; False ends the connection."""
        server = self.server
        reader = self.reader
        if self.poll is not None:
            # Pipelined behind a held poll: replies go out in order.
            await self.wait_for_poll()
        if self.transport.is_closing():
            return False
        self.busy = True
        request = parse_head(head)
        self.version = request.version
        self.keep_alive = request.keep_alive
        max_body = server.config.max_body
        length = body_length(request, max_body)
        expect = request.headers.get("expect")
        if expect is not None:
            if expect.lower() != "100-continue":
                raise HTTPError(417, "Only Expect: 100-continue is supported")
            if request.version == "HTTP/1.1" and length != 0:
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        try:
            if length:
                request.body = await reader.readexactly(length)
            elif length is None:
                request.body = await read_chunked(reader, max_body)
        except asyncio.LimitOverrunError:
            raise HTTPError(400, "Chunk size line too long") from None
        reply = server.app.route(request, self)
        if reply is None:
            self.busy = False
            # Held: keep reading, so a client that leaves is noticed at once.
            return True
        status, content_type, body, cors, extra = reply
        self.send(render(status, content_type, body, self.keep_alive,
                         self.version, cors, extra, request.method == "HEAD"))
        if self.transport.get_write_buffer_size() > WRITE_BUFFER_HIGH:
            await self.writer.drain()
        return self.keep_alive

    async def wait_for_poll(self):
        self.waiter = self.server.loop.create_future()
        try:
            await self.waiter
        finally:
            self.waiter = None

    def fail(self, error):
        if self.transport.is_closing():
            return
        if self.poll is not None:
            self.server.hub.release(self.poll)
        log.warning("%s: %d %s", self.peer_text(), error.status, error.message)
        extra = b"".join(b"%s: %s\r\n" % (k.encode(), v.encode())
                         for k, v in error.headers)
        body = error_text(BAD_PARAMETER, f"{error.status} "
                          f"{REASONS[error.status]}: {error.message}").encode()
        self.keep_alive = self.keep_alive and not error.close
        self.send(render(error.status, b"application/json", body,
                         self.keep_alive, self.version, extra=extra))

    async def close(self):
        if self.poll is not None:
            self.server.hub.release(self.poll)
        self.transport.close()
        try:
            # Until the socket is really closed the connection stays counted
            # (and Server.tick() aborts one whose client stopped reading).
            # Awaiting also takes the error of a reset connection, which
            # asyncio would otherwise log as never retrieved.
            await self.writer.wait_closed()
        except ConnectionError:
            pass
        finally:
            self.server.connections.discard(self)


# ---------------------------------------------------------------------------
# Server lifecycle
# ---------------------------------------------------------------------------

class StartupError(Exception):
    """Cannot start: the message is printed and the process exits 1."""


class Server:
    def __init__(self, config):
        self.config = config
        self.loop = None
        self.hub = None
        self.app = None
        self.connections = set()
        self.servers = []
        self.closing = False
        self.socket_inode = None
        self.ticker = None

    def handle(self, reader, writer):
        """Called for each new connection; returns the coroutine that serves
        it (not a coroutine itself, to keep one frame less per connection)."""
        if self.closing or len(self.connections) >= self.config.max_connections:
            writer.transport.write(render(
                503, b"application/json",
                error_text(BAD_PARAMETER, "503 Service Unavailable: too many "
                           "connections").encode(), False, "HTTP/1.1"))
            writer.transport.close()
            return None
        conn = Connection(self, reader, writer)
        self.connections.add(conn)
        return conn.run()

    async def start(self):
        config = self.config
        self.loop = asyncio.get_running_loop()
        self.hub = Hub(config, self.loop)
        self.app = App(config, self.hub, self)
        # Requests are read whole with readuntil(); the limit lets the
        # biggest legal head through and reports anything longer.
        limit = MAX_REQUEST_LINE + MAX_HEADER_BYTES + 4
        if config.unix_socket_path:
            self.servers.append(await self.start_unix(limit))
        if config.http_port or not config.unix_socket_path:
            port = config.http_port or DEFAULT_PORT
            try:
                server = await asyncio.start_server(
                    self.handle, config.http_host, port, limit=limit,
                    backlog=1024, reuse_address=True)
            except OSError as e:
                raise StartupError(f"cannot listen on port {port}: "
                                   f"{e.strerror or e}") from None
            self.servers.append(server)
            for sock in server.sockets:
                host, port = sock.getsockname()[:2]
                if ":" in host:
                    host = f"[{host}]"
                log.info("listening on http://%s:%d", host, port)
        interval = min(1.0, config.session_timeout / 4,
                       config.inactive_channel_timeout / 4,
                       config.http_timeout / 4)
        self.ticker = self.loop.create_task(self.tick(interval))

    async def start_unix(self, limit):
        path = self.config.unix_socket_path
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISSOCK(mode):
                raise StartupError(f"{path} exists and is not a socket")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
            except OSError:
                os.unlink(path)          # stale: nothing listens there
                log.info("replaced stale socket file %s", path)
            else:
                raise StartupError(f"{path}: another server is listening")
            finally:
                probe.close()
        try:
            server = await asyncio.start_unix_server(
                self.handle, path, limit=limit, backlog=1024)
            os.chmod(path, self.config.unix_socket_mode)
        except OSError as e:
            raise StartupError(f"cannot listen on {path}: "
                               f"{e.strerror or e}") from None
        self.socket_inode = os.stat(path).st_ino
        log.info("listening on unix:%s (mode %o)", path,
                 self.config.unix_socket_mode)
        return server

    async def tick(self, interval):
        """Housekeeping: expire clients and channels, close idle connections."""
        while True:
            await asyncio.sleep(interval)
            self.hub.reap()
            now = self.loop.time()
            idle = [c for c in self.connections
                    if c.deadline < now and c.poll is None]
            for conn in idle:
                if conn.transport.get_write_buffer_size():
                    # A client that stopped reading its replies: close()
                    # would wait for them to drain, forever.
                    conn.transport.abort()
                else:
                    conn.transport.close()

    async def shutdown(self):
        """Stop accepting, answer held polls, flush replies, clean up."""
        self.closing = True
        for server in self.servers:
            server.close()
        self.ticker.cancel()
        self.hub.answer_all()
        for conn in list(self.connections):
            if not conn.busy:
                conn.transport.close()
        pending = [t for t in asyncio.all_tasks()
                   if t is not asyncio.current_task()]
        if pending:
            await asyncio.wait(pending, timeout=SHUTDOWN_GRACE)
        for conn in list(self.connections):
            conn.transport.abort()
        self.remove_socket()
        log.info("stopped")

    def remove_socket(self):
        path = self.config.unix_socket_path
        if path and self.socket_inode is not None:
            try:
                if os.stat(path).st_ino == self.socket_inode:
                    os.unlink(path)
            except OSError:
                pass


async def serve(config):
    server = Server(config)
    try:
        await server.start()
    except BaseException:
        server.remove_socket()       # e.g. the socket came up, the port not
        raise
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down")
    await server.shutdown()


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        # One line, no usage dump: the message is what the user needs.
        self.exit(2, f"{self.prog}: error: {message}\n")


def duration(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}")
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be above 0 seconds: {text!r}")
    return value


def positive(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return value


def port(text):
    value = positive(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"not a TCP port: {text!r}")
    return value


def file_mode(text):
    try:
        value = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an octal mode: {text!r}")
    if not 0 <= value <= 0o777:
        raise argparse.ArgumentTypeError(f"not a file mode: {text!r}")
    return value


def parse_args(argv):
    d = Config
    p = ArgumentParser(
        prog="simple_comet.py",
        description="A long-polling publish/subscribe (comet) server.")
    a = p.add_argument
    a("--http-port", type=port, metavar="N",
      help=f"TCP port (default {DEFAULT_PORT} when no unix socket is given)")
    a("--http-host", metavar="ADDR",
      help="TCP address to listen on (default: all interfaces)")
    a("--unix-socket-path", "--unix-socket", metavar="PATH",
      help="also (or only) listen on this unix socket")
    a("--unix-socket-mode", type=file_mode, default=d.unix_socket_mode,
      metavar="MODE", help="octal mode of the socket file (default 666)")
    a("--http-timeout", type=duration, default=d.http_timeout, metavar="S",
      help="close idle connections and slow requests after S seconds "
           "(default %(default)s)")
    a("--session-timeout", type=duration, default=d.session_timeout,
      metavar="S", help="forget a client that has not read for S seconds "
                        "(default %(default)s)")
    a("--inactive-channel-timeout", type=duration,
      default=d.inactive_channel_timeout, metavar="S",
      help="remove a channel nobody has read for S seconds "
           "(default %(default)s)")
    a("--poll-timeout", type=duration, default=d.poll_timeout, metavar="S",
      help="answer a held poll with empty lists after S seconds "
           "(default %(default)s)")
    a("--messages-per-channel", "--max-messages-per-channel", type=positive,
      default=d.messages_per_channel, metavar="N",
      help="messages kept per channel (default %(default)s)")
    a("--quote-json", action="store_true",
      help="wrap .json bodies as /*-secure- ... */")
    a("--enable-status", action="store_true",
      help="serve /status.json (alias /stats.json)")
    a("--admin-token", metavar="T",
      default=os.environ.get("SIMPLE_COMET_ADMIN_TOKEN") or None,
      help="require 'Authorization: Bearer T' for writes and status "
           "(default: $SIMPLE_COMET_ADMIN_TOKEN; without one, writes are "
           "accepted from loopback and the unix socket only)")
    a("--max-body", type=positive, default=d.max_body, metavar="BYTES",
      help="largest request body (default %(default)s)")
    a("--max-connections", type=positive, default=d.max_connections,
      metavar="N", help="refuse connections beyond N (default %(default)s)")
    a("--log-level", default=d.log_level, type=str.upper,
      choices=["DEBUG", "INFO", "WARNING", "ERROR"],
      help="logging level (default %(default)s)")
    a("--version", action="version", version=f"%(prog)s {__version__}")
    args = p.parse_args(argv)
    return Config(**vars(args))


def main(argv=None):
    config = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=config.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s")
    try:
        asyncio.run(serve(config))
    except StartupError as e:
        log.error("%s", e)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
