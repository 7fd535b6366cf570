#!/usr/bin/env python3
"""Simple Comet: a long-polling and EventSource publish/subscribe server in
one file.

Browsers long-poll channels over plain HTTP (JSON or JSON-P) or stream them
as Server-Sent Events; the application publishes to a channel with one
POST.  Python 3.11+, standard library only:

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
    GET    /channels/A%7CB.sse   [since=N] [client_id=ID]  (or Last-Event-ID)
                                 -> text/event-stream, one event per message
    GET    /health.json          200 when writes are taken, else 503
    GET    /status.json, /metrics  (with --enable-status)

A read with nothing newer than ``since`` is held until a message is pushed
to one of its channels or ``--poll-timeout`` passes (then every list is
empty).  A stream sends what is retained after its cursor, then every new
message as it is pushed.  Message ids come from one counter shared by all
channels; a reader passes the reply's ``last_id`` as its next ``since`` (a
browser's EventSource sends ``Last-Event-ID``) and so sees every message
once.  Writes and the status page need ``--admin-token`` or, without one, a
client on loopback or the unix socket.

Where messages are kept (memory, or memory plus ``--state-file``) is the
store's business; how they reach readers (held polls, streams) is the hub's.

The file reads top to bottom: configuration, errors, HTTP parsing, replies,
storage, the hub and its waiters, routes, connection handling, logging,
server lifecycle, command line.
"""

import argparse
import asyncio
import errno
import fcntl
import hmac
import ipaddress
import json
import logging
import math
import os
import queue
import random
import re
import signal
import socket
import stat
import sys
import time
import zlib
from collections import deque
from itertools import islice
from logging.handlers import QueueHandler, QueueListener
from urllib.parse import parse_qsl, unquote_to_bytes

__version__ = "2.0.0"

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

# Connections beyond --max-connections that loopback and the unix socket may
# still open, so that a saturated server can be looked at.
LOCAL_RESERVE = 4

# After an error reply to a client that is still sending, read and discard
# until it has been quiet this long (bounded in time and bytes), so that the
# client reads the reply instead of a reset.
LINGER_QUIET = 2.0
LINGER_MAX_TIME = 30.0
LINGER_MAX_BYTES = 64 * 1024 * 1024

# EventSource streams.
SSE_RETRY_MS = 3000                  # the browser's reconnect delay
SSE_SHUTDOWN_RETRY_MS = (1000, 5000) # spread reconnects after a restart
SSE_MAX_UNSENT = 1024 * 1024         # live events a slow reader may owe

# Logging: client mistakes are rate-limited, and the log is written by a
# thread from a bounded queue, so a stuck sink never stalls serving.
CLIENT_LOG_BURST = 20                # client mistakes logged per window
CLIENT_LOG_WINDOW = 10.0             # seconds
LOG_QUEUE_SIZE = 10_000              # records waiting for the sink; then dropped

# Expiry removes at most this many entries between two turns of the event
# loop, so that a mass expiry does not hold up replies.
EXPIRY_SLICE = 2000

# The state file (--state-file).
STATE_FSYNC_INTERVAL = 1.0           # seconds: a power loss costs at most this
STATE_COMPACT_RATIO = 4              # compact when the file is this many times
STATE_COMPACT_SLACK = 64 * 1024      # ... the live state, plus this
STATE_COMPACT_SLICE = 0.005          # seconds of work between yields while compacting


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
    sse_heartbeat = 15.0
    messages_per_channel = 100
    quote_json = False
    enable_status = False
    admin_token = None
    max_body = 1024 * 1024
    max_connections = 10_000
    max_connections_per_ip = 256
    state_file = None
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
    ``return_code`` goes into the JSON body (-1 unless an API failure is
    told as an HTTP status, as for streams).
    """

    def __init__(self, status, message, close=True, headers=(),
                 return_code=-1):
        super().__init__(message)
        self.status = status
        self.message = message
        self.close = close
        self.headers = headers
        self.return_code = return_code


def unavailable(message):
    """A write the store could not take: 503, not acknowledged."""
    return HTTPError(503, message, close=False)


class APIError(Exception):
    """An API-level failure: HTTP 200 with a negative ``return_code``."""

    def __init__(self, return_code, message):
        super().__init__(message)
        self.return_code = return_code
        self.message = message


class StartupError(Exception):
    """Cannot start: the message is printed and the process exits 1."""


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
    """Parse a request line and headers (``head`` ends with an empty line).

    Lines end in CRLF or, as RFC 9112 section 2.2 allows, a bare LF.
    """
    if head.count(b"\r") != head.count(b"\r\n"):
        raise HTTPError(400, "Bare CR in request head")
    if _BAD_HEAD_BYTE.search(head):
        raise HTTPError(400, "Control character in request head")
    lines = head.replace(b"\r\n", b"\n").rstrip(b"\n").split(b"\n")
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


class HeadReader(asyncio.StreamReader):
    """A StreamReader that can read a request head whose lines end in CRLF
    or in a bare LF.

    ``readuntil()`` takes a single separator, and the two kinds of blank
    line that may end a head are two; ``readhead()`` mirrors it on the same
    buffer (the attributes it shares with ``readuntil`` have been stable
    since Python 3.7).
    """

    async def readhead(self):
        if self._exception is not None:
            raise self._exception
        buffer = self._buffer
        offset = 0
        while True:
            crlf = buffer.find(b"\n\r\n", offset)
            # Look for a bare-LF blank line only before the CRLF one, so a
            # long pipelined buffer is not scanned to its end per request.
            lf = buffer.find(b"\n\n", offset,
                             len(buffer) if crlf < 0 else crlf + 2)
            if lf >= 0:
                end = lf + 2
                break
            if crlf >= 0:
                end = crlf + 3
                break
            offset = max(0, len(buffer) - 2)
            if offset > self._limit:
                raise asyncio.LimitOverrunError("Request head too long", offset)
            if self._eof:
                partial = bytes(buffer)
                buffer.clear()
                raise asyncio.IncompleteReadError(partial, None)
            await self._wait_for_data("readhead")
        if end > self._limit:
            raise asyncio.LimitOverrunError("Request head too long", end)
        head = bytes(buffer[:end])
        del buffer[:end]
        self._maybe_resume_transport()
        return head


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
# Parameters
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


# ---------------------------------------------------------------------------
# Storage: channels, their messages, clients and the id counter
# ---------------------------------------------------------------------------

def message_text(message_id, content):
    """A message's JSON, encoded once when it is pushed."""
    return '{"id": %d, "ts": %d, "content": %s}' % (
        message_id, time.time(), json.dumps(content))


class Channel:
    """A channel: its options, its retained messages and who waits on it.

    Idle channels are many (one per user is common), so nothing is
    allocated before it is needed: no history until the first push, no
    waiter map while nobody waits, no encoded name until the first reply.
    """

    __slots__ = ("name", "max_messages", "use_sessions", "messages",
                 "dropped_id", "last_read", "waiters", "_key")

    def __init__(self, name, max_messages, use_sessions, now):
        self.name = name
        self.max_messages = max_messages
        self.use_sessions = use_sessions
        self.messages = None     # deque of (id, JSON text), oldest first
        self.dropped_id = 0      # newest id the history dropped
        self.last_read = now
        self.waiters = None      # held polls and open streams -> None
        self._key = None

    @property
    def key(self):
        """The name as a JSON string."""
        if self._key is None:
            self._key = json.dumps(self.name)
        return self._key

    @property
    def newest_id(self):
        return self.messages[-1][0] if self.messages else 0

    def add(self, message_id, text):
        messages = self.messages
        if messages is None:
            messages = self.messages = deque(maxlen=self.max_messages)
        elif len(messages) == self.max_messages:
            self.dropped_id = messages[0][0]
        messages.append((message_id, text))

    def since(self, since):
        """The retained (id, JSON text) with id > since, oldest first."""
        messages = self.messages
        if not messages or messages[-1][0] <= since:
            return []
        if messages[0][0] > since:
            return list(messages)
        newer = []
        for message in reversed(messages):
            if message[0] <= since:
                break
            newer.append(message)
        newer.reverse()
        return newer


class MemoryStore:
    """Channels, clients and the id counter, kept in memory.

    The writes (add_channel, add_client, push, remove_channel) check, store
    and then apply; applying is where the hub hears of a new message or a
    removed channel, whichever store made the change.  Both dicts are kept
    in order of last read (a read moves its entry to the end), so expiry
    walks from the oldest entry to the first one still alive: its cost
    follows what expires, not what exists.  A client is only its id and the
    time of its last read.
    """

    def __init__(self, config, loop):
        self.config = config
        self.loop = loop
        self.channels = {}
        self.clients = {}                # client id -> time of last read
        self.last_id = min(int(time.time() * ID_UNITS_PER_SECOND), MAX_SAFE_ID)
        self.pushed = 0
        self.hub = None                  # set by the Hub
        self.background = set()          # tasks that end only at close()

    def open(self):
        """Load what was stored (nothing, in memory)."""

    async def close(self):
        pass

    def health(self):
        """None when writes can be taken, else why not."""
        return None

    def describe(self):
        """Extra fields for the status page."""
        return {}

    def metrics(self):
        """Extra metric families: (name, type, help, [(labels, value)])."""
        return []

    # -- writes -----------------------------------------------------------

    def add_channel(self, name, max_messages, use_sessions):
        if name in self.channels:
            raise APIError(NO_CHANNEL, "Channel already exists")
        self.apply_channel(name, max_messages, use_sessions)

    def add_client(self, client_id):
        if client_id in self.clients:
            raise APIError(NO_CHANNEL, "Client already exists")
        self.clients[client_id] = self.loop.time()

    def push(self, name, content):
        """Store a message; returns (its id, waiters it reached)."""
        channel = self.channel(name)
        message_id = self.next_id()
        return message_id, self.apply_push(
            channel, message_id, message_text(message_id, content))

    def remove_channel(self, name):
        """True when the channel existed."""
        channel = self.channels.get(name)
        if channel is None:
            return False
        self.apply_remove(channel)
        return True

    def channel(self, name):
        channel = self.channels.get(name)
        if channel is None:
            check_id(name, "channel id", channel=True)
            raise APIError(NO_CHANNEL, "Nonexistent channel")
        return channel

    def settled(self):
        """None: this state is the whole truth.  A store that other
        instances also write (Redis) returns an awaitable that is done once
        this instance has applied everything stored before the call."""
        return None

    def next_id(self):
        if self.last_id >= MAX_SAFE_ID:
            raise APIError(BAD_PARAMETER, "Message id space exhausted")
        return self.last_id + 1

    # -- applying ---------------------------------------------------------

    def apply_channel(self, name, max_messages, use_sessions):
        channel = Channel(name, max_messages, use_sessions, self.loop.time())
        self.channels[name] = channel
        return channel

    def apply_push(self, channel, message_id, text):
        if message_id > self.last_id:
            self.last_id = message_id
        channel.add(message_id, text)
        self.pushed += 1
        return self.hub.deliver(channel, message_id, text) \
            if channel.waiters else 0

    def apply_remove(self, channel):
        del self.channels[channel.name]
        if channel.waiters:
            self.hub.channel_removed(channel)

    # -- reads and expiry -------------------------------------------------

    def touch_channel(self, channel, now):
        channels = self.channels
        del channels[channel.name]
        channels[channel.name] = channel
        channel.last_read = now

    def touch_client(self, client_id, now):
        clients = self.clients
        del clients[client_id]
        clients[client_id] = now

    async def expire(self, now, reading):
        """Forget clients and channels nobody has read for their timeout;
        those with a held poll or an open stream count as read now.  Done
        in slices, so a mass expiry does not hold up replies."""
        while True:
            clients = list(islice(self.stale(
                self.clients.items(), now - self.config.session_timeout),
                EXPIRY_SLICE))
            channels = list(islice(self.stale(
                ((c, c.last_read) for c in self.channels.values()),
                now - self.config.inactive_channel_timeout), EXPIRY_SLICE))
            if not clients and not channels:
                return
            gone_clients = []
            for client_id in clients:
                if client_id in reading:
                    self.touch_client(client_id, now)
                else:
                    gone_clients.append(client_id)
            gone_channels = []
            for channel in channels:
                if channel.waiters:
                    self.touch_channel(channel, now)
                else:
                    gone_channels.append(channel)
            if gone_clients or gone_channels:
                if not self.forget(gone_clients, gone_channels):
                    return
                log.debug("expired %d clients and %d channels",
                          len(gone_clients), len(gone_channels))
            await asyncio.sleep(0)

    @staticmethod
    def stale(entries, limit):
        """The oldest of (key, last read) pairs, up to the first read since
        ``limit``."""
        for key, last_read in entries:
            if last_read >= limit:
                return
            yield key

    def forget(self, client_ids, channels):
        """Remove expired entries; False when they could not be (yet)."""
        for client_id in client_ids:
            del self.clients[client_id]
        for channel in channels:
            del self.channels[channel.name]
        return True


class StateFileStore(MemoryStore):
    """Memory, plus a journal at PATH that survives restarts and crashes.

    Every write appends one record to PATH before it is applied and
    acknowledged, so a crash or SIGKILL loses nothing acknowledged; a
    thread fsyncs the file once a second, so a power loss costs at most
    about the last second.  A record is one line,

        <crc32 of the payload, 8 hex digits> <kind>\\t<field>\\t...\\n

    with JSON-encoded names, so no field holds a tab or a newline:

        i  LAST_ID                          the id counter is at least this
        c  NAME MAX_MESSAGES USE_SESSIONS DROPPED_ID     channel registered
        u  CLIENT                           client registered
        p  NAME ID MESSAGE_JSON             message pushed
        d  NAME                             channel deleted or expired
        x  CLIENT                           client expired

    Replaying is idempotent (a push at or below a channel's newest id is
    skipped), which is what lets compaction write a snapshot while writes
    go on: it copies the list of channels and clients, writes each one as
    it is when reached, a slice at a time, appends every record that
    arrived meanwhile, fsyncs, and renames the result over PATH.  Files:
    PATH, PATH.tmp while compacting, PATH.lock (held with flock while the
    server runs); all mode 0600.
    """

    def __init__(self, config, loop):
        super().__init__(config, loop)
        self.path = config.state_file
        self.fd = None
        self.lock_fd = None
        self.size = 0                    # bytes in PATH
        self.live = 0                    # about what a snapshot would take
        self.dirty = False               # written since the last fsync
        self.error = None                # why the last write failed
        self.broken = None               # why PATH cannot be trusted
        self.during = None               # records written while compacting
        self.compacting = None           # the compaction task
        self.swap = asyncio.Lock()       # fsync of PATH vs replacing PATH
        self.syncer = None
        self.compactions = 0

    # -- records ----------------------------------------------------------

    @staticmethod
    def record(payload):
        payload = payload.encode()
        return b"%08x %s\n" % (zlib.crc32(payload), payload)

    def channel_record(self, channel):
        return self.record("c\t%s\t%d\t%d\t%d" % (
            channel.key, channel.max_messages, channel.use_sessions,
            channel.dropped_id))

    def write(self, data):
        """Append records to PATH, or raise a 503 with nothing stored."""
        if self.broken:
            raise unavailable(f"state file not writable: {self.broken}")
        try:
            written = os.write(self.fd, data)
        except OSError as e:
            written = e
        if written != len(data):
            # A short write (the disk filled mid-record) or none: cut the
            # file back to its last whole record, so that no half record
            # is followed by good ones.
            try:
                os.ftruncate(self.fd, self.size)
            except OSError as e:
                self.fail("cannot cut back a failed write: " + e.strerror,
                          broken=True)
            reason = (written.strerror if isinstance(written, OSError)
                      else "short write") or str(written)
            self.fail(reason)
            raise unavailable(f"state file not writable: {reason}")
        self.size += written
        self.dirty = True
        if self.during is not None:
            self.during.append(data)
        if self.error is not None:
            log.info("state file %s is writable again", self.path)
            self.error = None
        if (self.compacting is None and self.size >
                STATE_COMPACT_RATIO * self.live + STATE_COMPACT_SLACK):
            self.start_compaction()

    def fail(self, reason, broken=False):
        if broken:
            if self.broken is None:
                log.error("state file %s: %s; writes are refused until it "
                          "is rewritten", self.path, reason)
            self.broken = reason
        elif self.error is None:
            log.error("state file %s: %s; writes are refused meanwhile",
                      self.path, reason)
        self.error = reason

    def health(self):
        if self.broken or self.error:
            return f"state file not writable: {self.broken or self.error}"
        return None

    def describe(self):
        return {"state_file": {"writable": self.health() is None,
                               "bytes": self.size,
                               "compactions": self.compactions}}

    def metrics(self):
        return [
            ("state_file_writable", "gauge",
             "1 when the state file takes writes.",
             [("", int(self.health() is None))]),
            ("state_file_bytes", "gauge", "Size of the state file.",
             [("", self.size)]),
            ("state_file_compactions_total", "counter",
             "Rewrites of the state file to its live records.",
             [("", self.compactions)]),
        ]

    # -- writes -----------------------------------------------------------

    def add_channel(self, name, max_messages, use_sessions):
        if name in self.channels:
            raise APIError(NO_CHANNEL, "Channel already exists")
        record = self.record("c\t%s\t%d\t%d\t0" % (
            json.dumps(name), max_messages, use_sessions))
        self.write(record)
        self.live += len(record)
        self.apply_channel(name, max_messages, use_sessions)

    def add_client(self, client_id):
        if client_id in self.clients:
            raise APIError(NO_CHANNEL, "Client already exists")
        record = self.record("u\t" + json.dumps(client_id))
        self.write(record)
        self.live += len(record)
        self.clients[client_id] = self.loop.time()

    def push(self, name, content):
        channel = self.channel(name)
        message_id = self.next_id()
        text = message_text(message_id, content)
        record = self.record("p\t%s\t%d\t%s" % (channel.key, message_id, text))
        self.write(record)
        self.live += len(record)
        messages = channel.messages
        if messages and len(messages) == channel.max_messages:
            # Roughly: the record of the message the history drops.
            self.live -= len(record) - len(text) + len(messages[0][1])
        return message_id, self.apply_push(channel, message_id, text)

    def remove_channel(self, name):
        channel = self.channels.get(name)
        if channel is None:
            return False
        self.write(self.record("d\t" + channel.key))
        self.live -= self.channel_bytes(channel)
        self.apply_remove(channel)
        return True

    def channel_bytes(self, channel):
        overhead = 30 + len(channel.key)
        return overhead + sum(overhead + len(text)
                              for _, text in channel.messages or ())

    def forget(self, client_ids, channels):
        # Journaled first, so what expired stays gone after a restart.  If
        # that fails (a full disk), they expire at a later pass.
        records = [self.record("x\t" + json.dumps(c)) for c in client_ids]
        records += [self.record("d\t" + c.key) for c in channels]
        try:
            self.write(b"".join(records))
        except HTTPError:
            return False
        self.live -= sum(len(r) for r in records[:len(client_ids)])
        self.live -= sum(self.channel_bytes(c) for c in channels)
        return super().forget(client_ids, channels)

    # -- startup ----------------------------------------------------------

    def open(self):
        path = self.path
        if os.path.exists(path + ".lock"):
            # Refuse before reading if another server holds PATH.
            self.lock()
        data = self.read_file()
        end = self.load(data)
        self.lock()
        self.fd = self.open_file(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        if end < len(data):
            log.warning("state file %s: dropped %d bytes of an incomplete "
                        "last record at byte %d", path, len(data) - end, end)
            os.ftruncate(self.fd, end)
            os.fsync(self.fd)
        self.size = end
        if os.path.exists(path + ".tmp"):
            os.unlink(path + ".tmp")     # a compaction cut short
        self.syncer = self.loop.create_task(self.sync_loop())
        self.background.add(self.syncer)
        log.info("state file %s: %d channels, %d clients, %d messages",
                 path, len(self.channels), len(self.clients),
                 sum(len(c.messages or ()) for c in self.channels.values()))

    @staticmethod
    def open_file(path, flags):
        fd = os.open(path, flags | os.O_CLOEXEC, 0o600)
        os.fchmod(fd, 0o600)             # whatever the umask
        return fd

    def lock(self):
        if self.lock_fd is None:
            try:
                self.lock_fd = self.open_file(self.path + ".lock",
                                              os.O_RDWR | os.O_CREAT)
            except OSError as e:
                raise StartupError(f"{self.path}.lock: {e.strerror}") from None
        try:
            fcntl.flock(self.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise StartupError(f"{self.path} is in use by another server") \
                from None

    def read_file(self):
        try:
            with open(self.path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            return b""
        except OSError as e:
            raise StartupError(f"{self.path}: {e.strerror}") from None

    def load(self, data):
        """Apply the records of ``data``; returns where the good ones end.

        A bad or incomplete record with no good one after it is a write cut
        short by a crash, and is dropped; one followed by good records is
        damage, and the server stops without touching the file.
        """
        now = self.loop.time()
        channels = self.channels
        clients = self.clients
        last_id = 0
        position = 0
        size = len(data)
        crc32 = zlib.crc32
        while position < size:
            newline = data.find(b"\n", position)
            line = data[position:newline if newline >= 0 else size]
            try:
                if newline < 0 or line[8:9] != b" " or \
                        int(line[:8], 16) != crc32(line[9:]):
                    raise ValueError("checksum mismatch")
                fields = line[9:].split(b"\t")
                kind = fields[0]
                if kind == b"p":
                    message_id = int(fields[2])
                    if message_id > last_id:
                        last_id = message_id
                    channel = channels.get(json.loads(fields[1]))
                    if channel is not None and \
                            channel.newest_id < message_id:
                        channel.add(message_id, fields[3].decode())
                elif kind == b"c":
                    name = json.loads(fields[1])
                    channel = channels[name] = Channel(
                        name, int(fields[2]), fields[3] == b"1", now)
                    channel.dropped_id = int(fields[4])
                elif kind == b"u":
                    clients[json.loads(fields[1])] = now
                elif kind == b"d":
                    channels.pop(json.loads(fields[1]), None)
                elif kind == b"x":
                    clients.pop(json.loads(fields[1]), None)
                elif kind == b"i":
                    last_id = max(last_id, int(fields[1]))
                else:
                    raise ValueError("unknown record")
            except (ValueError, IndexError, UnicodeDecodeError) as e:
                if self.good_record_after(data, newline):
                    raise StartupError(
                        f"{self.path}: damaged record at byte {position} "
                        f"({e}); fix or move the file") from None
                break
            position = newline + 1
        self.last_id = max(self.last_id, last_id)
        self.live = sum(map(self.channel_bytes, channels.values())) + \
            sum(30 + len(client_id) for client_id in clients)
        return position

    @staticmethod
    def good_record_after(data, newline):
        while newline >= 0:
            start = newline + 1
            newline = data.find(b"\n", start)
            if newline < 0:
                return False
            line = data[start:newline]
            if line[8:9] == b" " and line[:8].isalnum():
                try:
                    if int(line[:8], 16) == zlib.crc32(line[9:]):
                        return True
                except ValueError:
                    pass
        return False

    # -- durability -------------------------------------------------------

    async def sync_loop(self):
        """Once a second: fsync what was written; while PATH cannot be
        trusted, rewrite it; while writes fail, try again."""
        while True:
            await asyncio.sleep(STATE_FSYNC_INTERVAL)
            if self.dirty and not self.broken:
                self.dirty = False
                async with self.swap:
                    try:
                        await self.loop.run_in_executor(
                            None, os.fdatasync, self.fd)
                    except OSError as e:
                        # The kernel may have dropped the pages it could
                        # not write: retrying the fsync would report
                        # success for data that is gone.
                        self.fail("fsync failed: " + e.strerror, broken=True)
            if self.broken and self.compacting is None:
                self.start_compaction()
            elif self.error and not self.broken:
                try:
                    self.write(self.record("i\t%d" % self.last_id))
                except HTTPError:
                    pass

    def start_compaction(self):
        self.compacting = self.loop.create_task(self.compact())
        self.background.add(self.compacting)
        self.compacting.add_done_callback(self.background.discard)

    async def compact(self):
        """Rewrite PATH as the live state (see the class docstring)."""
        started = time.monotonic()
        tmp = self.path + ".tmp"
        channels = list(self.channels.values())
        clients = list(self.clients)
        self.during = []
        fd = None
        try:
            fd = self.open_file(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            size = self.write_all(fd, self.record("i\t%d" % self.last_id))
            chunk = []
            deadline = time.perf_counter() + STATE_COMPACT_SLICE
            record = self.record
            for channel in channels:
                if self.channels.get(channel.name) is not channel:
                    continue             # removed since the copy
                chunk.append(self.channel_record(channel))
                for message_id, text in channel.messages or ():
                    chunk.append(record("p\t%s\t%d\t%s" % (
                        channel.key, message_id, text)))
                if time.perf_counter() > deadline:
                    size += self.write_all(fd, b"".join(chunk))
                    chunk = []
                    await asyncio.sleep(0)
                    deadline = time.perf_counter() + STATE_COMPACT_SLICE
            for client_id in clients:
                if client_id in self.clients:
                    chunk.append(record("u\t" + json.dumps(client_id)))
                    if len(chunk) >= 1000 and \
                            time.perf_counter() > deadline:
                        size += self.write_all(fd, b"".join(chunk))
                        chunk = []
                        await asyncio.sleep(0)
                        deadline = time.perf_counter() + STATE_COMPACT_SLICE
            size += self.write_all(fd, b"".join(chunk))
            live = size
            size += self.write_all(fd, b"".join(self.during))
            self.during.clear()
            async with self.swap:
                await self.loop.run_in_executor(None, os.fdatasync, fd)
                # From here to the swap nothing awaits: no record can go to
                # the old file only.
                size += self.write_all(fd, b"".join(self.during))
                os.replace(tmp, self.path)
                old, self.fd, fd = self.fd, fd, None
                os.close(old)
                self.size, self.live = size, live
                self.during = None
                self.dirty = True
            await self.loop.run_in_executor(None, self.sync_directory)
        except BaseException as e:
            if fd is not None:
                os.close(fd)
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
            if not isinstance(e, OSError):
                raise
            log.error("state file %s: compaction failed: %s", self.path,
                      e.strerror or e)
            await asyncio.sleep(STATE_FSYNC_INTERVAL)
        else:
            self.compactions += 1
            if self.broken:
                log.info("state file %s rewritten; writes are taken again",
                         self.path)
            self.broken = self.error = None
            log.debug("compacted %s to %d bytes in %.3f s", self.path,
                      size, time.monotonic() - started)
        finally:
            self.during = None
            self.compacting = None

    @staticmethod
    def write_all(fd, data):
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        return len(data)

    def sync_directory(self):
        fd = os.open(os.path.dirname(os.path.abspath(self.path)),
                     os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    async def close(self):
        if self.syncer is not None:
            self.syncer.cancel()
        if self.compacting is not None:
            self.compacting.cancel()
            try:
                await self.compacting
            except asyncio.CancelledError:
                pass
        if self.fd is not None:
            try:
                os.fsync(self.fd)
            except OSError as e:
                log.error("state file %s: fsync failed at exit: %s",
                          self.path, e.strerror)
            os.close(self.fd)
            self.fd = None
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None


# ---------------------------------------------------------------------------
# The hub: held polls and open streams, the two kinds of waiter
# ---------------------------------------------------------------------------

def event_bytes(channel, message_id, text):
    """A message as one EventSource event (the JSON gains its channel)."""
    return ('id: %d\ndata: {"channel": %s, %s\n\n' % (
        message_id, channel.key, text[1:])).encode()


class Poll:
    """A held read, answered once: by a push to one of its channels, by
    the poll timeout, or when its channels are deleted."""

    __slots__ = ("conn", "channels", "since", "client_id", "callback",
                 "deadline")

    def __init__(self, conn, channels, since, client_id, callback):
        self.conn = conn
        self.channels = channels
        self.since = since
        self.client_id = client_id
        self.callback = callback         # JSON-P callback, None for JSON
        self.deadline = None

    def notify(self, hub, channel, message_id, text, cache, now):
        # Polls that share channels, since and format get the same bytes:
        # the reply is built once per distinct kind, not once per poll.
        conn = self.conn
        key = (self.channels, self.since, self.callback, conn.keep_alive,
               conn.version)
        data = cache.get(key)
        if data is None:
            data = cache[key] = conn.poll_reply(
                self.callback, hub.read_text(self.channels, self.since))
        hub.release(self, now)
        conn.finish_poll(data)

    def channel_gone(self, hub, channel):
        remaining = tuple(c for c in self.channels if c is not channel)
        if remaining:
            self.channels = remaining
        else:
            hub.answer(self, error_text(NO_CHANNEL, "No valid channels"))


class Stream:
    """An open EventSource stream: one event per message, for as long as
    the client stays.  While the opening replay is written, live events
    wait in ``backlog``."""

    __slots__ = ("conn", "channels", "client_id", "sent", "backlog")

    def __init__(self, conn, channels, client_id, now):
        self.conn = conn
        self.channels = channels
        self.client_id = client_id
        self.sent = now                  # last write, for heartbeats
        self.backlog = None

    def notify(self, hub, channel, message_id, text, cache, now):
        data = cache.get(Stream)
        if data is None:
            data = cache[Stream] = event_bytes(channel, message_id, text)
        self.send(hub, data)
        self.sent = now

    def send(self, hub, data):
        if self.backlog is not None:
            self.backlog.append(data)
            if sum(map(len, self.backlog)) > SSE_MAX_UNSENT:
                hub.end_stream(self, abort=True)
            return
        transport = self.conn.transport
        transport.write(data)
        if transport.get_write_buffer_size() > SSE_MAX_UNSENT:
            # Too slow for its events: cut it rather than skip some.  The
            # browser reconnects with Last-Event-ID and is replayed (or
            # told it lost messages).
            hub.end_stream(self, abort=True)

    def channel_gone(self, hub, channel):
        self.channels = tuple(c for c in self.channels if c is not channel)
        self.send(hub, b'event: deleted\ndata: {"channel": %s}\n\n'
                  % channel.key.encode())
        if not self.channels:
            hub.end_stream(self)


class Hub:
    """Delivery: who waits for which channel, in front of the store that
    keeps the messages.  Routes talk to the hub only."""

    def __init__(self, config, loop, store):
        self.config = config
        self.loop = loop
        self.store = store
        store.hub = self
        # Every held poll, oldest first.  They all share one timeout, so this
        # is also deadline order: one sweep answers the expired ones, where a
        # timer per poll would cost more memory and time than the poll.
        self.polls = {}
        self.streams = {}
        self.reading = {}                # client id -> its polls and streams
        self.delivered = 0
        self.started = time.time()
        self.sweep_interval = min(1.0, config.poll_timeout / 10)
        self.sweeper = loop.call_later(self.sweep_interval, self.sweep)
        self.heartbeat_interval = config.sse_heartbeat / 4
        self.heartbeats = loop.call_later(self.heartbeat_interval,
                                          self.heartbeat)

    @property
    def last_id(self):
        return self.store.last_id

    # -- writes (the store may answer later: Redis) -------------------------

    def add_channel(self, name, max_messages, use_sessions):
        return self.store.add_channel(name, max_messages, use_sessions)

    def add_client(self, client_id):
        return self.store.add_client(client_id)

    def push(self, name, content):
        """Store a message: (its id, waiters reached[, instances]), or an
        awaitable of it."""
        if content is None:
            self.store.channel(name)     # a missing channel is told first
            raise APIError(BAD_PARAMETER, "Missing content")
        return self.store.push(name, content)

    def remove_channel(self, name):
        """True when the channel existed (or an awaitable of it)."""
        return self.store.remove_channel(name)

    # -- told by the store --------------------------------------------------

    def deliver(self, channel, message_id, text):
        """A message was stored: every waiter on its channel gets it."""
        waiters = list(channel.waiters)
        cache = {}
        now = self.loop.time()
        for waiter in waiters:
            waiter.notify(self, channel, message_id, text, cache, now)
        self.delivered += len(waiters)
        return len(waiters)

    def channel_removed(self, channel):
        for waiter in list(channel.waiters):
            waiter.channel_gone(self, channel)

    # -- reads --------------------------------------------------------------

    def readable(self, names, client_id):
        """The channels of ``names`` that this reader may read, touched."""
        store = self.store
        now = self.loop.time()
        if client_id is not None:
            if client_id not in store.clients:
                raise APIError(UNREGISTERED_CLIENT, "Unregistered client_id")
            store.touch_client(client_id, now)
        channels = []
        for name in names:
            channel = store.channels.get(name)
            if channel is None:
                # Existing names were checked when registered; an unknown
                # one is left out, unless no channel could have it.
                check_id(name, "channel id", channel=True)
            elif client_id is not None or not channel.use_sessions:
                store.touch_channel(channel, now)
                channels.append(channel)
        if not channels:
            raise APIError(NO_CHANNEL, "No valid channels")
        return tuple(channels)

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
            parts.append(self.part(channel, [text for _, text in newer]))
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
                    since, self.store.last_id, ", ".join(parts), lost))

    def empty_text(self, channels, since):
        """A read's reply with every list empty."""
        return self.reply_text(since, [self.part(c) for c in channels])

    # -- waiters ------------------------------------------------------------

    def attach(self, waiter):
        for channel in waiter.channels:
            if channel.waiters is None:
                channel.waiters = {}
            channel.waiters[waiter] = None
        if waiter.client_id is not None:
            reading = self.reading
            reading[waiter.client_id] = reading.get(waiter.client_id, 0) + 1
        waiter.conn.held = waiter

    def release(self, waiter, now=None):
        """Forget a waiter: it was answered, or its client went away.  Its
        channels and session count as read until now."""
        if now is None:
            now = self.loop.time()
        if waiter.__class__ is Poll:
            del self.polls[waiter]
        else:
            del self.streams[waiter]
        store = self.store
        for channel in waiter.channels:
            waiters = channel.waiters
            del waiters[waiter]
            if not waiters:
                channel.waiters = None
            # Polls answered by one push share ``now``: one touch does.
            if channel.last_read != now and \
                    store.channels.get(channel.name) is channel:
                store.touch_channel(channel, now)
        client_id = waiter.client_id
        if client_id is not None:
            count = self.reading[client_id] - 1
            if count:
                self.reading[client_id] = count
            else:
                del self.reading[client_id]
            if client_id in store.clients:
                store.touch_client(client_id, now)
        waiter.conn.held = None

    def hold(self, poll):
        # Answered by the sweep that follows the deadline, so never later
        # than --poll-timeout.
        poll.deadline = (self.loop.time() + self.config.poll_timeout -
                         self.sweep_interval)
        self.polls[poll] = None
        self.attach(poll)

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

    def open_stream(self, conn, channels, cursor, client_id):
        """Start a stream; returns the opening replay, a list of event
        bytes: ``lost`` first where history was dropped, then what is
        retained after the cursor, oldest first."""
        stream = Stream(conn, channels, client_id, self.loop.time())
        lost = [c.key for c in channels if cursor and c.dropped_id > cursor]
        replay = [(message_id, channel, text) for channel in channels
                  for message_id, text in channel.since(cursor)]
        if len(channels) > 1:
            replay.sort(key=lambda item: item[0])
        events = [event_bytes(channel, message_id, text)
                  for message_id, channel, text in replay]
        if lost:
            events.insert(0, b'event: lost\ndata: {"channels": [%s]}\n\n'
                          % ", ".join(lost).encode())
        if events:
            stream.backlog = []
        self.streams[stream] = None
        self.attach(stream)
        return stream, events

    def end_stream(self, stream, abort=False, retry=None):
        """Close a stream: flushed first, unless its reader is too slow."""
        self.release(stream)
        transport = stream.conn.transport
        if abort:
            transport.abort()
        else:
            if retry is not None:
                transport.write(b"retry: %d\n\n" % retry)
            transport.close()

    def heartbeat(self):
        """A comment to every stream that has had no event for a while, so
        proxies and browsers keep it."""
        limit = self.loop.time() - self.config.sse_heartbeat
        for stream in self.streams:
            if stream.sent <= limit and stream.backlog is None:
                stream.conn.transport.write(b": keep-alive\n\n")
                stream.sent = limit + self.config.sse_heartbeat
        self.heartbeats = self.loop.call_later(self.heartbeat_interval,
                                               self.heartbeat)

    def close_all(self):
        """Shutdown: every held poll gets its empty reply now, every stream
        ends with a reconnect delay spread so clients do not all come back
        at once."""
        self.sweeper.cancel()
        self.heartbeats.cancel()
        for poll in list(self.polls):
            poll.conn.keep_alive = False
            self.time_out(poll)
        for stream in list(self.streams):
            self.end_stream(stream, retry=random.randint(
                *SSE_SHUTDOWN_RETRY_MS))

    # -- expiry -------------------------------------------------------------

    async def expire(self):
        await self.store.expire(self.loop.time(), self.reading)


# ---------------------------------------------------------------------------
# Routes
# ---------------------------------------------------------------------------

TRUE_WORDS = {"1", "true", "yes", "on"}
FALSE_WORDS = {"", "0", "false", "no", "off"}

PUBLIC, ADMIN = False, True              # who may call a route

# Method, path, handler, access.  A path with a "fmt" group is an API
# resource (JSON or JSON-P, failures as negative return codes); the others
# build their whole reply.  Status and metrics exist with --enable-status.
ROUTES = (
    ("GET", r"/channels/(?P<names>[^/]*)\.(?P<fmt>jsonp?)", "read", PUBLIC),
    ("HEAD", r"/channels/(?P<names>[^/]*)\.(?P<fmt>jsonp?)", "read", PUBLIC),
    ("POST", r"/channels/(?P<names>[^/]*)\.(?P<fmt>jsonp?)", "push", ADMIN),
    ("DELETE", r"/channels/(?P<names>[^/]*)\.(?P<fmt>jsonp?)", "delete",
     ADMIN),
    ("OPTIONS", r"/channels/(?P<names>[^/]*)\.(?P<fmt>jsonp?)", "preflight",
     PUBLIC),
    ("GET", r"/channels/(?P<names>[^/]*)\.sse", "stream", PUBLIC),
    ("OPTIONS", r"/channels/(?P<names>[^/]*)\.sse", "preflight", PUBLIC),
    ("POST", r"/channels\.(?P<fmt>jsonp?)", "register_channel", ADMIN),
    ("POST", r"/clients\.(?P<fmt>jsonp?)", "register_client", ADMIN),
    ("GET", r"/health\.(?P<fmt>jsonp?)", "health", PUBLIC),
    ("HEAD", r"/health\.(?P<fmt>jsonp?)", "health", PUBLIC),
    ("GET", r"/(?:status|stats)\.(?P<fmt>jsonp?)", "status", ADMIN),
    ("HEAD", r"/(?:status|stats)\.(?P<fmt>jsonp?)", "status", ADMIN),
    ("GET", r"/metrics", "metrics", ADMIN),
    ("HEAD", r"/metrics", "metrics", ADMIN),
)
STATUS_ROUTES = {"status", "metrics"}

# A stream refused before it starts gets a real HTTP status: a browser's
# EventSource then stops reconnecting.
STREAM_REFUSALS = {BAD_PARAMETER: 400, NO_CHANNEL: 404,
                   UNREGISTERED_CLIENT: 403}

SSE_HEAD = (b"HTTP/1.1 200 OK\r\n"
            b"Content-Type: text/event-stream; charset=utf-8\r\n" + NO_CACHE +
            b"X-Accel-Buffering: no\r\nX-Content-Type-Options: nosniff\r\n" +
            CORS + b"Connection: close\r\n\r\n"
            # The comment makes proxies pass the head on at once.
            b"retry: %d\n: stream open\n\n" % SSE_RETRY_MS)

METRICS_TYPE = b"text/plain; version=0.0.4; charset=utf-8"


def awaitable(value):
    return hasattr(value, "__await__")


class App:
    """Routes a parsed request to the hub and builds the reply."""

    def __init__(self, config, hub, server):
        self.config = config
        self.hub = hub
        self.server = server
        self.token = config.admin_token.encode() if config.admin_token else None
        # One compiled pattern per path, with its methods.
        self.routes = []
        paths = {}
        for method, path, handler, admin in ROUTES:
            if handler in STATUS_ROUTES and not config.enable_status:
                continue
            if path not in paths:
                paths[path] = {}
                self.routes.append((re.compile(path), paths[path]))
            paths[path][method] = (getattr(self, handler), admin)

    def route(self, request, conn):
        """The reply: (status, content type, body, cors, extra headers);
        None when a read is held; or an awaitable of either (a stream, or a
        write the store answers later).  Raises HTTPError."""
        for pattern, methods in self.routes:
            match = pattern.fullmatch(request.path)
            if match is not None:
                break
        else:
            raise HTTPError(404, f"No resource at {request.path[:100]}",
                            close=False)
        method = request.method
        if method not in methods:
            raise HTTPError(405, f"{method} not allowed here", close=False,
                            headers=[("Allow", ", ".join(methods))])
        handler, admin = methods[method]
        fmt = match.groupdict().get("fmt")
        if fmt is None or method == "OPTIONS":
            if admin:
                self.authorize(request, conn)
            return handler(request, conn, match)

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
            if admin:
                self.authorize(request, conn)
            text = handler(match, params, conn, callback, method)
            if text is None:
                return None
            if awaitable(text):
                return self.answer_later(text, callback, reading)
        except APIError as e:
            text = error_text(e.return_code, e.message)
        content_type, body = frame_body(text, callback, self.config.quote_json)
        return 200, content_type, body, reading, b""

    async def answer_later(self, pending, callback, reading):
        try:
            text = await pending
        except APIError as e:
            text = error_text(e.return_code, e.message)
        content_type, body = frame_body(text, callback, self.config.quote_json)
        return 200, content_type, body, reading, b""

    @staticmethod
    def then(result, reply):
        """``reply(result)`` now, or once the store has answered."""
        if not awaitable(result):
            return reply(result)

        async def later():
            return reply(await result)
        return later()

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

    # -- reading parameters -------------------------------------------------

    def channel_names(self, match):
        names = list(dict.fromkeys(
            decode_segment(match.group("names")).split("|")))
        if len(names) > MAX_CHANNELS_PER_READ:
            raise APIError(BAD_PARAMETER, "More than "
                           f"{MAX_CHANNELS_PER_READ} channels in one read")
        return names

    def cursor(self, value):
        """A read's ``since``: A3's rules, clamped to the counter."""
        return min(parse_count(value, "since", 0), self.hub.last_id)

    @staticmethod
    def client_id(params):
        if "client_id" not in params:
            return None
        return check_id(params["client_id"], "client_id")

    # -- resources ----------------------------------------------------------

    def register_channel(self, match, params, conn, callback, method):
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
        return self.then(
            self.hub.add_channel(name, max_messages, word in TRUE_WORDS),
            lambda _: success_text(channel_id=name))

    def register_client(self, match, params, conn, callback, method):
        client_id = check_id(params.get("client_id"), "client_id")
        return self.then(self.hub.add_client(client_id),
                         lambda _: success_text(client_id=client_id))

    def push(self, match, params, conn, callback, method):
        return self.then(self.hub.push(decode_segment(match.group("names")),
                                       params.get("content")), self.push_text)

    @staticmethod
    def push_text(result):
        # The hottest write: formatted directly rather than through a dict.
        if len(result) == 2:
            return ('{"return_code": 1, "error_message": "", "message_id": '
                    '%d, "delivered": %d}' % result)
        return ('{"return_code": 1, "error_message": "", "message_id": %d, '
                '"delivered": %d, "instances": %d}' % result)

    def delete(self, match, params, conn, callback, method):
        name = check_id(decode_segment(match.group("names")), "channel id",
                        channel=True)
        return self.then(self.hub.remove_channel(name), lambda removed:
                         success_text(2 if removed else 1, channel_id=name,
                                      removed=removed))

    def read(self, match, params, conn, callback, method):
        hub = self.hub
        names = self.channel_names(match)
        since = self.cursor(params.get("since", "0"))
        client_id = self.client_id(params)
        channels = hub.readable(names, client_id)
        # No await between this check and hold(): a push cannot slip between.
        text = hub.read_text(channels, since) if since < hub.last_id else None
        if text is not None:
            return text
        if method == "HEAD":
            return hub.empty_text(channels, since)
        hub.hold(Poll(conn, channels, since, client_id, callback))
        return None

    def stream(self, request, conn, match):
        """Start an EventSource stream (the reply is written here)."""
        try:
            params = self.parameters(request)
            names = self.channel_names(match)
            # A reconnecting browser sends the last id it saw: it wins.
            last_event_id = request.headers.get("last-event-id", "").strip()
            if last_event_id.isascii() and last_event_id.isdigit():
                cursor = self.cursor(last_event_id)
            else:
                cursor = self.cursor(params.get("since", "0"))
            client_id = self.client_id(params)
            channels = self.hub.readable(names, client_id)
        except APIError as e:
            raise HTTPError(STREAM_REFUSALS[e.return_code], e.message,
                            close=False, return_code=e.return_code) from None
        stream, replay = self.hub.open_stream(conn, channels, cursor,
                                              client_id)
        conn.send(SSE_HEAD, 200, keep=True)
        return conn.replay(stream, replay)

    def preflight(self, request, conn, match):
        requested = request.headers.get("access-control-request-headers", "")
        extra = (b"Access-Control-Allow-Methods: GET, HEAD, OPTIONS\r\n"
                 b"Access-Control-Max-Age: 86400\r\n")
        if requested and not requested.strip(TOKEN + ", "):
            extra += b"Access-Control-Allow-Headers: %s\r\n" % requested.encode()
        return 204, b"text/plain", b"", True, extra

    def health(self, match, params, conn, callback, method):
        problem = self.hub.store.health()
        if problem is not None:
            raise HTTPError(503, problem, close=False)
        return success_text()

    def status(self, match, params, conn, callback, method):
        hub = self.hub
        store = hub.store
        server = self.server
        return success_text(status={
            "channels": list(store.channels),
            "clients": list(store.clients),
            "held_connections_count": len(hub.polls),
            "uptime": round(time.time() - hub.started, 3),
            "connections": len(server.connections),
            "polls_held": len(hub.polls),
            "streams_open": len(hub.streams),
            "channels_count": len(store.channels),
            "clients_count": len(store.clients),
            "messages_pushed": store.pushed,
            "messages_delivered": hub.delivered,
            "last_id": store.last_id,
            **store.describe(),
        })

    def metrics(self, request, conn, match):
        hub = self.hub
        store = hub.store
        server = self.server
        families = [
            ("connections", "gauge", "Open client connections.",
             [("", len(server.connections))]),
            ("polls_held", "gauge", "Long polls held, waiting for a message.",
             [("", len(hub.polls))]),
            ("streams_open", "gauge", "EventSource streams open.",
             [("", len(hub.streams))]),
            ("channels", "gauge", "Registered channels.",
             [("", len(store.channels))]),
            ("clients", "gauge", "Registered clients (sessions).",
             [("", len(store.clients))]),
            ("messages_pushed_total", "counter", "Messages pushed.",
             [("", store.pushed)]),
            ("messages_delivered_total", "counter",
             "Held polls answered and stream events sent by pushes.",
             [("", hub.delivered)]),
            ("requests_total", "counter", "Replies sent, by status class.",
             [('{class="%dxx"}' % n, server.replies[n]) for n in (2, 3, 4, 5)]),
            ("connections_refused_total", "counter",
             "Connections refused at the connection caps.",
             [("", server.refused)]),
            ("writable", "gauge",
             "1 when the server can take writes (see /health.json).",
             [("", int(store.health() is None))]),
        ]
        families += store.metrics()
        lines = []
        for name, kind, text, samples in families:
            lines.append(f"# HELP simple_comet_{name} {text}")
            lines.append(f"# TYPE simple_comet_{name} {kind}")
            lines.extend(f"simple_comet_{name}{labels} {value}"
                         for labels, value in samples)
        return 200, METRICS_TYPE, ("\n".join(lines) + "\n").encode(), \
            False, b""


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

    A held poll or an open stream does not block the loop: it goes back to
    reading, so a client that goes away is noticed at once, and the push
    that reaches the waiter writes straight to the transport.
    """

    __slots__ = ("server", "reader", "writer", "transport", "local", "peer",
                 "held", "keep_alive", "version", "deadline",
                 "waiter", "busy")

    def __init__(self, server, reader, writer, peer, local):
        self.server = server
        self.reader = reader
        self.writer = writer
        self.transport = writer.transport
        self.peer = peer
        self.local = local
        self.held = None                 # a held Poll or an open Stream
        self.keep_alive = True
        self.version = "HTTP/1.1"
        self.waiter = None               # set while a request waits on a poll
        self.busy = False                # a request read but not answered
        # Server.tick() closes idle connections from the oldest deadline on;
        # one walk for all costs less than a timer each.
        self.deadline = server.loop.time() + server.config.http_timeout

    def poll_reply(self, callback, text):
        """The bytes that answer this connection's held poll."""
        content_type, body = frame_body(text, callback,
                                        self.server.config.quote_json)
        return render(200, content_type, body, self.keep_alive, self.version,
                      cors=True)

    def finish_poll(self, data):
        self.send(data, 200)
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def send(self, data, status, keep=False):
        server = self.server
        server.replies[status // 100] += 1
        self.busy = False
        self.transport.write(data)
        if not keep and (not self.keep_alive or server.closing):
            self.transport.close()
        self.deadline = server.loop.time() + server.config.http_timeout
        connections = server.connections
        del connections[self]
        connections[self] = None         # kept in deadline order

    def peer_text(self):
        if isinstance(self.peer, tuple):
            return f"{self.peer[0]}:{self.peer[1]}"
        return "unix socket"

    async def run(self):
        reader = self.reader
        try:
            while True:
                try:
                    # While a poll is held or a stream open, the connection
                    # waits here, and only here: this frame is part of every
                    # waiter's memory, so it keeps no request and the rest
                    # of the work is in serve().
                    if not await self.serve(await reader.readhead()):
                        break
                except asyncio.LimitOverrunError:
                    self.fail(await self.head_too_long())
                    await self.linger()
                    break
                except HTTPError as e:
                    self.fail(e)
                    if not self.keep_alive:
                        await self.linger()
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
        if b"\n" in buffered:
            return HTTPError(431, f"Request head over {MAX_HEADER_BYTES} bytes")
        return HTTPError(414, f"Request line over {MAX_REQUEST_LINE} bytes")

    async def serve(self, head):
        """Answer (or hold) one request; False ends the connection."""
        server = self.server
        reader = self.reader
        held = self.held
        if held is not None:
            if held.__class__ is Stream:
                return True              # nothing is answered after a stream
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
        if reply is not None and reply.__class__ is not tuple:
            reply = await reply          # a stream, or a write answered later
        if reply is None:
            self.busy = False
            # Held, or streaming: keep reading, so a client that leaves is
            # noticed at once.
            return True
        status, content_type, body, cors, extra = reply
        self.send(render(status, content_type, body, self.keep_alive,
                         self.version, cors, extra, request.method == "HEAD"),
                  status)
        if self.transport.get_write_buffer_size() > WRITE_BUFFER_HIGH:
            await self.writer.drain()
        return self.keep_alive

    async def wait_for_poll(self):
        self.waiter = self.server.loop.create_future()
        try:
            await self.waiter
        finally:
            self.waiter = None

    async def replay(self, stream, events):
        """Write a new stream's opening replay as the client reads it; live
        events wait meanwhile, then follow."""
        transport = self.transport
        batch = []
        size = 0
        for event in events:
            batch.append(event)
            size += len(event)
            if size >= WRITE_BUFFER_HIGH:
                if self.held is not stream:
                    return               # ended meanwhile (deleted, shutdown)
                transport.write(b"".join(batch))
                batch = []
                size = 0
                await self.writer.drain()
        if self.held is not stream:
            return
        backlog = stream.backlog
        stream.backlog = None
        if batch or backlog:
            stream.send(self.server.hub, b"".join(batch + (backlog or [])))

    def fail(self, error):
        if self.transport.is_closing():
            return
        if self.held is not None:
            self.server.hub.release(self.held)
        self.server.client_log.mistake("%s: %d %s", self.peer_text(),
                                       error.status, error.message)
        extra = b"".join(b"%s: %s\r\n" % (k.encode(), v.encode())
                         for k, v in error.headers)
        body = error_text(error.return_code, f"{error.status} "
                          f"{REASONS[error.status]}: {error.message}").encode()
        self.keep_alive = self.keep_alive and not error.close
        # Not closed here: run() lingers first.
        self.send(render(error.status, b"application/json", body,
                         self.keep_alive, self.version, extra=extra),
                  error.status, keep=True)

    async def linger(self):
        """After an error reply that closes the connection, read and drop
        what the client still sends until it has been quiet for a while,
        so it reads the reply instead of a reset (RFC 9112 section 9.6)."""
        transport = self.transport
        if transport.is_closing():
            return
        if transport.can_write_eof():
            transport.write_eof()
        reader = self.reader
        deadline = self.server.loop.time() + LINGER_MAX_TIME
        received = 0
        try:
            while received < LINGER_MAX_BYTES:
                left = deadline - self.server.loop.time()
                if left <= 0:
                    break
                async with asyncio.timeout(min(LINGER_QUIET, left)):
                    data = await reader.read(65536)
                if not data:
                    break
                received += len(data)
        except (TimeoutError, ConnectionError, RuntimeError):
            pass
        transport.close()

    async def close(self):
        server = self.server
        if self.held is not None:
            server.hub.release(self.held)
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
            server.forget(self)


# ---------------------------------------------------------------------------
# Logging
# ---------------------------------------------------------------------------

class DroppingQueueHandler(QueueHandler):
    """Hands records to the writer thread; drops them when it is stuck
    (a full pipe, a hung terminal) rather than stall the event loop."""

    dropped = 0

    def enqueue(self, record):
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            DroppingQueueHandler.dropped += 1


def start_logging(level):
    """Log to stderr from a thread; returns the listener to stop at exit."""
    sink = logging.StreamHandler(sys.stderr)
    sink.setFormatter(logging.Formatter(
        "%(asctime)s %(levelname)s %(message)s"))
    records = queue.Queue(LOG_QUEUE_SIZE)
    root = logging.getLogger()
    root.handlers[:] = [DroppingQueueHandler(records)]
    root.setLevel(level)
    listener = QueueListener(records, sink)
    listener.start()
    return listener


class ClientLog:
    """Client mistakes at INFO, at most CLIENT_LOG_BURST per window; then a
    line says how many were left out, so a flood of bad requests cannot
    flood the log."""

    def __init__(self, clock):
        self.clock = clock
        self.window_end = 0.0
        self.logged = 0
        self.left_out = 0

    def mistake(self, message, *args):
        now = self.clock()
        if now >= self.window_end:
            self.flush()
            self.window_end = now + CLIENT_LOG_WINDOW
        if self.logged < CLIENT_LOG_BURST:
            self.logged += 1
            log.info(message, *args)
        else:
            self.left_out += 1

    def flush(self):
        """Called at least once a window, and at shutdown."""
        if self.left_out:
            log.info("%d more client errors not logged in the last %g s",
                     self.left_out, CLIENT_LOG_WINDOW)
        self.logged = self.left_out = 0

    def tick(self):
        if self.clock() >= self.window_end:
            self.flush()


# ---------------------------------------------------------------------------
# Server lifecycle
# ---------------------------------------------------------------------------

class Server:
    def __init__(self, config):
        self.config = config
        self.loop = None
        self.hub = None
        self.app = None
        # Open connections in deadline order, so the idle sweep stops at the
        # first one still in time.
        self.connections = {}
        self.per_ip = {}                 # non-local address -> connections
        self.replies = [0] * 6           # replies sent, by status // 100
        self.refused = 0
        self.servers = []
        self.closing = False
        self.socket_inode = None
        self.ticker = None
        self.client_log = ClientLog(time.monotonic)

    def handle(self, reader, writer):
        """Called for each new connection; returns the coroutine that serves
        it (not a coroutine itself, to keep one frame less per connection)."""
        config = self.config
        peer = writer.get_extra_info("peername")
        local = is_local(peer)
        count = len(self.connections)
        if local:
            refused = count >= config.max_connections + LOCAL_RESERVE
        else:
            ip = peer[0]
            refused = count >= config.max_connections or \
                self.per_ip.get(ip, 0) >= config.max_connections_per_ip
        if refused or self.closing:
            self.refused += 1
            writer.transport.write(render(
                503, b"application/json",
                error_text(BAD_PARAMETER, "503 Service Unavailable: too many "
                           "connections").encode(), False, "HTTP/1.1"))
            writer.transport.close()
            return None
        if not local:
            self.per_ip[ip] = self.per_ip.get(ip, 0) + 1
        conn = Connection(self, reader, writer, peer, local)
        self.connections[conn] = None
        return conn.run()

    def forget(self, conn):
        """A connection is closed: it counts no more."""
        if self.connections.pop(conn, False) is not False and not conn.local:
            ip = conn.peer[0]
            count = self.per_ip[ip] - 1
            if count:
                self.per_ip[ip] = count
            else:
                del self.per_ip[ip]

    async def start(self):
        config = self.config
        self.loop = loop = asyncio.get_running_loop()
        store = (StateFileStore if config.state_file else MemoryStore)(
            config, loop)
        store.open()
        self.hub = Hub(config, loop, store)
        self.app = App(config, self.hub, self)
        # Request heads are read whole; the limit lets the biggest legal
        # head through and reports anything longer.
        limit = MAX_REQUEST_LINE + MAX_HEADER_BYTES + 4

        def protocol():
            return asyncio.StreamReaderProtocol(
                HeadReader(limit=limit, loop=loop), self.handle, loop=loop)

        if config.unix_socket_path:
            self.servers.append(await self.start_unix(protocol))
        if config.http_port or not config.unix_socket_path:
            port = config.http_port or DEFAULT_PORT
            try:
                server = await loop.create_server(
                    protocol, config.http_host, port, backlog=1024,
                    reuse_address=True)
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
        self.ticker = loop.create_task(self.tick(interval))

    async def start_unix(self, protocol):
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
            server = await self.loop.create_unix_server(protocol, path,
                                                        backlog=1024)
            os.chmod(path, self.config.unix_socket_mode)
        except OSError as e:
            raise StartupError(f"cannot listen on {path}: "
                               f"{e.strerror or e}") from None
        self.socket_inode = os.stat(path).st_ino
        log.info("listening on unix:%s (mode %o)", path,
                 self.config.unix_socket_mode)
        return server

    async def tick(self, interval):
        """Housekeeping: expire clients and channels, close idle
        connections, count the client errors left out of the log."""
        while True:
            await asyncio.sleep(interval)
            await self.hub.expire()
            self.client_log.tick()
            now = self.loop.time()
            idle = []
            for conn in self.connections:
                if conn.deadline >= now:
                    break
                idle.append(conn)
            for conn in idle:
                if conn.held is not None:
                    # Waiting for a message is not idle.
                    conn.deadline = now + self.config.http_timeout
                    del self.connections[conn]
                    self.connections[conn] = None
                elif conn.transport.get_write_buffer_size():
                    # A client that stopped reading its replies: close()
                    # would wait for them to drain, forever.
                    conn.transport.abort()
                else:
                    conn.transport.close()

    async def shutdown(self):
        """Stop accepting, answer held polls, end streams, flush replies,
        clean up."""
        self.closing = True
        for server in self.servers:
            server.close()
        self.ticker.cancel()
        self.hub.close_all()
        for conn in list(self.connections):
            if not conn.busy:
                conn.transport.close()
        background = self.hub.store.background
        pending = [t for t in asyncio.all_tasks()
                   if t is not asyncio.current_task() and t not in background]
        if pending:
            await asyncio.wait(pending, timeout=SHUTDOWN_GRACE)
        for conn in list(self.connections):
            conn.transport.abort()
        await self.hub.store.close()
        self.remove_socket()
        self.client_log.flush()
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
        if server.hub is not None:
            await server.hub.store.close()
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
      help="require 'Authorization: Bearer T' for writes and status; "
           "visible to every local user, so prefer --admin-token-file "
           "(default: $SIMPLE_COMET_ADMIN_TOKEN, then the systemd credential "
           "admin-token; without one, writes are accepted from loopback and "
           "the unix socket only)")
    a("--admin-token-file", metavar="PATH",
      help="read the admin token from this file (one line)")
    a("--max-body", type=positive, default=d.max_body, metavar="BYTES",
      help="largest request body (default %(default)s)")
    a("--max-connections", type=positive, default=d.max_connections,
      metavar="N", help="refuse connections beyond N (default %(default)s; "
                        f"loopback and the unix socket get {LOCAL_RESERVE} more)")
    a("--max-connections-per-ip", type=positive,
      default=d.max_connections_per_ip, metavar="N",
      help="refuse connections beyond N from one non-local address "
           "(default %(default)s)")
    a("--sse-heartbeat", type=duration, default=d.sse_heartbeat, metavar="S",
      help="send a comment to an EventSource stream after S seconds "
           "without an event (default %(default)s)")
    a("--state-file", metavar="PATH",
      help="keep channels, messages and clients in PATH (and files beside "
           "it starting with PATH) across restarts and crashes")
    a("--log-level", default=d.log_level, type=str.upper,
      choices=["DEBUG", "INFO", "WARNING", "ERROR"],
      help="logging level (default %(default)s)")
    a("--version", action="version", version=f"%(prog)s {__version__}")
    args = p.parse_args(argv)
    warnings = []
    try:
        args.admin_token = admin_token(args, warnings)
    except ValueError as e:
        p.error(str(e))
    del args.admin_token_file
    return Config(**vars(args)), warnings


def read_secret(path, what):
    """A secret kept in a file: its one line, surrounding space ignored."""
    try:
        with open(path, encoding="utf-8") as f:
            secret = f.read().strip()
    except (OSError, UnicodeDecodeError) as e:
        reason = getattr(e, "strerror", None) or "not UTF-8 text"
        raise ValueError(f"cannot read {what} from {path}: {reason}") from None
    if not secret or "\n" in secret:
        raise ValueError(f"{path} must hold the {what} on one line")
    return secret


def admin_token(args, warnings):
    """The admin token: from --admin-token-file, --admin-token, the
    environment or a systemd credential, in that order."""
    if args.admin_token_file:
        if args.admin_token:
            raise ValueError("give --admin-token or --admin-token-file, "
                             "not both")
        return read_secret(args.admin_token_file, "admin token")
    if args.admin_token:
        warnings.append("--admin-token on the command line is visible to "
                        "every local user (ps, /proc); use "
                        "--admin-token-file or $SIMPLE_COMET_ADMIN_TOKEN")
        return args.admin_token
    if os.environ.get("SIMPLE_COMET_ADMIN_TOKEN"):
        return os.environ["SIMPLE_COMET_ADMIN_TOKEN"]
    credentials = os.environ.get("CREDENTIALS_DIRECTORY")
    if credentials and os.path.exists(os.path.join(credentials,
                                                   "admin-token")):
        return read_secret(os.path.join(credentials, "admin-token"),
                           "admin token")
    return None


def main(argv=None):
    config, warnings = parse_args(sys.argv[1:] if argv is None else argv)
    listener = start_logging(config.log_level)
    for warning in warnings:
        log.warning("%s", warning)
    # Past a file size limit, writes should fail with EFBIG, not kill us.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        asyncio.run(serve(config))
    except StartupError as e:
        log.error("%s", e)
        return 1
    except KeyboardInterrupt:
        pass
    finally:
        listener.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
