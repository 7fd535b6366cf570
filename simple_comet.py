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

Where messages are kept (memory; memory plus ``--state-file``; a replica
of Redis with ``--redis``) is the store's business, behind one contract:
every write a coroutine with one result shape, every change applied by one
core.  How messages reach readers (held polls, streams) is the hub's.

The file reads top to bottom, a banner a section:

    Configuration        limits and defaults, each with its reason
    Errors               HTTPError (carries its status), APIError (-1..-3)
    HTTP parsing         the request head, bodies, parameters
    Replies              JSON, JSON-P and the bytes of a response
    Parameters           ids and counts
    Storage              the change core (Core, Channel, Pushed); in
                         memory; in a file (records, Journal,
                         StateFileStore); shared by instances (the Lua
                         scripts, RedisReplica, RedisPushes, RedisStore)
    The hub              Deadlines, the two kinds of waiter (Poll,
                         Stream), Hub
    Routes               the route table, App and its handlers, counters
    Connection handling  one keep-alive loop per connection
    Logging              a writer thread, rate-limited client mistakes
    Server lifecycle     listening, housekeeping, shutdown
    Command line         switches, secrets, main()
    Lower level          a Redis client: errors, URLs, RESP2, one
                         connection, a connection kept up
"""

import argparse
import asyncio
import fcntl
import gc
import hashlib
import hmac
import ipaddress
import json
import logging
import math
import operator
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
from collections import OrderedDict, deque
from itertools import islice
# What json.dumps() gives for a str, without its generic dispatch.
from json.encoder import encode_basestring_ascii as json_string
from logging.handlers import QueueHandler, QueueListener
from typing import NamedTuple
from urllib.parse import parse_qsl, quote, unquote, unquote_to_bytes

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
MATCHED_PATHS = 256                  # paths whose route match is kept ...
MATCHED_PATH_BYTES = 256             # ... if this short: 128 KiB at most
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
IDLE_ORDER_SLACK = 1.0               # seconds an idle close may come late

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
LOG_FLUSH_TIMEOUT = 2.0              # seconds to write the last lines at exit

# Channels and clients made since the last gc.freeze() before the next one
# (see Server.spare_the_collector).
GC_FREEZE_AFTER = 20_000

# Expiry removes at most this many entries between two turns of the event
# loop, so that a mass expiry does not hold up replies.
EXPIRY_SLICE = 500

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
    redis = None
    redis_prefix = "comet:"
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
                 "keep_alive", "match", "params", "callback")

    def __init__(self, method, path, query, version, headers):
        self.method = method
        self.path = path
        self.query = query
        self.version = version
        self.headers = headers
        self.body = b""
        self.callback = None             # set by App.route for JSON-P
        # HTTP/1.1 keeps the connection by default, HTTP/1.0 only on request.
        connection = headers.get("connection")
        if connection is None:
            self.keep_alive = version == "HTTP/1.1"
        elif version == "HTTP/1.1":
            self.keep_alive = "close" not in connection.lower()
        else:
            self.keep_alive = "keep-alive" in connection.lower()


# The head nearly every client sends: CRLF lines, a method of capitals, an
# origin-form target of printable ASCII with no fragment, HTTP/1.x, and
# header lines of a token name and a value without control characters (tab
# aside).  One match checks the whole head; one findall splits its header
# lines (a value without its surrounding blanks).  parse_head() takes it
# there and leaves every other head, and every error, to parse_any_head().
_HEADER_NAME = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_HEADER_VALUE = r"[^\x00-\x08\x0a-\x1f\x7f]"
_COMMON_HEAD = re.compile(
    r"([A-Z]+) (/[^\x00-\x20#?\x7f-\xff]*)\??([^\x00-\x20#\x7f-\xff]*) "
    r"(HTTP/1\.[01])\r\n((?:%s:%s*\r\n)*)\r\n" % (_HEADER_NAME, _HEADER_VALUE))
_COMMON_HEADER = re.compile(
    r"(%s):[ \t]*([^\x00-\x20\x7f](?:%s*[^\x00-\x20\x7f])?)?[ \t]*\r\n"
    % (_HEADER_NAME, _HEADER_VALUE))


def parse_head(head):
    """Parse a request line and headers (``head`` ends with an empty line);
    the common shape of head (see _COMMON_HEAD) in one pass."""
    # Up to this size no line or header limit can be passed (their count
    # is checked below).
    if len(head) <= MAX_REQUEST_LINE:
        match = _COMMON_HEAD.fullmatch(head.decode("latin-1"))
        if match is not None:
            method, path, query, version, lines = match.groups()
            headers = {}
            count = 0
            for name, value in _COMMON_HEADER.findall(lines):
                headers[name.lower()] = value
                count += 1
            # A repeated header, too many or a missing Host: as below.
            if len(headers) == count <= MAX_HEADER_LINES and (
                    "host" in headers or version == "HTTP/1.0"):
                return Request(method, path, query, version, headers)
    return parse_any_head(head)


def parse_any_head(head):
    """Parse a request line and headers (``head`` ends with an empty line).

    Lines end in CRLF or, as RFC 9112 section 2.2 allows, a bare LF.
    """
    crlf = head.count(b"\r\n")
    if head.count(b"\n") == crlf:
        if head.count(b"\r") != crlf:
            raise HTTPError(400, "Bare CR in request head")
        lines = head[:-4].split(b"\r\n")
    else:
        if head.count(b"\r") != crlf:
            raise HTTPError(400, "Bare CR in request head")
        lines = head.replace(b"\r\n", b"\n").rstrip(b"\n").split(b"\n")
    if _BAD_HEAD_BYTE.search(head):
        raise HTTPError(400, "Control character in request head")
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
            offset = len(buffer) - 2 if len(buffer) > 2 else 0
            if offset > self._limit:
                raise asyncio.LimitOverrunError("Request head too long", offset)
            if self._eof:
                partial = bytes(buffer)
                buffer.clear()
                raise asyncio.IncompleteReadError(partial, None)
            await self._wait_for_data("readhead")
        if end > self._limit:
            raise asyncio.LimitOverrunError("Request head too long", end)
        if end == len(buffer):           # the usual: one head, nothing after
            head = bytes(buffer)
            buffer.clear()
        else:
            head = bytes(memoryview(buffer)[:end])
            del buffer[:end]
        if self._paused:
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
    if "&" not in text and "%" not in text and "+" not in text:
        # The usual: one plain field (since=N, content=TEXT).
        name, _, value = text.partition("=")
        return {name: value}
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
    if extra:
        parts = head_parts(status, content_type, keep_alive, version, cors,
                           extra)
    else:
        # Replies come in a few shapes, whose heads are built once.
        key = (status, content_type, keep_alive, version, cors)
        parts = _HEADS.get(key) or _HEADS.setdefault(
            key, head_parts(*key, b""))
    if head_only:
        return b"%b%d%b" % (parts[0], len(body), parts[1])
    return b"%b%d%b%b" % (parts[0], len(body), parts[1], body)


def head_parts(status, content_type, keep_alive, version, cors, extra):
    """A reply's head, before and after the body's length."""
    out = [b"\r\n", NO_CACHE, b"X-Content-Type-Options: nosniff\r\n"]
    if cors:
        out.append(CORS)
    if extra:
        out.append(extra)
    if not keep_alive:
        out.append(b"Connection: close\r\n")
    elif version == "HTTP/1.0":
        out.append(b"Connection: keep-alive\r\n")
    out.append(b"\r\n")
    return (b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: "
            % (status, REASONS[status].encode(), content_type),
            b"".join(out))


# (status, content type, keep-alive, version, CORS) -> head_parts(): a
# handful of shapes (statuses x content types x the two versions).
_HEADS = {}


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
        raise APIError(BAD_PARAMETER,
                       f"Invalid {what}: not a non-negative integer")
    # Past 20 digits the exact value cannot matter (ids stay below 2**53),
    # and int() of thousands of digits would be slow.
    number = int(value) if len(value) <= 20 else 10 ** 20
    if number < lowest:
        raise APIError(BAD_PARAMETER, f"Invalid {what}: below {lowest}")
    return number


# ---------------------------------------------------------------------------
# Storage: the change core
# ---------------------------------------------------------------------------
#
# Every store keeps its channels, clients and id counter in a Core and
# changes them only through its apply_* methods: the memory store after its
# checks, the state file's replay for each record, the Redis replica for
# each log entry and when it loads.  Applying is idempotent (a channel or
# client that exists, a message at or below its channel's newest id, the
# removal of what is gone: no change), so a journal replayed over its own
# snapshot, or a log entry applied by its writer and read back, changes
# nothing.  Applying is also where the hub hears of a new message or a
# removed channel, whichever store made the change.

# A message's JSON, the same bytes in every reply, stream event, journal
# record and Redis history (Redis's push script writes the same layout).
MESSAGE_JSON = '{"id": %d, "ts": %d, "content": %s}'


def message_text(message_id, content):
    """A message's JSON, encoded once when it is pushed."""
    return MESSAGE_JSON % (message_id, time.time(), json_string(content))


def message_id_of(text):
    """The id of a message's JSON, read back from its fixed layout."""
    return int(text[7:text.index(",")])


class Pushed(NamedTuple):
    """What every store's push answers."""
    id: int                              # the message's id
    delivered: int                       # polls and streams reached here
    instances: int | None = None         # instances connected (Redis only)


class Channel:
    """A channel: its options, its retained messages and who waits on it.

    Idle channels are many (one per user is common), so nothing is
    allocated before it is needed: no history until the first push, no
    waiter map while nobody waits, no encoded name until the first reply.
    """

    __slots__ = ("name", "max_messages", "use_sessions", "messages",
                 "dropped_id", "last_read", "waiters", "key")

    def __init__(self, name, max_messages, use_sessions, now):
        self.name = name
        self.max_messages = max_messages
        self.use_sessions = use_sessions
        self.messages = None     # deque of (id, JSON text), oldest first
        self.dropped_id = 0      # newest id the history dropped
        self.last_read = now
        self.waiters = None      # held polls and open streams -> None
        # self.key, the name as a JSON string, is set when first asked for.

    def __getattr__(self, name):
        # Called only for a slot not set yet: the key, read as a plain
        # attribute from then on.
        if name != "key":
            raise AttributeError(name)
        self.key = key = json.dumps(self.name)
        return key

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


class Core:
    """Channels, clients and the id counter, and the one place they change.

    Both dicts are kept in order of last read (a read moves its entry to
    the end), so expiry walks from the oldest entry to the first one still
    alive: its cost follows what expires, not what exists.  A client is only
    its id and the time of its last read.
    """

    def __init__(self, config, loop):
        self.config = config
        self.loop = loop
        # Ordered dicts: expiry deletes from the front, where a plain dict
        # would leave slots that every later walk has to step over.
        self.channels = OrderedDict()
        self.clients = OrderedDict()     # client id -> time of last read
        self.last_id = min(int(time.time() * ID_UNITS_PER_SECOND), MAX_SAFE_ID)
        self.pushed = 0                  # messages pushed through here
        self.added = 0                   # channels and clients ever made
        self.hub = None                  # set by the Hub

    # -- applying a change ------------------------------------------------

    def apply_channel(self, name, max_messages, use_sessions, dropped_id=0):
        channel = self.channels.get(name)
        if channel is None:
            channel = self.channels[name] = Channel(
                name, max_messages, use_sessions, self.loop.time())
            self.added += 1
        if dropped_id > channel.dropped_id:
            channel.dropped_id = dropped_id
        return channel

    def apply_client(self, client_id):
        if client_id not in self.clients:
            self.clients[client_id] = self.loop.time()
            self.added += 1

    def apply_push(self, channel, message_id, text):
        """Store a message in ``channel`` (None: not known here, and only
        the counter moves); returns how many waiters it reached."""
        if message_id > self.last_id:
            self.last_id = message_id
        if channel is None or channel.newest_id >= message_id:
            return 0
        channel.add(message_id, text)
        return self.hub.deliver(channel, message_id, text) \
            if channel.waiters else 0

    def apply_remove(self, name):
        channel = self.channels.pop(name, None)
        if channel is not None and channel.waiters:
            self.hub.channel_removed(channel)

    def apply_forget(self, client_id):
        self.clients.pop(client_id, None)

    def apply_counter(self, last_id):
        """Ids taken elsewhere (or before a restart) are never given out."""
        if last_id > self.last_id:
            self.last_id = last_id

    # -- reads ------------------------------------------------------------

    def touch_channel(self, channel, now):
        self.channels.move_to_end(channel.name)
        channel.last_read = now

    def touch_client(self, client_id, now):
        clients = self.clients
        clients[client_id] = now
        clients.move_to_end(client_id)

    def stale_clients(self, now):
        return self.stale(self.clients.items(),
                          now - self.config.session_timeout)

    def stale_channels(self, now):
        return self.stale(((c, c.last_read) for c in self.channels.values()),
                          now - self.config.inactive_channel_timeout)

    @staticmethod
    def stale(entries, limit):
        """The oldest of (key, last read) pairs, up to the first read since
        ``limit``."""
        for key, last_read in entries:
            if last_read >= limit:
                return
            yield key

    def channel(self, name):
        channel = self.channels.get(name)
        if channel is None:
            check_id(name, "channel id", channel=True)
            raise APIError(NO_CHANNEL, "Nonexistent channel")
        return channel

    def next_id(self):
        if self.last_id >= MAX_SAFE_ID:
            raise APIError(BAD_PARAMETER, "Message id space exhausted")
        return self.last_id + 1

    # -- the store contract -----------------------------------------------
    #
    # Writes are coroutines: add_channel(name, max_messages, use_sessions)
    # and add_client(client_id) return None, push(name, content) a Pushed,
    # remove_channel(name) whether it existed; refusals raise APIError (API
    # failures) or HTTPError (503: not stored).  catch_up() returns True
    # once this instance has applied every change stored before the call,
    # False when it cannot tell; expire(now, reading) forgets what nobody
    # read.  open(), close(), health() (None, or why writes are refused)
    # and counters() (its own rows of App.counters()).

    def open(self):
        """Load what was stored."""

    async def close(self):
        pass

    def health(self):
        return None

    def counters(self):
        return ()

    async def catch_up(self):
        return True                      # this state is the whole truth


# ---------------------------------------------------------------------------
# Storage in memory
# ---------------------------------------------------------------------------

class MemoryStore(Core):
    """The store of one process: each write checks, is kept (a hook: the
    state file journals it there; raising refuses the write), and is
    applied."""

    async def add_channel(self, name, max_messages, use_sessions):
        if name in self.channels:
            raise APIError(NO_CHANNEL, "Channel already exists")
        self.keep_channel(name, max_messages, use_sessions)
        self.apply_channel(name, max_messages, use_sessions)

    async def add_client(self, client_id):
        if client_id in self.clients:
            raise APIError(NO_CHANNEL, "Client already exists")
        self.keep_client(client_id)
        self.apply_client(client_id)

    async def push(self, name, content):
        channel = self.channels.get(name) or self.channel(name)
        message_id = self.next_id()
        text = message_text(message_id, content)
        self.keep_push(channel, message_id, text)
        self.pushed += 1
        return Pushed(message_id, self.apply_push(channel, message_id, text))

    async def remove_channel(self, name):
        channel = self.channels.get(name)
        if channel is None:
            return False
        self.keep_remove(channel)
        self.apply_remove(name)
        return True

    async def expire(self, now, reading):
        """Forget clients and channels nobody has read for their timeout;
        those with a held poll or an open stream count as read now.  Done
        in slices, so a mass expiry does not hold up replies."""
        while True:
            clients = list(islice(self.stale_clients(now), EXPIRY_SLICE))
            gone = []
            for client_id in clients:
                if client_id in reading:
                    self.touch_client(client_id, now)
                else:
                    gone.append(client_id)
            channels = list(islice(self.stale_channels(now), EXPIRY_SLICE))
            dead = []
            for channel in channels:
                if channel.waiters:
                    self.touch_channel(channel, now)
                else:
                    dead.append(channel)
            if gone or dead:
                if not self.keep_expiry(gone, dead):
                    return               # tried again at the next pass
                for client_id in gone:
                    self.apply_forget(client_id)
                for channel in dead:
                    self.apply_remove(channel.name)
            if not clients and not channels:
                return
            await asyncio.sleep(0)

    # -- persistence hooks: nothing to keep in memory ----------------------

    def keep_channel(self, name, max_messages, use_sessions):
        pass

    def keep_client(self, client_id):
        pass

    def keep_push(self, channel, message_id, text):
        pass

    def keep_remove(self, channel):
        pass

    def keep_expiry(self, client_ids, channels):
        """False when what expired cannot be forgotten yet."""
        return True


# ---------------------------------------------------------------------------
# Storage in a file (--state-file): records, the journal, the store
# ---------------------------------------------------------------------------
#
# The state file is a journal of records, one a line,
#
#     <crc32 of the payload, 8 hex digits> <kind>\t<field>\t...\n
#
# with JSON-encoded names, so no field holds a tab or a newline:
#
#     i  LAST_ID                          the id counter is at least this
#     c  NAME MAX_MESSAGES USE_SESSIONS DROPPED_ID     channel registered
#     u  CLIENT                           client registered
#     p  NAME ID MESSAGE_JSON             message pushed
#     d  NAME                             channel deleted or expired
#     x  CLIENT                           client expired
#
# Each record is applied through the core when replayed, and the core's
# idempotence is what lets compaction write a snapshot while writes go on.

def record(payload):
    payload = payload.encode()
    return b"%08x %s\n" % (zlib.crc32(payload), payload)


def counter_record(last_id, padding=0):
    return record("i\t%d%s" % (last_id, "\t" + "." * padding if padding
                               else ""))


def channel_record(name, max_messages, use_sessions, dropped_id=0):
    return record("c\t%s\t%d\t%d\t%d" % (json.dumps(name), max_messages,
                                         use_sessions, dropped_id))


def message_record(channel, message_id, text):
    return record("p\t%s\t%d\t%s" % (channel.key, message_id, text))


def removal_record(name):
    return record("d\t" + json.dumps(name))


def client_record(client_id, kind="u"):
    return record(kind + "\t" + json.dumps(client_id))


def replay_record(core, fields):
    """Apply one record's fields (bytes) through the core."""
    kind = fields[0]
    if kind == b"p":
        core.apply_push(core.channels.get(json.loads(fields[1])),
                        int(fields[2]), fields[3].decode())
    elif kind == b"c":
        core.apply_channel(json.loads(fields[1]), int(fields[2]),
                           fields[3] == b"1", int(fields[4]))
    elif kind == b"u":
        core.apply_client(json.loads(fields[1]))
    elif kind == b"d":
        core.apply_remove(json.loads(fields[1]))
    elif kind == b"x":
        core.apply_forget(json.loads(fields[1]))
    elif kind == b"i":
        core.apply_counter(int(fields[1]))
    else:
        raise ValueError("unknown record")


def replay(core, data, path):
    """Apply the records of ``data``; returns where the good ones end.

    A bad or incomplete last line is a write cut short by a crash, and is
    dropped; a bad record anywhere else is damage (or not a state file),
    and the server stops without touching the file.
    """
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
            replay_record(core, line[9:].split(b"\t"))
        except (ValueError, IndexError, UnicodeDecodeError) as e:
            if 0 <= newline < size - 1:
                raise StartupError(
                    f"{path}: damaged record at byte {position} ({e}); "
                    "fix or move the file") from None
            break                        # the last record, cut short
        position = newline + 1
    return position


def channel_bytes(channel):
    """About what a channel and its messages take in a snapshot."""
    overhead = 30 + len(channel.key)
    return overhead + sum(overhead + len(text)
                          for _, text in channel.messages or ())


class Journal:
    """The life of the state file PATH: appending, fsync, compaction, lock.

    Its state is one of OK, REFUSING (a write failed, a full disk: the
    server reports itself unable to take writes, and each write is still
    tried, until one as big as the refused one goes through; the sync loop
    probes with such a write once a second) and BROKEN (a failed fsync or cut-back: PATH cannot be trusted
    until compaction has rewritten it).  Files: PATH, PATH.tmp while
    compacting, PATH.lock (held with flock while the server runs); all
    mode 0600.  Compaction copies the list of channels and clients, writes
    each one as it is when reached, a slice at a time, appends what arrived
    meanwhile, fsyncs and renames the result over PATH; while the rename
    runs (off the event loop) every record goes to both files.
    """

    OK, REFUSING, BROKEN = "ok", "refusing", "broken"

    def __init__(self, path, core, loop):
        self.path = path
        self.core = core                 # what a snapshot is made of
        self.loop = loop
        self.fd = None
        self.lock_fd = None
        self.state = self.OK
        self.reason = None               # why not OK
        self.needed = 0                  # size of the largest refused write
        self.size = 0                    # bytes in PATH
        self.live = 0                    # about what a snapshot would take
        self.dirty = False               # written since the last fsync
        self.during = None               # records written while compacting
        self.mirror = None               # the new file, while it is renamed
        self.compacting = None           # the compaction task
        self.swap = asyncio.Lock()       # fsync of PATH vs replacing PATH
        self.syncer = None
        self.compactions = 0

    # -- opening ----------------------------------------------------------

    def open(self):
        """Lock PATH, replay it through the core, and open it to append."""
        path = self.path
        if os.path.exists(path + ".lock"):
            # Refuse before reading if another server holds PATH.
            self.lock()
        data = self.read_file()
        end = replay(self.core, data, path)
        self.lock()
        self.fd = self.open_file(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        if end < len(data):
            log.warning("state file %s: dropped %d bytes of an incomplete "
                        "last record at byte %d", path, len(data) - end, end)
            os.ftruncate(self.fd, end)
            os.fsync(self.fd)
        self.size = end
        core = self.core
        self.live = sum(map(channel_bytes, core.channels.values())) + \
            sum(30 + len(client_id) for client_id in core.clients)
        if os.path.exists(path + ".tmp"):
            os.unlink(path + ".tmp")     # a compaction cut short
        self.syncer = self.loop.create_task(self.sync_loop())

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

    # -- appending --------------------------------------------------------

    def write(self, data, live=0):
        """Append records, or raise a 503 with nothing stored; ``live`` is
        how much they change the size of a snapshot."""
        if self.state == self.BROKEN:
            raise unavailable(f"state file not writable: {self.reason}")
        failure = self.append(self.fd, data, self.size)
        if failure is None and self.mirror is not None:
            failure = self.append(self.mirror[0], data, self.mirror[1])
            if failure is not None:
                self.cut_back(self.fd, self.size)
            else:
                self.mirror[1] += len(data)
        if failure is not None:
            self.refuse(failure, len(data))
            raise unavailable(f"state file not writable: {failure}")
        self.size += len(data)
        self.live += live
        self.dirty = True
        if self.during is not None:
            self.during.append(data)
        if self.state == self.REFUSING and len(data) >= self.needed:
            log.info("state file %s is writable again", self.path)
            self.state, self.reason, self.needed = self.OK, None, 0
        if (self.compacting is None and self.size >
                STATE_COMPACT_RATIO * self.live + STATE_COMPACT_SLACK):
            self.start_compaction()

    def append(self, fd, data, size):
        """Write all of ``data`` at the end of a file of ``size`` bytes;
        None, or why not (the file is then cut back to ``size``)."""
        try:
            written = os.write(fd, data)
        except OSError as e:
            written = e
        if written == len(data):
            return None
        # A short write (the disk filled mid-record) or none: cut the file
        # back to its last whole record, so that no half record is
        # followed by good ones.
        self.cut_back(fd, size)
        return (written.strerror if isinstance(written, OSError)
                else "short write") or str(written)

    def cut_back(self, fd, size):
        try:
            os.ftruncate(fd, size)
        except OSError as e:
            self.fail("cannot cut back a failed write: " + e.strerror)

    def refuse(self, reason, needed):
        self.needed = max(self.needed, needed)
        if self.state == self.OK:
            log.error("state file %s: %s; writes are refused meanwhile",
                      self.path, reason)
        if self.state != self.BROKEN:
            self.state, self.reason = self.REFUSING, reason

    def fail(self, reason):
        """PATH cannot be trusted: refuse writes until it is rewritten."""
        if self.state != self.BROKEN:
            log.error("state file %s: %s; writes are refused until it is "
                      "rewritten", self.path, reason)
        self.state, self.reason = self.BROKEN, reason

    # -- durability -------------------------------------------------------

    async def sync_loop(self):
        """Once a second: fsync what was written; while PATH cannot be
        trusted, rewrite it; while writes are refused, try again."""
        while True:
            await asyncio.sleep(STATE_FSYNC_INTERVAL)
            if self.dirty and self.state != self.BROKEN:
                self.dirty = False
                async with self.swap:
                    try:
                        await self.loop.run_in_executor(
                            None, os.fdatasync, self.fd)
                    except OSError as e:
                        # The kernel may have dropped the pages it could
                        # not write: retrying the fsync would report
                        # success for data that is gone.
                        self.fail("fsync failed: " + e.strerror)
            if self.state == self.BROKEN and self.compacting is None:
                self.start_compaction()
            elif self.state == self.REFUSING:
                # Writable again only if a write as big as the refused one
                # goes through: the probe is padded to its size.
                try:
                    self.write(counter_record(self.core.last_id, self.needed))
                except HTTPError:
                    pass

    def start_compaction(self):
        self.compacting = self.loop.create_task(self.compact())

    async def snapshot(self, fd):
        """Write the live state to ``fd`` a slice at a time; its size."""
        core = self.core
        channels = list(core.channels.values())
        clients = list(core.clients)
        size = self.write_all(fd, counter_record(core.last_id))
        chunk = []
        deadline = time.perf_counter() + STATE_COMPACT_SLICE
        for channel in channels:
            if core.channels.get(channel.name) is channel:  # not removed since
                chunk.append(channel_record(
                    channel.name, channel.max_messages, channel.use_sessions,
                    channel.dropped_id))
                for message_id, text in channel.messages or ():
                    chunk.append(message_record(channel, message_id, text))
            if time.perf_counter() > deadline:
                size += self.write_all(fd, b"".join(chunk))
                chunk = []
                await asyncio.sleep(0)
                deadline = time.perf_counter() + STATE_COMPACT_SLICE
        for client_id in clients:
            if client_id in core.clients:
                chunk.append(client_record(client_id))
                if len(chunk) >= 1000 and time.perf_counter() > deadline:
                    size += self.write_all(fd, b"".join(chunk))
                    chunk = []
                    await asyncio.sleep(0)
                    deadline = time.perf_counter() + STATE_COMPACT_SLICE
        return size + self.write_all(fd, b"".join(chunk))

    async def compact(self):
        """Rewrite PATH as the live state (see the class docstring).  What
        could hold the event loop (fsync, the rename, closing the old file,
        which makes the kernel free its pages) runs in a thread."""
        started = time.monotonic()
        tmp = self.path + ".tmp"
        run = self.loop.run_in_executor
        self.during = []
        fd = None
        try:
            # O_APPEND: once swapped in, a write cut back by ftruncate()
            # must go on at the new end, not leave a hole.
            fd = self.open_file(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC |
                                os.O_APPEND)
            size = live = await self.snapshot(fd)
            # What arrived meanwhile, until little is left to copy.
            while True:
                during, self.during = self.during, []
                size += await run(None, self.write_all, fd, b"".join(during))
                if len(during) < 100:
                    break
            async with self.swap:
                await run(None, os.fdatasync, fd)
                size += self.write_all(fd, b"".join(self.during))
                # From here every record goes to both files, so that it is
                # in PATH whichever file PATH names when the rename returns.
                self.during = None
                self.mirror = [fd, size]
                try:
                    await run(None, os.replace, tmp, self.path)
                finally:
                    fd, size = self.mirror
                    self.mirror = None
                old, self.fd, fd = self.fd, fd, None
                self.size, self.live = size, live
                self.dirty = True
                await run(None, os.close, old)
            await run(None, self.sync_directory)
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
            if self.state == self.BROKEN:
                log.info("state file %s rewritten; writes are taken again",
                         self.path)
            self.state, self.reason, self.needed = self.OK, None, 0
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


class StateFileStore(MemoryStore):
    """Memory, plus a journal that survives restarts and crashes.

    Every write appends its record before it is applied and acknowledged,
    so a crash or SIGKILL loses nothing acknowledged; the journal fsyncs
    once a second, so a power loss costs at most about the last second.
    """

    def __init__(self, config, loop):
        super().__init__(config, loop)
        self.journal = Journal(config.state_file, self, loop)

    def open(self):
        self.journal.open()
        log.info("state file %s: %d channels, %d clients, %d messages",
                 self.journal.path, len(self.channels), len(self.clients),
                 sum(len(c.messages or ()) for c in self.channels.values()))

    async def close(self):
        await self.journal.close()

    def health(self):
        journal = self.journal
        if journal.state != journal.OK:
            return f"state file not writable: {journal.reason}"
        return None

    def counters(self):
        journal = self.journal
        return (
            ("state_file.writable", "state_file_writable",
             "1 when the state file takes writes.", self.health() is None),
            ("state_file.bytes", "state_file_bytes", "Size of the state file.",
             journal.size),
            ("state_file.compactions", "state_file_compactions_total",
             "Rewrites of the state file to its live records.",
             journal.compactions),
        )

    # -- persistence hooks ------------------------------------------------

    def keep_channel(self, name, max_messages, use_sessions):
        data = channel_record(name, max_messages, use_sessions)
        self.journal.write(data, live=len(data))

    def keep_client(self, client_id):
        data = client_record(client_id)
        self.journal.write(data, live=len(data))

    def keep_push(self, channel, message_id, text):
        data = message_record(channel, message_id, text)
        live = len(data)
        messages = channel.messages
        if messages and len(messages) == channel.max_messages:
            # Roughly: the record of the message the history drops.
            live -= len(data) - len(text) + len(messages[0][1])
        self.journal.write(data, live)

    def keep_remove(self, channel):
        self.journal.write(removal_record(channel.name),
                           live=-channel_bytes(channel))

    def keep_expiry(self, client_ids, channels):
        # Journaled first, so what expired stays gone after a restart.
        records = [client_record(c, "x") for c in client_ids]
        live = -sum(map(len, records)) - sum(map(channel_bytes, channels))
        records += [removal_record(c.name) for c in channels]
        try:
            self.journal.write(b"".join(records), live)
        except HTTPError:
            return False
        return True


# ---------------------------------------------------------------------------
# Storage shared by instances (--redis): the scripts
# ---------------------------------------------------------------------------
#
# Keys, under the prefix: id (the counter), log (the shared log, a stream)
# and log:bytes (its size), epoch, channels, clients and instances (sorted
# sets by time of last read or sign of life), c:NAME (a channel's options),
# h:NAME (its history, a list of message JSON).

REDIS_LOG_LENGTH = 100_000           # entries kept in the shared log, at most
REDIS_LOG_BYTES = 64 * 1024 * 1024   # ... and bytes of entries, at most
REDIS_KEY_TTL = 7 * 24 * 3600        # seconds a channel's keys outlive all use
REDIS_INSTANCE_WINDOW = 3000         # ms: an instance seen since is counted
REDIS_APPLY_WAIT = 5.0               # seconds a reply waits for its entry
REDIS_TAIL_BLOCK = 1.0               # seconds one XREAD waits for entries
REDIS_TAIL_COUNT = 1000              # entries one XREAD reads at most
REDIS_PUSH_BATCH = 100               # pushes in one script at most
REDIS_PUSH_BYTES = 1024 * 1024       # bytes of messages in one script, about
REDIS_EXPIRE_BATCH = 1000            # expiries per housekeeping run
REDIS_TOUCH_BATCH = 5000             # names per housekeeping script

# Lua run by every script: ids from one counter, never below what this
# instance has seen (so they never go backwards, even if Redis lost its
# data), and one log entry per change, chained to the one before so that an
# instance notices a gap.  Every id taken is appended at once, so the
# counter is also the last entry of the log, and the entry before an id is
# the counter's value before it was taken.  The log is bounded in entries
# and in bytes (so that Redis's memory follows the histories, whatever the
# size of messages): past either bound its oldest entries go, a batch at a
# time, until it is a sixteenth under both; an instance that falls behind
# the trimmed log sees a gap and reloads.
REDIS_LUA_COMMON = r"""
local function now_ms()
  local t = redis.call('TIME')
  return t[1] * 1000 + math.floor(t[2] / 1000), t[1]
end
local function next_id(counter, floor)
  local id = redis.call('INCR', counter)
  local prev = id - 1
  if id <= tonumber(floor) then
    id = tonumber(floor) + 1
    redis.call('SET', counter, string.format('%d', id))
  end
  return id, string.format('%d', prev)
end
local function trim(log, size)
  local len = redis.call('XLEN', log)
  if len <= @ENTRIES@ and size <= @BYTES@ then return end
  local want_len, want_size = @ENTRIES@ * 15 / 16, @BYTES@ * 15 / 16
  local freed = 0
  for _ = 1, 10 do
    local need = math.max(len - want_len,
                          math.ceil((size - want_size) * len / size))
    if need <= 0 then break end
    local batch = redis.call('XRANGE', log, '-', '+', 'COUNT',
                             math.min(100, need))
    if #batch == 0 then break end
    local last
    for _, entry in ipairs(batch) do
      size, len, last = size - #entry[2][2], len - 1, entry[1]
      freed = freed + #entry[2][2]
      if len <= want_len and size <= want_size then break end
    end
    redis.call('XTRIM', log, 'MINID', string.match(last, '^%d+') .. '-2')
  end
  redis.call('DECRBY', log .. ':bytes', freed)
end
local function append(log, id, prev, kind, rest)
  local sid = string.format('%d', id)
  local entry = kind .. '\t' .. prev .. '\t' .. rest
  redis.call('XADD', log, sid .. '-1', 'r', entry)
  trim(log, redis.call('INCRBY', log .. ':bytes', #entry))
  return sid
end
""".replace("@ENTRIES@", str(REDIS_LOG_LENGTH)).replace(
    "@BYTES@", str(REDIS_LOG_BYTES))

# KEYS: counter log channels meta  ARGV: floor name max sessions ttl
REDIS_ADD_CHANNEL = REDIS_LUA_COMMON + r"""
if redis.call('EXISTS', KEYS[4]) == 1 then return -2 end
local id, prev = next_id(KEYS[1], ARGV[1])
redis.call('HSET', KEYS[4], 'max', ARGV[3], 'sessions', ARGV[4], 'dropped', 0)
redis.call('PEXPIRE', KEYS[4], ARGV[5])
redis.call('ZADD', KEYS[3], now_ms(), ARGV[2])
append(KEYS[2], id, prev, 'c', ARGV[2] .. '\t' .. ARGV[3] .. '\t' .. ARGV[4])
return id
"""

# KEYS: counter log clients  ARGV: floor client
REDIS_ADD_CLIENT = REDIS_LUA_COMMON + r"""
if redis.call('ZADD', KEYS[3], 'NX', now_ms(), ARGV[2]) == 0 then return -2 end
local id, prev = next_id(KEYS[1], ARGV[1])
append(KEYS[2], id, prev, 'u', ARGV[2])
return id
"""

# Every push made on an instance in one turn of its event loop, in one
# script (up to REDIS_PUSH_BATCH): Redis runs it for about a quarter less
# than one script per push.
# KEYS: counter log instances, then meta history of each push
# ARGV: floor ttl instance_window_ms, then name content of each push
# Returns the instances counted, then for each push "ID<TAB>PREVIOUS
# ENTRY<TAB>MESSAGE" ("-2": no such channel), one per line: one string,
# which costs a Python reader far less than an array.  (A message's JSON
# has no raw line break; its layout is MESSAGE_JSON's.)  A history gets
# its time to live when it is made; housekeeping renews it while the
# channel is read.
REDIS_PUSH = REDIS_LUA_COMMON + r"""
local ms, seconds = now_ms()
local floor = ARGV[1]
local out = {redis.call('ZCOUNT', KEYS[3], ms - tonumber(ARGV[3]), '+inf')}
for i = 1, (#KEYS - 3) / 2 do
  local meta, history = KEYS[2 + 2 * i], KEYS[3 + 2 * i]
  local max = tonumber(redis.call('HGET', meta, 'max'))
  if not max then
    out[i + 1] = '-2'
  else
    local id, prev = next_id(KEYS[1], floor)
    local sid = string.format('%d', id)
    local text = '{"id": ' .. sid .. ', "ts": ' .. seconds ..
                 ', "content": ' .. ARGV[3 + 2 * i] .. '}'
    local length = redis.call('RPUSH', history, text)
    if length == 1 then
      redis.call('PEXPIRE', history, ARGV[2])
    elseif length > max then
      local oldest = redis.call('LPOP', history)
      redis.call('HSET', meta, 'dropped', string.match(oldest, '^{"id": (%d+)'))
    end
    append(KEYS[2], id, prev, 'p', ARGV[2 + 2 * i] .. '\t' .. text)
    out[i + 1] = sid .. '\t' .. prev .. '\t' .. text
  end
end
return table.concat(out, '\n')
"""

# KEYS: counter log channels meta history  ARGV: floor name
REDIS_REMOVE_CHANNEL = REDIS_LUA_COMMON + r"""
if redis.call('EXISTS', KEYS[4]) == 0 then return 0 end
redis.call('DEL', KEYS[4], KEYS[5])
redis.call('ZREM', KEYS[3], ARGV[2])
local id, prev = next_id(KEYS[1], ARGV[1])
append(KEYS[2], id, prev, 'd', ARGV[2])
return id
"""

# Run by every instance about once a second: it is alive, these channels
# and clients were read here (or are held by a poll or stream), and what
# nobody read for its timeout goes, as log entries every instance applies.
# KEYS: counter log channels clients instances
# ARGV: floor instance channel_timeout_ms session_timeout_ms ttl prefix
#       limit n_channels channels... clients...
REDIS_HOUSEKEEPING = REDIS_LUA_COMMON + r"""
local ms = now_ms()
local floor = ARGV[1]
local prefix = ARGV[6]
redis.call('ZADD', KEYS[5], ms, ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', ms - 60000)
local n = tonumber(ARGV[8])
for i = 9, 8 + n do
  if redis.call('ZADD', KEYS[3], 'XX', 'CH', ms, ARGV[i]) == 1 then
    redis.call('PEXPIRE', prefix .. 'c:' .. ARGV[i], ARGV[5])
    redis.call('PEXPIRE', prefix .. 'h:' .. ARGV[i], ARGV[5])
  end
end
for i = 9 + n, #ARGV do
  redis.call('ZADD', KEYS[4], 'XX', ms, ARGV[i])
end
local gone = 0
local names = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', ms - tonumber(ARGV[3]),
                         'LIMIT', 0, tonumber(ARGV[7]))
for _, name in ipairs(names) do
  redis.call('DEL', prefix .. 'c:' .. name, prefix .. 'h:' .. name)
  redis.call('ZREM', KEYS[3], name)
  local id, prev = next_id(KEYS[1], floor)
  floor = append(KEYS[2], id, prev, 'd', name)
  gone = gone + 1
end
names = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', ms - tonumber(ARGV[4]),
                   'LIMIT', 0, tonumber(ARGV[7]))
for _, client in ipairs(names) do
  redis.call('ZREM', KEYS[4], client)
  local id, prev = next_id(KEYS[1], floor)
  floor = append(KEYS[2], id, prev, 'x', client)
  gone = gone + 1
end
redis.call('PEXPIRE', KEYS[3], ARGV[5])
redis.call('PEXPIRE', KEYS[4], ARGV[5])
return gone
"""

# Run once on connecting: if no instance has been looking after this
# deployment (all were stopped), its channels and clients get a fresh
# timeout, as after a restart with a state file.
# KEYS: instances channels clients  ARGV: instance_window_ms
REDIS_REVIVE = REDIS_LUA_COMMON + r"""
local ms = now_ms()
if redis.call('ZCOUNT', KEYS[1], ms - tonumber(ARGV[1]), '+inf') > 0 then
  return 0
end
for i = 2, 3 do
  for _, member in ipairs(redis.call('ZRANGE', KEYS[i], 0, -1)) do
    redis.call('ZADD', KEYS[i], ms, member)
  end
end
return 1
"""


# ---------------------------------------------------------------------------
# Storage shared by instances (--redis): the replica
# ---------------------------------------------------------------------------

SCRIPT_SHAS = {}                     # script -> the SHA1 Redis knows it by


class LogGap(Exception):
    """The shared log does not continue where this instance stopped."""


class RedisReplica:
    """Keeps a store's core what Redis holds: loads it, then tails the
    shared log from the last entry applied and applies each entry through
    the core, in order, which wakes this instance's polls and streams.

    ``applied(position)`` waits until the replica has applied the log up to
    an entry: a write is answered once its own entry is applied, so the
    writer reads what it wrote, and a read that needs more than the replica
    has waits for it.  While pushes from here are under way (``writing``)
    the tail mostly waits for their replies instead of reading them back.
    """

    def __init__(self, store):
        self.store = store               # the core entries are applied to
        self.client = store.client
        self.k = store.k
        self.position = None             # last log entry applied; None: load
        self.epoch = None
        self.reached = {}                # message id -> waiters it reached
        self.awaited = {}                # log position -> futures
        self.writing = 0                 # push scripts sent, not answered
        self.wanted = asyncio.Event()    # the tail should read the log

    async def applied(self, position):
        """Wait until the log is applied up to position; False if it is not
        within REDIS_APPLY_WAIT."""
        if self.position is not None and self.position >= position:
            return True
        future = self.store.loop.create_future()
        self.awaited.setdefault(position, []).append(future)
        self.wanted.set()
        try:
            async with asyncio.timeout(REDIS_APPLY_WAIT):
                await future
        except TimeoutError:
            return False
        return True

    def advance(self, position):
        self.position = position
        if self.awaited:
            for wanted in [p for p in self.awaited if p <= position]:
                for future in self.awaited.pop(wanted):
                    if not future.done():
                        future.set_result(None)

    def answered(self):
        """A push script was answered (or failed)."""
        self.writing -= 1
        if not self.writing:
            self.wanted.set()

    # -- applying -----------------------------------------------------------

    def apply_entry(self, position, payload):
        if self.position is not None and position <= self.position:
            return                       # applied already, by its writer
        kind, prev, rest = payload.split("\t", 2)
        if int(prev) != self.position:
            raise LogGap(f"log entries between {self.position} and "
                         f"{position} are gone")
        store = self.store
        if kind == "p":
            name, text = rest.split("\t", 1)
            self.apply_pushed(position, name, text)
            return
        if kind == "c":
            name, max_messages, use_sessions = rest.split("\t")
            store.apply_channel(name, int(max_messages), use_sessions == "1")
        elif kind == "d":
            store.apply_remove(rest)
        elif kind == "u":
            store.apply_client(rest)
        elif kind == "x":
            store.apply_forget(rest)
        store.apply_counter(position)
        self.advance(position)

    def apply_pushed(self, position, name, text):
        store = self.store
        reached = store.apply_push(store.channels.get(name), position, text)
        if reached:
            self.reached[position] = reached
        self.advance(position)

    # -- following the log --------------------------------------------------

    async def tail(self):
        """Apply the shared log, in order, for as long as the server runs."""
        client = self.client
        fresh = True                     # the last read applied something
        while True:
            await client.wait_connected()
            try:
                if self.position is None:
                    await self.load()
                    fresh = True
                if self.writing and not self.awaited:
                    # While pushes from here are under way, reading the log
                    # would mostly read them back: each push's reply names
                    # the entry before it, so one from elsewhere shows as a
                    # gap, and waiting for it (applied()) wakes this loop,
                    # as does the last push answered.
                    self.wanted.clear()
                    try:
                        async with asyncio.timeout(REDIS_TAIL_BLOCK):
                            await self.wanted.wait()
                    except TimeoutError:
                        pass
                # Unless entries are known to be waiting, ask for one: more
                # pushes from here may be on their way, and a long read
                # would bring them back as well.
                count = REDIS_TAIL_COUNT if fresh or self.awaited else 1
                reply = await client.execute_blocking(
                    "XREAD", "COUNT", count,
                    "BLOCK", int(REDIS_TAIL_BLOCK * 1000),
                    "STREAMS", self.k["log"], "%d-1" % self.position,
                    block=REDIS_TAIL_BLOCK)
                fresh = False
                if reply:
                    # Entries applied meanwhile by their writer are skipped.
                    after = self.position
                    for entry_id, fields in reply[0][1]:
                        self.apply_entry(int(entry_id.partition(b"-")[0]),
                                         fields[1].decode())
                    # Entries that came while pushes from here were under
                    # way were likely those (their replies still to come).
                    fresh = self.position != after and not self.writing
                else:
                    # Quiet: a good moment to check that Redis still has
                    # this deployment's data (new entries would show a gap).
                    epoch = await client.execute("GET", self.k["epoch"])
                    if epoch is None or epoch.decode() != self.epoch:
                        raise LogGap("Redis lost its data")
            except LogGap as e:
                log.warning("redis: %s; reloading the shared state", e)
                self.position = None
            except (RedisError, HTTPError):
                await asyncio.sleep(0.1)  # the client reconnects meanwhile

    async def load(self):
        """Make the core what Redis holds, then follow the log from the
        entry that was last when loading began (entries applied twice
        change nothing).  Waiters on channels that are gone get -2 or
        ``deleted``; messages the replica missed are delivered."""
        execute = self.client.execute
        k = self.k
        store = self.store
        await execute("SET", k["epoch"], os.urandom(8).hex(), "NX")
        epoch, tail = await asyncio.gather(execute("GET", k["epoch"]),
                                           execute("GET", k["id"]))
        epoch = epoch.decode()
        if self.epoch is not None and epoch != self.epoch:
            log.warning("redis: Redis came back without this deployment's "
                        "data; channels and clients are gone")
        names, clients = await asyncio.gather(
            execute("ZRANGE", k["channels"], 0, -1),
            execute("ZRANGE", k["clients"], 0, -1))
        names = [n.decode() for n in names]
        metas = await asyncio.gather(*[execute(
            "HMGET", store.key("c:", n), "max", "sessions", "dropped")
            for n in names])
        histories = await asyncio.gather(*[execute(
            "LRANGE", store.key("h:", n), 0, -1) for n in names])
        loaded = {name: (meta, history) for name, meta, history
                  in zip(names, metas, histories) if meta[0] is not None}
        for name in [n for n in store.channels if n not in loaded]:
            store.apply_remove(name)
        for name, ((max_messages, sessions, dropped), history) in \
                loaded.items():
            channel = store.apply_channel(name, int(max_messages),
                                          sessions == b"1", int(dropped or 0))
            for text in history:
                text = text.decode()
                store.apply_push(channel, message_id_of(text), text)
        clients = {c.decode() for c in clients}
        for client_id in [c for c in store.clients if c not in clients]:
            store.apply_forget(client_id)
        for client_id in clients:
            store.apply_client(client_id)
        self.epoch = epoch
        store.apply_counter(int(tail or 0))
        self.advance(int(tail or 0))
        log.info("redis: %d channels and %d clients loaded", len(loaded),
                 len(clients))


# ---------------------------------------------------------------------------
# Storage shared by instances (--redis): pushes in batches
# ---------------------------------------------------------------------------

class RedisPushes:
    """Pushes made in one turn of the loop go to Redis in one script (up to
    REDIS_PUSH_BATCH pushes and REDIS_PUSH_BYTES of messages, or one larger
    message: Redis runs one script at a time, for every instance), and are
    applied in order as answered.  The hottest command, so it is encoded
    from parts made once."""

    def __init__(self, store, replica):
        self.store = store
        self.replica = replica
        self.client = store.client
        self.waiting = []                # (name, content JSON, future)
        k = store.k
        self.keys = b"".join(encode_command(k[name]).partition(b"\r\n")[2]
                             for name in ("id", "log", "instances"))
        self.limits = encode_command(
            store.ttl, REDIS_INSTANCE_WINDOW).partition(b"\r\n")[2]
        prefix = store.prefix.encode().replace(b"%", b"%%")
        self.channel_keys = (b"$%d\r\n" + prefix + b"c:%b\r\n"
                             b"$%d\r\n" + prefix + b"h:%b\r\n")
        self.key_length = len(store.prefix.encode()) + 2
        self.sha = script_sha(REDIS_PUSH).encode()

    def add(self, name, content):
        """A future of (id, instances), or an exception to raise."""
        future = self.store.loop.create_future()
        if not self.waiting:
            self.store.loop.call_soon(self.send)
        self.waiting.append((name, json.dumps(content).encode(), future))
        return future

    def send(self, batch=None, script=False):
        """Send the pushes waiting (or ``batch`` again, with the script's
        text when Redis did not know it)."""
        if batch is None:
            batch, self.waiting = self.waiting, []
        while batch:
            count = size = 0
            for _, content, _ in batch[:REDIS_PUSH_BATCH]:
                if count and size + len(content) > REDIS_PUSH_BYTES:
                    break
                count += 1
                size += len(content)
            some, batch = batch[:count], batch[count:]
            try:
                reply = self.client.send(self.command(some, script))
            except RedisError as e:
                self.fail(some, f"Redis unreachable: {e}")
                continue
            self.replica.writing += 1
            reply.add_done_callback(
                lambda reply, some=some: self.answered(some, reply))

    def command(self, some, script):
        names = [name.encode() for name, _, _ in some]
        key_length = self.key_length
        floor = b"%d" % self.store.floor()
        numkeys = b"%d" % (3 + 2 * len(some))
        body = REDIS_PUSH.encode() if script else self.sha
        return b"".join((
            b"*%d\r\n" % (9 + 4 * len(some)),
            b"$4\r\nEVAL\r\n" if script else b"$7\r\nEVALSHA\r\n",
            b"$%d\r\n%b\r\n" % (len(body), body),
            b"$%d\r\n%b\r\n" % (len(numkeys), numkeys),
            self.keys,
            *[self.channel_keys % (key_length + len(name), name,
                                   key_length + len(name), name)
              for name in names],
            b"$%d\r\n%b\r\n" % (len(floor), floor),
            self.limits,
            *[b"$%d\r\n%b\r\n$%d\r\n%b\r\n" % (
                len(name), name, len(content), content)
              for name, (_, content, _) in zip(names, some)]))

    def answered(self, batch, reply):
        self.replica.answered()
        try:
            results = reply.result().decode().split("\n")
        except RedisReplyError as e:
            if e.code == "NOSCRIPT":
                self.send(batch, script=True)
            else:
                self.fail(batch, f"Redis refused the write: {e}")
            return
        except RedisError as e:
            # Not confirmed: Redis may or may not have stored them.
            self.fail(batch, f"Redis did not confirm the write: {e}")
            return
        try:
            self.apply(batch, results)
        except Exception:
            # A callback's exception would only be logged: its pushes
            # would wait for ever.
            log.exception("internal error applying pushes")
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(
                        HTTPError(500, "Internal server error"))

    def apply(self, batch, results):
        instances = int(results[0])
        replica = self.replica
        for (name, _, future), result in zip(batch, results[1:]):
            if result == "-2":
                if not future.done():
                    try:
                        check_id(name, "channel id", channel=True)
                        error = APIError(NO_CHANNEL, "Nonexistent channel")
                    except APIError as e:
                        error = e
                    future.set_exception(error)
                continue
            message_id, prev, text = result.split("\t", 2)
            message_id = int(message_id)
            if replica.position is not None and int(prev) == replica.position:
                # The entry right after the last one applied: apply it
                # now rather than wait for the tail to read it back.
                replica.apply_pushed(message_id, name, text)
            # Its caller may have gone (the client left): applied anyway.
            if not future.done():
                future.set_result((message_id, instances))

    @staticmethod
    def fail(batch, message):
        for _, _, future in batch:
            if not future.done():
                # One exception each: raised in many tasks, one instance
                # would collect all their tracebacks.
                future.set_exception(unavailable(message))


# ---------------------------------------------------------------------------
# Storage shared by instances (--redis): the store
# ---------------------------------------------------------------------------

class RedisStore(Core):
    """A replica of the state that every instance keeps in one Redis.

    Writes run a Lua script that checks, assigns an id from the shared
    counter, stores and appends one entry to the shared log, all
    atomically; the replica applies it (the writer's own entry first, so
    the writer reads what it wrote).  Reads are answered from the replica;
    one that needs more than it has (a channel, a client or a ``since`` it
    has not seen yet) first catches up.  Expiry is decided in Redis (every
    instance sends what it read once a second), so all instances agree.
    """

    def __init__(self, config, loop):
        super().__init__(config, loop)
        prefix = self.prefix = config.redis_prefix
        self.k = {name: prefix + name for name in (
            "id", "log", "epoch", "channels", "clients", "instances")}
        self.client = RedisClient(config.redis, on_connect=self.connected)
        self.instance = os.urandom(8).hex()
        # A safety net for a deployment that is gone for good; expiry
        # itself is the housekeeping script's.
        self.ttl = int(max(config.inactive_channel_timeout,
                           config.session_timeout, REDIS_KEY_TTL) * 1000)
        self.replica = RedisReplica(self)
        self.pushes = RedisPushes(self, self.replica)
        self.touched_channels = set()
        self.touched_clients = set()
        self.tail_task = None
        self.housekeeping_task = None

    def open(self):
        self.client.start()
        self.tail_task = self.loop.create_task(self.replica.tail())
        log.info("redis: using %s with prefix %r", self.client.url,
                 self.prefix)

    async def close(self):
        if self.tail_task is not None:
            self.tail_task.cancel()
        if self.client.connected:
            # Gone: pushes elsewhere stop counting this instance at once.
            try:
                await self.client.execute("ZREM", self.k["instances"],
                                          self.instance)
            except RedisError:
                pass
        await self.client.close()

    def health(self):
        # Open to everyone: no address, no detail (the log has them).
        if not self.client.connected:
            return "Redis unreachable"
        if self.replica.position is None:
            return "Redis: catching up"
        return None

    def counters(self):
        connected = self.health() is None
        return (
            ("redis.connected", "redis_connected",
             "1 when connected to Redis and caught up.", connected),
            ("redis.last_error", None, None, self.client.last_error),
            ("redis.applied_id", None, None, self.replica.position or 0),
            ("redis.instance", None, None, self.instance),
            (None, "redis_reconnects_total", "Connections made to Redis.",
             self.client.connects),
        )

    def key(self, kind, name):
        return self.prefix + kind + name

    def floor(self):
        return max(self.last_id,
                   min(int(time.time() * ID_UNITS_PER_SECOND), MAX_SAFE_ID))

    # -- talking to Redis ---------------------------------------------------

    async def connected(self, client):
        # A new connection: whatever was missed is in the log (or, if Redis
        # lost its data, the state is reloaded); the tail finds out.  Say
        # at once that this instance is here, and what it read meanwhile.
        self.touched_channels.update(self.channels)
        self.touched_clients.update(self.clients)
        await self.run(REDIS_REVIVE, [
            self.k["instances"], self.k["channels"], self.k["clients"]],
            [REDIS_INSTANCE_WINDOW], check=False)
        await self.housekeeping(check=False)

    def check_connected(self):
        """A 503 at once, with nothing sent, while Redis is unreachable."""
        if not self.client.connected:
            raise unavailable("Redis unreachable: " +
                              (self.client.last_error or "connecting"))

    async def run(self, script, keys, args, check=True):
        """Run a script, or a command (``script`` None); a Redis that
        cannot answer is a 503."""
        if check:
            self.check_connected()
        try:
            if script is None:
                return await self.client.execute(*keys)
            sha = SCRIPT_SHAS.get(script)
            if sha is None:
                sha = SCRIPT_SHAS[script] = script_sha(script)
            return await self.client.evalsha(sha, script, keys, args)
        except RedisReplyError as e:
            raise unavailable(f"Redis refused the write: {e}") from None
        except RedisError as e:
            # Not confirmed: Redis may or may not have stored it.
            raise unavailable(f"Redis did not confirm the write: {e}") \
                from None

    async def catch_up(self):
        try:
            tail = await self.run(None, ["GET", self.k["id"]], ())
        except HTTPError:
            return False
        return await self.replica.applied(int(tail or 0))

    # -- writes -------------------------------------------------------------

    async def add_channel(self, name, max_messages, use_sessions):
        await self.change(REDIS_ADD_CHANNEL, [
            self.k["id"], self.k["log"], self.k["channels"],
            self.key("c:", name)],
            [self.floor(), name, max_messages, int(use_sessions), self.ttl],
            "Channel already exists")

    async def add_client(self, client_id):
        await self.change(REDIS_ADD_CLIENT, [
            self.k["id"], self.k["log"], self.k["clients"]],
            [self.floor(), client_id], "Client already exists")

    async def change(self, script, keys, args, refusal):
        position = await self.run(script, keys, args)
        if position == -2:
            raise APIError(NO_CHANNEL, refusal)
        await self.replica.applied(position)

    async def push(self, name, content):
        self.check_connected()
        message_id, instances = await self.pushes.add(name, content)
        replica = self.replica
        if replica.position is None or replica.position < message_id:
            await replica.applied(message_id)
        self.pushed += 1
        return Pushed(message_id, replica.reached.pop(message_id, 0),
                      instances)

    async def remove_channel(self, name):
        removed = await self.run(REDIS_REMOVE_CHANNEL, [
            self.k["id"], self.k["log"], self.k["channels"],
            self.key("c:", name), self.key("h:", name)], [self.floor(), name])
        if removed:
            await self.replica.applied(removed)
        return bool(removed)

    # -- reads and expiry ---------------------------------------------------

    def touch_channel(self, channel, now):
        self.touched_channels.add(channel.name)
        super().touch_channel(channel, now)

    def touch_client(self, client_id, now):
        self.touched_clients.add(client_id)
        super().touch_client(client_id, now)

    async def expire(self, now, reading):
        """Tell Redis what was read here (held polls and open streams count)
        and let it expire what nobody read.  Locally, entries are only
        moved along, so each is looked at once per timeout."""
        for client_id in list(self.stale_clients(now)):
            if client_id in reading:
                self.touch_client(client_id, now)
            else:
                Core.touch_client(self, client_id, now)
        for channel in list(self.stale_channels(now)):
            if channel.waiters:
                self.touch_channel(channel, now)
            else:
                Core.touch_channel(self, channel, now)
        if self.client.connected and (self.housekeeping_task is None or
                                      self.housekeeping_task.done()):
            self.housekeeping_task = self.loop.create_task(self.housekeeping())
        # Push counts of entries applied here but pushed elsewhere.
        if len(self.replica.reached) > 10_000:
            self.replica.reached.clear()

    async def housekeeping(self, check=True):
        channels = list(self.touched_channels)
        clients = list(self.touched_clients)
        self.touched_channels.clear()
        self.touched_clients.clear()
        config = self.config
        keys = [self.k[k] for k in ("id", "log", "channels", "clients",
                                     "instances")]
        try:
            while True:
                some_channels = channels[:REDIS_TOUCH_BATCH]
                some_clients = clients[:REDIS_TOUCH_BATCH - len(some_channels)]
                del channels[:len(some_channels)]
                del clients[:len(some_clients)]
                await self.run(REDIS_HOUSEKEEPING, keys, [
                    self.floor(), self.instance,
                    int(config.inactive_channel_timeout * 1000),
                    int(config.session_timeout * 1000), self.ttl, self.prefix,
                    REDIS_EXPIRE_BATCH, len(some_channels), *some_channels,
                    *some_clients], check)
                if not channels and not clients:
                    return
        except HTTPError:
            # Told again next time.
            self.touched_channels.update(channels)
            self.touched_clients.update(clients)


# ---------------------------------------------------------------------------
# The hub: held polls and open streams, the two kinds of waiter
# ---------------------------------------------------------------------------

class Deadlines:
    """Items in the order of their deadlines, for timeouts that all have one
    length, so that an item added or moved goes to the end and the order
    holds: what is due is at the front, and one periodic walk finds it,
    stopping at the first item still in time (a timer each would cost more
    memory and time than the item).  Held polls, open streams (their next
    heartbeat) and connections (their idle close) are kept so."""

    __slots__ = ("due",)

    def __init__(self):
        self.due = {}                    # item -> deadline, in that order

    def __len__(self):
        return len(self.due)

    def __iter__(self):
        return iter(self.due)

    def add(self, item, deadline):
        self.due[item] = deadline

    def move(self, item, deadline):
        """A later deadline for an item (if it is still here)."""
        due = self.due
        if due.pop(item, None) is not None:
            due[item] = deadline

    def remove(self, item):
        return self.due.pop(item, None) is not None

    def expired(self, now):
        """The items due by ``now``, oldest first; they stay until removed
        or moved."""
        out = []
        for item, deadline in self.due.items():
            if deadline > now:
                break
            out.append(item)
        return out


# A read's reply; the hottest text, formatted directly rather than through
# a dict.
REPLY_JSON = ('{"return_code": 1, "error_message": "", "since": %d, '
              '"last_id": %d, "messages": {%s}%s}')
_TEXT = operator.itemgetter(1)           # the JSON of a retained (id, text)


def event_bytes(channel, message_id, text):
    """A message as one EventSource event (the JSON gains its channel)."""
    return ('id: %d\ndata: {"channel": %s, %s\n\n' % (
        message_id, channel.key, text[1:])).encode()


class Poll:
    """A held read, answered once: by a push to one of its channels, by
    the poll timeout, or when its channels are deleted."""

    __slots__ = ("conn", "channels", "since", "client_id", "callback")

    def __init__(self, conn, channels, since, client_id, callback):
        self.conn = conn
        self.channels = channels
        self.since = since
        self.client_id = client_id
        self.callback = callback         # JSON-P callback, None for JSON

    def notify(self, hub, channel, message_id, text, cache, now):
        # Polls that share channels, since and format get the same bytes:
        # the reply is built once per distinct kind, not once per poll.
        conn = self.conn
        key = (self.channels, self.since, self.callback, conn.keep_alive,
               conn.version)
        data = cache.get(key)
        if data is None:
            text = hub.read_text(self.channels, self.since)
            if text is None:
                # Its cursor is ahead of this message (read elsewhere, on
                # an instance ahead of this one): keep waiting.
                return 0
            data = cache[key] = conn.poll_reply(self.callback, text)
        hub.release(self, now)
        conn.finish_poll(data)
        return 1

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

    __slots__ = ("conn", "channels", "client_id", "cursor", "backlog")

    def __init__(self, conn, channels, client_id, cursor):
        self.conn = conn
        self.channels = channels
        self.client_id = client_id
        self.cursor = cursor             # the id it started after
        self.backlog = None

    def notify(self, hub, channel, message_id, text, cache, now):
        if message_id <= self.cursor:
            return 0                     # as for polls: seen elsewhere
        data = cache.get(Stream)
        if data is None:
            data = cache[Stream] = event_bytes(channel, message_id, text)
        self.send(hub, data)
        hub.streams.move(self, now + hub.config.sse_heartbeat)
        return 1

    def send(self, hub, data):
        if self.backlog is not None:
            self.backlog += data
            if len(self.backlog) > SSE_MAX_UNSENT:
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
        self.polls = Deadlines()         # held polls, by their timeout
        self.streams = Deadlines()       # open streams, by their heartbeat
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

    # -- writes: coroutines of the store ----------------------------------

    def add_channel(self, name, max_messages, use_sessions):
        return self.store.add_channel(name, max_messages, use_sessions)

    def add_client(self, client_id):
        return self.store.add_client(client_id)

    def push(self, name, content):
        """Store a message; a coroutine of its Pushed."""
        if content is None:
            self.store.channel(name)     # a missing channel is told first
            raise APIError(BAD_PARAMETER, "Missing content")
        return self.store.push(name, content)

    def remove_channel(self, name):
        """A coroutine of whether the channel existed."""
        return self.store.remove_channel(name)

    # -- told by the store --------------------------------------------------

    def deliver(self, channel, message_id, text):
        """A message was stored: every waiter on its channel gets it."""
        cache = {}
        now = self.loop.time()
        reached = 0
        for waiter in list(channel.waiters):
            reached += waiter.notify(self, channel, message_id, text, cache,
                                     now)
        self.delivered += reached
        return reached

    def channel_removed(self, channel):
        for waiter in list(channel.waiters):
            waiter.channel_gone(self, channel)

    # -- reads --------------------------------------------------------------

    async def view(self, names, since, client_id):
        """(The channels a reader may read, its cursor), once this instance
        has what the reader needs.

        A3 clamps a ``since`` above the counter to it.  An instance of a
        shared store may not have applied yet what the reader saw on
        another one, nor a channel or client registered there: then it
        catches up first, rather than answer from a stale view.  If it
        cannot (the shared store is unreachable or slow), it answers from
        what it has, and keeps a cursor that is ahead (nothing is sent
        twice).
        """
        store = self.store
        if since <= store.last_id:
            try:
                return self.readable(names, client_id), since
            except APIError:
                await store.catch_up()
                return self.readable(names, client_id), since
        caught_up = await store.catch_up()
        return self.readable(names, client_id), \
            min(since, store.last_id) if caught_up else since

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
            messages = channel.messages
            if not messages or messages[-1][0] <= since:
                parts.append(channel.key + ": []")
                continue
            empty = False
            if since and channel.dropped_id > since:
                lost.append(channel.key)
            # All of the history (a first read, since=0) needs no search.
            newer = messages if messages[0][0] > since else \
                channel.since(since)
            parts.append(channel.key + ": [" + ", ".join(map(_TEXT, newer))
                         + "]")
        if empty:
            return None
        return self.reply_text(since, parts, lost)

    @staticmethod
    def part(channel, texts=()):
        """A channel's entry in a reply's "messages"."""
        return channel.key + ": [" + ", ".join(texts) + "]"

    def reply_text(self, since, parts, lost=()):
        lost = ', "lost": [%s]' % ", ".join(lost) if lost else ""
        last_id = self.store.last_id
        # A cursor ahead of this instance (see view) is kept, not sent back.
        return REPLY_JSON % (since, last_id if last_id > since else since,
                             ", ".join(parts), lost)

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
            self.polls.remove(waiter)
        else:
            self.streams.remove(waiter)
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
        self.polls.add(poll, self.loop.time() + self.config.poll_timeout -
                       self.sweep_interval)
        self.attach(poll)

    def answer(self, poll, text):
        """Send a held poll its reply (a JSON text) and forget it."""
        self.release(poll)
        conn = poll.conn
        conn.finish_poll(conn.poll_reply(poll.callback, text))

    def time_out(self, poll):
        self.answer(poll, self.empty_text(poll.channels, poll.since))

    def sweep(self):
        for poll in self.polls.expired(self.loop.time()):
            self.time_out(poll)
        self.sweeper = self.loop.call_later(self.sweep_interval, self.sweep)

    def open_stream(self, conn, channels, cursor, client_id):
        """Start a stream; returns the opening replay, a list of event
        bytes: ``lost`` first where history was dropped, then what is
        retained after the cursor, oldest first."""
        stream = Stream(conn, channels, client_id, cursor)
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
            stream.backlog = bytearray()
        self.streams.add(stream, self.loop.time() + self.config.sse_heartbeat)
        self.attach(stream)
        return stream, events

    def end_stream(self, stream, abort=False, retry=None):
        """Close a stream: flushed first, unless its reader is too slow."""
        if stream.conn.held is not stream:
            return                       # ended already
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
        now = self.loop.time()
        for stream in self.streams.expired(now):
            if stream.backlog is None:
                stream.conn.transport.write(b": keep-alive\n\n")
                self.streams.move(stream, now + self.config.sse_heartbeat)
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
FORM_TYPE = "application/x-www-form-urlencoded"

# Path -> {method: (handler, access)}.  A path with a "fmt" group is an API
# resource (JSON or JSON-P, failures as negative return codes) whose
# handler returns a JSON text (None: held); the others build their whole
# reply.  HEAD goes wherever GET goes.  Status and metrics exist with
# --enable-status.
ROUTES = {
    r"/channels/(?P<names>[^/]*)\.(?P<fmt>jsonp?)": {
        "GET": ("read", PUBLIC), "POST": ("push", ADMIN),
        "DELETE": ("delete", ADMIN), "OPTIONS": ("preflight", PUBLIC)},
    r"/channels/(?P<names>[^/]*)\.sse": {
        "GET": ("stream", PUBLIC), "OPTIONS": ("preflight", PUBLIC)},
    r"/channels\.(?P<fmt>jsonp?)": {"POST": ("register_channel", ADMIN)},
    r"/clients\.(?P<fmt>jsonp?)": {"POST": ("register_client", ADMIN)},
    r"/health\.(?P<fmt>jsonp?)": {"GET": ("health", PUBLIC)},
    r"/(?:status|stats)\.(?P<fmt>jsonp?)": {"GET": ("status", ADMIN)},
    r"/metrics": {"GET": ("metrics", ADMIN)},
}
STATUS_ROUTES = {"status", "metrics"}

# A stream refused before it starts gets a real HTTP status: a browser's
# EventSource then stops reconnecting.
STREAM_REFUSALS = {BAD_PARAMETER: 400, NO_CHANNEL: 404,
                   UNREGISTERED_CLIENT: 403}

SSE_HEAD = (b"HTTP/1.1 200 OK\r\n"
            b"Content-Type: text/event-stream; charset=utf-8\r\n" + NO_CACHE +
            b"X-Accel-Buffering: no\r\nX-Content-Type-Options: nosniff\r\n" +
            CORS + b"Connection: close\r\n\r\n")
# The comment makes proxies pass the head on at once.
SSE_START = SSE_HEAD + b"retry: %d\n: stream open\n\n" % SSE_RETRY_MS

METRICS_TYPE = b"text/plain; version=0.0.4; charset=utf-8"


class App:
    """Routes a parsed request to the hub and builds the reply.  Every
    handler is a coroutine ``handler(request, conn)``; the route's match,
    parameters and JSON-P callback are on the request."""

    def __init__(self, config, hub, server):
        self.config = config
        self.hub = hub
        self.server = server
        self.token = config.admin_token.encode() if config.admin_token else None
        self.routes = []                 # (pattern, {method: entry})
        self.matched = {}                # path -> (match, {method: entry})
        for path, methods in ROUTES.items():
            entries = {method: (getattr(self, name), admin, "(?P<fmt>" in path)
                       for method, (name, admin) in methods.items()
                       if config.enable_status or name not in STATUS_ROUTES}
            if "GET" in entries:         # HEAD beside GET, in Allow too
                entries = {m: e for method, e in entries.items() for m in
                           ((method, "HEAD") if method == "GET" else (method,))}
            if entries:
                self.routes.append((re.compile(path), entries))

    def match(self, path):
        """(The route's match, its methods) for a path; raises 404."""
        found = self.matched.get(path)
        if found is not None:
            return found
        for pattern, methods in self.routes:
            match = pattern.fullmatch(path)
            if match is not None:
                break
        else:
            raise HTTPError(404, f"No resource at {path[:100]}", close=False)
        # Most requests go to paths seen before (a channel's readers, its
        # publisher): each is matched once while the cache holds it.
        if len(path) <= MATCHED_PATH_BYTES:
            if len(self.matched) >= MATCHED_PATHS:
                self.matched.clear()
            self.matched[path] = found = match, methods
        return match, methods

    async def route(self, request, conn):
        """The reply: (status, content type, body, cors, extra headers), or
        None when a read is held or a stream is open.  Raises HTTPError."""
        match, methods = self.match(request.path)
        method = request.method
        entry = methods.get(method)
        if entry is None:
            raise HTTPError(405, f"{method} not allowed here", close=False,
                            headers=[("Allow", ", ".join(methods))])
        handler, admin, api = entry
        request.match = match
        if not api or method == "OPTIONS":
            if admin:
                self.authorize(request, conn)
            return await handler(request, conn)

        reading = method in ("GET", "HEAD")
        # Until the callback is known, errors go through the default one.
        callback = DEFAULT_CALLBACK if match["fmt"] == "jsonp" else None
        try:
            request.params = params = self.parameters(request)
            if callback is not None:
                callback = params.get("cb", DEFAULT_CALLBACK)
                refused = callback_error(callback)
                if refused:
                    # Never echo the caller's text, and do not act on a
                    # request whose answer could not be read.
                    return 200, b"application/javascript", \
                        f"/* {refused} */".encode(), reading, b""
                request.callback = callback
            if admin:
                self.authorize(request, conn)
            text = await handler(request, conn)
            if text is None:
                return None              # held
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
        content_type = request.headers.get("content-type")
        if content_type is not None and content_type != FORM_TYPE:
            mime = content_type.partition(";")[0].strip().lower()
            if mime not in ("", FORM_TYPE):
                raise HTTPError(415, "Send application/x-www-form-urlencoded",
                                close=False)
        try:
            form = request.body.decode("utf-8")
        except UnicodeDecodeError:
            raise HTTPError(400, "Invalid UTF-8 in body") from None
        # As in the original, the query string counts too; the form wins.
        form = decode_params(form, "body")
        return {**params, **form} if params else form

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

    @staticmethod
    def channel_names(match):
        names = decode_segment(match["names"])
        if "|" not in names:
            return (names,)
        names = list(dict.fromkeys(names.split("|")))
        if len(names) > MAX_CHANNELS_PER_READ:
            raise APIError(BAD_PARAMETER, "More than "
                           f"{MAX_CHANNELS_PER_READ} channels in one read")
        return names

    @staticmethod
    def cursor(value):
        return parse_count(value, "since", 0)

    @staticmethod
    def client_id(params):
        if "client_id" not in params:
            return None
        return check_id(params["client_id"], "client_id")

    # -- resources ----------------------------------------------------------

    async def register_channel(self, request, conn):
        params = request.params
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
        await self.hub.add_channel(name, max_messages, word in TRUE_WORDS)
        return success_text(channel_id=name)

    async def register_client(self, request, conn):
        client_id = check_id(request.params.get("client_id"), "client_id")
        await self.hub.add_client(client_id)
        return success_text(client_id=client_id)

    async def push(self, request, conn):
        pushed = await self.hub.push(decode_segment(request.match["names"]),
                                     request.params.get("content"))
        # The hottest write: formatted directly rather than through a dict.
        return ('{"return_code": 1, "error_message": "", "message_id": %d, '
                '"delivered": %d%s}' % (
                    pushed.id, pushed.delivered, "" if pushed.instances is None
                    else ', "instances": %d' % pushed.instances))

    async def delete(self, request, conn):
        name = check_id(decode_segment(request.match["names"]), "channel id",
                        channel=True)
        removed = await self.hub.remove_channel(name)
        return success_text(2 if removed else 1, channel_id=name,
                            removed=removed)

    async def read(self, request, conn):
        params = request.params
        since = params.get("since")
        client_id = self.client_id(params)
        hub = self.hub
        channels, since = await hub.view(
            self.channel_names(request.match),
            0 if since is None else self.cursor(since), client_id)
        # No await between this check and hold(): a push cannot slip between.
        text = hub.read_text(channels, since) if since < hub.last_id else None
        if text is not None:
            return text
        if request.method == "HEAD":
            return hub.empty_text(channels, since)
        hub.hold(Poll(conn, channels, since, client_id, request.callback))
        return None

    async def stream(self, request, conn):
        """Start an EventSource stream: write the head and the opening
        replay, then stay open."""
        try:
            params = self.parameters(request)
            names = self.channel_names(request.match)
            # A reconnecting browser sends the last id it saw: it wins.
            last_event_id = request.headers.get("last-event-id", "").strip()
            if last_event_id.isascii() and last_event_id.isdigit():
                cursor = self.cursor(last_event_id)
            else:
                cursor = self.cursor(params.get("since", "0"))
            client_id = self.client_id(params)
            channels, cursor = await self.hub.view(names, cursor, client_id)
        except APIError as e:
            # Before the stream starts, a real HTTP status: a browser's
            # EventSource then stops reconnecting.
            raise HTTPError(STREAM_REFUSALS[e.return_code], e.message,
                            close=False, return_code=e.return_code) from None
        if request.method == "HEAD":
            conn.keep_alive = False
            conn.send(SSE_HEAD, 200)
            return None
        stream, replay = self.hub.open_stream(conn, channels, cursor,
                                              client_id)
        conn.send(SSE_START, 200, keep=True)
        await conn.replay(stream, replay)
        return None

    async def preflight(self, request, conn):
        requested = request.headers.get("access-control-request-headers", "")
        methods = next(m for pattern, m in self.routes
                       if pattern is request.match.re)
        extra = (b"Access-Control-Allow-Methods: %s\r\n"
                 b"Access-Control-Max-Age: 86400\r\n" % ", ".join(
                     m for m in methods if m in ("GET", "HEAD", "OPTIONS")
                 ).encode())
        if requested and not requested.strip(TOKEN + ", "):
            extra += b"Access-Control-Allow-Headers: %s\r\n" % requested.encode()
        return 204, b"text/plain", b"", True, extra

    async def health(self, request, conn):
        problem = self.hub.store.health()
        if problem is not None:
            raise HTTPError(503, problem, close=False)
        return success_text()

    # -- status and metrics ---------------------------------------------------

    def counters(self):
        """Every figure of /status.json and /metrics, a row each: (status
        key, dotted for a group; metric name, with its label name in
        braces; help; value).  A row without a key is a metric only, one
        without a name in the status only; a metric ending in _total is a
        counter, any other a gauge."""
        hub = self.hub
        store = hub.store
        server = self.server
        return (
            ("held_connections_count", None, None, len(hub.polls)),
            ("uptime", None, None, round(time.time() - hub.started, 3)),
            ("connections", "connections", "Open client connections.",
             len(server.connections)),
            ("polls_held", "polls_held",
             "Long polls held, waiting for a message.", len(hub.polls)),
            ("streams_open", "streams_open", "EventSource streams open.",
             len(hub.streams)),
            ("channels_count", "channels", "Registered channels.",
             len(store.channels)),
            ("clients_count", "clients", "Registered clients (sessions).",
             len(store.clients)),
            ("messages_pushed", "messages_pushed_total", "Messages pushed.",
             store.pushed),
            ("messages_delivered", "messages_delivered_total",
             "Held polls answered and stream events sent by pushes.",
             hub.delivered),
            ("last_id", None, None, store.last_id),
            ("replies", "requests_total{class}",
             "Replies sent, by status class.",
             {"%dxx" % n: server.replies[n] for n in (2, 3, 4, 5)}),
            ("connections_refused", "connections_refused_total",
             "Connections refused at the connection caps.", server.refused),
            ("writable", "writable",
             "1 when the server can take writes (see /health.json).",
             store.health() is None),
            ("log_records_dropped", "log_records_dropped_total",
             "Log lines dropped because the log sink was not keeping up.",
             DroppingQueueHandler.dropped),
        ) + tuple(store.counters())

    async def status(self, request, conn):
        store = self.hub.store
        status = {"channels": list(store.channels),
                  "clients": list(store.clients)}
        for key, _, _, value in self.counters():
            if key is not None:
                group, _, key = key.rpartition(".")
                (status.setdefault(group, {}) if group else status)[key] = value
        return success_text(status=status)

    async def metrics(self, request, conn):
        lines = []
        for _, name, text, value in self.counters():
            if name is None:
                continue
            name, _, label = name.partition("{")
            kind = "counter" if name.endswith("_total") else "gauge"
            lines.append(f"# HELP simple_comet_{name} {text}")
            lines.append(f"# TYPE simple_comet_{name} {kind}")
            samples = value.items() if label else [("", value)]
            for labels, number in samples:
                if label:
                    labels = '{%s="%s"}' % (label[:-1], labels)
                lines.append(f"simple_comet_{name}{labels} {int(number)}")
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
        # When it is idle for --http-timeout, Server.tick() closes it.
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
        deadline = server.loop.time() + server.config.http_timeout
        if deadline - self.deadline >= IDLE_ORDER_SLACK:
            # Moved along at most once a second: the idle sweep is then at
            # most that late.
            server.connections.move(self, deadline)
        self.deadline = deadline

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
        except asyncio.CancelledError:
            # Shutdown gave up on this client.  The task ends normally:
            # asyncio's stream callback would log a cancelled one.
            pass
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
        reply = await server.app.route(request, self)
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
        if stream.backlog:
            batch.append(stream.backlog)
        stream.backlog = None
        data = b"".join(batch)
        if data:
            stream.send(self.server.hub, data)

    def fail(self, error):
        if self.transport.is_closing():
            return
        if self.held is not None:
            self.server.hub.release(self.held)
        # A 5xx is this server's trouble (Redis away, a full disk): above
        # the client mistakes, rate-limited with them.
        self.server.client_log.mistake(
            "%s: %d %s", self.peer_text(), error.status, error.message,
            level=logging.WARNING if error.status >= 500 else logging.INFO)
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


class LogWriter(QueueListener):
    """Writes queued records to the sink, in a thread of its own."""

    def stop(self, timeout=LOG_FLUSH_TIMEOUT):
        """Let the thread write what is queued; False if the sink is stuck
        (then the process must exit without flushing stderr either)."""
        try:
            self.enqueue_sentinel()
        except queue.Full:
            return False
        self._thread.join(timeout)
        return not self._thread.is_alive()


def start_logging(level):
    """Log to stderr from a thread; returns the writer to stop at exit."""
    sink = logging.StreamHandler(sys.stderr)
    sink.setFormatter(logging.Formatter(
        "%(asctime)s %(levelname)s %(message)s"))
    records = queue.Queue(LOG_QUEUE_SIZE)
    root = logging.getLogger()
    root.handlers[:] = [DroppingQueueHandler(records)]
    root.setLevel(level)
    writer = LogWriter(records, sink)
    writer.start()
    return writer


class ClientLog:
    """Refused requests in the log, at most CLIENT_LOG_BURST per window (a
    client's mistake at INFO, a 5xx at WARNING); then a line says how many
    were left out, so a flood of bad requests cannot flood the log."""

    def __init__(self, clock):
        self.clock = clock
        self.window_end = 0.0
        self.logged = 0
        self.left_out = 0

    def mistake(self, message, *args, level=logging.INFO):
        now = self.clock()
        if now >= self.window_end:
            self.flush()
            self.window_end = now + CLIENT_LOG_WINDOW
        if self.logged < CLIENT_LOG_BURST:
            self.logged += 1
            log.log(level, message, *args)
        else:
            self.left_out += 1

    def flush(self):
        """Called at least once a window, and at shutdown."""
        if self.left_out:
            log.info("%d more refused requests not logged in the last %g s",
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
        self.connections = Deadlines()   # open, by their idle deadline
        self.per_ip = {}                 # non-local address -> connections
        self.replies = [0] * 6           # replies sent, by status // 100
        self.refused = 0
        self.servers = []
        self.closing = False
        self.socket_inode = None
        self.ticker = None
        self.client_log = ClientLog(time.monotonic)
        self.frozen = 0                  # store.added at the last gc.freeze()

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
        self.connections.add(conn, conn.deadline)
        return conn.run()

    def forget(self, conn):
        """A connection is closed: it counts no more."""
        if self.connections.remove(conn) and not conn.local:
            ip = conn.peer[0]
            count = self.per_ip[ip] - 1
            if count:
                self.per_ip[ip] = count
            else:
                del self.per_ip[ip]

    async def start(self):
        config = self.config
        self.loop = loop = asyncio.get_running_loop()
        if config.redis:
            store = RedisStore(config, loop)
        elif config.state_file:
            store = StateFileStore(config, loop)
        else:
            store = MemoryStore(config, loop)
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
            self.spare_the_collector()
            now = self.loop.time()
            for conn in self.connections.expired(now):
                if conn.held is not None or conn.deadline > now:
                    # Waiting for a message is not idle.
                    if conn.held is not None:
                        conn.deadline = now + self.config.http_timeout
                    self.connections.move(conn, conn.deadline)
                elif conn.transport.get_write_buffer_size():
                    # A client that stopped reading its replies: close()
                    # would wait for them to drain, forever.
                    conn.transport.abort()
                else:
                    conn.transport.close()

    def spare_the_collector(self):
        """Channels and clients live long and are freed by reference
        counting (they form no cycles), yet every full pass of Python's
        cycle collector walks them all: with a million, it stalls the loop
        for 50-100 ms.  Once many have been made, the young generations are
        collected and everything left is moved out of the collector's sight
        (gc.freeze)."""
        added = self.hub.store.added
        if added - self.frozen >= GC_FREEZE_AFTER:
            gc.collect(1)
            gc.freeze()
            self.frozen = added

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
        # Replies in flight (a write waiting for Redis, a client still
        # reading a stream's last bytes) get a grace period.
        deadline = self.loop.time() + SHUTDOWN_GRACE
        while self.connections and self.loop.time() < deadline:
            await asyncio.sleep(0.02)
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
    a("--redis", metavar="URL",
      help="share channels, messages and clients with every instance "
           "started with the same Redis: redis://[[user]:password@]host"
           "[:port][/db] or unix:///path/redis.sock[?db=N] (default: "
           "$SIMPLE_COMET_REDIS; a password here is visible to every "
           "local user, so prefer --redis-file)")
    a("--redis-file", metavar="PATH",
      help="read the Redis URL from this file (one line)")
    a("--redis-prefix", default=d.redis_prefix, metavar="P",
      help="prefix of every Redis key (default %(default)s)")
    a("--log-level", default=d.log_level, type=str.upper,
      choices=["DEBUG", "INFO", "WARNING", "ERROR"],
      help="logging level (default %(default)s)")
    a("--version", action="version", version=f"%(prog)s {__version__}")
    args = p.parse_args(argv)
    warnings = []
    try:
        args.admin_token = admin_token(args, warnings)
        args.redis = redis_url(args, warnings)
    except ValueError as e:
        p.error(str(e))
    if args.redis and args.state_file:
        p.error("--redis and --state-file do not go together: Redis keeps "
                "the state (use its persistence, AOF)")
    if not args.redis_prefix:
        p.error("--redis-prefix must not be empty")
    del args.admin_token_file, args.redis_file
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


def redis_url(args, warnings):
    """The Redis URL, parsed: from --redis-file, --redis or the
    environment."""
    if args.redis_file:
        if args.redis:
            raise ValueError("give --redis or --redis-file, not both")
        text = read_secret(args.redis_file, "Redis URL")
    elif args.redis:
        text = args.redis
    else:
        text = os.environ.get("SIMPLE_COMET_REDIS")
        if not text:
            return None
    url = parse_redis_url(text)
    if args.redis and url.password:
        warnings.append("a password in --redis on the command line is "
                        "visible to every local user (ps, /proc); use "
                        "--redis-file or $SIMPLE_COMET_REDIS")
    return url


def main(argv=None):
    config, warnings = parse_args(sys.argv[1:] if argv is None else argv)
    writer = start_logging(config.log_level)
    for warning in warnings:
        log.warning("%s", warning)
    # Past a file size limit, writes should fail with EFBIG, not kill us.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    status = 0
    try:
        asyncio.run(serve(config))
    except StartupError as e:
        log.error("%s", e)
        status = 1
    except KeyboardInterrupt:
        pass
    # Stopped already: a second SIGTERM must not turn exit 0 into a kill.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if not writer.stop():
        # The log sink is stuck (a full pipe nobody reads): exiting
        # normally would wait for it at the final flush of stderr.
        os._exit(status)
    return status


# ===========================================================================
# Lower level: a Redis client (RESP2 over an asyncio protocol, pipelined,
# reconnecting), self-contained; the Redis store above is its only user
# ===========================================================================
#
# Replies: simple strings are ``str``, bulk strings ``bytes``, integers
# ``int``, nulls ``None``, arrays ``list``.  An error reply raises
# RedisReplyError in the caller.  A command that Redis does not confirm
# within REDIS_COMMAND_TIMEOUT raises RedisTimeout and closes its
# connection: replies are matched by order only, so once one is missing no
# later reply can be trusted.  Nothing is queued while disconnected.

redis_log = logging.getLogger("simple_comet.redis")


# Limits.  Redis's own proto-max-bulk-len is 512 MiB, so a longer bulk can
# only be garbage; the others are far above anything Redis sends to us.
REDIS_DEFAULT_PORT = 6379
REDIS_MAX_BULK = 512 * 1024 * 1024
REDIS_MAX_ARRAY = 2 ** 32            # elements announced by one array header
REDIS_MAX_DEPTH = 32                 # nested arrays (an XREAD reply uses 4)
REDIS_MAX_LINE = 64 * 1024           # a status, error or header line
REDIS_MAX_DB = 2 ** 31 - 1           # Redis keeps databases in an int

REDIS_CONNECT_TIMEOUT = 5.0          # seconds for connect, AUTH and SELECT
REDIS_COMMAND_TIMEOUT = 5.0          # seconds for Redis to confirm a command

# Reconnect back-off: the first retry after about RECONNECT_FIRST seconds,
# then RECONNECT_FACTOR times longer each failure, +-RECONNECT_JITTER so
# that many instances do not reconnect in step, never above RECONNECT_MAX.
REDIS_RECONNECT_FIRST = 0.2
REDIS_RECONNECT_FACTOR = 2.0
REDIS_RECONNECT_JITTER = 0.2
REDIS_RECONNECT_MAX = 5.0
REDIS_LOG_REPEAT = 60.0              # seconds between "still unreachable" lines


# ---------------------------------------------------------------------------
# Redis client: errors
# ---------------------------------------------------------------------------

class RedisError(Exception):
    """Anything that went wrong talking to Redis."""


class RedisReplyError(RedisError):
    """Redis answered the command with an error reply.

    The connection is fine and stays open.  ``code`` is the error's first
    word ("ERR", "NOSCRIPT", "WRONGTYPE", ...).
    """

    @property
    def code(self):
        return str(self).split(" ", 1)[0]


class RedisConnectionError(RedisError):
    """Not connected, or the connection was lost before the reply came.

    The command may or may not have been carried out by Redis.
    """


class RedisTimeout(RedisConnectionError):
    """Redis did not confirm the command in time; the connection is closed."""


class RedisProtocolError(RedisError):
    """The bytes from the server are not RESP2: the stream is unusable."""


# ---------------------------------------------------------------------------
# Redis client: URLs
# ---------------------------------------------------------------------------

_DIGITS = re.compile(r"[0-9]+")
_HOSTNAME = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_.])?")
_URL_FORBIDDEN = re.compile(r"[\x00-\x20\x7f]")
_QUERY_KEYS = {"db", "password", "username"}


class RedisURL(NamedTuple):
    """Where Redis is and how to log in: ``path`` for a unix socket, else
    ``host`` and ``port``.  Its repr and str hide the password."""

    host: str | None
    port: int | None
    path: str | None
    username: str | None
    password: str | None
    db: int

    @property
    def where(self):
        """The address alone, for messages."""
        if self.path is not None:
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def redacted(self):
        """The URL with '***' in place of the password."""
        login = ""
        if self.username is not None or self.password is not None:
            login = quote(self.username or "", safe="")
            if self.password is not None:
                login += ":***"
            login += "@"
        if self.path is not None:
            db = f"?db={self.db}" if self.db else ""
            return f"unix://{login}{quote(self.path)}{db}"
        return f"redis://{login}{self.where}/{self.db}"

    def __repr__(self):
        return f"RedisURL({self.redacted()!r})"

    __str__ = redacted


def parse_redis_url(text):
    """Parse ``redis://[[user]:password@]host[:port][/db]`` or
    ``unix://[[user]:password@]/path/redis.sock[?db=N]`` into a RedisURL.

    User and password are percent-decoded; ``?db=``, ``?password=`` and
    ``?username=`` are accepted in either form.  A user without a password
    is refused: ``redis://secret@host`` is more often a password written
    without its colon than a user who needs none.  Raises ValueError with a
    one-line message that never contains the password.
    """
    if not isinstance(text, str):
        raise ValueError("redis URL must be a string")
    # No URL has them raw; a stray newline from a secrets file would
    # otherwise end up in the password.
    if _URL_FORBIDDEN.search(text):
        raise ValueError("redis URL contains a space or control character")
    scheme, sep, rest = text.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in ("redis", "unix"):
        if scheme == "rediss":
            raise ValueError("redis URL: TLS (rediss://) is not supported")
        raise ValueError("redis URL must start with redis:// or unix://")
    if "#" in rest:
        raise ValueError("redis URL must not have a #fragment")
    rest, _, query = rest.partition("?")
    if scheme == "redis":
        netloc, _, path = rest.partition("/")
    else:
        # unix://[login@]/path: the login, if any, ends at the first "@"
        # that comes before the path's first "/".
        at = rest.find("@")
        if at >= 0 and at < rest.find("/"):
            netloc, path = rest[:at + 1], rest[at + 1:]
        else:
            netloc, path = "", rest
    login, at, hostport = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = login.partition(":")
        if not colon:
            raise ValueError("redis URL has a user but no password "
                             "(write redis://:PASSWORD@host for a password alone)")
        username = _unquote(user, "user") if user else None
        password = _unquote(secret, "password")

    fields = {}
    for field in query.split("&") if query else ():
        key, equals, value = field.partition("=")
        if key not in _QUERY_KEYS or not equals:
            # Named only when it is a plain word: the text after a "?" may
            # be the end of a password whose "?" was not percent-encoded.
            raise ValueError("redis URL: unknown parameter"
                             + (f" {key!r}" if key.isalpha() and len(key) < 20 else "")
                             + " (use db, password, username)")
        if key in fields:
            raise ValueError(f"redis URL: parameter {key!r} given twice")
        fields[key] = _unquote(value, key)
    if "password" in fields:
        if password is not None:
            raise ValueError("redis URL gives the password twice")
        password = fields["password"]
    if "username" in fields:
        if username is not None:
            raise ValueError("redis URL gives the user twice")
        username = fields["username"] or None
    if username is not None and password is None:
        raise ValueError("redis URL has a user but no password")
    if username is None and password == "":
        password = None               # redis://:@host: nothing to AUTH with

    db_text = fields.get("db")
    host = port = socket_path = None
    if scheme == "redis":
        host, port = _parse_host_port(hostport)
        if path:
            if db_text is not None:
                raise ValueError("redis URL gives the database twice")
            db_text = path
    else:
        if hostport:
            raise ValueError("redis URL: unix:// takes no host "
                             "(write unix:///path/redis.sock)")
        socket_path = _unquote(path, "socket path")
        if not socket_path.startswith("/"):
            raise ValueError("redis URL: unix:// needs an absolute socket path "
                             "(write unix:///path/redis.sock)")
        if "\x00" in socket_path:
            raise ValueError("redis URL: the socket path contains NUL")
    db = 0
    if db_text is not None:
        if not _DIGITS.fullmatch(db_text) or int(db_text) > REDIS_MAX_DB:
            raise ValueError(f"redis URL: database {db_text!r} is not "
                             f"a number from 0 to {REDIS_MAX_DB}")
        db = int(db_text)
    return RedisURL(host, port, socket_path, username, password, db)


def _unquote(text, what):
    if _BAD_PERCENT.search(text):
        raise ValueError(f"redis URL: bad %-escape in the {what}")
    try:
        return unquote(text, errors="strict")
    except UnicodeDecodeError:
        # Its own message would quote the bytes, the password's perhaps.
        raise ValueError(f"redis URL: the {what} is not UTF-8 "
                         f"once %-decoded") from None


def _parse_host_port(text):
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError("redis URL: unclosed [ in the host")
        host, rest = text[1:end], text[end + 1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"redis URL: {host!r} is not an IPv6 address") from None
        if rest and not rest.startswith(":"):
            raise ValueError("redis URL: unexpected text after the IPv6 address")
        port_text = rest[1:] if rest else None
    else:
        host, colon, port_text = text.partition(":")
        if ":" in port_text:
            raise ValueError("redis URL: put an IPv6 address in [brackets]")
        if not host:
            raise ValueError("redis URL has no host")
        if not colon:
            port_text = None
        if not _HOSTNAME.fullmatch(host):
            raise ValueError(f"redis URL: {host!r} is not a host name")
    if port_text is None:
        return host, REDIS_DEFAULT_PORT
    if not _DIGITS.fullmatch(port_text) or not 0 < int(port_text) < 65536:
        raise ValueError(f"redis URL: port {port_text!r} is not "
                         f"a number from 1 to 65535")
    return host, int(port_text)


# ---------------------------------------------------------------------------
# Redis client: encoding and parsing (RESP2)
# ---------------------------------------------------------------------------

def encode_command(*args):
    """One command as a RESP array of bulk strings.

    str is sent as UTF-8, int and float as their decimal text, bytes as
    they are.  bool and None are refused: Redis has no such types and
    "True" or "None" stored by mistake is hard to find afterwards.
    """
    if not args:
        raise ValueError("a Redis command needs at least a name")
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, str):
            arg = arg.encode()
        elif isinstance(arg, (bytes, bytearray, memoryview)):
            arg = bytes(arg)
        elif isinstance(arg, int) and not isinstance(arg, bool):
            arg = b"%d" % arg
        elif isinstance(arg, float):
            if arg != arg:
                raise ValueError("NaN cannot be sent to Redis")
            arg = repr(arg).encode()
        else:
            raise TypeError(f"cannot send {type(arg).__name__} to Redis")
        parts.append(b"$%d\r\n%b\r\n" % (len(arg), arg))
    return b"".join(parts)


INCOMPLETE = object()                # gets(): no complete reply yet

_INTEGER = re.compile(rb"-?[0-9]{1,19}")


class RedisReader:
    """Turns the bytes Redis sends into replies, however they are split.

    ``feed(data)`` adds bytes; ``gets()`` returns the next complete reply,
    or INCOMPLETE.  An array is built up across calls (a stack of the
    arrays still open), so a large reply that arrives in many pieces is
    parsed once, not again on every piece.  Raises RedisProtocolError on
    anything that is not RESP2; the reader is unusable afterwards.
    """

    def __init__(self):
        self._buffer = bytearray()
        self._pos = 0
        self._stack = []              # [[items so far, items still to come]]

    def feed(self, data):
        self._buffer += data

    def gets(self):
        stack = self._stack
        while True:
            item = self._item()
            if item is INCOMPLETE:
                # Deleting from the front of a bytearray is cheap in CPython.
                del self._buffer[:self._pos]
                self._pos = 0
                return INCOMPLETE
            if item is _OPENED:
                continue
            while stack:
                frame = stack[-1]
                frame[0].append(item)
                frame[1] -= 1
                if frame[1]:
                    break
                item = stack.pop()[0]
            else:
                return item

    def _item(self):
        """One reply element, INCOMPLETE, or _OPENED when an array begins."""
        buffer, pos = self._buffer, self._pos
        end = buffer.find(b"\r\n", pos)
        if end < 0 or end - pos > REDIS_MAX_LINE:
            if len(buffer) - pos > REDIS_MAX_LINE:
                raise RedisProtocolError(
                    f"line longer than {REDIS_MAX_LINE} bytes")
            return INCOMPLETE
        kind, line = buffer[pos], buffer[pos + 1:end]
        if kind == 36:                                   # $ bulk string
            size = self._length(line, REDIS_MAX_BULK)
            if size < 0:
                self._pos = end + 2
                return None
            start = end + 2
            stop = start + size
            if len(buffer) < stop + 2:
                return INCOMPLETE
            if buffer[stop:stop + 2] != b"\r\n":
                raise RedisProtocolError("bulk string not followed by CRLF")
            self._pos = stop + 2
            return bytes(buffer[start:stop])
        self._pos = end + 2
        if kind == 43 or kind == 45:                     # + simple, - error
            if 10 in line or 13 in line:
                raise RedisProtocolError("bare CR or LF in a status line")
            text = line.decode("utf-8", "replace")
            return text if kind == 43 else RedisReplyError(text)
        if kind == 58:                                   # : integer
            if not _INTEGER.fullmatch(line):
                raise RedisProtocolError(f"bad integer {bytes(line)[:40]!r}")
            return int(line)
        if kind == 42:                                   # * array
            count = self._length(line, REDIS_MAX_ARRAY)
            if count < 0:
                return None
            if count == 0:
                return []
            if len(self._stack) >= REDIS_MAX_DEPTH:
                raise RedisProtocolError(
                    f"arrays nested deeper than {REDIS_MAX_DEPTH}")
            self._stack.append([[], count])
            return _OPENED
        raise RedisProtocolError(f"unknown reply type {bytes([kind])!r}")

    @staticmethod
    def _length(line, limit):
        # isdigit() first: int() would also take " 7", "+7" and "7_0".
        if line.isdigit() and len(line) <= 10:
            length = int(line)
            if length <= limit:
                return length
        elif line == b"-1":
            return -1
        raise RedisProtocolError(f"bad length {bytes(line)[:40]!r}")


_OPENED = object()


# ---------------------------------------------------------------------------
# Redis client: one connection
# ---------------------------------------------------------------------------

def _reason(exc):
    """Why a socket operation failed, in a few words, for messages."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host name ({exc.strerror})"
    # asyncio's "Connect call failed ('127.0.0.1', 6379)" hides the errno's
    # meaning, which is what an operator needs.
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno)
    return str(exc) or type(exc).__name__


class RedisConnection(asyncio.Protocol):
    """One stream to Redis, shared by any number of concurrent commands.

    ``execute()`` sends its command at once and returns a future; replies
    resolve the futures as they arrive (in data_received: a protocol, not
    a stream and a reader task, which would cost a turn of the loop per
    read), in the order the commands were written, which is the order
    Redis answers them.  Once closed, for whatever reason, a connection
    stays closed (``close_reason`` says why): make a new one.
    """

    def __init__(self, url, *, connect_timeout=REDIS_CONNECT_TIMEOUT,
                 command_timeout=REDIS_COMMAND_TIMEOUT):
        self.url = url if isinstance(url, RedisURL) else parse_redis_url(url)
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.close_reason = None
        self._loop = None
        self._transport = None
        self._parser = RedisReader()
        self._pending = deque()       # (future, deadline, timeout), in order
        self._timer = None            # fires at the earliest deadline
        self._timer_when = None
        self._closed = None           # an Event, set once closed
        self._outgoing = None

    @property
    def connected(self):
        return self._transport is not None and not self._closed.is_set()

    @property
    def closed(self):
        return self._closed is not None and self._closed.is_set()

    async def connect(self):
        """Open the stream, log in (AUTH) and select the database.

        All within connect_timeout.  Raises RedisConnectionError when it
        cannot, a refused login included.
        """
        if self._closed is not None:
            raise RuntimeError("a RedisConnection connects only once")
        self._loop = loop = asyncio.get_running_loop()
        self._closed = asyncio.Event()
        url = self.url
        deadline = loop.time() + self.connect_timeout
        try:
            async with asyncio.timeout_at(deadline):
                if url.path is not None:
                    await loop.create_unix_connection(lambda: self, url.path)
                else:
                    await loop.create_connection(lambda: self, url.host,
                                                 url.port)
        except (OSError, TimeoutError) as exc:
            self._abort(_reason(exc))
            raise RedisConnectionError(
                f"{url.where}: cannot connect: {self.close_reason}") from None
        except BaseException:
            self._abort("connect cancelled")
            raise

        # One round trip for all three.  PING also proves that the other
        # end speaks RESP before the connection is handed out.
        timeout = max(0.001, deadline - loop.time())
        replies = []
        if url.password is not None:
            login = (url.password,) if url.username is None else (url.username, url.password)
            replies.append(self.execute("AUTH", *login, timeout=timeout))
        if url.db:
            replies.append(self.execute("SELECT", url.db, timeout=timeout))
        replies.append(self.execute("PING", timeout=timeout))
        try:
            # All of them, so that no error is left unretrieved.
            results = await asyncio.gather(*replies, return_exceptions=True)
        except BaseException:
            self._abort("connect cancelled")
            raise
        for result in results:
            if isinstance(result, RedisReplyError):
                # WRONGPASS, NOAUTH, a bad db, LOADING: Redis's own words.
                self._abort(str(result))
            if isinstance(result, BaseException):
                raise RedisConnectionError(
                    f"{url.where}: cannot connect: {self.close_reason}") from None

    def execute(self, *args, timeout=None):
        """Send one command (in this turn of the event loop, after those
        issued before it); return a future for its reply.

        The future raises RedisReplyError for an error reply, RedisTimeout
        if no reply comes within ``timeout`` seconds (default
        command_timeout), RedisConnectionError if the connection is lost
        first.  Raises RedisConnectionError at once when not connected.
        """
        return self.send(encode_command(*args), timeout)

    def send(self, data, timeout=None):
        """As execute(), for a command already encoded."""
        if not self.connected or self._transport.is_closing():
            raise RedisConnectionError(
                f"{self.url.where}: not connected"
                + (f" ({self.close_reason})" if self.close_reason else ""))
        loop = self._loop
        future = loop.create_future()
        if timeout is None:
            timeout = self.command_timeout
        deadline = loop.time() + timeout
        self._pending.append((future, deadline, timeout))
        if self._timer is None or deadline < self._timer_when:
            self._arm(deadline)
        # Commands issued in one turn of the event loop go out in one write:
        # a syscall per command would cost a third of the throughput with
        # many callers.  The buffer is bounded by the timeout: what Redis
        # does not take within command_timeout goes with the connection.
        if self._outgoing is None:
            self._outgoing = [data]
            loop.call_soon(self._flush)
        else:
            self._outgoing.append(data)
        return future

    def _flush(self):
        outgoing, self._outgoing = self._outgoing, None
        if outgoing and not self._closed.is_set():
            self._transport.write(b"".join(outgoing))

    def close(self, reason="closed by the client"):
        """Close now; every command still waiting fails."""
        self._abort(reason)

    async def wait_closed(self):
        """Return once the connection is closed, by close() or by loss."""
        await self._closed.wait()

    # -- asyncio.Protocol ---------------------------------------------------

    def connection_made(self, transport):
        if self._closed.is_set():        # connect() was cancelled meanwhile
            transport.abort()
        else:
            self._transport = transport

    def data_received(self, data):
        parser = self._parser
        pending = self._pending
        try:
            parser.feed(data)
            while (reply := parser.gets()) is not INCOMPLETE:
                if not pending:
                    raise RedisProtocolError("a reply to no command")
                future = pending.popleft()[0]
                if future.done():         # its caller was cancelled
                    continue
                if type(reply) is RedisReplyError:
                    future.set_exception(reply)
                else:
                    future.set_result(reply)
        except RedisProtocolError as exc:
            self._abort(f"protocol error: {exc}")

    def eof_received(self):
        self._abort("connection closed by the server")

    def connection_lost(self, exc):
        if exc is None:
            self._abort("connection closed by the server")
        else:
            self._abort(f"connection lost: {_reason(exc)}")

    def _arm(self, when):
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_at(when, self._check_deadlines)
        self._timer_when = when

    def _check_deadlines(self):
        # One timer serves every command: it fires at the earliest deadline
        # and, if that command has been answered meanwhile, sets itself for
        # the next one.  Replies come about in deadline order, so the scan
        # of the waiting commands happens about once per command_timeout.
        self._timer = None
        if not self._pending:
            return
        deadline, timeout = min((entry[1], entry[2]) for entry in self._pending)
        # call_at may fire up to a clock tick early.
        if deadline <= self._loop.time() + 0.001:
            self._abort(f"no reply within {timeout:g} s", timed_out=True)
        else:
            self._arm(deadline)

    def _abort(self, reason, timed_out=False):
        if self._closed is None:
            self._closed = asyncio.Event()
        if self._closed.is_set():
            return
        self._closed.set()
        self.close_reason = reason
        self._outgoing = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._transport is not None:
            # abort, not close: close would first flush what a stalled
            # server is not reading.
            self._transport.abort()
        message = f"{self.url.where}: {reason}"
        now = self._loop.time() + 0.001 if self._loop else 0.0
        pending, self._pending = self._pending, deque()
        for future, deadline, _ in pending:
            if future.done():
                continue
            # Commands behind the one that timed out were maybe not late
            # themselves, but their replies can no longer be matched.
            # A fresh exception each: one instance raised in many tasks
            # would collect all their tracebacks.
            late = timed_out and deadline <= now
            future.set_exception((RedisTimeout if late else RedisConnectionError)(message))
            # Marks it retrieved: a caller that stopped waiting (a
            # fire-and-forget write) must not cause an asyncio error log.
            future.exception()


# ---------------------------------------------------------------------------
# Redis client: a connection kept up
# ---------------------------------------------------------------------------

class RedisBackoff:
    """Delays between reconnect attempts: growing, jittered, capped."""

    def __init__(self):
        self.reset()

    def reset(self):
        self._base = REDIS_RECONNECT_FIRST

    def next(self):
        delay = self._base * random.uniform(1 - REDIS_RECONNECT_JITTER,
                                            1 + REDIS_RECONNECT_JITTER)
        # Capping the base, not the result, keeps the jitter at the cap too.
        self._base = min(self._base * REDIS_RECONNECT_FACTOR,
                         REDIS_RECONNECT_MAX / (1 + REDIS_RECONNECT_JITTER))
        return delay


def script_sha(script):
    """The SHA1 by which Redis knows a Lua script."""
    if isinstance(script, str):
        script = script.encode()
    return hashlib.sha1(script).hexdigest()


class RedisClient:
    """A connection to Redis that reconnects by itself.

    ``start()`` (in a running loop) begins connecting in the background
    and returns at once.
    After each (re)connection ``await on_connect(client)`` runs (to load
    scripts and catch up): during it ``execute`` already works but
    ``connected`` is still false, so whoever checks ``connected`` before
    writing waits for the catch-up.  If on_connect raises, the connection
    is dropped and retried.  Commands issued while disconnected fail at
    once with RedisConnectionError.
    """

    def __init__(self, url, *, on_connect=None,
                 connect_timeout=REDIS_CONNECT_TIMEOUT,
                 command_timeout=REDIS_COMMAND_TIMEOUT):
        self.url = url if isinstance(url, RedisURL) else parse_redis_url(url)
        self.on_connect = on_connect
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.last_error = None        # why it is not connected, for status
        self.connects = 0             # successful (re)connections so far
        self._conn = None             # set once logged in, before on_connect
        self._ready = False           # on_connect has returned
        self._ready_event = asyncio.Event()
        self._task = None
        self._blocking_conn = None
        self._blocking_lock = asyncio.Lock()
        self._blocking_backoff = RedisBackoff()
        self._blocking_retry_at = 0.0

    @property
    def connected(self):
        return self._ready and self._conn is not None and self._conn.connected

    def start(self):
        """Begin connecting; returns the task that keeps the connection."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._keep())
        return self._task

    async def wait_connected(self, timeout=None):
        """Wait until connected; return False if timeout seconds pass first."""
        try:
            async with asyncio.timeout(timeout):
                while not self.connected:
                    await self._ready_event.wait()
                    if not self.connected:
                        await asyncio.sleep(0)
            return True
        except TimeoutError:
            return False

    async def close(self):
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        for conn in (self._conn, self._blocking_conn):
            if conn is not None:
                conn.close()
        self._conn = self._blocking_conn = None
        self._ready = False
        self._ready_event.clear()

    def execute(self, *args, timeout=None):
        """As RedisConnection.execute, on the current connection."""
        conn = self._conn
        if conn is None:
            raise RedisConnectionError(
                f"{self.url.where}: not connected"
                + (f" ({self.last_error})" if self.last_error else ""))
        return conn.execute(*args, timeout=timeout)

    def send(self, data):
        """As RedisConnection.send, on the current connection."""
        conn = self._conn
        if conn is None:
            raise RedisConnectionError(f"{self.url.where}: not connected")
        return conn.send(data)

    async def evalsha(self, sha, script, keys=(), args=()):
        """Run a Lua script by its SHA1 (None: computed), loading it if need be.

        On NOSCRIPT (Redis restarted, failed over, or SCRIPT FLUSH) the
        script is sent whole with EVAL, which also caches it again.  The
        retry goes after whatever was issued meanwhile.
        """
        keys = tuple(keys)
        args = tuple(args)
        if sha is None:
            sha = script_sha(script)
        try:
            return await self.execute("EVALSHA", sha, len(keys), *keys, *args)
        except RedisReplyError as exc:
            if exc.code != "NOSCRIPT":
                raise
        return await self.execute("EVAL", script, len(keys), *keys, *args)

    async def execute_blocking(self, *args, block):
        """Run a blocking command (``XREAD BLOCK ms ...``) on a connection
        of its own, so that it holds up no other command.

        ``block`` is the command's own blocking time in seconds; no reply
        within block + command_timeout raises RedisTimeout.  One at a time:
        concurrent calls wait their turn.  The connection is opened on
        first use and again after a failure, not sooner than the back-off
        allows, so a loop around this call does not spin.  While the client
        is not connected it raises RedisConnectionError at once: a tailing
        loop waits with ``wait_connected()`` first.
        """
        if not block or block <= 0:
            raise ValueError("execute_blocking needs a finite block time")
        loop = asyncio.get_running_loop()
        async with self._blocking_lock:
            conn = self._blocking_conn
            if conn is None or not conn.connected:
                self._blocking_conn = None
                if not self.connected:
                    raise RedisConnectionError(
                        f"{self.url.where}: not connected"
                        + (f" ({self.last_error})" if self.last_error else ""))
                delay = self._blocking_retry_at - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                conn = RedisConnection(self.url,
                                       connect_timeout=self.connect_timeout,
                                       command_timeout=self.command_timeout)
                try:
                    await conn.connect()
                except RedisConnectionError:
                    self._blocking_retry_at = loop.time() + self._blocking_backoff.next()
                    raise
                self._blocking_backoff.reset()
                self._blocking_conn = conn
            future = conn.execute(*args, timeout=block + self.command_timeout)
            try:
                return await future
            except asyncio.CancelledError:
                # Its reply is still to come; the next command would get it.
                conn.close("a blocking command was cancelled")
                raise

    async def _keep(self):
        loop = asyncio.get_running_loop()
        backoff = RedisBackoff()
        down_since = loop.time()
        failures = 0
        logged_reason = None
        logged_at = 0.0
        while True:
            conn = RedisConnection(self.url,
                                   connect_timeout=self.connect_timeout,
                                   command_timeout=self.command_timeout)
            try:
                await conn.connect()
                self._conn = conn
                if self.on_connect is not None:
                    await self.on_connect(self)
                if not conn.connected:
                    raise RedisConnectionError(f"{self.url.where}: {conn.close_reason}")
            except RedisError as exc:
                reason = conn.close_reason if conn.closed else f"on_connect: {exc}"
            except Exception as exc:
                # A bug in on_connect, not a Redis state: its traceback helps.
                redis_log.error("redis: on_connect failed", exc_info=exc)
                reason = f"on_connect: {exc!r}"
            else:
                reason = None
            if reason is not None:
                conn.close("on_connect failed")
                self._conn = None
                self.last_error = reason
                failures += 1
                now = loop.time()
                # The first failure of an outage at WARNING, then only news
                # or a periodic reminder, so a long outage stays readable.
                if reason != logged_reason or now - logged_at >= REDIS_LOG_REPEAT:
                    if failures == 1:
                        redis_log.warning("redis: cannot connect to %s: %s; "
                                          "retrying", self.url, reason)
                    else:
                        redis_log.warning("redis: still cannot connect to %s: "
                                          "%s (%d attempts in %.0f s)", self.url,
                                          reason, failures, now - down_since)
                    logged_reason, logged_at = reason, now
                else:
                    redis_log.debug("redis: cannot connect to %s: %s",
                                    self.url, reason)
                await asyncio.sleep(backoff.next())
                continue

            self.connects += 1
            self.last_error = None
            self._ready = True
            self._ready_event.set()
            if self.connects == 1 and failures == 0:
                redis_log.info("redis: connected to %s", self.url)
            else:
                redis_log.info("redis: connected to %s after %.1f s",
                               self.url, loop.time() - down_since)
            up_since = loop.time()
            await conn.wait_closed()

            self._ready = False
            self._ready_event.clear()
            self._conn = None
            self.last_error = conn.close_reason
            redis_log.warning("redis: connection to %s lost: %s; reconnecting",
                              self.url, conn.close_reason)
            # A connection that drops as soon as it is made must not be
            # retried at the first delay for ever.
            if loop.time() - up_since >= REDIS_RECONNECT_MAX:
                backoff.reset()
            down_since = loop.time()
            failures = 0
            logged_reason = None
            await asyncio.sleep(backoff.next())


if __name__ == "__main__":
    sys.exit(main())
