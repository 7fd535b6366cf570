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
client, -3 unregistered client, -4 refused token):

    POST   /channels.json        channel_id=ID [use_sessions=1] [private=1]
                                 [presence=1] [max_messages=N]
    POST   /channels/ID.json     content=TEXT [from=S] [ephemeral=1]
                                 -> message_id, delivered
    DELETE /channels/ID.json                         -> channel_id, removed
    POST   /clients.json         client_id=ID
    GET    /channels/A%7CB.json  [since=N] [client_id=ID] [token=JWT]
                                 -> since, last_id, messages {ID: [...]}, [lost]
    GET    /channels/A%7CB.sse   [since=N] [client_id=ID] [token=JWT]
                                 (or Last-Event-ID)
                                 -> text/event-stream, one event per message
    GET    /channels/ID/presence.json                -> members, users, last_id
    POST   /tokens/revoke.json   sub=S | jti=J [until=T]
    GET    /health.json          200 when writes are taken, else 503
    GET    /status.json, /metrics, /dashboard  (with --enable-status)

A read with nothing newer than ``since`` is held until a message is pushed
to one of its channels or ``--poll-timeout`` passes (then every list is
empty).  A stream sends what is retained after its cursor, then every new
message as it is pushed.  Message ids come from one counter shared by all
channels; a reader passes the reply's ``last_id`` as its next ``since`` (a
browser's EventSource sends ``Last-Event-ID``) and so sees every message
once.  Writes and the status page need ``--admin-token`` or, without one, a
client on loopback or the unix socket; a signed token (``--token-key-file``)
opens private channels, names its holder in presence, and lets a page push
where its ``publish`` claim allows, the server stamping the sender.

Where messages are kept (memory; memory plus ``--state-file``; a replica
of Redis with ``--redis``) is the store's business, behind one contract:
every write a coroutine with one result shape, every change applied by one
core.  How messages reach readers (held polls, streams) is the hub's.

The file reads top to bottom, a banner a section:

    Configuration        limits and defaults, each with its reason
    Errors               HTTPError (carries its status), APIError (-1..-4)
    HTTP parsing         the request head (KeptLines: the header lines
                         a connection repeats), bodies, parameters
    Replies              JSON, JSON-P and the bytes of a response
    Parameters           ids and counts
    Tokens               signed JWTs verified by hand: keys, claims,
                         patterns, the verification cache
    Storage              the change core (Core, Channel, Presence,
                         Pushed); in memory; in a file (records, Journal,
                         StateFileStore); shared by instances (the Lua
                         scripts, RedisReplica, RedisPushes, RedisStore)
    The hub              Deadlines, the two kinds of waiter (Poll,
                         Stream), Reads, ReadersOfNote (presence, token
                         ends), Hub
    Routes               the route table, RateLimiter, Access, StatusPages
                         (one table of counters), Writes, Shortcuts (the
                         commonest requests on a short path), App
    Connection handling  one keep-alive loop per connection
    Logging              a writer thread, rate-limited client mistakes
    Server lifecycle     listening, housekeeping, shutdown
    Command line         switches, secrets, main()
    Lower level          a Redis client: errors, URLs, RESP2, one
                         connection, a connection kept up; the
                         dashboard's page
"""

import argparse
import asyncio
import base64
import binascii
import fcntl
import gc
import hashlib
import heapq
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

__version__ = "3.0.0"

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
# A connection between requests keeps its last header lines (a client
# repeats them) if this short: idle connections, up to --max-connections
# of them, keep 2 KiB at most each (a browser's lines with few cookies).
MAX_KEPT_LINES = 2 * 1024

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

# Channels the dashboard lists (those with the most readers).
TOP_CHANNELS = 20

# Users listed by presence.json (the counts stay exact beyond it).
MAX_PRESENCE_LISTED = 1000

# Revocations in force at once; beyond it a new one is refused (503), never
# an old one dropped, so a revoked token cannot come back (SPEC D1).
MAX_REVOCATIONS = 100_000
MAX_REVOCATION_TIME = 30 * 24 * 3600    # seconds a revocation lasts at most

# Expiry removes at most this many entries between two turns of the event
# loop, so that a mass expiry does not hold up replies.
EXPIRY_SLICE = 500

# The state file (--state-file).
STATE_FSYNC_INTERVAL = 1.0           # seconds: a power loss costs at most this
STATE_COMPACT_RATIO = 4              # compact when the file is this many times
STATE_COMPACT_SLACK = 64 * 1024      # ... the live state, plus this
STATE_COMPACT_SLICE = 0.005          # seconds of work between yields while compacting
STATE_COMPACT_CATCH_UPS = 3          # copies of what arrived, in a thread, before the swap


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
    token_keys = None                # TokenKeys, from --token-key-file
    token_audience = None
    token_issuer = None
    presence_grace = 10.0            # seconds a user stays present unseen
    client_max_message = 4096        # bytes of content a token push may carry
    client_publish_rate = 10         # token pushes a second per sub
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
TOKEN_REFUSED = -4       # a token that is malformed, expired, revoked, ...

REASONS = {
    100: "Continue", 200: "OK", 204: "No Content",
    400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed", 408: "Request Timeout",
    413: "Content Too Large", 414: "URI Too Long",
    415: "Unsupported Media Type", 417: "Expectation Failed",
    429: "Too Many Requests",
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
                 "keep_alive", "match", "params", "callback", "token",
                 "claims", "kept")

    def __init__(self, method, path, query, version, headers, kept=None):
        self.method = method
        self.path = path
        self.query = query
        self.version = version
        self.headers = headers
        self.kept = kept                 # its KeptLines, if they may be
        self.body = b""
        self.callback = None             # set by App.route for JSON-P
        self.token = None                # ... the token it carries, if any
        self.claims = None               # ... and its claims, once judged
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
# aside).  One match checks the whole head; its header lines are then only
# split (a value without its surrounding blanks).  parse_head() takes it
# there and leaves every other head, and every error, to parse_any_head().
_HEADER_NAME = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_HEADER_VALUE = r"[^\x00-\x08\x0a-\x1f\x7f]"
_REQUEST_LINE = (r"([A-Z]+) (/[^\x00-\x20#?\x7f-\xff]*)\??"
                 r"([^\x00-\x20#\x7f-\xff]*) (HTTP/1\.[01])\r\n")
_COMMON_HEAD = re.compile(_REQUEST_LINE + r"((?:%s:%s*\r\n)*)\r\n" % (
    _HEADER_NAME, _HEADER_VALUE))
_COMMON_LINE = re.compile(_REQUEST_LINE)


def parse_head(head, kept=None):
    """Parse a request line and headers (``head`` ends with an empty line);
    the common shape of head (see _COMMON_HEAD) in one pass, or less
    (``kept``: the previous request's KeptLines on the connection)."""
    # Up to this size no line or header limit can be passed (their count
    # is checked below).
    if len(head) <= MAX_REQUEST_LINE:
        text = head.decode("latin-1")
        if kept is not None:
            request = kept.request(text)
            if request is not None:
                return request
        match = _COMMON_HEAD.fullmatch(text)
        if match is not None:
            method, path, query, version, lines = match.groups()
            headers = {}
            count = 0
            for line in lines.split("\r\n")[:-1]:
                name, _, value = line.partition(":")
                headers[name.lower()] = value.strip(" \t")
                count += 1
            # A repeated header, too many or a missing Host: as below.
            if len(headers) == count <= MAX_HEADER_LINES and (
                    "host" in headers or version == "HTTP/1.0"):
                start = match.start(5)
                kept = KeptLines(text[start:], headers) \
                    if len(text) - start <= MAX_KEPT_LINES else None
                return Request(method, path, query, version, headers, kept)
    return parse_any_head(head)


# Content-Length's value, after its name and colon in header lines that
# parse_head() has checked.
_LENGTH_VALUE = re.compile(r"[ \t]*([0-9]+)[ \t]*\r")


class KeptLines:
    """The header lines of a connection's last request, which its client
    sends again with every request, but for the value of Content-Length
    (the body's size) at times: a head that ends with them is checked by its
    request line alone, and takes their dict."""

    __slots__ = ("lines", "headers", "before", "after")

    def __init__(self, lines, headers):
        # ``lines``: a head's header lines and the blank line after them,
        # of the common shape; ``headers``: their dict.
        self.lines = lines
        self.headers = headers
        self.after = None                # the lines after Content-Length's
        if "content-length" in headers:  # digits, and before them
            # Its line (the only one: a value holds no line break).
            at = ("\n" + lines.lower()).find("\ncontent-length:")
            found = at >= 0 and _LENGTH_VALUE.match(lines, at + 15)
            if found:
                self.before = lines[:found.start(1)]
                self.after = lines[found.end(1):]

    def request(self, text):
        """The Request of a head (as text) that ends with these lines, or
        with them but for other digits for Content-Length's, or None."""
        lines = self.lines
        headers = self.headers
        if text.endswith(lines):
            start = len(text) - len(lines)
        else:
            after = self.after
            if after is None or not text.endswith(after):
                return None
            # Between before and after: other digits, as many as last time
            # usually.  (What comes first must be one request line, below.)
            end = len(text) - len(after)
            before = self.before
            start = end - len(headers["content-length"]) - len(before)
            if start < 0 or not text.startswith(before, start):
                start = text.rfind(before, 0, end)
                if start < 0:
                    return None
            length = text[start + len(before):end]
            if not length.isdigit():
                return None
            headers = {**headers, "content-length": length}
        match = _COMMON_LINE.fullmatch(text, 0, start)
        if match is None:
            return None
        method, path, query, version = match.groups()
        if "host" not in headers and version != "HTTP/1.0":
            return None
        return Request(method, path, query, version, headers, self)


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
        if not buffer and not self._eof:
            # The usual, between requests: nothing to scan yet.  What
            # _wait_for_data() does, but for its checks (an empty buffer
            # pauses nothing; one reader waits at a time), in this frame.
            self._waiter = waiter = self._loop.create_future()
            try:
                await waiter
            finally:
                self._waiter = None
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
        return self.take(end)

    def take(self, size):
        """``size`` bytes if the buffer holds them, else b"" (then
        readexactly() waits for them)."""
        buffer = self._buffer
        if len(buffer) < size or self._exception is not None:
            return b""
        if size == len(buffer):          # the usual: nothing after it
            data = bytes(buffer)
            buffer.clear()
        else:
            data = bytes(memoryview(buffer)[:size])
            del buffer[:size]
        if self._paused:
            self._maybe_resume_transport()
        return data


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
    if extra and extra is not TOKEN_WRITE_EXPOSE:
        parts = head_parts(status, content_type, keep_alive, version, cors,
                           extra)
    else:
        # Replies come in a few shapes, whose heads are built once (a
        # token write's too; other extra headers vary, and are not kept).
        key = (status, content_type, keep_alive, version, cors, extra)
        parts = _HEADS.get(key) or _HEADS.setdefault(key, head_parts(*key))
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


# (status, content type, keep-alive, version, CORS, extra) -> head_parts():
# a handful of shapes (statuses x content types x the two versions).
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
# Tokens: signed JWTs (HS256, HS384, HS512, RS256), verified by hand
# ---------------------------------------------------------------------------
#
# Pure code: no I/O and no clock (the caller passes ``now``, unix seconds).
# The caller reads the key file, checks revocation and the subscribe and
# publish scopes, and counts refusals by TokenError.reason.

MAX_TOKEN_BYTES = 4096          # SPEC D1: "at most 4 KiB per token"
MAX_TOKEN_PATTERNS = 100        # SPEC D1: patterns per claim
MAX_INFO_BYTES = 1024           # SPEC D1: `info` at most 1 KiB, compact JSON
TOKEN_LEEWAY = 5.0              # seconds of clock skew forgiven: SPEC's most
TOKEN_CACHE_SIZE = 10_000       # tokens remembered: at most ~50 MB, often ~5
MIN_HMAC_SECRET_BYTES = 32      # SPEC D1
# RSA below 2048 bits is disallowed by NIST SP 800-131A and refused by
# jsonwebtoken; one check costs ~0.2 ms at 2048 bits, ~0.85 ms at 4096 and
# ~3 ms at 8192, past SPEC's 1 ms.
MIN_RSA_BITS, MAX_RSA_BITS = 2048, 4096
MAX_RSA_EXPONENT_BITS = 256     # NIST SP 800-56B's bound; keeps pow() cheap

# The metric's reason labels, in SPEC's order.
TOKEN_REASONS = ("malformed", "signature", "algorithm", "expired",
                 "not_yet_valid", "audience", "issuer", "revoked", "scope",
                 "disabled")

# The accepted algorithms (RFC 7518 3.1); every other `alg`, "none" first,
# is refused.  HMAC ones name their hash for hmac.digest().
HMAC_HASHES = {"HS256": "sha256", "HS384": "sha384", "HS512": "sha512"}
TOKEN_ALGORITHMS = (*HMAC_HASHES, "RS256")

# DER encoding of DigestInfo(sha256, NULL) (RFC 8017 9.2, note 1): what an
# RS256 signature's encoded message holds just before the hash.
SHA256_DIGEST_INFO = bytes.fromhex("3031300d060960864801650304020105000420")
# The OID 1.2.840.113549.1.1.1, rsaEncryption (RFC 3279 2.3.1).
RSA_ENCRYPTION_OID = bytes.fromhex("2a864886f70d010101")
DER_INTEGER, DER_BIT_STRING, DER_OID, DER_SEQUENCE = 0x02, 0x03, 0x06, 0x30

# Compact JWS (RFC 7515 7.1): three base64url parts without padding.  The
# signature may be empty, so that `alg: none` is refused as an algorithm.
TOKEN_FORM = re.compile(
    r"([A-Za-z0-9_-]+)\.([A-Za-z0-9_-]+)\.([A-Za-z0-9_-]*)")
PEM_BEGIN = re.compile(r"-----BEGIN ([A-Z0-9 ]+)-----")


class TokenError(Exception):
    """A refused token.  `reason` is one of TOKEN_REASONS (the metric label
    and the end of the error message), `detail` a fixed phrase for the log.
    `sub` and `jti` are set only when read from a payload whose signature
    was verified, so a log never names an identity that a forger made up."""

    def __init__(self, reason, detail="", sub=None, jti=None):
        super().__init__(f"token {reason}")
        self.reason, self.detail, self.sub, self.jti = reason, detail, sub, jti


class KeyFileError(Exception):
    """A key file that cannot be used: the message is one line that names
    the file and the line, and never holds key material."""


# -- keys --

class HmacKey:
    __slots__ = ("kid", "secret")    # the default repr shows neither

    def __init__(self, kid, secret):
        self.kid, self.secret = kid, secret


class RsaKey:
    __slots__ = ("kid", "n", "e", "size", "prefix")

    def __init__(self, kid, n, e):
        self.kid, self.n, self.e = kid, n, e
        self.size = (n.bit_length() + 7) // 8
        # The encoded message of RSASSA-PKCS1-v1_5 (RFC 8017 9.2) up to the
        # hash, built once: 00 01 FF..FF 00 DigestInfo.
        padding = self.size - 3 - len(SHA256_DIGEST_INFO) - 32
        self.prefix = b"\0\1" + b"\xff" * padding + b"\0" + SHA256_DIGEST_INFO


class TokenKeys:
    """The keys of a key file: HMAC secrets, RSA public keys, and by name."""
    __slots__ = ("hmac", "rsa", "named")

    def __init__(self, keys):
        self.hmac = tuple(key for key in keys if type(key) is HmacKey)
        self.rsa = tuple(key for key in keys if type(key) is RsaKey)
        self.named = {key.kid: key for key in keys if key.kid is not None}

    def __len__(self):
        return len(self.hmac) + len(self.rsa)

    def __repr__(self):
        return f"<TokenKeys: {len(self.hmac)} HMAC, {len(self.rsa)} RSA>"


def parse_key_file(text, path):
    """Read a key file (SPEC D1) into TokenKeys, or raise KeyFileError."""
    keys, names, kid, kid_line = [], set(), None, 0
    lines = text.removeprefix("\ufeff").split("\n")
    index = 0
    while index < len(lines):
        line, index = lines[index].strip(), index + 1
        where = f"{path}: line {index}"
        if not line or line.startswith("#"):
            continue
        words = line.split(None, 1)
        if words[0] == "kid":
            if kid is not None:
                raise KeyFileError(f"{path}: line {kid_line}: kid {kid!r}"
                                   " is not followed by a key")
            if len(words) == 1:
                raise KeyFileError(f"{where}: kid without a name")
            kid, kid_line = words[1], index
            if kid in names:
                raise KeyFileError(f"{where}: kid {kid!r} names two keys")
            names.add(kid)
            continue
        if line.startswith("-----"):
            label, der, index = read_pem(lines, index - 1, where)
            try:
                n, e = (public_key_info if label == "PUBLIC KEY"
                        else rsa_public_key)(der, 0, len(der))
                check_rsa_numbers(n, e)
            except ValueError as error:
                raise KeyFileError(f"{where}: {error}") from None
            keys.append(RsaKey(kid, n, e))
        else:
            keys.append(HmacKey(kid, hmac_secret(line, where)))
        kid = None
    if kid is not None:
        raise KeyFileError(
            f"{path}: line {kid_line}: kid {kid!r} is not followed by a key")
    if not keys:
        raise KeyFileError(f"{path}: no key in the file")
    return TokenKeys(keys)


def hmac_secret(line, where):
    # An OpenSSH public key line would otherwise become an HMAC secret
    # that anyone can read, and so a way to forge tokens.
    if line.startswith(("ssh-", "ecdsa-sha2-")):
        raise KeyFileError(f"{where}: an OpenSSH public key; give it as PEM"
                           " (ssh-keygen -e -m PKCS8 -f KEY.pub)")
    secret = line.encode("utf-8", "surrogateescape")
    if len(secret) < MIN_HMAC_SECRET_BYTES:
        raise KeyFileError(f"{where}: HMAC secret of {len(secret)} bytes;"
                           f" at least {MIN_HMAC_SECRET_BYTES} are needed")
    return secret


def read_pem(lines, start, where):
    """Return (label, DER bytes, index past the END line) of the PEM block
    (RFC 7468) whose BEGIN line is lines[start]."""
    match = PEM_BEGIN.fullmatch(lines[start].strip())
    label = match and match.group(1)
    if not label:
        raise KeyFileError(f"{where}: a PEM END or broken BEGIN line")
    if "PRIVATE KEY" in label:
        raise KeyFileError(f"{where}: a private key; give the public key"
                           " (openssl pkey -in KEY -pubout)")
    if label == "CERTIFICATE":
        raise KeyFileError(f"{where}: a certificate; give its public key"
                           " (openssl x509 -in CERT -pubkey -noout)")
    if label not in ("PUBLIC KEY", "RSA PUBLIC KEY"):
        raise KeyFileError(f"{where}: a PEM {label}, not an RSA public key")
    end, body = f"-----END {label}-----", []
    for index in range(start + 1, len(lines)):
        line = lines[index].strip()
        if line == end:
            try:
                der = binascii.a2b_base64("".join(body), strict_mode=True)
            except ValueError:
                raise KeyFileError(f"{where}: PEM of bad base64") from None
            return label, der, index + 1
        body.append(line)
    raise KeyFileError(f"{where}: PEM block without its END line")


# A DER reader just for RSA public keys: definite lengths, minimal
# encodings (X.690 10.1, 8.3.2), every element inside its parent's bounds,
# nothing left over.  Its errors are ValueErrors with a phrase.

def der_element(data, pos, end, tag):
    """Return (start, stop) of the content of the element at data[pos]."""
    if pos + 2 > end or data[pos] != tag:
        raise ValueError("unparsable public key (unexpected DER element)")
    length, pos = data[pos + 1], pos + 2
    if length & 0x80:   # long form; 0x80 alone is BER's indefinite length
        count = length & 0x7F
        if not 1 <= count <= 4 or pos + count > end or data[pos] == 0:
            raise ValueError("unparsable public key (bad DER length)")
        length, pos = int.from_bytes(data[pos:pos + count], "big"), pos + count
        if length < 0x80:
            raise ValueError("unparsable public key (bad DER length)")
    if pos + length > end:
        raise ValueError("unparsable public key (truncated)")
    return pos, pos + length


def der_integer(data, pos, end):
    """Return (value, stop) of a positive, minimally encoded INTEGER."""
    start, stop = der_element(data, pos, end, DER_INTEGER)
    body = data[start:stop]
    if (not body or body[0] & 0x80
            or (len(body) > 1 and body[0] == 0 and not body[1] & 0x80)):
        raise ValueError("unparsable public key (bad INTEGER)")
    return int.from_bytes(body, "big"), stop


def rsa_public_key(data, pos, end):
    """PKCS#1 RSAPublicKey (RFC 8017 A.1.1): SEQUENCE {n, e}."""
    start, stop = der_element(data, pos, end, DER_SEQUENCE)
    n, pos = der_integer(data, start, stop)
    e, pos = der_integer(data, pos, stop)
    if pos != stop or stop != end:
        raise ValueError("unparsable public key (trailing bytes)")
    return n, e


def public_key_info(data, pos, end):
    """SubjectPublicKeyInfo (RFC 5280 4.1, RFC 3279 2.3.1) of an RSA key:
    SEQUENCE {SEQUENCE {OID rsaEncryption, NULL}, BIT STRING RSAPublicKey}."""
    start, stop = der_element(data, pos, end, DER_SEQUENCE)
    if stop != end:
        raise ValueError("unparsable public key (trailing bytes)")
    algorithm, rest = der_element(data, start, stop, DER_SEQUENCE)
    oid, params = der_element(data, algorithm, rest, DER_OID)
    if data[oid:params] != RSA_ENCRYPTION_OID:
        raise ValueError("not an RSA public key (RS256 needs RSA)")
    if data[params:rest] not in (b"", b"\x05\x00"):   # NULL, or absent
        raise ValueError("unparsable public key (bad parameters)")
    bits, bits_end = der_element(data, rest, stop, DER_BIT_STRING)
    if bits_end != stop:
        raise ValueError("unparsable public key (trailing bytes)")
    if bits == bits_end or data[bits] != 0:           # no unused bits
        raise ValueError("unparsable public key (bad BIT STRING)")
    return rsa_public_key(data, bits + 1, bits_end)


def check_rsa_numbers(n, e):
    if not MIN_RSA_BITS <= n.bit_length() <= MAX_RSA_BITS:
        raise ValueError(f"RSA key of {n.bit_length()} bits; {MIN_RSA_BITS}"
                         f" to {MAX_RSA_BITS} are accepted")
    # An even modulus is no RSA key; e = 1 would let anyone sign.
    if not (n & 1 and e & 1 and 3 <= e < n
            and e.bit_length() <= MAX_RSA_EXPONENT_BITS):
        raise ValueError("not a valid RSA public key (modulus or exponent)")


# -- claims --

def valid_id(value, channel=False):
    """The rules of an id (A2): a non-empty printable string of at most 200
    bytes of UTF-8; a channel id also has no "|" or "/"."""
    return (type(value) is str and value != "" and value.isprintable()
            and len(value.encode()) <= MAX_ID_BYTES
            and not (channel and ("|" in value or "/" in value)))


class Patterns:
    """The channels a `subscribe` or `publish` claim covers: exact names, a
    prefix before a final "*" ("room:*" covers "room:" and "room:1"), or
    "*" alone for all.  Built once per token; covers() costs a set look-up
    and one startswith()."""
    __slots__ = ("exact", "prefixes", "everything")

    def __init__(self, patterns=()):
        """Raise ValueError for a pattern that breaks those rules."""
        exact, prefixes, self.everything = set(), [], False
        for pattern in patterns:
            if pattern == "*":
                self.everything = True
                continue
            is_prefix = pattern.endswith("*")
            body = pattern[:-1] if is_prefix else pattern
            if "*" in body or not valid_id(body, channel=True):
                raise ValueError("a channel pattern breaks the rules")
            (prefixes.append if is_prefix else exact.add)(body)
        self.exact, self.prefixes = frozenset(exact), tuple(prefixes)

    def covers(self, name):
        return (self.everything or name in self.exact
                or name.startswith(self.prefixes))

    def __repr__(self):
        texts = sorted(self.exact) + [p + "*" for p in self.prefixes]
        return f"Patterns({(['*'] if self.everything else []) + texts!r})"


NO_PATTERNS = Patterns()


class Claims:
    """What a verified token says.  Times are floats (unix seconds) or
    None; `aud` is a string, a tuple or None; `info_json` is the compact
    JSON text of `info`, ready to be put into replies, or None."""
    __slots__ = ("sub", "subscribe", "publish", "info_json", "jti", "iat",
                 "exp", "nbf", "aud", "iss")

    def __init__(self, **fields):
        for name in self.__slots__:
            setattr(self, name, fields.get(name))

    def expiry(self, leeway=TOKEN_LEEWAY):
        """The moment a held poll is answered "token expired", or None."""
        return None if self.exp is None else self.exp + leeway

    def __repr__(self):
        return f"<Claims {describe_token(self) or 'anonymous'}>"


def describe_token(item):
    """"sub alice jti 42" for a log line, from Claims or a TokenError: only
    ids that passed the rules of an id, never the token."""
    return " ".join(f"{name} {value}" for name, value
                    in (("sub", item.sub), ("jti", item.jti)) if value)


INFINITIES = (float("inf"), float("-inf"))
# `info` as compact JSON; allow_nan=False: 1e400 must not come out "Infinity".
INFO_ENCODER = json.JSONEncoder(ensure_ascii=False, allow_nan=False,
                                separators=(",", ":"))


def time_claim(payload, name):
    if name not in payload:
        return None
    value = payload[name]
    if type(value) not in (int, float):          # bool, null, text: no
        raise ValueError(f"{name} is not a number")
    try:
        value = float(value)                     # 10**400 does not fit
    except OverflowError:
        raise ValueError(f"{name} is out of range") from None
    if value in INFINITIES:                      # 1e400 parses as infinity
        raise ValueError(f"{name} is out of range")
    return value


def pattern_claim(payload, name):
    if name not in payload:
        return NO_PATTERNS
    value = payload[name]
    if type(value) is not list or not all(type(p) is str for p in value):
        raise ValueError(f"{name} is not a list of strings")
    if len(value) > MAX_TOKEN_PATTERNS:
        raise ValueError(f"{name} has over {MAX_TOKEN_PATTERNS} patterns")
    return Patterns(value)


def info_claim(payload):
    if "info" not in payload:
        return None
    if type(payload["info"]) is not dict:
        raise ValueError("info is not a JSON object")
    try:
        text = INFO_ENCODER.encode(payload["info"])
        size = len(text.encode())
    except UnicodeEncodeError:                   # a lone surrogate escape
        raise ValueError("info is not valid Unicode") from None
    except RecursionError:
        raise ValueError("info is nested too deeply") from None
    if size > MAX_INFO_BYTES:
        raise ValueError(f"info is over {MAX_INFO_BYTES} bytes")
    return text


def read_claims(payload):
    """Claims from a verified payload, or TokenError "malformed"."""
    # Read first, so that a refusal can name them in the log.
    sub, jti = payload.get("sub"), payload.get("jti")
    sub = sub if valid_id(sub) else None
    jti = jti if valid_id(jti) else None
    try:
        for name, value in (("sub", sub), ("jti", jti)):
            if name in payload and value is None:
                raise ValueError(f"{name} breaks the rules of an id")
        aud = payload.get("aud")
        if type(aud) is list and all(type(a) is str for a in aud):
            aud = tuple(aud)
        elif "aud" in payload and type(aud) is not str:
            raise ValueError("aud is not a string or a list of strings")
        if "iss" in payload and type(payload["iss"]) is not str:
            raise ValueError("iss is not a string")
        return Claims(
            sub=sub, jti=jti, aud=aud, iss=payload.get("iss"),
            exp=time_claim(payload, "exp"), nbf=time_claim(payload, "nbf"),
            iat=time_claim(payload, "iat"),
            subscribe=pattern_claim(payload, "subscribe"),
            publish=pattern_claim(payload, "publish"),
            info_json=info_claim(payload))
    except ValueError as error:
        raise TokenError("malformed", str(error), sub, jti) from None


# -- verification --

def refuse_duplicates(pairs):
    # RFC 7515 4 and RFC 7519 4: a name twice is refused, or the last one
    # wins; refusing leaves no room for two parsers to read two tokens.
    members = dict(pairs)
    if len(members) != len(pairs):
        raise ValueError("a member name twice")
    return members


def refuse_constant(name):
    raise ValueError(f"{name} is not JSON")      # NaN never expires


JSON_DECODER = json.JSONDecoder(object_pairs_hook=refuse_duplicates,
                                parse_constant=refuse_constant)
BASE64URL_TO_STANDARD = bytes.maketrans(b"-_", b"+/")  # fast on bytes
# Characters allowed last in a part whose length is 2 or 3 modulo 4: those
# whose unused low bits are zero (RFC 4648 3.5), so each token has one form.
BASE64URL_LAST = {2: frozenset("AQgw"), 3: frozenset("AEIMQUYcgkosw048")}


def base64url(part):
    rest = len(part) % 4
    if rest == 1 or (rest and part[-1] not in BASE64URL_LAST[rest]):
        raise TokenError("malformed", "not canonical base64url")
    return binascii.a2b_base64(part.encode().translate(BASE64URL_TO_STANDARD)
                               + b"=" * (-len(part) % 4))


def json_object(raw, what):
    try:
        value = JSON_DECODER.decode(raw.decode("utf-8"))
    except (ValueError, RecursionError):
        raise TokenError("malformed", f"{what} is not JSON") from None
    if type(value) is not dict:
        raise TokenError("malformed", f"{what} is not a JSON object")
    return value


def looks_like_token(value):
    """Whether a bearer value has a JWT's form (whatever its length: a huge
    one is a malformed token, never a value to ignore)."""
    return TOKEN_FORM.fullmatch(value) is not None


def read_token(token, keys):
    """Check a token's form, algorithm, signature and claim types, in that
    order, and return its Claims; time, audience and issuer are judged by
    check_claims().  Raise TokenError."""
    if not keys:
        raise TokenError("disabled", "no token key is configured")
    match = len(token) <= MAX_TOKEN_BYTES and TOKEN_FORM.fullmatch(token)
    if not match:
        raise TokenError("malformed", "not a compact JWS of at most 4 KiB")
    header, payload, signature = map(base64url, match.groups())
    header = json_object(header, "header")
    if "crit" in header:
        raise TokenError("malformed", "crit header: no extension is known")
    for name in ("typ", "kid"):
        if name in header and type(header[name]) is not str:
            raise TokenError("malformed", f"{name} header is not a string")
    algorithm = header.get("alg")
    if type(algorithm) is not str or algorithm not in TOKEN_ALGORITHMS:
        raise TokenError("algorithm", "alg is not HS256/384/512 or RS256")
    candidates = keys_for(algorithm, header, keys)
    signed = token[:match.end(2)].encode("ascii")
    if algorithm == "RS256":
        digest = hashlib.sha256(signed).digest()
        verified = any(rsa_verifies(key, digest, signature)
                       for key in candidates)
    else:
        name = HMAC_HASHES[algorithm]
        verified = any(hmac.compare_digest(
            hmac.digest(key.secret, signed, name), signature)
            for key in candidates)
    if not verified:
        raise TokenError("signature", "no key verifies the signature")
    return read_claims(json_object(payload, "payload"))


def keys_for(algorithm, header, keys):
    """The keys that may have signed a token of `algorithm`: the one its
    kid names, else all of that family.  RSA keys are never HMAC secrets,
    so a token "HS256-signed" with a public key is never accepted."""
    family = RsaKey if algorithm == "RS256" else HmacKey
    if "kid" in header:
        key = keys.named.get(header["kid"])
        if key is None:
            raise TokenError("signature", "kid names no key")
        if type(key) is not family:
            raise TokenError("algorithm", "kid names a key of another alg")
        return (key,)
    candidates = keys.rsa if family is RsaKey else keys.hmac
    if not candidates:
        raise TokenError("algorithm", f"no key for {algorithm}")
    return candidates


def rsa_verifies(key, digest, signature):
    """RSASSA-PKCS1-v1_5 verification (RFC 8017 8.2.2): the signature is as
    long as the modulus and below it, and its e-th power is byte for byte
    the encoded message we expect.  Built and compared whole, never parsed,
    so no lax parser can be fooled (Bleichenbacher 2006, BERserk 2014)."""
    if len(signature) != key.size:
        return False
    s = int.from_bytes(signature, "big")
    if s >= key.n:
        return False
    message = pow(s, key.e, key.n).to_bytes(key.size, "big")
    return hmac.compare_digest(message, key.prefix + digest)


def check_claims(claims, now, *, audience=None, issuer=None,
                 leeway=TOKEN_LEEWAY):
    """Judge time, then audience and issuer; raise TokenError.  Expired
    from exp + leeway on (RFC 7519 4.1.4: valid only before exp); valid
    from nbf - leeway on (4.1.5)."""
    sub, jti = claims.sub, claims.jti
    if claims.exp is not None and now >= claims.exp + leeway:
        raise TokenError("expired", "past exp", sub, jti)
    if claims.nbf is not None and now < claims.nbf - leeway:
        raise TokenError("not_yet_valid", "before nbf", sub, jti)
    aud = claims.aud
    if audience is not None and aud != audience and not (
            type(aud) is tuple and audience in aud):
        raise TokenError("audience", "aud lacks the audience", sub, jti)
    if issuer is not None and claims.iss != issuer:
        raise TokenError("issuer", "iss is not the issuer", sub, jti)


def verify_token(token, keys, now, *, audience=None, issuer=None,
                 leeway=TOKEN_LEEWAY):
    """The Claims of a token that is valid at `now`, or raise TokenError."""
    claims = read_token(token, keys)
    check_claims(claims, now, audience=audience, issuer=issuer, leeway=leeway)
    return claims


class TokenCache:
    """verify_token() with memory: read_token()'s answer, Claims or
    refusal, is kept per token, and only the cheap check_claims() runs on a
    hit, so expiry is judged at every check and never cached.  Bounded;
    make a new one when the keys or settings change."""

    def __init__(self, keys, audience=None, issuer=None,
                 size=TOKEN_CACHE_SIZE, leeway=TOKEN_LEEWAY):
        self.keys, self.audience, self.issuer = keys, audience, issuer
        self.size, self.leeway, self.entries = size, leeway, {}
        self.valid = {}                  # token -> (claims, from, until)

    def __len__(self):
        return len(self.entries)

    def check(self, token, now):
        # The usual hit: a token seen and found valid, within its times
        # (its audience and issuer cannot change).
        valid = self.valid.get(token)
        if valid is not None and valid[1] <= now < valid[2]:
            return valid[0]
        entry = self.entries.get(token)
        if entry is None:
            try:
                entry = read_token(token, self.keys)
            except TokenError as error:
                entry = error
            if len(self.entries) >= self.size:
                # Forget the older half at once: deleting the oldest entry
                # one at a time makes each next deletion slower (a dict
                # scans its deleted slots until it is resized).
                for old in list(self.entries)[:max(1, self.size // 2)]:
                    del self.entries[old]
                    self.valid.pop(old, None)
            self.entries[token] = entry
        if type(entry) is TokenError:
            # A new one: an exception raised again keeps its old traceback
            # and grows it.
            raise TokenError(entry.reason, entry.detail, entry.sub, entry.jti)
        check_claims(entry, now, audience=self.audience, issuer=self.issuer,
                     leeway=self.leeway)
        self.valid[token] = (
            entry, -math.inf if entry.nbf is None else entry.nbf - self.leeway,
            math.inf if entry.exp is None else entry.exp + self.leeway)
        return entry


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
# record and Redis history (Redis's push script writes the same layout):
#
#     {"id": ID, "ts": SECONDS, "content": TEXT}
#     {"id": ID, "ts": SECONDS, "from": SENDER, "content": TEXT}
#
# "from" is there when the message has a sender.

def message_text(message_id, content, sender=None):
    """A message's JSON, encoded once when it is pushed (f-strings: a
    quarter cheaper than a %-template, on the hottest write)."""
    ts = int(time.time())
    if sender is None:
        return (f'{{"id": {message_id}, "ts": {ts}, '
                f'"content": {json_string(content)}}}')
    return (f'{{"id": {message_id}, "ts": {ts}, '
            f'"from": {json_string(sender)}, '
            f'"content": {json_string(content)}}}')


def message_id_of(text):
    """The id of a message's JSON, read back from its fixed layout."""
    return int(text[7:text.index(",")])


def presence_text(event_id, kind, user, info):
    """A join or leave entry's JSON: the layout of a message, with event
    and from (and the token's info) instead of content."""
    return '{"id": %d, "ts": %d, "event": "%s", "from": %s%s}' % (
        event_id, time.time(), kind, json.dumps(user),
        "" if info is None else ', "info": ' + info)


class Presence:
    """Who reads a presence channel: its members (present users, as its
    join and leave entries say, with their token's info), the window of
    those entries (of their own, so that churn never evicts messages), and
    the connections open on this instance."""

    __slots__ = ("members", "events", "dropped_id", "connections",
                 "anonymous")

    def __init__(self, size):
        self.members = {}                # user -> info JSON text, or None
        self.events = deque(maxlen=size)  # (id, JSON text, kind), oldest first
        self.dropped_id = 0              # newest entry the window dropped
        self.connections = {}            # user -> polls and streams here
        self.anonymous = 0               # polls and streams without a user

    def since(self, since):
        return [entry for entry in self.events if entry[0] > since]


class Pushed(NamedTuple):
    """What every store's push answers."""
    id: int                              # the message's id
    delivered: int                       # polls and streams reached here
    instances: int | None = None         # instances connected (Redis only)


# A channel's options, one bit each (kept as one number in every store; a
# version 2 state file or Redis wrote 0 or 1, which mean the same here).
SESSIONS = 1                             # read only with a registered client
PRIVATE = 2                              # read only with a token's subscribe
PRESENCE = 4                             # keeps track of who reads it


class Channel:
    """A channel: its options, its retained messages and who waits on it.

    Idle channels are many (one per user is common), so nothing is
    allocated before it is needed: no history until the first push, no
    waiter map while nobody waits, no encoded name until the first reply.
    """

    __slots__ = ("name", "max_messages", "options", "messages",
                 "dropped_id", "last_read", "waiters", "_key")

    def __init__(self, name, max_messages, options, now):
        self.name = name
        self.max_messages = max_messages
        self.options = options   # SESSIONS | PRIVATE
        self.messages = None     # deque of (id, JSON text), oldest first
        self.dropped_id = 0      # newest id the history dropped
        self.last_read = now
        self.waiters = None      # held polls and open streams -> None
        self._key = None

    # A property, not __getattr__: a class with __getattr__ makes every
    # attribute read of its instances the slow, generic kind.
    @property
    def key(self):
        """The name as a JSON string, made when first asked for."""
        key = self._key
        if key is None:
            key = self._key = json.dumps(self.name)
        return key

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
        self.revoked = {}                # (kind, value) -> (at, until)
        self.presence = {}               # channel name -> its Presence
        self.hub = None                  # set by the Hub

    # -- applying a change ------------------------------------------------

    def apply_channel(self, name, max_messages, options, dropped_id=0):
        channel = self.channels.get(name)
        if channel is None:
            channel = self.channels[name] = Channel(
                name, max_messages, options, self.loop.time())
            self.added += 1
            if options & PRESENCE:
                self.presence[name] = Presence(max_messages)
        if dropped_id > channel.dropped_id:
            channel.dropped_id = dropped_id
        return channel

    def apply_client(self, client_id):
        if client_id not in self.clients:
            self.clients[client_id] = self.loop.time()
            self.added += 1

    def apply_push(self, channel, message_id, text, ephemeral=False):
        """Store a message in ``channel`` (None: not known here, and only
        the counter moves), or only pass it to its waiters (ephemeral);
        returns how many waiters it reached."""
        if message_id > self.last_id:
            self.last_id = message_id
        if channel is None or channel.messages and \
                channel.messages[-1][0] >= message_id:
            return 0
        if not ephemeral:
            channel.add(message_id, text)
        return self.hub.deliver(channel, message_id, text, ephemeral) \
            if channel.waiters else 0

    def apply_remove(self, name):
        channel = self.channels.pop(name, None)
        if channel is not None and channel.options & PRESENCE:
            del self.presence[name]
        if channel is not None and channel.waiters:
            self.hub.channel_removed(channel)

    def apply_presence(self, name, kind, user, info, text):
        """A join or leave entry (its JSON text made when it was decided);
        returns how many waiters it reached."""
        event_id = message_id_of(text)
        if event_id > self.last_id:
            self.last_id = event_id
        presence = self.presence.get(name)
        if presence is None or presence.events and \
                presence.events[-1][0] >= event_id:
            return 0
        if kind == "join":
            presence.members[user] = info
        else:
            presence.members.pop(user, None)
        events = presence.events
        if len(events) == events.maxlen:
            presence.dropped_id = events[0][0]
        events.append((event_id, text, kind))
        channel = self.channels[name]
        return self.hub.deliver(channel, event_id, text, kind=kind) \
            if channel.waiters else 0

    def apply_member(self, name, user, info):
        """A member as a snapshot holds it (no entry)."""
        presence = self.presence.get(name)
        if presence is not None:
            presence.members[user] = info

    def apply_forget(self, client_id):
        self.clients.pop(client_id, None)

    def apply_revoke(self, kind, value, at, until):
        """Tokens of ``kind`` "sub" (issued before ``at``) or "jti" named
        ``value`` are refused until ``until`` (unix seconds)."""
        key = (kind, value)
        old = self.revoked.get(key)
        if old is not None:
            at, until = max(at, old[0]), max(until, old[1])
        self.revoked[key] = (at, until)
        if self.hub is not None and self.hub.holders:
            self.hub.revoked(kind, value, at)

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

    async def expire(self, now, reading):
        """Find the clients and channels nobody has read for their timeout
        (those with a held poll or an open stream count as read now) and
        hand them to ``expired()``.  Done in slices, so that a mass expiry
        does not hold up replies."""
        while True:
            clients = list(islice(self.stale(
                self.clients.items(), now - self.config.session_timeout),
                EXPIRY_SLICE))
            channels = list(islice(self.stale(
                ((c, c.last_read) for c in self.channels.values()),
                now - self.config.inactive_channel_timeout), EXPIRY_SLICE))
            if not clients and not channels:
                return
            gone = [c for c in clients if c not in reading]
            dead = [c for c in channels if not c.waiters]
            for client_id in clients:
                if client_id in reading:
                    self.touch_client(client_id, now)
            for channel in channels:
                if channel.waiters:
                    self.touch_channel(channel, now)
            if (gone or dead) and not self.expired(gone, dead, now):
                return                   # tried again at the next pass
            await asyncio.sleep(0)

    @staticmethod
    def stale(entries, limit):
        """The oldest of (key, last read) pairs, up to the first read since
        ``limit``."""
        for key, last_read in entries:
            if last_read >= limit:
                return
            yield key

    def is_revoked(self, claims, now):
        revoked = self.revoked
        if not revoked:
            return False
        if claims.jti is not None:
            entry = revoked.get(("jti", claims.jti))
            if entry is not None and entry[1] > now:
                return True
        if claims.sub is not None:
            entry = revoked.get(("sub", claims.sub))
            # No iat: it cannot be told from a token issued after.
            if entry is not None and entry[1] > now and (
                    claims.iat is None or claims.iat < entry[0]):
                return True
        return False

    def revocation_room(self, now):
        """Whether one more revocation may be kept: those that ended go
        first (a walk only at the bound)."""
        if len(self.revoked) >= MAX_REVOCATIONS:
            for key in [key for key, (_, until) in self.revoked.items()
                        if until <= now]:
                del self.revoked[key]
        return len(self.revoked) < MAX_REVOCATIONS

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
    # Writes are coroutines: add_channel(name, max_messages, options),
    # add_client(client_id) and revoke(kind, value, until) return None,
    # push(name, content, sender=None, ephemeral=False) a Pushed (an
    # ephemeral message reaches the waiters of now and is kept nowhere),
    # remove_channel(name) whether it
    # existed, change_presence(name, kind, user, info) (a join or leave
    # its hub decided) None; refusals raise APIError (API
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

    async def instances(self):
        """The instances of a shared store: [(instance, seconds since its
        last sign of life, whether it is this one)]; none here."""
        return []

    async def presence_counts(self, name):
        """A presence channel's connections: ({user: open polls and
        streams}, anonymous ones), on every instance."""
        presence = self.presence[name]
        return presence.connections, presence.anonymous


# ---------------------------------------------------------------------------
# Storage in memory
# ---------------------------------------------------------------------------

class MemoryStore(Core):
    """The store of one process: each write checks, is kept (a hook: the
    state file journals it there; raising refuses the write), and is
    applied."""

    kind = "memory"                      # as the dashboard names it

    def __init__(self, config, loop):
        super().__init__(config, loop)
        self.leaving = Deadlines()       # (channel, user) by end of grace

    def open(self):
        grace = self.loop.time() + self.config.presence_grace
        for name, presence in self.presence.items():
            for user in presence.members:
                self.leaving.add((name, user), grace)

    async def add_channel(self, name, max_messages, options):
        if name in self.channels:
            raise APIError(NO_CHANNEL, "Channel already exists")
        self.keep_channel(name, max_messages, options)
        self.apply_channel(name, max_messages, options)

    async def add_client(self, client_id):
        if client_id in self.clients:
            raise APIError(NO_CHANNEL, "Client already exists")
        self.keep_client(client_id)
        self.apply_client(client_id)

    async def push(self, name, content, sender=None, ephemeral=False):
        channel = self.channels.get(name) or self.channel(name)
        message_id = self.next_id()
        text = message_text(message_id, content, sender)
        if not ephemeral:
            self.keep_push(channel, message_id, text)
        self.pushed += 1
        return Pushed(message_id, self.apply_push(channel, message_id, text,
                                                  ephemeral))

    async def remove_channel(self, name):
        channel = self.channels.get(name)
        if channel is None:
            return False
        self.keep_remove(channel)
        self.apply_remove(name)
        return True

    # -- presence: decided here, for one process -------------------------
    #
    # A user's first connection makes it join (if it is not a member
    # yet); once its last one has been gone for --presence-grace (a queue
    # in deadline order, walked by the hub's sweep) it leaves.  Members
    # restored from a state file start as gone: a reader back within the
    # grace (counted from the start) causes nothing.

    def presence_moved(self, name, user, info, seen=False):
        presence = self.presence[name]
        key = (name, user)
        self.leaving.remove(key)
        if user not in presence.connections:
            self.leaving.add(key, self.loop.time() +
                             self.config.presence_grace)
            if not seen:
                return
        if user not in presence.members:
            self.loop.create_task(self.change_presence(name, "join", user,
                                                       info))

    def sweep_presence(self, now):
        for key in self.leaving.expired(now):
            self.leaving.remove(key)
            name, user = key
            presence = self.presence.get(name)
            if presence is not None and user not in presence.connections \
                    and user in presence.members:
                self.loop.create_task(self.change_presence(name, "leave",
                                                           user))

    async def change_presence(self, name, kind, user, info=None):
        """A user joins or leaves; nothing when that is so already (a join
        of a member, a leave of a user who came back).  One not stored (a
        full disk) is tried again: a leave after another grace, a join at
        the user's next connection."""
        presence = self.presence.get(name)
        if presence is None or (user in presence.members) == (kind == "join") \
                or kind == "leave" and user in presence.connections:
            return
        text = presence_text(self.next_id(), kind, user, info)
        try:
            self.keep_presence(name, kind, user, info, text)
        except HTTPError as e:
            log.warning("presence of %s in %s not stored: %s", user, name,
                        e.message)
            if kind == "leave":
                self.leaving.add((name, user), self.loop.time() +
                                 self.config.presence_grace)
            return
        self.apply_presence(name, kind, user, info, text)

    async def revoke(self, kind, value, until):
        now = time.time()
        if not self.revocation_room(now):
            raise unavailable(f"{MAX_REVOCATIONS} revocations are in force")
        self.keep_revoke(kind, value, now, until)
        self.apply_revoke(kind, value, now, until)

    def expired(self, client_ids, channels, now):
        """Forget what expired; False when it cannot be yet."""
        if not self.keep_expiry(client_ids, channels):
            return False
        for client_id in client_ids:
            self.apply_forget(client_id)
        for channel in channels:
            self.apply_remove(channel.name)
        return True

    # -- persistence hooks: nothing to keep in memory ----------------------

    def keep_channel(self, name, max_messages, options):
        pass

    def keep_client(self, client_id):
        pass

    def keep_push(self, channel, message_id, text):
        pass

    def keep_remove(self, channel):
        pass

    def keep_revoke(self, kind, value, at, until):
        pass

    def keep_presence(self, name, kind, user, info, text):
        pass

    def keep_expiry(self, client_ids, channels):
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
#     c  NAME MAX_MESSAGES OPTIONS DROPPED_ID          channel registered
#     u  CLIENT                           client registered
#     p  NAME ID MESSAGE                  message pushed (message_text())
#     d  NAME                             channel deleted or expired
#     x  CLIENT                           client expired
#     r  KIND VALUE AT UNTIL              tokens revoked (by sub or jti)
#     v  NAME KIND USER INFO ENTRY_JSON   a user joined or left (presence)
#     m  NAME USER INFO                   a present user (snapshots only)
#
# Each record is applied through the core when replayed, and the core's
# idempotence is what lets compaction write a snapshot while writes go on.

def record(payload):
    payload = payload.encode()
    return b"%08x %s\n" % (zlib.crc32(payload), payload)


def counter_record(last_id, padding=0):
    return record("i\t%d%s" % (last_id, "\t" + "." * padding if padding
                               else ""))


def channel_record(name, max_messages, options, dropped_id=0):
    return record("c\t%s\t%d\t%d\t%d" % (json.dumps(name), max_messages,
                                         options, dropped_id))


def message_record(channel, message_id, text):
    return record("p\t%s\t%d\t%s" % (channel.key, message_id, text))


def removal_record(name):
    return record("d\t" + json.dumps(name))


def client_record(client_id, kind="u"):
    return record(kind + "\t" + json.dumps(client_id))


def presence_record(name, kind, user, info, text):
    return record("v\t%s\t%s\t%s\t%s\t%s" % (
        json.dumps(name), kind, json.dumps(user), json.dumps(info), text))


def member_record(name, user, info):
    return record("m\t%s\t%s\t%s" % (json.dumps(name), json.dumps(user),
                                      json.dumps(info)))


def revocation_record(kind, value, at, until):
    return record("r\t%s\t%s\t%.6f\t%.6f" % (kind, json.dumps(value), at,
                                             until))


def replay_record(core, fields):
    """Apply one record's fields (bytes) through the core."""
    kind = fields[0]
    if kind == b"p":
        core.apply_push(core.channels.get(json.loads(fields[1])),
                        int(fields[2]), fields[3].decode())
    elif kind == b"c":
        core.apply_channel(json.loads(fields[1]), int(fields[2]),
                           int(fields[3]), int(fields[4]))
    elif kind == b"u":
        core.apply_client(json.loads(fields[1]))
    elif kind == b"d":
        core.apply_remove(json.loads(fields[1]))
    elif kind == b"x":
        core.apply_forget(json.loads(fields[1]))
    elif kind == b"i":
        core.apply_counter(int(fields[1]))
    elif kind == b"r":
        core.apply_revoke(fields[1].decode(), json.loads(fields[2]),
                          float(fields[3]), float(fields[4]))
    elif kind == b"v":
        core.apply_presence(json.loads(fields[1]), fields[2].decode(),
                            json.loads(fields[3]), json.loads(fields[4]),
                            fields[5].decode())
    elif kind == b"m":
        core.apply_member(json.loads(fields[1]), json.loads(fields[2]),
                          json.loads(fields[3]))
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


def live_records(core):
    """The records of the core's live state, each as it is when reached
    (what compaction writes; replay() reads them back)."""
    yield counter_record(core.last_id)
    for channel in list(core.channels.values()):
        if core.channels.get(channel.name) is channel:  # not removed since
            yield channel_record(channel.name, channel.max_messages,
                                 channel.options, channel.dropped_id)
            for message_id, text in tuple(channel.messages or ()):
                yield message_record(channel, message_id, text)
            presence = core.presence.get(channel.name)
            if presence is not None:
                for event_id, text, kind in tuple(presence.events):
                    user = json.loads(text)["from"]
                    yield presence_record(channel.name, kind, user,
                                          presence.members.get(user), text)
                for user, info in list(presence.members.items()):
                    yield member_record(channel.name, user, info)
    for client_id in list(core.clients):
        if client_id in core.clients:
            yield client_record(client_id)
    now = time.time()
    for (kind, value), (at, until) in list(core.revoked.items()):
        if until > now:
            yield revocation_record(kind, value, at, until)


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
    probes with such a write once a second) and BROKEN (a failed fsync or
    cut-back: PATH cannot be trusted until compaction has rewritten it).
    Files: PATH, PATH.tmp while compacting, PATH.lock (held with flock
    while the server runs); all mode 0600.  Compaction copies the list of
    channels and clients, writes each one as it is when reached, a slice at
    a time, appends what arrived meanwhile, fsyncs and renames the result
    over PATH; while the rename runs (off the event loop) every record goes
    to both files.
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
            self.needed = max(self.needed, len(data))
            self.trouble(self.REFUSING, failure)
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
            self.trouble(self.BROKEN,
                         "cannot cut back a failed write: " + e.strerror)

    def trouble(self, state, reason):
        """REFUSING, or BROKEN (PATH cannot be trusted until rewritten)."""
        if self.state == self.BROKEN:
            return
        if self.state != state:
            log.error("state file %s: %s; writes are refused %s", self.path,
                      reason, "meanwhile" if state == self.REFUSING else
                      "until it is rewritten")
        self.state, self.reason = state, reason

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
                        self.trouble(self.BROKEN,
                                     "fsync failed: " + e.strerror)
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
        size = 0
        chunk = []
        deadline = time.perf_counter() + STATE_COMPACT_SLICE
        for data in live_records(self.core):
            chunk.append(data)
            if len(chunk) >= 100 and time.perf_counter() > deadline:
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
            # What arrived meanwhile, a few times over (under a steady flow
            # of pushes it would never run dry); the rest goes below.
            for _ in range(STATE_COMPACT_CATCH_UPS):
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

    kind = "state_file"

    def __init__(self, config, loop):
        super().__init__(config, loop)
        self.journal = Journal(config.state_file, self, loop)

    def open(self):
        self.journal.open()
        super().open()
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

    def keep_channel(self, name, max_messages, options):
        data = channel_record(name, max_messages, options)
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

    def keep_revoke(self, kind, value, at, until):
        data = revocation_record(kind, value, at, until)
        self.journal.write(data, live=len(data))

    def keep_presence(self, name, kind, user, info, text):
        data = presence_record(name, kind, user, info, text)
        self.journal.write(data, live=len(data))

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
# h:NAME (its history, a list of message JSON), revoked (revocations).

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
local function presence_keys(prefix, name)
  return prefix .. 'pm:' .. name, prefix .. 'pw:' .. name,
         prefix .. 'pc:' .. name, prefix .. 'pa:' .. name
end
-- A join or leave entry: in the channel's window (pw:NAME, at most its
-- max_messages) and in the log.
local function presence_entry(counter, log, prefix, name, kind, user, info,
                              max, seconds, floor)
  local id, prev = next_id(counter, floor)
  local sid = string.format('%d', id)
  local text = '{"id": ' .. sid .. ', "ts": ' .. seconds .. ', "event": "' ..
               kind .. '", "from": ' .. cjson.encode(user) ..
               (info ~= '' and ', "info": ' .. info or '') .. '}'
  local _, window = presence_keys(prefix, name)
  if redis.call('RPUSH', window, text) > max then
    local oldest = redis.call('LPOP', window)
    redis.call('HSET', prefix .. 'c:' .. name, 'pdropped',
               string.match(oldest, '^{"id": (%d+)'))
  end
  return append(log, id, prev, kind == 'join' and 'j' or 'l', name .. '\t' ..
                kind .. '\t' .. user .. '\t' .. info .. '\t' .. text)
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
# ARGV: floor ttl instance_window_ms, then name, content (JSON), sender
# (JSON, or empty) and mode ("p", or "e" for an ephemeral message, which
# goes to the log only) of each push
# Returns the instances counted, then for each push "ID<TAB>PREVIOUS
# ENTRY<TAB>MESSAGE" ("-2": no such channel), one per line: one string,
# which costs a Python reader far less than an array.  (A message's JSON
# has no raw line break; its layout is message_text()'s.)  A history gets
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
    local a = 4 * i
    local id, prev = next_id(KEYS[1], floor)
    local sid = string.format('%d', id)
    local from = ARGV[a + 2] ~= '' and ', "from": ' .. ARGV[a + 2] or ''
    local text = '{"id": ' .. sid .. ', "ts": ' .. seconds .. from ..
                 ', "content": ' .. ARGV[a + 1] .. '}'
    if ARGV[a + 3] == 'p' then
      local length = redis.call('RPUSH', history, text)
      if length == 1 then
        redis.call('PEXPIRE', history, ARGV[2])
      elseif length > max then
        local oldest = redis.call('LPOP', history)
        redis.call('HSET', meta, 'dropped', string.match(oldest, '^{"id": (%d+)'))
      end
    end
    append(KEYS[2], id, prev, ARGV[a + 3], ARGV[a] .. '\t' .. text)
    out[i + 1] = sid .. '\t' .. prev .. '\t' .. text
  end
end
return table.concat(out, '\n')
"""

# KEYS: counter log channels meta history  ARGV: floor name prefix
REDIS_REMOVE_CHANNEL = REDIS_LUA_COMMON + r"""
if redis.call('EXISTS', KEYS[4]) == 0 then return 0 end
redis.call('DEL', KEYS[4], KEYS[5], presence_keys(ARGV[3], ARGV[2]))
redis.call('ZREM', KEYS[3], ARGV[2])
local id, prev = next_id(KEYS[1], ARGV[1])
append(KEYS[2], id, prev, 'd', ARGV[2])
return id
"""

# Tokens revoked by sub or jti: one hash field each, "KIND<TAB>VALUE" ->
# "AT<TAB>UNTIL" (unix seconds); at the bound, those that ended go first,
# and if none did the revocation is refused (-3).
# KEYS: counter log revoked  ARGV: floor kind value at until now bound ttl
REDIS_REVOKE = REDIS_LUA_COMMON + r"""
local field = ARGV[2] .. '\t' .. ARGV[3]
if redis.call('HEXISTS', KEYS[3], field) == 0 and
    redis.call('HLEN', KEYS[3]) >= tonumber(ARGV[7]) then
  local all = redis.call('HGETALL', KEYS[3])
  for i = 1, #all, 2 do
    if tonumber(string.match(all[i + 1], '\t(.+)$')) <= tonumber(ARGV[6]) then
      redis.call('HDEL', KEYS[3], all[i])
    end
  end
  if redis.call('HLEN', KEYS[3]) >= tonumber(ARGV[7]) then return -3 end
end
local id, prev = next_id(KEYS[1], ARGV[1])
redis.call('HSET', KEYS[3], field, ARGV[4] .. '\t' .. ARGV[5])
redis.call('PEXPIRE', KEYS[3], ARGV[8])
append(KEYS[2], id, prev, 'r', field .. '\t' .. ARGV[4] .. '\t' .. ARGV[5])
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
    for _, key in ipairs({presence_keys(prefix, ARGV[i])}) do
      redis.call('PEXPIRE', key, ARGV[5])
    end
  end
end
for i = 9 + n, #ARGV do
  redis.call('ZADD', KEYS[4], 'XX', ms, ARGV[i])
end
local gone = 0
local names = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', ms - tonumber(ARGV[3]),
                         'LIMIT', 0, tonumber(ARGV[7]))
for _, name in ipairs(names) do
  redis.call('DEL', prefix .. 'c:' .. name, prefix .. 'h:' .. name,
             presence_keys(prefix, name))
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

# Presence, decided in Redis so that every instance sees one view.  Each
# instance keeps its own connection count of each present user (pi:INSTANCE,
# "NAME<TAB>USER" -> count), and their sum is pc:NAME; a user whose sum
# reaches 0 goes into the gone set (score: since when), and PRESENCE_SWEEP
# makes it leave once the grace has passed; a user whose sum leaves 0 and
# who is not a member (pm:NAME) joins.
# KEYS: counter log gone counts_of_this_instance  ARGV: floor prefix, then
# name user info count seen ("1": a read without waiting) of each change
REDIS_PRESENCE = REDIS_LUA_COMMON + r"""
local ms, seconds = now_ms()
local floor, prefix = ARGV[1], ARGV[2]
for i = 3, #ARGV, 5 do
  local name, user, info = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local count, seen = tonumber(ARGV[i + 3]), ARGV[i + 4] == '1'
  local field = name .. '\t' .. user
  local members, _, counts = presence_keys(prefix, name)
  local max = tonumber(redis.call('HGET', prefix .. 'c:' .. name, 'max'))
  if max then
    local old = tonumber(redis.call('HGET', KEYS[4], field) or '0')
    if count > 0 then
      redis.call('HSET', KEYS[4], field, count)
    else
      redis.call('HDEL', KEYS[4], field)
    end
    local total = redis.call('HINCRBY', counts, user, count - old)
    if total <= 0 then
      redis.call('HDEL', counts, user)
      if old > 0 or seen then redis.call('ZADD', KEYS[3], ms, field) end
    else
      redis.call('ZREM', KEYS[3], field)
    end
    if (total > 0 or seen) and redis.call('HSETNX', members, user, info) == 1 then
      floor = presence_entry(KEYS[1], KEYS[2], prefix, name, 'join', user,
                             info, max, seconds, floor)
    end
  end
end
redis.call('PEXPIRE', KEYS[4], 24 * 3600 * 1000)
return tonumber(floor)
"""

# Run by every instance about once a second, after housekeeping: report
# this instance's anonymous readers (pa:NAME, instance -> "COUNT<TAB>MS"),
# take back the counts of instances silent for ARGV[5] ms (dead: they leave
# after the grace unless they came back elsewhere), and make users gone
# for the grace leave.  Returns 1 when this instance was taken for dead (it
# was stalled): it then tells its counts again.
# KEYS: counter log gone instances
# ARGV: floor prefix instance grace_ms dead_ms limit, then name count of
# this instance's anonymous readers on each presence channel
REDIS_PRESENCE_SWEEP = REDIS_LUA_COMMON + r"""
local ms, seconds = now_ms()
local floor, prefix = ARGV[1], ARGV[2]
for i = 7, #ARGV, 2 do
  local _, _, _, anonymous = presence_keys(prefix, ARGV[i])
  redis.call('HSET', anonymous, ARGV[3], ARGV[i + 1] .. '\t' .. ms)
  redis.call('PEXPIRE', anonymous, 60000)
end
local dead = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf',
                        ms - tonumber(ARGV[5]), 'WITHSCORES')
for i = 1, #dead, 2 do
  local theirs = prefix .. 'pi:' .. dead[i]
  local all = redis.call('HGETALL', theirs)
  for j = 1, #all, 2 do
    local name, user = string.match(all[j], '^(.-)\t(.*)$')
    local _, _, counts = presence_keys(prefix, name)
    if redis.call('HINCRBY', counts, user, -tonumber(all[j + 1])) <= 0 then
      redis.call('HDEL', counts, user)
      redis.call('ZADD', KEYS[3], dead[i + 1], all[j])
    end
  end
  redis.call('DEL', theirs)
  redis.call('ZREM', KEYS[4], dead[i])
  redis.call('SET', prefix .. 'dead:' .. dead[i], 1, 'PX', 60000)
end
local gone = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf',
                        ms - tonumber(ARGV[4]), 'LIMIT', 0, tonumber(ARGV[6]))
for _, field in ipairs(gone) do
  redis.call('ZREM', KEYS[3], field)
  local name, user = string.match(field, '^(.-)\t(.*)$')
  local members, _, counts = presence_keys(prefix, name)
  local max = tonumber(redis.call('HGET', prefix .. 'c:' .. name, 'max'))
  if max and redis.call('HEXISTS', counts, user) == 0 and
      redis.call('HDEL', members, user) == 1 then
    floor = presence_entry(KEYS[1], KEYS[2], prefix, name, 'leave', user, '',
                           max, seconds, floor)
  end
end
return redis.call('DEL', prefix .. 'dead:' .. ARGV[3])
"""

REDIS_DEAD_AFTER = 5000              # ms without a sign of life: dead

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


def redis_unavailable(error, write=True):
    """What a client is told when Redis did not do as asked: a 503, in one
    wording per case.  A write Redis did not confirm may or may not have
    been stored (the README says so)."""
    if isinstance(error, RedisReplyError):
        what = "refused the write" if write else "refused"
    elif isinstance(error, RedisConnectionError) and "not connected" in \
            str(error):
        what = "unreachable"
    else:
        what = "did not confirm the write" if write else "did not answer"
    return unavailable(f"Redis {what}: {error}")


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
        if kind == "p" or kind == "e":
            name, text = rest.split("\t", 1)
            self.apply_pushed(position, name, text, kind == "e")
            return
        if kind == "c":
            name, max_messages, options = rest.split("\t")
            store.apply_channel(name, int(max_messages), int(options))
        elif kind == "d":
            store.apply_remove(rest)
        elif kind == "u":
            store.apply_client(rest)
        elif kind == "x":
            store.apply_forget(rest)
        elif kind == "r":
            kind, value, at, until = rest.split("\t")
            store.apply_revoke(kind, value, float(at), float(until))
        elif kind == "j" or kind == "l":
            name, kind, user, info, text = rest.split("\t", 4)
            store.apply_presence(name, kind, user, info or None, text)
        store.apply_counter(position)
        self.advance(position)

    def apply_pushed(self, position, name, text, ephemeral=False):
        store = self.store
        reached = store.apply_push(store.channels.get(name), position, text,
                                   ephemeral)
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

    async def load_presence(self, name):
        store = self.store
        members, window, dropped = await asyncio.gather(
            self.client.execute("HGETALL", store.key("pm:", name)),
            self.client.execute("LRANGE", store.key("pw:", name), 0, -1),
            self.client.execute("HGET", store.key("c:", name), "pdropped"))
        for text in window:
            entry = json.loads(text)
            store.apply_presence(name, entry["event"], entry["from"],
                                 None, text.decode())
        presence = store.presence[name]
        presence.members = {user.decode(): info.decode() or None for
                            user, info in zip(members[::2], members[1::2])}
        presence.dropped_id = max(presence.dropped_id, int(dropped or 0))

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
        names, clients, revoked = await asyncio.gather(
            execute("ZRANGE", k["channels"], 0, -1),
            execute("ZRANGE", k["clients"], 0, -1),
            execute("HGETALL", k["revoked"]))
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
                                          int(sessions), int(dropped or 0))
            for text in history:
                text = text.decode()
                store.apply_push(channel, message_id_of(text), text)
            if channel.options & PRESENCE:
                await self.load_presence(name)
        clients = {c.decode() for c in clients}
        for client_id in [c for c in store.clients if c not in clients]:
            store.apply_forget(client_id)
        for client_id in clients:
            store.apply_client(client_id)
        for field, times in zip(revoked[::2], revoked[1::2]):
            kind, value = field.decode().split("\t")
            at, until = times.split(b"\t")
            store.apply_revoke(kind, value, float(at), float(until))
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
        self.waiting = []                # (name, content, sender, mode, future)
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

    def add(self, name, content, sender, ephemeral):
        """A future of (id, instances), or an exception to raise."""
        future = self.store.loop.create_future()
        if not self.waiting:
            self.store.loop.call_soon(self.send)
        self.waiting.append((name, json.dumps(content).encode(),
                             b"" if sender is None else json.dumps(sender).encode(),
                             b"e" if ephemeral else b"p", future))
        return future

    def send(self, batch=None, script=False):
        """Send the pushes waiting (or ``batch`` again, with the script's
        text when Redis did not know it)."""
        if batch is None:
            batch, self.waiting = self.waiting, []
        while batch:
            count = size = 0
            for _, content, _, _, _ in batch[:REDIS_PUSH_BATCH]:
                if count and size + len(content) > REDIS_PUSH_BYTES:
                    break
                count += 1
                size += len(content)
            some, batch = batch[:count], batch[count:]
            try:
                reply = self.client.send(self.command(some, script))
            except RedisError as e:
                self.fail(some, e)
                continue
            self.replica.writing += 1
            reply.add_done_callback(
                lambda reply, some=some: self.answered(some, reply))

    def command(self, some, script):
        names = [push[0].encode() for push in some]
        key_length = self.key_length
        floor = b"%d" % self.store.floor()
        numkeys = b"%d" % (3 + 2 * len(some))
        body = REDIS_PUSH.encode() if script else self.sha
        return b"".join((
            b"*%d\r\n" % (9 + 6 * len(some)),
            b"$4\r\nEVAL\r\n" if script else b"$7\r\nEVALSHA\r\n",
            b"$%d\r\n%b\r\n" % (len(body), body),
            b"$%d\r\n%b\r\n" % (len(numkeys), numkeys),
            self.keys,
            *[self.channel_keys % (key_length + len(name), name,
                                   key_length + len(name), name)
              for name in names],
            b"$%d\r\n%b\r\n" % (len(floor), floor),
            self.limits,
            *[b"$%d\r\n%b\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n$1\r\n%b\r\n" % (
                len(name), name, len(content), content, len(sender), sender,
                mode) for name, (_, content, sender, mode, _)
              in zip(names, some)]))

    def answered(self, batch, reply):
        self.replica.answered()
        try:
            results = reply.result().decode().split("\n")
        except RedisError as e:
            if getattr(e, "code", None) == "NOSCRIPT":
                self.send(batch, script=True)
            else:
                self.fail(batch, e)
            return
        try:
            self.apply(batch, results)
        except Exception:
            # A callback's exception would only be logged: its pushes
            # would wait for ever.
            log.exception("internal error applying pushes")
            for *_, future in batch:
                if not future.done():
                    future.set_exception(
                        HTTPError(500, "Internal server error"))

    def apply(self, batch, results):
        instances = int(results[0])
        replica = self.replica
        for (name, _, _, mode, future), result in zip(batch, results[1:]):
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
                replica.apply_pushed(message_id, name, text, mode == b"e")
            # Its caller may have gone (the client left): applied anyway.
            if not future.done():
                future.set_result((message_id, instances))

    @staticmethod
    def fail(batch, error):
        for *_, future in batch:
            if not future.done():
                # One exception each: raised in many tasks, one instance
                # would collect all their tracebacks.
                future.set_exception(redis_unavailable(error))


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

    kind = "redis"

    def __init__(self, config, loop):
        super().__init__(config, loop)
        prefix = self.prefix = config.redis_prefix
        self.k = {name: prefix + name for name in (
            "id", "log", "epoch", "channels", "clients", "instances",
            "revoked", "gone")}
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
        self.moved = {}                  # (channel, user) -> (info, seen)
        self.telling = set()             # presence scripts under way
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
            # Gone: pushes elsewhere stop counting this instance at once,
            # and its readers leave after the grace, unless they came back.
            try:
                # Shutdown has closed every poll and stream: what they
                # told is sent now, and waited for.
                self.send_presence()
                await asyncio.gather(*self.telling, return_exceptions=True)
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
        if self.presence:
            self.loop.call_soon(self.send_presence, True)
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
        except RedisError as e:
            raise redis_unavailable(e, script is not None) from None

    async def instances(self):
        try:
            seen = await self.run(None, ["ZRANGE", self.k["instances"], 0,
                                         -1, "WITHSCORES"], ())
        except HTTPError:
            return []
        now = time.time() * 1000
        return [(name.decode(), max(0.0, (now - float(ms)) / 1000),
                 name.decode() == self.instance)
                for name, ms in zip(seen[::2], seen[1::2])]

    async def catch_up(self):
        try:
            tail = await self.run(None, ["GET", self.k["id"]], ())
        except HTTPError:
            return False
        return await self.replica.applied(int(tail or 0))

    # -- writes -------------------------------------------------------------

    async def add_channel(self, name, max_messages, options):
        await self.change(REDIS_ADD_CHANNEL, [
            self.k["id"], self.k["log"], self.k["channels"],
            self.key("c:", name)],
            [self.floor(), name, max_messages, options, self.ttl],
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

    async def push(self, name, content, sender=None, ephemeral=False):
        self.check_connected()
        message_id, instances = await self.pushes.add(name, content, sender,
                                                      ephemeral)
        replica = self.replica
        if replica.position is None or replica.position < message_id:
            await replica.applied(message_id)
        self.pushed += 1
        return Pushed(message_id, replica.reached.pop(message_id, 0),
                      instances)

    # -- presence: decided in Redis, for every instance ----------------------

    def presence_moved(self, name, user, info, seen=False):
        # The changes of one turn of the loop go in one script, with the
        # counts they leave (a reconnect within the turn changes nothing).
        if not self.moved:
            self.loop.call_soon(self.send_presence)  # once per turn
        old = self.moved.get((name, user))
        self.moved[(name, user)] = (info, seen or old is not None and old[1])

    def send_presence(self, everyone=False):
        """Tell Redis this instance's counts of the users that moved (or of
        every user here: after a reconnect, or when taken for dead)."""
        moved, self.moved = self.moved, {}
        if everyone:
            for name, presence in self.presence.items():
                for user in presence.connections:
                    moved.setdefault((name, user), (None, False))
        args = [self.floor(), self.prefix]
        for (name, user), (info, seen) in moved.items():
            presence = self.presence.get(name)
            if presence is not None:
                args += [name, user, info or "", presence.connections.get(
                    user, 0), int(seen)]
        if len(args) > 2:
            task = self.loop.create_task(self.run_presence(args))
            self.telling.add(task)
            task.add_done_callback(self.telling.discard)

    async def run_presence(self, args):
        try:
            await self.run(REDIS_PRESENCE, [
                self.k["id"], self.k["log"], self.k["gone"],
                self.key("pi:", self.instance)], args)
        except HTTPError as e:
            # Told again, every count, once Redis is back (connected()).
            log.warning("redis: presence not told: %s", e.message)

    def sweep_presence(self, now):
        pass                             # decided in Redis (housekeeping)

    async def presence_counts(self, name):
        counts, anonymous = await asyncio.gather(
            self.run(None, ["HGETALL", self.key("pc:", name)], ()),
            self.run(None, ["HGETALL", self.key("pa:", name)], ()))
        recent = time.time() * 1000 - REDIS_DEAD_AFTER
        return ({user.decode(): int(count) for user, count
                 in zip(counts[::2], counts[1::2])},
                sum(int(value.split(b"\t")[0]) for value in anonymous[1::2]
                    if float(value.split(b"\t")[1]) > recent))

    async def revoke(self, kind, value, until):
        now = time.time()
        position = await self.run(REDIS_REVOKE, [
            self.k["id"], self.k["log"], self.k["revoked"]],
            [self.floor(), kind, value, "%.6f" % now, "%.6f" % until,
             "%.6f" % now, MAX_REVOCATIONS,
             int((MAX_REVOCATION_TIME + 24 * 3600) * 1000)])
        if position == -3:
            raise unavailable(f"{MAX_REVOCATIONS} revocations are in force")
        await self.replica.applied(position)

    async def remove_channel(self, name):
        removed = await self.run(REDIS_REMOVE_CHANNEL, [
            self.k["id"], self.k["log"], self.k["channels"],
            self.key("c:", name), self.key("h:", name)],
            [self.floor(), name, self.prefix])
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
        """Tell Redis what was read here (held polls and open streams
        count) and let it expire what nobody read (housekeeping)."""
        await super().expire(now, reading)
        if self.client.connected and (self.housekeeping_task is None or
                                      self.housekeeping_task.done()):
            self.housekeeping_task = self.loop.create_task(self.housekeeping())
        # Push counts of entries applied here but pushed elsewhere.
        if len(self.replica.reached) > 10_000:
            self.replica.reached.clear()

    def expired(self, client_ids, channels, now):
        # Decided in Redis: locally they are only moved along (not told
        # as read), so that each is looked at once per timeout.
        for client_id in client_ids:
            Core.touch_client(self, client_id, now)
        for channel in channels:
            Core.touch_channel(self, channel, now)
        return True

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
                    break
            taken_for_dead = await self.run(REDIS_PRESENCE_SWEEP, [
                self.k["id"], self.k["log"], self.k["gone"],
                self.k["instances"]], [
                self.floor(), self.prefix, self.instance,
                int(config.presence_grace * 1000), REDIS_DEAD_AFTER,
                REDIS_EXPIRE_BATCH, *[item for name, presence in
                                      self.presence.items() for item in
                                      (name, presence.anonymous)]], check)
            if taken_for_dead:
                self.send_presence(everyone=True)
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


_TEXT = operator.itemgetter(1)           # the JSON of a retained (id, text)


def event_bytes(channel, message_id, text, kind=None):
    """A message as one EventSource event (the JSON gains its channel); a
    join or leave entry has its ``event:`` line, so onmessage skips it."""
    event = "" if kind is None else f"event: {kind}\n"
    return (f'{event}id: {message_id}\ndata: {{"channel": {channel.key}, '
            f'{text[1:]}\n\n').encode()


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
            text = hub.read_text(self.channels, self.since, cache.get(Poll))
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
            data = cache[Stream] = event_bytes(channel, message_id, text,
                                               cache.get(Presence))
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
        if transport.is_closing():
            return                       # gone; released when noticed
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


class Reads:
    """What a reader may read and the replies it gets: its channels, their
    messages (with a presence channel's join and leave entries) after its
    cursor, the busiest channels.  Part of Hub."""

    async def view(self, names, since, client_id, claims=None, touch=True):
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
                return self.readable(names, client_id, claims, touch), since
            except APIError:
                await store.catch_up()
                return self.readable(names, client_id, claims, touch), since
        caught_up = await store.catch_up()
        return self.readable(names, client_id, claims, touch), \
            min(since, store.last_id) if caught_up else since

    def readable(self, names, client_id, claims=None, touch=True):
        """The channels of ``names`` that this reader may read (touched as
        read, unless ``touch`` is false): a session channel with a
        registered client, a private one with a token whose subscribe
        covers it."""
        store = self.store
        now = self.loop.time()
        if client_id is not None:
            if client_id not in store.clients:
                raise APIError(UNREGISTERED_CLIENT, "Unregistered client_id")
            if touch:
                store.touch_client(client_id, now)
        channels = []
        for name in names:
            channel = store.channels.get(name)
            if channel is None:
                # Existing names were checked when registered; an unknown
                # one is left out, unless no channel could have it.
                check_id(name, "channel id", channel=True)
            elif not channel.options or (
                    client_id is not None or not channel.options & SESSIONS
            ) and (not channel.options & PRIVATE or claims is not None and
                   claims.subscribe.covers(name)):
                if touch:
                    store.touch_channel(channel, now)
                channels.append(channel)
        if not channels:
            raise APIError(NO_CHANNEL, "No valid channels")
        return tuple(channels)

    def read_text(self, channels, since, passing=None):
        """The JSON reply of a read, or None when there is nothing newer;
        ``passing`` is an ephemeral message (channel, id, text), the newest
        of its channel, in no history."""
        parts = []
        lost = []
        empty = True
        for channel in channels:
            if channel.options & PRESENCE or passing is not None:
                newer = channel.since(since)
                if channel.options & PRESENCE:
                    newer, dropped = self.with_presence(channel, since, newer)
                else:
                    dropped = channel.dropped_id
                texts = [entry[1] for entry in newer]
                if newer:
                    empty = False
                    if since and dropped > since:
                        lost.append(channel.key)
                if passing is not None and passing[0] is channel and \
                        passing[1] > since:
                    texts.append(passing[2])
                    empty = False
                parts.append(self.part(channel, texts))
                continue
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

    def busiest(self, count):
        """The ``count`` channels with the most readers: (channel, readers,
        pushes since they had readers)."""
        return [(channel, len(channel.waiters), pushes) for channel, pushes
                in heapq.nlargest(count, self.busy.items(),
                                  key=lambda item: len(item[0].waiters))]

    def with_presence(self, channel, since, messages):
        """A presence channel's messages and its join and leave entries
        after ``since``, in id order, and the newest id either window
        dropped."""
        presence = self.store.presence[channel.name]
        entries = presence.since(since)
        if entries:
            messages = sorted(messages + entries, key=lambda e: e[0])
        return messages, max(channel.dropped_id, presence.dropped_id)

    @staticmethod
    def part(channel, texts=()):
        """A channel's entry in a reply's "messages"."""
        return channel.key + ": [" + ", ".join(texts) + "]"

    def reply_text(self, since, parts, lost=()):
        """A read's reply, the hottest text: formatted directly (an
        f-string) rather than through a dict."""
        lost = f', "lost": [{", ".join(lost)}]' if lost else ""
        last_id = self.store.last_id
        # A cursor ahead of this instance (see view) is kept, not sent back.
        if last_id < since:
            last_id = since
        return (f'{{"return_code": 1, "error_message": "", "since": {since}, '
                f'"last_id": {last_id}, "messages": {{{", ".join(parts)}}}'
                f'{lost}}}')

    def empty_text(self, channels, since):
        """A read's reply with every list empty."""
        return self.reply_text(since, [self.part(c) for c in channels])


class ReadersOfNote:
    """Waiters that matter beyond their messages: who reads a presence
    channel, and the waiters whose token expires or is revoked.  Part of
    Hub.

    A reader of a presence channel is its token's sub, else its client_id
    on a session channel, else anonymous (counted, never listed).  The hub
    counts the connections here and tells the store when a user's count
    here goes from 0 to 1 or back (or when it reads without waiting); the
    store decides the joins and leaves (for one process, or in Redis for
    all)."""

    def revoked(self, kind, value, at):
        """A revocation was stored: its tokens' polls and streams end."""
        for waiter, (claims, _) in list(self.holders.items()):
            if kind == "jti" and claims.jti == value or kind == "sub" and \
                    claims.sub == value and (claims.iat is None or
                                             claims.iat < at):
                self.token_ended(waiter, "revoked")

    def token_ended(self, waiter, reason):
        """A waiter's token expired or was revoked: a poll is answered
        -4, a stream told (``event: expired`` or ``revoked``) and closed.
        The page goes on from its cursor with a new token."""
        if waiter.conn.held is not waiter:
            return
        if waiter.__class__ is Poll:
            self.answer(waiter, error_text(TOKEN_REFUSED,
                                           f"Refused: token {reason}"))
        else:
            waiter.send(self, b"event: %s\ndata: {}\n\n" % reason.encode())
            self.end_stream(waiter)

    @staticmethod
    def user_of(channel, client_id, claims):
        if claims is not None and claims.sub is not None:
            return claims.sub, claims.info_json
        if client_id is not None and channel.options & SESSIONS:
            return client_id, None
        return None, None

    def enter(self, channel, client_id, claims):
        presence = self.store.presence[channel.name]
        user, info = self.user_of(channel, client_id, claims)
        if user is None:
            presence.anonymous += 1
            return
        count = presence.connections.get(user, 0)
        presence.connections[user] = count + 1
        if not count:
            self.store.presence_moved(channel.name, user, info)

    def leave(self, channel, client_id, claims):
        presence = self.store.presence.get(channel.name)
        if presence is None:
            return                       # the channel is gone
        user, info = self.user_of(channel, client_id, claims)
        if user is None:
            presence.anonymous -= 1
            return
        count = presence.connections.get(user, 0) - 1
        if count > 0:
            presence.connections[user] = count
        else:
            presence.connections.pop(user, None)
            self.store.presence_moved(channel.name, user, info)

    def seen(self, channels, client_id, claims):
        """A read answered at once counts as a connection that has just
        closed: present for the grace."""
        for channel in channels:
            if channel.options & PRESENCE:
                user, info = self.user_of(channel, client_id, claims)
                if user is not None and \
                        user not in self.store.presence[
                            channel.name].connections:
                    self.store.presence_moved(channel.name, user, info,
                                              seen=True)


class Hub(Reads, ReadersOfNote):
    """Delivery: who waits for which channel, in front of the store that
    keeps the messages.  Routes read through the hub and write to the
    store."""

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
        # Waiters that read with a token -> (its claims, the timer that
        # ends them when it expires, or None).
        self.holders = {}
        # Channels with readers -> pushes since they had them, for the
        # dashboard's busiest channels (a million idle ones are not looked
        # at: only transitions and pushes to read channels touch this).
        self.busy = {}

    @property
    def last_id(self):
        return self.store.last_id

    # -- told by the store --------------------------------------------------

    def deliver(self, channel, message_id, text, ephemeral=False, kind=None):
        """A message (or a join or leave entry, of ``kind``) was stored, or
        is passing (ephemeral): every waiter on its channel gets it."""
        # Waiters that get the same bytes share them; an ephemeral message
        # is in no history, so polls are told of it here.
        cache = {Poll: (channel, message_id, text)} if ephemeral else {}
        if kind is not None:
            cache[Presence] = kind
        self.busy[channel] += 1
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
        self.busy.pop(channel, None)

    # -- waiters ------------------------------------------------------------

    def attach(self, waiter, claims=None):
        if claims is not None:
            expiry = claims.expiry()
            timer = None
            if expiry is not None:
                # A poll times out first, unless its token is about to
                # expire: only that one costs a timer.
                when = self.loop.time() + expiry - time.time()
                if waiter.__class__ is Stream or \
                        when < self.loop.time() + self.config.poll_timeout:
                    timer = self.loop.call_at(when, self.token_ended, waiter,
                                              "expired")
            self.holders[waiter] = (claims, timer)
        for channel in waiter.channels:
            if channel.waiters is None:
                channel.waiters = {}
                self.busy[channel] = 0
            channel.waiters[waiter] = None
            if channel.options & PRESENCE:
                self.enter(channel, waiter.client_id, claims)
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
        claims = self.holders.get(waiter, (None,))[0] if self.holders else None
        for channel in waiter.channels:
            waiters = channel.waiters
            del waiters[waiter]
            if not waiters:
                channel.waiters = None
                self.busy.pop(channel, None)
            if channel.options & PRESENCE:
                self.leave(channel, waiter.client_id, claims)
            # Polls answered by one push share ``now``: one touch does.
            if channel.last_read != now and \
                    store.channels.get(channel.name) is channel:
                store.touch_channel(channel, now)
        if self.holders:
            held = self.holders.pop(waiter, None)
            if held is not None and held[1] is not None:
                held[1].cancel()
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

    def hold(self, poll, claims=None):
        # Answered by the sweep that follows the deadline, so never later
        # than --poll-timeout.
        self.polls.add(poll, self.loop.time() + self.config.poll_timeout -
                       self.sweep_interval)
        self.attach(poll, claims)

    def answer(self, poll, text):
        """Send a held poll its reply (a JSON text) and forget it."""
        self.release(poll)
        conn = poll.conn
        conn.finish_poll(conn.poll_reply(poll.callback, text))

    def time_out(self, poll):
        self.answer(poll, self.empty_text(poll.channels, poll.since))

    def sweep(self):
        now = self.loop.time()
        for poll in self.polls.expired(now):
            self.time_out(poll)
        if self.store.presence:
            self.store.sweep_presence(now)
        self.sweeper = self.loop.call_later(self.sweep_interval, self.sweep)

    def open_stream(self, conn, channels, cursor, client_id, claims=None):
        """Start a stream; returns the opening replay, a list of event
        bytes: ``lost`` first where history was dropped, then what is
        retained after the cursor, oldest first."""
        stream = Stream(conn, channels, client_id, cursor)
        lost = []
        replay = []
        for channel in channels:
            newer = channel.since(cursor)
            if channel.options & PRESENCE:
                newer, dropped = self.with_presence(channel, cursor, newer)
            else:
                dropped = channel.dropped_id
            if cursor and dropped > cursor:
                lost.append(channel.key)
            replay += [(entry, channel) for entry in newer]
        if len(channels) > 1:
            replay.sort(key=lambda item: item[0][0])
        events = [event_bytes(channel, entry[0], entry[1],
                              entry[2] if len(entry) > 2 else None)
                  for entry, channel in replay]
        if lost:
            events.insert(0, b'event: lost\ndata: {"channels": [%s]}\n\n'
                          % ", ".join(lost).encode())
        if events:
            stream.backlog = bytearray()
        self.streams.add(stream, self.loop.time() + self.config.sse_heartbeat)
        self.attach(stream, claims)
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

# Who may call a route: anyone; the admin; the admin, or a token whose
# publish claim covers the channel (a push from the browser).
PUBLIC, ADMIN, PUBLISH = "public", "admin", "publish"
FORM_TYPE = "application/x-www-form-urlencoded"

# Path -> {method: (handler, access)}.  A path with a "fmt" group is an API
# resource (JSON or JSON-P, failures as negative return codes) whose
# handler returns a JSON text (None: held); the others build their whole
# reply.  HEAD goes wherever GET goes.  Status and metrics exist with
# --enable-status.
ROUTES = {
    r"/channels/(?P<names>[^/]*)\.(?P<fmt>jsonp?)": {
        "GET": ("read", PUBLIC), "POST": ("push", PUBLISH),
        "DELETE": ("delete", ADMIN), "OPTIONS": ("preflight", PUBLIC)},
    r"/channels/(?P<names>[^/]*)/presence\.(?P<fmt>jsonp?)": {
        "GET": ("presence", PUBLIC)},
    r"/channels/(?P<names>[^/]*)\.sse": {
        "GET": ("stream", PUBLIC), "OPTIONS": ("preflight", PUBLIC)},
    r"/channels\.(?P<fmt>jsonp?)": {"POST": ("register_channel", ADMIN)},
    r"/clients\.(?P<fmt>jsonp?)": {"POST": ("register_client", ADMIN)},
    r"/tokens/revoke\.(?P<fmt>jsonp?)": {"POST": ("revoke", ADMIN)},
    r"/health\.(?P<fmt>jsonp?)": {"GET": ("health", PUBLIC)},
    r"/(?:status|stats)\.(?P<fmt>jsonp?)": {"GET": ("status", ADMIN)},
    r"/metrics": {"GET": ("metrics", ADMIN)},
    r"/dashboard": {"GET": ("dashboard", PUBLIC)},
    r"/dashboard\.(?P<fmt>jsonp?)": {"GET": ("dashboard_json", ADMIN)},
}
STATUS_ROUTES = {"status", "metrics", "dashboard", "dashboard_json"}

# A stream refused before it starts, and a write with a token (a fetch from
# the browser), get a real HTTP status: a browser's EventSource then stops
# reconnecting, and a page can tell why.
STREAM_REFUSALS = {BAD_PARAMETER: 400, NO_CHANNEL: 404,
                   UNREGISTERED_CLIENT: 403, TOKEN_REFUSED: 401}
# A token write's reply, and its refusals, may be read by any page: the
# token is the credential (no cookie is involved, so no CSRF).
TOKEN_WRITE_CORS = (("Access-Control-Allow-Origin", "*"),
                    ("Access-Control-Expose-Headers", "Retry-After"))

SSE_HEAD = (b"HTTP/1.1 200 OK\r\n"
            b"Content-Type: text/event-stream; charset=utf-8\r\n" + NO_CACHE +
            b"X-Accel-Buffering: no\r\nX-Content-Type-Options: nosniff\r\n" +
            CORS + b"Connection: close\r\n\r\n")
# The comment makes proxies pass the head on at once.
SSE_START = SSE_HEAD + b"retry: %d\n: stream open\n\n" % SSE_RETRY_MS

HELD = "held"                            # a read that now waits

TOKEN_WRITE_EXPOSE = b"Access-Control-Expose-Headers: Retry-After\r\n"

METRICS_TYPE = b"text/plain; version=0.0.4; charset=utf-8"


class RateLimiter:
    """A token bucket per key: ``rate`` a second, up to ``burst`` at once.
    A take costs a dict look-up; prune() (once a second) drops the full
    buckets, so memory follows the active senders."""

    def __init__(self, rate, burst):
        self.rate = rate
        self.burst = burst
        self.buckets = {}                # key -> (tokens, when counted)

    def take(self, key, now):
        """0 when allowed, else the seconds until it would be."""
        tokens, then = self.buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - then) * self.rate)
        if tokens < 1:
            self.buckets[key] = (tokens, now)
            return (1 - tokens) / self.rate
        self.buckets[key] = (tokens - 1, now)
        return 0

    def prune(self, now):
        full = [key for key, (tokens, then) in self.buckets.items()
                if tokens + (now - then) * self.rate >= self.burst]
        for key in full:
            del self.buckets[key]


class Access:
    """Who asks, and what it may do: the admin token, a client on loopback or
    the unix socket, or a signed token judged by itself alone.  Part of App."""

    def credentials(self, request, conn, params, access):
        """Who asks: the claims of the token the request carries (the token
        parameter, or a bearer value of a JWT's form other than the admin
        token), judged by the token alone, from any address; else None.
        An admin route needs the admin token or, without one, a client on
        loopback or the unix socket."""
        token = params.get("token")
        bearer = None
        if token is None:
            scheme, _, bearer = request.headers.get(
                "authorization", "").partition(" ")
            bearer = bearer.strip() if scheme.lower() == "bearer" else None
            if bearer and not self.is_admin(bearer) and \
                    looks_like_token(bearer):
                token = bearer
        if token is not None:
            request.token = token
            claims = self.judge(token, conn)
            if access == ADMIN:
                raise HTTPError(403, "A token gives no admin rights (send "
                                     "the admin token)", close=False)
            return claims
        if access == PUBLIC:
            return None
        if self.token is not None:
            if bearer and self.is_admin(bearer):
                return None
            raise HTTPError(403, "Missing or wrong admin token "
                                 "(Authorization: Bearer ...)", close=False)
        if not conn.local:
            raise HTTPError(403, "Writes are accepted only from loopback and "
                                 "the unix socket; set --admin-token to allow "
                                 "them from elsewhere", close=False)
        return None

    def is_admin(self, credential):
        return self.token is not None and hmac.compare_digest(
            credential.encode(), self.token)

    def judge(self, token, conn):
        """A token's claims, or TokenError (counted, and logged with its
        reason and sub or jti, never the token)."""
        now = time.time()
        try:
            if self.tokens is None:
                raise TokenError("disabled", "no token key is configured")
            claims = self.tokens.check(token, now)
            if self.store.is_revoked(claims, now):
                raise TokenError("revoked", "revoked", claims.sub, claims.jti)
        except TokenError as e:
            self.token_refusals[e.reason] += 1
            who = describe_token(e)
            self.server.client_log.mistake(
                "%s: token refused: %s%s", conn.peer_text(), e.reason,
                f" ({who})" if who else "")
            raise
        return claims

    @staticmethod
    def unauthorized(error):
        return HTTPError(401, f"Refused: token {error.reason}", close=False,
                         headers=[("WWW-Authenticate", "Bearer")],
                         return_code=TOKEN_REFUSED)


class StatusPages:
    """What the server tells about itself: health, the status page, the
    metrics and the dashboard, all from one table of counters.  Part of
    App."""

    async def health(self, request, conn):
        problem = self.hub.store.health()
        if problem is not None:
            raise HTTPError(503, problem, close=False)
        return success_text()

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
            ("tokens_refused", "tokens_refused_total{reason}",
             "Requests refused for their token, by reason.",
             self.token_refusals),
            ("revocations", "revocations", "Token revocations kept.",
             len(store.revoked)),
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

    async def dashboard_json(self, request, conn):
        """What the dashboard shows, in one cheap answer: the figures of
        the status page, the busiest channels, the store, the instances;
        never a list of every channel."""
        hub = self.hub
        store = self.store
        rows = {key: value for key, _, _, value in self.counters()
                if key is not None}
        problem = store.health()
        store_info = {"kind": store.kind, "healthy": problem is None,
                      "problem": problem}
        for key, value in rows.items():
            group, _, name = key.rpartition(".")
            if group in ("state_file", "redis"):
                store_info.setdefault(group, {})[name] = value
        return api_text({
            "return_code": 1, "error_message": "", "time": time.time(),
            "uptime": rows["uptime"], "version": __version__,
            "figures": {
                "connections": rows["connections"],
                "polls_held": rows["polls_held"],
                "streams_open": rows["streams_open"],
                "channels": rows["channels_count"],
                "clients": rows["clients_count"],
                "messages_pushed": rows["messages_pushed"],
                "messages_delivered": rows["messages_delivered"],
                "replies": rows["replies"],
                "connections_refused": rows["connections_refused"]},
            "top": [{"channel": channel.name, "readers": readers,
                     "messages": len(channel.messages or ()),
                     "pushes": pushes}
                    for channel, readers, pushes in hub.busiest(TOP_CHANNELS)],
            "store": store_info,
            "instances": [{"instance": name, "seen": round(seen, 1),
                           "self": own}
                          for name, seen, own in await store.instances()],
        })

    async def dashboard(self, request, conn):
        return 200, b"text/html; charset=utf-8", DASHBOARD_PAGE, False, \
            DASHBOARD_HEADERS


class Writes:
    """The writes: registering channels and clients, pushes (the admin's,
    or a page's with its token), deletions, revocations.  Part of App."""

    @staticmethod
    def flag(params, name):
        word = params.get(name, "0").lower()
        if word not in TRUE_WORDS and word not in FALSE_WORDS:
            raise APIError(BAD_PARAMETER, f"Invalid {name}: use 1 or 0")
        return word in TRUE_WORDS

    async def register_channel(self, request, conn):
        params = request.params
        name = check_id(params.get("channel_id"), "channel_id", channel=True)
        options = SESSIONS * self.flag(params, "use_sessions") | \
            PRIVATE * self.flag(params, "private") | \
            PRESENCE * self.flag(params, "presence")
        if options & PRIVATE and self.tokens is None:
            raise APIError(BAD_PARAMETER, "private=1 needs tokens: start the "
                                          "server with --token-key-file")
        if options & (SESSIONS | PRIVATE) == SESSIONS | PRIVATE:
            raise APIError(BAD_PARAMETER, "A channel cannot be both private "
                                          "and use_sessions")
        max_messages = self.config.messages_per_channel
        if "max_messages" in params:
            max_messages = parse_count(params["max_messages"], "max_messages",
                                       1)
            if max_messages > MAX_MESSAGES_PARAM:
                raise APIError(BAD_PARAMETER, "Invalid max_messages: above "
                                              f"{MAX_MESSAGES_PARAM}")
        await self.store.add_channel(name, max_messages, options)
        return success_text(channel_id=name)

    async def register_client(self, request, conn):
        client_id = check_id(request.params.get("client_id"), "client_id")
        await self.store.add_client(client_id)
        return success_text(client_id=client_id)

    async def push(self, request, conn):
        params = request.params
        name = decode_segment(request.match["names"])
        content = params.get("content")
        sender = params.get("from")
        ephemeral = "ephemeral" in params and self.flag(params, "ephemeral")
        claims = request.claims
        if claims is not None:
            sender = self.token_sender(claims, name, content, sender)
        elif sender is not None:
            check_id(sender, "from")     # a backend relaying for a user
        if content is None:
            self.store.channel(name)     # a missing channel is told first
            raise APIError(BAD_PARAMETER, "Missing content")
        pushed = await self.store.push(name, content, sender, ephemeral)
        if claims is not None:
            # A publisher is not told how many read a channel.
            return ('{"return_code": 1, "error_message": "", "message_id": '
                    '%d}' % pushed.id)
        return self.pushed_text(pushed)

    @staticmethod
    def pushed_text(pushed):
        """An admin push's reply, formatted directly (the hottest write)."""
        message_id, delivered, instances = pushed
        instances = "" if instances is None else \
            f', "instances": {instances}'
        return (f'{{"return_code": 1, "error_message": "", "message_id": '
                f'{message_id}, "delivered": {delivered}{instances}}}')

    def token_sender(self, claims, name, content, sender):
        """The sender of a push from the browser, once its token may make
        it: a sub, a publish claim that covers the channel, a message within
        --client-max-message, and the sub's rate."""
        if sender is not None:
            raise APIError(BAD_PARAMETER, "from is set by the server from "
                                          "the token's sub")
        if claims.sub is None:
            raise HTTPError(403, "A token without sub cannot publish",
                            close=False)
        if not claims.publish.covers(name):
            self.token_refusals["scope"] += 1
            raise HTTPError(403, "The token's publish claim does not cover "
                                 "this channel", close=False)
        limit = self.config.client_max_message
        if content is not None and len(content) > limit // 4 and \
                len(content.encode()) > limit:
            raise HTTPError(413, f"Message over {limit} bytes", close=False)
        wait = self.senders.take(claims.sub, time.monotonic())
        if wait:
            raise HTTPError(429, f"More than {self.config.client_publish_rate}"
                                 " pushes a second", close=False,
                            headers=[("Retry-After",
                                      "%d" % max(1, math.ceil(wait)))])
        return claims.sub

    async def delete(self, request, conn):
        name = check_id(decode_segment(request.match["names"]), "channel id",
                        channel=True)
        removed = await self.store.remove_channel(name)
        return success_text(2 if removed else 1, channel_id=name,
                            removed=removed)

    async def revoke(self, request, conn):
        params = request.params
        kinds = [kind for kind in ("sub", "jti") if kind in params]
        if len(kinds) != 1:
            raise APIError(BAD_PARAMETER, "Give sub or jti (one of them)")
        kind = kinds[0]
        value = check_id(params[kind], kind)
        longest = int(time.time() + MAX_REVOCATION_TIME)
        until = longest
        if "until" in params:
            until = parse_count(params["until"], "until", 0)
            if until <= time.time():
                raise APIError(BAD_PARAMETER, "Invalid until: in the past")
            until = min(until, longest)
        await self.store.revoke(kind, value, until)
        return success_text(**{kind: value}, until=until)


class Shortcuts:
    """The commonest requests, a read and an admin's push of one channel,
    answered without the general route's steps (parameters in general, the
    hub's view).  Anything else, and every refusal but a token's, goes the
    general way.  Part of App."""

    def short_read(self, request, conn, name, match):
        """A read of one channel, public or private, with nothing but since,
        a JSON-P callback and a token: route()'s reply, HELD, or None when
        the general route must answer."""
        try:
            params = decode_params(request.query, "query string")
        except (HTTPError, APIError):
            return None                  # told by the general route
        since = params.pop("since", "0")
        callback = params.pop("cb", DEFAULT_CALLBACK) \
            if match["fmt"] == "jsonp" else None
        if len(since) > 16 or not since.isdigit() or not since.isascii() or \
                callback is not None and callback_error(callback) or \
                params and (len(params) > 1 or "token" not in params):
            return None
        claims = None
        if params or "authorization" in request.headers:
            try:
                claims = self.credentials(request, conn, params, PUBLIC)
            except TokenError as e:      # judged (and counted) once: here
                return self.framed(error_text(
                    TOKEN_REFUSED, f"Refused: token {e.reason}"), callback)
        since = int(since)
        store = self.store
        channel = store.channels.get(name)
        if channel is None or since > store.last_id or channel.options and (
                channel.options != PRIVATE or claims is None or
                not claims.subscribe.covers(name)):
            return None
        hub = self.hub
        store.touch_channel(channel, hub.loop.time())
        channels = (channel,)
        text = hub.read_text(channels, since) if since < store.last_id \
            else None
        if text is None:
            hub.hold(Poll(conn, channels, since, None, callback), claims)
            return HELD
        return self.framed(text, callback)

    def framed(self, text, callback=None, reading=True):
        """route()'s reply for a JSON text (a read's may be read by any
        page)."""
        content_type, body = frame_body(text, callback,
                                        self.config.quote_json)
        return 200, content_type, body, reading, b""

    def push_content(self, request, conn, name):
        """The content of a push by the admin on loopback with nothing but
        content to a channel that exists, or None when the general route
        must answer.  (route() makes the push: a coroutine less.)"""
        if request.query or name not in self.store.channels or \
                self.token is not None or not conn.local or \
                "authorization" in request.headers:
            return None
        content_type = request.headers.get("content-type")
        if content_type is not None and content_type != FORM_TYPE:
            return None
        try:
            form = request.body.decode("utf-8")
        except UnicodeDecodeError:
            return None
        # One field (a form's "&" is never part of a value): a push with a
        # token in its form goes on before anything is unquoted.
        if "&" in form or not form.startswith("content="):
            return None
        try:
            return decode_params(form, "body")["content"]
        except HTTPError:
            return None


class App(Access, Writes, StatusPages, Shortcuts):
    """Routes a parsed request to the hub and builds the reply.  Every
    handler is a coroutine ``handler(request, conn)``; the route's match,
    parameters and JSON-P callback are on the request."""

    def __init__(self, config, hub, server):
        self.config = config
        self.hub = hub
        self.store = hub.store
        self.server = server
        self.token = config.admin_token.encode() if config.admin_token else None
        self.tokens = config.token_keys and TokenCache(
            config.token_keys, config.token_audience, config.token_issuer)
        self.senders = RateLimiter(config.client_publish_rate,
                                   2 * config.client_publish_rate)
        self.token_refusals = dict.fromkeys(TOKEN_REASONS, 0)
        self.routes = []                 # (pattern, {method: entry})
        self.matched = {}                # path -> (match, {method: entry})
        for path, methods in ROUTES.items():
            entries = {method: (getattr(self, name), access, "(?P<fmt>" in path)
                       for method, (name, access) in methods.items()
                       if config.enable_status or name not in STATUS_ROUTES}
            if "GET" in entries:         # HEAD beside GET, in Allow too
                entries = {m: e for method, e in entries.items() for m in
                           ((method, "HEAD") if method == "GET" else (method,))}
            if entries:
                self.routes.append((re.compile(path), entries))

    def match(self, path):
        """(The route's match, its methods, and the channel's name when the
        path is the channel resource with one plain name, which takes the
        short path) for a path; raises 404."""
        found = self.matched.get(path)
        if found is not None:
            return found
        for pattern, methods in self.routes:
            match = pattern.fullmatch(path)
            if match is not None:
                break
        else:
            raise HTTPError(404, f"No resource at {path[:100]}", close=False)
        # The channel resource (the reads' route) with one plain name.
        name = match["names"] if "GET" in methods and \
            methods["GET"][0] == self.read else None
        if name is not None and ("%" in name or "|" in name):
            name = None
        found = match, methods, name
        # Most requests go to paths seen before (a channel's readers, its
        # publisher): each is matched once while the cache holds it.
        if len(path) <= MATCHED_PATH_BYTES:
            if len(self.matched) >= MATCHED_PATHS:
                self.matched.clear()
            self.matched[path] = found
        return found

    async def route(self, request, conn):
        """The reply: (status, content type, body, cors, extra headers), or
        None when a read is held or a stream is open.  Raises HTTPError."""
        match, methods, name = self.match(request.path)
        method = request.method
        if name is not None:
            # The commonest requests, on a short path when they have the
            # common shape (see Shortcuts).
            if method == "GET":
                reply = self.short_read(request, conn, name, match)
                if reply is not None:
                    return None if reply is HELD else reply
            elif method == "POST" and match["fmt"] == "json":
                content = self.push_content(request, conn, name)
                if content is not None:
                    try:
                        text = self.pushed_text(
                            await self.store.push(name, content))
                    except APIError as e:
                        text = error_text(e.return_code, e.message)
                    return self.framed(text, reading=False)
        entry = methods.get(method)
        if entry is None:
            raise HTTPError(405, f"{method} not allowed here", close=False,
                            headers=[("Allow", ", ".join(methods))])
        handler, access, api = entry
        request.match = match
        if not api or method == "OPTIONS":
            if access != PUBLIC:
                try:
                    self.credentials(request, conn, {}, access)
                except TokenError as e:
                    raise self.unauthorized(e) from None
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
            try:
                request.claims = self.credentials(request, conn, params,
                                                  access)
                text = await handler(request, conn)
            except TokenError as e:
                if not reading:
                    raise self.unauthorized(e) from None
                raise APIError(TOKEN_REFUSED, f"Refused: token {e.reason}") \
                    from None
            except APIError as e:
                if request.token is None or reading:
                    raise
                raise HTTPError(STREAM_REFUSALS[e.return_code], e.message,
                                close=False, return_code=e.return_code) \
                    from None
            if text is None:
                return None              # held
        except APIError as e:
            text = error_text(e.return_code, e.message)
        except HTTPError as e:
            if request.token is not None and not reading:
                e.headers = [*e.headers, *TOKEN_WRITE_CORS]
            raise
        content_type, body = frame_body(text, callback, self.config.quote_json)
        if request.token is not None and not reading:
            return 200, content_type, body, True, TOKEN_WRITE_EXPOSE
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

    async def read(self, request, conn):
        params = request.params
        since = params.get("since")
        client_id = self.client_id(params)
        hub = self.hub
        channels, since = await hub.view(
            self.channel_names(request.match),
            0 if since is None else self.cursor(since), client_id,
            request.claims)
        # No await between this check and hold(): a push cannot slip between.
        text = hub.read_text(channels, since) if since < hub.last_id else None
        if text is None and request.method == "HEAD":
            text = hub.empty_text(channels, since)
        if text is not None:
            if hub.store.presence:
                hub.seen(channels, client_id, request.claims)
            return text
        hub.hold(Poll(conn, channels, since, client_id, request.callback),
                 request.claims)
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
            try:
                claims = self.credentials(request, conn, params, PUBLIC)
            except TokenError as e:
                raise self.unauthorized(e) from None
            channels, cursor = await self.hub.view(names, cursor, client_id,
                                                   claims)
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
                                              client_id, claims)
        conn.send(SSE_START, 200, keep=True)
        await conn.replay(stream, replay)
        return None

    async def preflight(self, request, conn):
        requested = request.headers.get("access-control-request-headers", "")
        methods = next(m for pattern, m in self.routes
                       if pattern is request.match.re)
        # POST is allowed to pages where a token may push (D3).
        allowed = [m for m in methods if m in ("GET", "HEAD", "OPTIONS") or
                   m == "POST" and self.tokens and methods[m][1] == PUBLISH]
        extra = (b"Access-Control-Allow-Methods: %s\r\n"
                 b"Access-Control-Max-Age: 86400\r\n" %
                 ", ".join(allowed).encode())
        # With tokens, Authorization is named ("*" does not cover it).
        headers = ["Authorization", "Content-Type"] if self.tokens else []
        if requested and not requested.strip(TOKEN + ", "):
            known = {h.lower() for h in headers}
            headers += [h for h in map(str.strip, requested.split(","))
                        if h and h.lower() not in known]
        if headers:
            extra += b"Access-Control-Allow-Headers: %s\r\n" % \
                ", ".join(headers).encode()
        return 204, b"text/plain", b"", True, extra

    async def presence(self, request, conn):
        """Who is present on a presence channel now, with the cursor from
        which a reader sees every later join and leave once.  Not a read:
        it keeps nothing alive."""
        name = check_id(decode_segment(request.match["names"]), "channel id",
                        channel=True)
        client_id = self.client_id(request.params)
        channels, _ = await self.hub.view([name], 0, client_id,
                                          request.claims, touch=False)
        presence = self.store.presence.get(name)
        if presence is None:
            raise APIError(NO_CHANNEL, "Not a presence channel")
        connections, anonymous = await self.store.presence_counts(name)
        users = []
        total = 0
        for user, info in presence.members.items():
            count = connections.get(user, 0)
            total += count
            if len(users) < MAX_PRESENCE_LISTED:
                users.append('%s: {"info": %s, "connections": %d}' % (
                    json.dumps(user), "null" if info is None else info,
                    count))
        return ('{"return_code": 1, "error_message": "", "channel": %s, '
                '"members": %d, "connections": %d, "anonymous": %d, '
                '"users": {%s}%s, "last_id": %d}' % (
                    channels[0].key, len(presence.members), total,
                    anonymous, ", ".join(users),
                    ', "truncated": true' if len(presence.members) >
                    MAX_PRESENCE_LISTED else "", self.store.last_id))

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
                 "waiter", "busy", "kept")

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
        # The last request's KeptLines, while nothing is held: the many
        # held polls and streams keep none.
        self.kept = None
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
        request = parse_head(head, self.kept)
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
                # Usually the body came with its head: taken at once.
                request.body = reader.take(length) or \
                    await reader.readexactly(length)
            elif length is None:
                request.body = await read_chunked(reader, max_body)
        except asyncio.LimitOverrunError:
            raise HTTPError(400, "Chunk size line too long") from None
        reply = await server.app.route(request, self)
        if reply is None:
            self.kept = None
            self.busy = False
            # Held, or streaming: keep reading, so a client that leaves is
            # noticed at once.
            return True
        self.kept = request.kept
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
            self.app.senders.prune(time.monotonic())
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
    a("--token-key-file", metavar="PATH",
      help="enable signed tokens (JWT): HMAC secrets and RSA public keys, "
           "one or more (default: the systemd credential token-key)")
    a("--token-audience", metavar="AUD",
      help="accept only tokens whose aud claim holds AUD")
    a("--token-issuer", metavar="ISS",
      help="accept only tokens whose iss claim is ISS")
    a("--presence-grace", type=duration, default=d.presence_grace,
      metavar="S", help="a user stays present S seconds after its last "
                        "connection to a presence channel closed "
                        "(default %(default)s)")
    a("--client-max-message", type=positive, default=d.client_max_message,
      metavar="BYTES", help="largest content of a push made with a token "
                            "(default %(default)s)")
    a("--client-publish-rate", type=positive, default=d.client_publish_rate,
      metavar="N", help="pushes a second one token sub may make, with a burst "
                        "of twice as many (default %(default)s; per instance)")
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
        args.token_keys = token_keys(args.token_key_file)
    except (ValueError, KeyFileError) as e:
        p.error(str(e))
    if args.redis and args.state_file:
        p.error("--redis and --state-file do not go together: Redis keeps "
                "the state (use its persistence, AOF)")
    if not args.redis_prefix:
        p.error("--redis-prefix must not be empty")
    del args.admin_token_file, args.redis_file, args.token_key_file
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


def token_keys(path):
    """The keys of --token-key-file or the systemd credential token-key."""
    if path is None:
        credentials = os.environ.get("CREDENTIALS_DIRECTORY")
        if not credentials or not os.path.exists(
                os.path.join(credentials, "token-key")):
            return None
        path = os.path.join(credentials, "token-key")
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            text = f.read()
    except OSError as e:
        raise ValueError(f"cannot read the token key file {path}: "
                         f"{e.strerror}") from None
    return parse_key_file(text, path)


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


# ===========================================================================
# Lower level: the dashboard's page (GET /dashboard), served as it stands
# ===========================================================================
#
# One self-contained page: HTML with one inline <style> and one inline
# <script>, nothing fetched but "dashboard.json" (a relative URL, so that the
# page keeps working under a path prefix behind nginx).  The page holds no
# data: everything it shows comes from dashboard.json, asked once a second
# (a setTimeout after each answer, so that a slow server is never piled up;
# nothing while the tab is hidden, so that it costs nothing while nobody
# looks).  The 5-minute history of each figure is kept in the page.
#
# The Content-Security-Policy allows the script and the style by their
# SHA-256, computed below from the page's own text at import time, so an
# edit of the page cannot leave a stale hash behind.  A hash covers only the
# elements' text, hence no inline event handler and no style attribute
# anywhere in the page; the script changes the page through the DOM only,
# and inserts user data (channel names, error texts) with textContent.
#
# Kept ASCII-only and free of "//" (no line comments in the script) so that
# a check for absolute URLs ("http://", "https://", "//host") finds nothing.

DASHBOARD_HTML = r"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="color-scheme" content="light dark">
<meta name="referrer" content="no-referrer">
<title>Simple Comet dashboard</title>
<link rel="icon" href="data:,">
<style>
:root {
  color-scheme: light dark;
  --bg: #ffffff; --fg: #1c1e21; --muted: #5d6470; --line: #dde0e5;
  --card: #f6f7f9; --accent: #2f6fdf; --bad: #b42318; --ok: #11734b;
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Noto Sans",
        "DejaVu Sans", sans-serif;
}
@media (prefers-color-scheme: dark) {
  :root {
    --bg: #15171a; --fg: #e4e6ea; --muted: #9aa1ac; --line: #30343b;
    --card: #1d2025; --accent: #6ea2ff; --bad: #ff8b7e; --ok: #6fd19c;
  }
}
[hidden] { display: none !important; }
body { margin: 0 auto; max-width: 76rem; padding: 1rem 1.25rem 2rem;
       background: var(--bg); color: var(--fg); }
header { display: flex; flex-wrap: wrap; align-items: baseline;
         gap: .2rem 1rem; padding-bottom: .6rem;
         border-bottom: 1px solid var(--line); }
h1 { font-size: 1.2rem; margin: 0; font-weight: 650; }
h2 { font-size: .78rem; font-weight: 600; letter-spacing: .05em;
     text-transform: uppercase; color: var(--muted); margin: 1.4rem 0 .5rem; }
h2 small { text-transform: none; letter-spacing: 0; font-weight: 400; }
p { margin: 0; }
#about, #status { color: var(--muted); }
#status { margin-left: auto; }
#error { flex-basis: 100%; color: var(--bad); font-weight: 600; }
main.stale { opacity: .55; }
.figures { display: grid; gap: .5rem;
           grid-template-columns: repeat(5, minmax(0, 1fr)); }
@media (max-width: 62rem) {
  .figures { grid-template-columns: repeat(2, minmax(0, 1fr)); }
}
@media (max-width: 22rem) {
  .figures { grid-template-columns: minmax(0, 1fr); }
}
.fig { padding: .45rem .6rem .55rem; background: var(--card);
       border: 1px solid var(--line); border-radius: 6px; }
.fig .name { display: block; color: var(--muted); font-size: .8rem;
             white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
.fig .line { display: flex; justify-content: space-between;
             align-items: baseline; gap: .5rem; }
.fig .val { font-size: 1.35rem; font-weight: 600; line-height: 1.3;
            font-variant-numeric: tabular-nums; white-space: nowrap; }
.fig .sub { color: var(--muted); font-size: .72rem; text-align: right;
            font-variant-numeric: tabular-nums; }
.fig.alarm .val { color: var(--bad); }
canvas { display: block; width: 100%; height: 2.6rem; margin-top: .3rem; }
.cols { display: grid; grid-template-columns: minmax(0, 3fr) minmax(0, 2fr);
        gap: 0 2rem; }
@media (max-width: 52rem) { .cols { grid-template-columns: minmax(0, 1fr); } }
table { width: 100%; border-collapse: collapse;
        font-variant-numeric: tabular-nums; }
th, td { padding: .28rem .5rem; text-align: left; vertical-align: baseline;
         border-bottom: 1px solid var(--line); }
th { color: var(--muted); font-size: .78rem; font-weight: 600; }
th.n, td.n { text-align: right; white-space: nowrap; }
td.id { overflow-wrap: anywhere; font-family: ui-monospace, "SF Mono",
        Menlo, Consolas, "DejaVu Sans Mono", monospace; font-size: .9em; }
td.none { color: var(--muted); font-style: italic; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: .28rem 1rem;
     margin: 0; }
dt { color: var(--muted); }
dd { margin: 0; overflow-wrap: anywhere; }
.ok { color: var(--ok); font-weight: 600; }
.bad { color: var(--bad); font-weight: 600; }
form { margin: 2rem auto; max-width: 24rem; padding: 1rem 1.2rem;
       background: var(--card); border: 1px solid var(--line);
       border-radius: 6px; }
form p { margin-bottom: .7rem; }
form label { display: block; font-weight: 600; margin-bottom: .25rem; }
form div { display: flex; gap: .5rem; }
input, button { font: inherit; padding: .3rem .55rem; border-radius: 4px;
                border: 1px solid var(--line); background: var(--bg);
                color: var(--fg); }
input { flex: 1; min-width: 0; }
button { cursor: pointer; }
#login-bad { color: var(--bad); }
footer { margin-top: 1.6rem; color: var(--muted); font-size: .8rem; }
footer button { font-size: .8rem; padding: .1rem .45rem; }
</style>
</head>
<body>
<header>
<h1>Simple Comet</h1>
<p id="about"></p>
<p id="status">Connecting&hellip;</p>
<p id="error" role="alert" hidden></p>
</header>

<form id="login" hidden>
<p>This server needs its admin token to show the dashboard. It is kept
for this tab only.</p>
<p id="login-bad" hidden>That token was refused. Try again.</p>
<label for="token">Admin token</label>
<div><input id="token" type="password" autocomplete="off"
 spellcheck="false" required><button type="submit">Show</button></div>
</form>

<main id="main" hidden>
<h2>Figures <small>(last 5 minutes; rates are a second)</small></h2>
<div class="figures" id="figures"></div>
<div class="cols">
<section>
<h2>Channels with the most readers</h2>
<table>
<thead><tr><th>Channel</th><th class="n">Readers</th>
<th class="n">Retained</th><th class="n">Pushes/s</th></tr></thead>
<tbody id="top"></tbody>
</table>
</section>
<section>
<h2>Store</h2>
<dl id="store"></dl>
<div id="instances-box" hidden>
<h2>Instances</h2>
<table>
<thead><tr><th>Instance</th><th class="n">Last seen</th><th></th></tr></thead>
<tbody id="instances"></tbody>
</table>
</div>
</section>
</div>
<footer><button id="forget" type="button" hidden>Forget the token</button>
</footer>
</main>

<script>
(function () {
"use strict";

/* The figures, in the order shown.  A "gauge" is shown as it is; a "rate"
   is a counter (a total since the server started) turned into a rate a
   second: its change between two answers over the change of their "time".
   Refused connections are shown as a rate too, with the total beside it. */
var FIGURES = [
  {key: "connections", label: "Connections", kind: "gauge"},
  {key: "polls_held", label: "Held polls", kind: "gauge"},
  {key: "streams_open", label: "Open streams", kind: "gauge"},
  {key: "channels", label: "Channels", kind: "gauge"},
  {key: "clients", label: "Clients", kind: "gauge"},
  {key: "messages_pushed", label: "Pushes/s", kind: "rate"},
  {key: "messages_delivered", label: "Deliveries/s", kind: "rate"},
  {key: "4xx", label: "4xx replies/s", kind: "rate", reply: true},
  {key: "5xx", label: "5xx replies/s", kind: "rate", reply: true, alarm: true},
  {key: "connections_refused", label: "Refused connections/s", kind: "rate",
   alarm: true, total: true}
];
var POLL_MS = 1000;          /* one answer a second, counted from the last */
var TIMEOUT_MS = 5000;       /* a slower answer counts as none */
var SPAN_S = 300;            /* the charts show the last 5 minutes... */
var MAX_POINTS = 600;        /* ...of at most this many points */
var GAP_S = 3.5;             /* points further apart are not joined */
var TOKEN_KEY = "simple-comet-admin-token";
var DASH = "\u2013";
var KINDS = {memory: "memory", state_file: "state file", redis: "Redis"};

var INT = new Intl.NumberFormat(undefined, {maximumFractionDigits: 0});
var DEC = new Intl.NumberFormat(undefined, {maximumFractionDigits: 1});
var DEC1 = new Intl.NumberFormat(undefined, {minimumFractionDigits: 1,
                                             maximumFractionDigits: 1});

function $(id) { return document.getElementById(id); }
function isNum(v) { return typeof v === "number" && isFinite(v); }
function fmtInt(v) { return isNum(v) ? INT.format(v) : DASH; }
/* Rates keep one decimal below 100 (so that a column of them lines up),
   but an idle 0 stays a plain 0. */
function fmtRate(v) {
  if (!isNum(v)) return DASH;
  return v === 0 ? "0" : (Math.abs(v) < 100 ? DEC1 : INT).format(v);
}
function el(tag, text, cls) {
  var e = document.createElement(tag);
  if (text !== undefined) e.textContent = text;
  if (cls) e.className = cls;
  return e;
}
function fmtBytes(b) {
  if (!isNum(b)) return DASH;
  var units = ["bytes", "KiB", "MiB", "GiB", "TiB"], i = 0, v = b;
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
  return (i ? DEC.format(v) + " " + units[i] + " (" + INT.format(b) + " bytes)"
            : INT.format(b) + " bytes");
}
function fmtDuration(s) {
  if (!isNum(s)) return DASH;
  s = Math.floor(s);
  var d = Math.floor(s / 86400), h = Math.floor(s / 3600) % 24,
      m = Math.floor(s / 60) % 60;
  if (d) return d + " d " + h + " h";
  if (h) return h + " h " + m + " min";
  if (m) return m + " min " + (s % 60) + " s";
  return s + " s";
}

/* The token: in sessionStorage, so it lives as long as the tab and no
   longer; a plain variable where storage is refused. */
var token = null;
try { token = sessionStorage.getItem(TOKEN_KEY); } catch (e) { token = null; }
function keepToken(t) {
  token = t;
  try {
    if (t === null) sessionStorage.removeItem(TOKEN_KEY);
    else sessionStorage.setItem(TOKEN_KEY, t);
  } catch (e) { }
  $("forget").hidden = token === null;
}

/* One card per figure: its name, its value and 5-minute peak, its chart. */
var cards = {};
FIGURES.forEach(function (f) {
  var card = el("div", undefined, "fig"), line = el("div", undefined, "line");
  card.setAttribute("data-figure", f.key);
  card.appendChild(el("span", f.label, "name"));
  var val = line.appendChild(el("span", DASH, "val"));
  var sub = line.appendChild(el("span", "", "sub"));
  var canvas = el("canvas");
  canvas.setAttribute("aria-hidden", "true");
  card.appendChild(line);
  card.appendChild(canvas);
  $("figures").appendChild(card);
  cards[f.key] = {card: card, val: val, sub: sub, canvas: canvas, points: []};
});

function niceCeil(m) {
  if (!(m > 0)) return 1;
  var p = Math.pow(10, Math.floor(Math.log10(m))), n = m / p;
  return (n <= 1 ? 1 : n <= 2 ? 2 : n <= 5 ? 5 : 10) * p;
}

function cssVar(style, name) { return style.getPropertyValue(name).trim(); }

/* A chart: the last SPAN_S seconds of [time, value] points, ending at `now`
   (the server's time of the last answer), from 0 to a round ceiling. */
function draw(c, now, style) {
  var canvas = c.canvas, w = canvas.clientWidth, h = canvas.clientHeight;
  if (!w || !h) return;               /* not laid out (hidden) */
  var dpr = window.devicePixelRatio || 1;
  var W = Math.round(w * dpr), H = Math.round(h * dpr);
  if (canvas.width !== W || canvas.height !== H) {
    canvas.width = W; canvas.height = H;
  }
  var g = canvas.getContext("2d");
  g.setTransform(dpr, 0, 0, dpr, 0, 0);
  g.clearRect(0, 0, w, h);
  var top = 0;
  c.points.forEach(function (p) {
    if (isNum(p[1]) && p[1] > top) top = p[1];
  });
  var ceil = niceCeil(top), pad = 2;   /* the scale: 0 to a round number */
  function x(t) { return w - (now - t) / SPAN_S * w; }
  function y(v) { return h - pad - v / ceil * (h - 2 * pad); }
  g.lineWidth = 1;
  g.strokeStyle = cssVar(style, "--line");
  g.beginPath();
  g.moveTo(0, h - .5); g.lineTo(w, h - .5);
  g.moveTo(0, .5); g.lineTo(w, .5);
  g.stroke();
  /* Runs of points no further apart than GAP_S, each drawn as a line
     over a faint area. */
  var runs = [], run = [], last = null;
  c.points.forEach(function (p) {
    if (!isNum(p[1]) || (last && p[0] - last[0] > GAP_S)) {
      if (run.length) runs.push(run);
      run = [];
    }
    if (isNum(p[1])) run.push(p);
    last = p;
  });
  if (run.length) runs.push(run);
  var accent = cssVar(style, "--accent");
  runs.forEach(function (r) {
    g.beginPath();
    r.forEach(function (p, i) {
      if (i) g.lineTo(x(p[0]), y(p[1])); else g.moveTo(x(p[0]), y(p[1]));
    });
    if (r.length === 1) g.lineTo(x(r[0][0]) + 1.5, y(r[0][1]));
    g.strokeStyle = accent;
    g.lineWidth = 1.5;
    g.stroke();
    g.lineTo(x(r[r.length - 1][0]), h);
    g.lineTo(x(r[0][0]), h);
    g.closePath();
    g.globalAlpha = .14;
    g.fillStyle = accent;
    g.fill();
    g.globalAlpha = 1;
  });
}

var lastNow = null;
function drawAll() {
  if (lastNow === null) return;
  var style = getComputedStyle(document.documentElement);
  FIGURES.forEach(function (f) { draw(cards[f.key], lastNow, style); });
}

/* The previous answer, for the rates. */
var prev = null;

function figureValue(f, figures) {
  var v = f.reply ? (figures.replies || {})[f.key] : figures[f.key];
  return isNum(v) ? v : null;
}

function update(d) {
  var now = +d.time, figures = d.figures || {};
  if (!isNum(now)) throw new Error("no time in the answer");
  /* A clock that went back: the history no longer lines up. */
  if (prev && now < prev.time) {
    FIGURES.forEach(function (f) { cards[f.key].points = []; });
  }
  /* Counters restart from 0 with the server: no rate across a restart. */
  var dt = prev && now > prev.time && !(d.uptime < prev.uptime) ?
      now - prev.time : 0;
  var values = {};
  FIGURES.forEach(function (f) {
    var c = cards[f.key], raw = figureValue(f, figures), v = raw;
    values[f.key] = raw;
    if (f.kind === "rate") {
      var before = prev ? prev.values[f.key] : null;
      v = dt > 0 && raw !== null && before !== null && raw >= before ?
          (raw - before) / dt : null;
    }
    c.points.push([now, v]);
    while (c.points.length > MAX_POINTS ||
           (c.points.length && c.points[0][0] < now - SPAN_S)) {
      c.points.shift();
    }
    var fmt = f.kind === "rate" ? fmtRate : fmtInt, peak = 0;
    c.points.forEach(function (q) {
      if (isNum(q[1]) && q[1] > peak) peak = q[1];
    });
    c.val.textContent = fmt(v);
    c.sub.textContent = (f.total ? "total " + fmtInt(raw) + ", " : "") +
        "peak " + fmt(peak);
    c.card.classList.toggle("alarm", !!(f.alarm && v > 0));
  });
  renderTop(Array.isArray(d.top) ? d.top : [], dt);
  renderStore(d.store || {});
  renderInstances(d.instances);
  prev = {time: now, uptime: d.uptime, values: values,
          pushes: pushesOf(d.top)};
  $("status").textContent = "Updated " + new Date().toLocaleTimeString();
  $("about").textContent = "version " + String(d.version || "") + ", up " +
      fmtDuration(d.uptime);
  $("main").hidden = false;         /* before drawing: charts need a size */
  $("main").classList.remove("stale");
  $("error").hidden = true;
  lastNow = now;
  drawAll();
}

function pushesOf(top) {
  var m = new Map();
  (Array.isArray(top) ? top : []).forEach(function (c) {
    if (c && isNum(c.pushes)) m.set(String(c.channel), c.pushes);
  });
  return m;
}

function renderTop(top, dt) {
  var rows = [];
  top.slice(0, 20).forEach(function (c) {
    if (!c) return;
    var name = String(c.channel), tr = el("tr");
    var before = prev ? prev.pushes.get(name) : undefined;
    var rate = dt > 0 && isNum(before) && isNum(c.pushes) &&
        c.pushes >= before ? (c.pushes - before) / dt : null;
    tr.appendChild(el("td", name, "id"));
    tr.appendChild(el("td", fmtInt(c.readers), "n"));
    tr.appendChild(el("td", fmtInt(c.messages), "n"));
    tr.appendChild(el("td", fmtRate(rate), "n"));
    rows.push(tr);
  });
  if (!rows.length) {
    var tr = el("tr"), td = tr.appendChild(el("td", "No channel has readers.",
                                               "none"));
    td.colSpan = 4;
    rows.push(tr);
  }
  $("top").replaceChildren.apply($("top"), rows);
}

function renderStore(s) {
  var items = [["Kind", KINDS[s.kind] || String(s.kind || DASH)]];
  if (s.healthy && !s.problem) items.push(["Health", "healthy", "ok"]);
  else items.push(["Health", s.problem ? String(s.problem) : "not healthy",
                   "bad"]);
  if (s.state_file) {
    items.push(["State file", fmtBytes(s.state_file.bytes)]);
    items.push(["Compactions", fmtInt(s.state_file.compactions)]);
  }
  if (s.redis) {
    items.push(["Redis", s.redis.connected ? "connected" : "not connected",
                s.redis.connected ? "ok" : "bad"]);
    items.push(["Applied id", s.redis.applied_id === null ||
                s.redis.applied_id === undefined ? DASH :
                String(s.redis.applied_id)]);
    items.push(["Last error", s.redis.last_error ?
                String(s.redis.last_error) : "none"]);
  }
  var nodes = [];
  items.forEach(function (it) {
    nodes.push(el("dt", it[0]));
    nodes.push(el("dd", it[1], it[2]));
  });
  $("store").replaceChildren.apply($("store"), nodes);
}

function renderInstances(list) {
  $("instances-box").hidden = !Array.isArray(list);
  if (!Array.isArray(list)) return;
  var rows = list.map(function (i) {
    var tr = el("tr");
    tr.appendChild(el("td", String(i.instance), "id"));
    tr.appendChild(el("td", isNum(i.seen) ?
        DEC.format(i.seen) + " s ago" : DASH, "n"));
    tr.appendChild(el("td", i.self ? "this one" : ""));
    return tr;
  });
  $("instances").replaceChildren.apply($("instances"), rows);
}

/* No good answer: say so, keep the last figures (dimmed) and keep trying. */
var failingSince = null;
function failed(why) {
  if (failingSince === null) failingSince = new Date();
  $("error").textContent = "Failing since " +
      failingSince.toLocaleTimeString() + ": " + why +
      ". Retrying every second.";
  $("error").hidden = false;
  $("main").classList.add("stale");
}

/* Asking for the token stops the polling until one is given. */
var asking = false;
function askToken(refused) {
  asking = true;
  keepToken(null);
  $("main").hidden = true;
  $("error").hidden = true;
  $("status").textContent = "Admin token needed";
  $("login-bad").hidden = !refused;
  $("login").hidden = false;
  $("token").focus();
}
$("login").addEventListener("submit", function (e) {
  e.preventDefault();
  var t = $("token").value.trim();
  /* A header value must be printable ASCII; fetch would throw on others. */
  if (!/^[!-~]+$/.test(t)) { $("login-bad").hidden = false; return; }
  $("token").value = "";
  keepToken(t);
  $("login").hidden = true;
  asking = false;
  prev = null;
  poll();
});
$("forget").addEventListener("click", function () {
  keepToken(null);
  location.reload();
});

var timer = 0, busy = false;
function schedule() {
  clearTimeout(timer);
  timer = 0;
  if (!document.hidden && !asking) timer = setTimeout(poll, POLL_MS);
}

async function poll() {
  timer = 0;
  if (busy || asking || document.hidden) return;
  busy = true;
  try { await ask(); } finally { busy = false; schedule(); }
}

async function ask() {
  var ctl = new AbortController(), sent = token, reply, text;
  var killer = setTimeout(function () { ctl.abort(); }, TIMEOUT_MS);
  var headers = {Accept: "application/json"};
  if (sent !== null) headers.Authorization = "Bearer " + sent;
  try {
    reply = await fetch("dashboard.json", {cache: "no-store", headers: headers,
                                           signal: ctl.signal});
    text = await reply.text();
  } catch (e) {
    failed(ctl.signal.aborted ? "no answer within " + TIMEOUT_MS / 1000 + " s"
                              : "the server cannot be reached");
    return;
  } finally {
    clearTimeout(killer);
  }
  if (reply.status === 401 || reply.status === 403) {
    askToken(sent !== null);
    return;
  }
  var d = null;
  try { d = JSON.parse(text); } catch (e) { d = null; }
  if (!reply.ok || !d || typeof d !== "object" || !(d.return_code > 0)) {
    var why = "HTTP " + reply.status;
    if (d && d.error_message) why += ", " + String(d.error_message);
    failed(why);
    return;
  }
  try { update(d); } catch (e) { failed("an answer the page cannot read (" +
                                        e.message + ")"); return; }
  failingSince = null;
}

document.addEventListener("visibilitychange", function () {
  if (document.hidden) { clearTimeout(timer); timer = 0; }
  else if (!busy && !timer) poll();
});
window.addEventListener("resize", drawAll);
keepToken(token);
poll();
})();
</script>
</body>
</html>
"""


def _element_text(page, tag):
    """The text of the page's one <tag> element, as the browser hashes it."""
    before, found, rest = page.partition("<%s>" % tag)
    text, closed, _ = rest.partition("</%s>" % tag)
    assert found and closed and ("<%s>" % tag) not in rest, tag
    return text


def _csp_hash(text):
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return "'sha256-%s'" % base64.b64encode(digest).decode("ascii")


# Only the page's own script and style may run; it may talk to its own
# origin only (dashboard.json); the data: image is the empty favicon that
# keeps the browser from asking for /favicon.ico.  No framing, no forms
# posting away, no <base> redirecting its relative URL.
DASHBOARD_CSP = (
    "default-src 'none'; "
    "script-src %s; style-src %s; "
    "connect-src 'self'; img-src 'self' data:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    % (_csp_hash(_element_text(DASHBOARD_HTML, "script")),
       _csp_hash(_element_text(DASHBOARD_HTML, "style"))))

_DASHBOARD_HEADERS = (
    "Content-Security-Policy: %s\r\n"
    "X-Frame-Options: DENY\r\n"           # frame-ancestors, for old browsers
    "Referrer-Policy: no-referrer\r\n" % DASHBOARD_CSP).encode("ascii")


DASHBOARD_PAGE = DASHBOARD_HTML.encode()
DASHBOARD_HEADERS = _DASHBOARD_HEADERS


if __name__ == "__main__":
    sys.exit(main())
