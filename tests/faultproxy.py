"""A small fault-injecting HTTP proxy for tests, in front of a local emulator.

The proxy listens on a free loopback port and forwards every request to an upstream URL (the
Cloud Storage or BigQuery emulator). Clients are pointed at it through their usual variable
(STORAGE_EMULATOR_HOST, BIGQUERY_EMULATOR_HOST): see `proxied()`. `Location` headers and JSON
bodies that name the upstream are rewritten to name the proxy, so that follow-up requests of a
resumable upload (a PUT to the URL the emulator returned) come back through the proxy as well.

Faults are programmed with rules, tried in order for every request:

    proxy.add(Rule(method="PUT", query="upload_id", status=503, times=2))    # two 503s, then pass
    proxy.add(Rule(method="PUT", query="upload_id", reset_after=64 * 1024))  # reset mid-body
    proxy.add(Rule(path=r"/o/", delay=0.5, times=None))                      # slow every object call
    proxy.add(Rule(method="GET", path=r"/o/.+", after=json_patch(md5Hash="AAAA"), times=None))
    proxy.add(gcs_preconditions(proxy))                                     # 412 like real GCS

A rule matches on method, a regular expression searched in the path and a substring of the raw
query. Every matching request counts in `rule.seen`; a rule lets the first `skip` of them pass,
then acts while `times` is not used up (None: always); each action counts in `rule.fired`.
Actions, in this order:
  - `delay`: sleep that many seconds, then go on;
  - `before(request)`: a side effect (it may also change `request.body`), then go on;
  - `reset_after`: read that many body bytes, then reset the TCP connection (nothing forwarded);
  - `status`: answer it without forwarding (`body`: bytes, text or a dict sent as JSON);
  - `respond(request)`: answer what it returns, or go on when it returns None;
  - `reset_after_forward`: forward, then reset instead of answering (the server did the work,
    the client never hears of it).
After forwarding, `after(request, response)` may replace the response (returning None leaves
it, and does not count as fired). The first rule that answers or resets ends the chain.

`proxy.log` records every request (method, path, query, status or "reset", the rules that
acted); `proxy.errors` keeps what a rule's own hook raised (the client got a 500).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import socket
import struct
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailers",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
}

RESET = "reset"


@dataclass
class ProxyRequest:
    method: str
    path: str  # without the query
    query: str  # raw, without "?"
    headers: dict[str, str]  # lower-case names
    body: bytes = b""

    @property
    def target(self) -> str:
        return f"{self.path}?{self.query}" if self.query else self.path

    def query_params(self) -> dict[str, list[str]]:
        return urllib.parse.parse_qs(self.query, keep_blank_values=True)


@dataclass
class ProxyResponse:
    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)

    def json(self) -> Any:
        return json.loads(self.body)

    @classmethod
    def of_json(cls, status: int, doc: Any) -> ProxyResponse:
        return cls(status, [("Content-Type", "application/json; charset=UTF-8")], json.dumps(doc).encode())


@dataclass
class Rule:
    method: str | None = None  # None: any method
    path: str = ""  # regular expression, searched in the path
    query: str = ""  # substring of the raw query
    times: int | None = 1  # how many times the rule acts; None: every matching request
    skip: int = 0  # let this many matching requests pass untouched first
    delay: float = 0.0
    before: Callable[[ProxyRequest], None] | None = None
    reset_after: int | None = None  # body bytes read before the connection is reset
    status: int | None = None
    body: bytes | str | dict | None = None  # with status; a dict is sent as JSON
    respond: Callable[[ProxyRequest], ProxyResponse | None] | None = None
    reset_after_forward: bool = False
    after: Callable[[ProxyRequest, ProxyResponse], ProxyResponse | None] | None = None
    name: str = ""
    seen: int = 0  # matching requests
    fired: int = 0  # times the rule acted

    def matches(self, method: str, path: str, query: str) -> bool:
        if self.method is not None and self.method.upper() != method.upper():
            return False
        return re.search(self.path, path) is not None and self.query in query

    @property
    def exhausted(self) -> bool:
        return self.times is not None and self.fired >= self.times

    def canned(self) -> ProxyResponse:
        status = self.status or 500
        if isinstance(self.body, dict):
            return ProxyResponse.of_json(status, self.body)
        if self.body is None:
            reason = http.client.responses.get(status, "Injected")
            return ProxyResponse.of_json(status, {"error": {"code": status, "message": f"{reason} (fault proxy)"}})
        data = self.body.encode() if isinstance(self.body, str) else self.body
        return ProxyResponse(status, [("Content-Type", "text/plain")], data)


@dataclass
class LoggedRequest:
    method: str
    path: str
    query: str
    status: int | str  # the status sent, or "reset"
    rules: list[str] = field(default_factory=list)  # names of the rules that acted


class _Reset(Exception):
    """Abort the connection with a TCP reset."""


class FaultProxy:
    def __init__(self, upstream: str, *, host: str = "127.0.0.1", timeout: float = 120.0) -> None:
        parsed = urllib.parse.urlsplit(upstream)
        if parsed.scheme != "http" or not parsed.hostname or not parsed.port:
            raise ValueError(f"upstream must be http://host:port, not {upstream!r}")
        self.upstream = f"http://{parsed.hostname}:{parsed.port}"
        self._upstream_addr = (parsed.hostname, parsed.port)
        self.timeout = timeout
        self.rules: list[Rule] = []
        self.log: list[LoggedRequest] = []
        self.errors: list[Exception] = []  # exceptions raised by rule hooks (answered with 500)
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer((host, 0), self._handler_class())
        self._server.daemon_threads = True
        self.url = f"http://{host}:{self._server.server_address[1]}"
        self._thread: threading.Thread | None = None

    # -- lifecycle

    def start(self) -> FaultProxy:
        self._thread = threading.Thread(target=self._server.serve_forever, name="fault-proxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- programming and inspection

    def add(self, rule: Rule) -> Rule:
        with self._lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        """Forget all rules and the log."""
        with self._lock:
            self.rules.clear()
            self.log.clear()

    def requests(self, method: str | None = None, path: str = "", query: str = "") -> list[LoggedRequest]:
        with self._lock:
            logged = list(self.log)
        return [
            r
            for r in logged
            if (method is None or r.method == method.upper()) and re.search(path, r.path) and query in r.query
        ]

    # -- upstream access, for rules and tests (not logged, no rules applied)

    def upstream_request(
        self, method: str, target: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> ProxyResponse:
        conn = http.client.HTTPConnection(*self._upstream_addr, timeout=self.timeout)
        try:
            send_headers = dict(headers or {})
            send_headers["Host"] = f"{self._upstream_addr[0]}:{self._upstream_addr[1]}"
            if body or method.upper() in {"POST", "PUT", "PATCH"}:
                send_headers["Content-Length"] = str(len(body))
            conn.request(method, target, body=body or None, headers=send_headers)
            answer = conn.getresponse()
            data = answer.read()
            return ProxyResponse(answer.status, list(answer.getheaders()), data)
        finally:
            conn.close()

    # -- internals

    def _rewrite(self, response: ProxyResponse) -> ProxyResponse:
        """Make URLs that name the upstream name the proxy (Location, and links in JSON)."""
        up = self.upstream
        alt = up.replace("127.0.0.1", "localhost") if "127.0.0.1" in up else None
        headers = []
        for name, value in response.headers:
            if name.lower() == "location":
                value = value.replace(up, self.url)
                if alt:
                    value = value.replace(alt, self.url)
            headers.append((name, value))
        body = response.body
        content_type = (response.header("content-type") or "").lower()
        if "json" in content_type and body:
            body = body.replace(up.encode(), self.url.encode())
            if alt:
                body = body.replace(alt.encode(), self.url.encode())
        return ProxyResponse(response.status, headers, body)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _read_body(self, limit: int | None = None) -> bytes:
                if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
                    parts = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            break
                        parts.append(self.rfile.read(size))
                        self.rfile.readline()
                        if limit is not None and sum(map(len, parts)) >= limit:
                            break
                    data = b"".join(parts)
                    return data if limit is None else data[:limit]
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length if limit is None else min(limit, length))

            def _reset(self) -> None:
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.connection.close()

            def _send(self, response: ProxyResponse, head_only: bool) -> None:
                self.send_response(response.status)
                for name, value in response.headers:
                    if name.lower() not in HOP_BY_HOP and name.lower() not in {"date", "server"}:
                        self.send_header(name, value)
                no_body = head_only or response.status in (204, 304) or 100 <= response.status < 200
                self.send_header("Content-Length", "0" if no_body else str(len(response.body)))
                self.end_headers()
                if not no_body:
                    self.wfile.write(response.body)

            def _handle(self) -> None:
                path, _, query = self.path.partition("?")
                if self.path.startswith("http://") or self.path.startswith("https://"):
                    split = urllib.parse.urlsplit(self.path)
                    path, query = split.path, split.query
                request = ProxyRequest(self.command, path, query, {k.lower(): v for k, v in self.headers.items()}, b"")
                body_read = False

                def body() -> bytes:
                    nonlocal body_read
                    if not body_read:
                        request.body = self._read_body()
                        body_read = True
                    return request.body

                entry = self._entry = LoggedRequest(self.command, path, query, 0)
                with proxy._lock:
                    proxy.log.append(entry)
                    matching = [r for r in proxy.rules if r.matches(self.command, path, query)]
                    for rule in matching:
                        rule.seen += 1
                acted: list[Rule] = []
                answer: ProxyResponse | None = None
                reset_after_forward = False
                counted: set[int] = set()

                def act(rule: Rule) -> None:
                    if id(rule) in counted:
                        return
                    counted.add(id(rule))
                    with proxy._lock:
                        rule.fired += 1
                    entry.rules.append(rule.name or rule.path or "*")

                for rule in matching:
                    with proxy._lock:
                        if rule.exhausted or rule.seen <= rule.skip:
                            continue
                    if rule.reset_after is not None:
                        if not body_read:
                            self._read_body(limit=rule.reset_after)
                        act(rule)
                        raise _Reset
                    if rule.delay:
                        time.sleep(rule.delay)
                        act(rule)
                    if rule.before is not None:
                        body()
                        rule.before(request)
                        act(rule)
                    if rule.status is not None:
                        body()
                        act(rule)
                        answer = rule.canned()
                        break
                    if rule.respond is not None:
                        body()
                        answer = rule.respond(request)
                        if answer is not None:
                            act(rule)
                            break
                    if rule.reset_after_forward:
                        act(rule)
                        reset_after_forward = True
                        break
                    if rule.after is not None:
                        acted.append(rule)

                if answer is None:
                    forward_headers = {
                        k: v
                        for k, v in self.headers.items()
                        if k.lower() not in HOP_BY_HOP and k.lower() != "accept-encoding"
                    }
                    try:
                        upstream = proxy.upstream_request(self.command, request.target, body(), forward_headers)
                    except OSError as err:  # the upstream is down or hung up: answer like a gateway
                        upstream = ProxyResponse.of_json(502, {"error": {"code": 502, "message": str(err)}})
                    if reset_after_forward:
                        raise _Reset
                    answer = proxy._rewrite(upstream)
                    for rule in acted:
                        with proxy._lock:
                            if rule.exhausted:
                                continue
                        changed = rule.after(request, answer)  # type: ignore[misc]
                        if changed is not None:
                            act(rule)
                            answer = changed
                else:
                    body()
                entry.status = answer.status
                if self.headers.get("Connection", "").lower() == "close":
                    self.close_connection = True
                self._send(answer, head_only=self.command == "HEAD")

            def _dispatch(self) -> None:
                try:
                    self._handle()
                except _Reset:
                    self._entry.status = RESET
                    self._reset()
                except (ConnectionError, BrokenPipeError):
                    self.close_connection = True
                except Exception as err:  # a rule's hook failed: tell the client and keep it for the test
                    proxy.errors.append(err)
                    if hasattr(self, "_entry"):
                        self._entry.status = 500
                    self.close_connection = True
                    with contextlib.suppress(OSError):
                        self._send(ProxyResponse.of_json(500, {"error": {"code": 500, "message": repr(err)}}), False)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _dispatch

        return Handler


@contextlib.contextmanager
def proxied(upstream: str, env_var: str) -> Iterator[FaultProxy]:
    """A running proxy in front of `upstream`, with `env_var` pointing at it until the end."""
    previous = os.environ.get(env_var)
    with FaultProxy(upstream) as proxy:
        os.environ[env_var] = proxy.url
        try:
            yield proxy
        finally:
            if previous is None:
                os.environ.pop(env_var, None)
            else:
                os.environ[env_var] = previous


# -- helpers for rules


def json_patch(**fields: Any) -> Callable[[ProxyRequest, ProxyResponse], ProxyResponse | None]:
    """An `after` hook that overwrites top-level fields of a successful JSON answer."""

    def patch(request: ProxyRequest, response: ProxyResponse) -> ProxyResponse | None:
        if response.status != 200 or "json" not in (response.header("content-type") or ""):
            return None
        doc = response.json()
        doc.update(fields)
        return ProxyResponse(response.status, response.headers, json.dumps(doc).encode())

    return patch


def flip_byte(offset: int = 0) -> Callable[[ProxyRequest], None]:
    """A `before` hook that corrupts one byte of the request body in transit."""

    def corrupt(request: ProxyRequest) -> None:
        if len(request.body) > offset:
            data = bytearray(request.body)
            data[offset] ^= 0xFF
            request.body = bytes(data)

    return corrupt


_UPLOAD_PATH = re.compile(r"^/upload/storage/v1/b/(?P<bucket>[^/]+)/o$")


class GcsPreconditions:
    """What the emulator does not do: `ifGenerationMatch` on uploads, answered with 412 like GCS.

    Checked when an upload starts (media, multipart, or the start of a resumable session) and on
    the final request of a resumable session, against the object as the emulator holds it at
    that moment. `ifGenerationMatch=0` means "only if there is no live object".
    """

    def __init__(self, proxy: FaultProxy, *, atomic: bool = False) -> None:
        self.proxy = proxy
        self.atomic = atomic
        self.sessions: dict[str, tuple[str, str, int]] = {}  # upload_id -> bucket, name, generation
        self._lock = threading.Lock()

    def rule(self, times: int | None = None) -> Rule:
        return Rule(path=r"^/upload/storage/v1/b/[^/]+/o$", query="ifGenerationMatch=", times=times,
                    respond=self._respond, after=self._remember, name="gcs-preconditions")  # fmt: skip

    def _target(self, request: ProxyRequest) -> tuple[str, str, int] | None:
        match = _UPLOAD_PATH.match(request.path)
        params = request.query_params()
        if match is None or "ifGenerationMatch" not in params:
            return None
        upload_id = params.get("upload_id", [None])[0]
        if upload_id is not None:
            return self.sessions.get(upload_id)
        name = params.get("name", [None])[0]
        if name is None and request.body:
            name = _object_name_from_body(request)
        if name is None:
            return None
        return urllib.parse.unquote(match["bucket"]), name, int(params["ifGenerationMatch"][0])

    def _is_final(self, request: ProxyRequest) -> bool:
        params = request.query_params()
        if "upload_id" not in params:
            return True  # media, multipart, or the start of a session
        content_range = request.headers.get("content-range", "")
        return re.fullmatch(r"bytes (\d+-\d+|\*)/\d+", content_range.strip()) is not None

    def _respond(self, request: ProxyRequest) -> ProxyResponse | None:
        target = self._target(request)
        if target is None or not self._is_final(request):
            return None
        # atomic: check and write as one step, like Cloud Storage, so that two create-only writes
        # racing through the proxy cannot both see "no object" and both succeed. The write is then
        # made here, so rules after this one do not see the request: for race tests only.
        with self._lock if self.atomic else contextlib.nullcontext():
            bucket, name, wanted = target
            quoted = urllib.parse.quote(name, safe="")
            current = self.proxy.upstream_request("GET", f"/storage/v1/b/{bucket}/o/{quoted}")
            generation = int(current.json()["generation"]) if current.status == 200 else 0
            if generation == wanted and not self.atomic:
                return None
            if generation == wanted:
                headers = {k: v for k, v in request.headers.items() if k not in HOP_BY_HOP and k != "accept-encoding"}
                try:
                    upstream = self.proxy.upstream_request(request.method, request.target, request.body, headers)
                except OSError as err:  # the upstream is down or hung up: answer like a gateway
                    upstream = ProxyResponse.of_json(502, {"error": {"code": 502, "message": str(err)}})
                answer = self.proxy._rewrite(upstream)
                self._remember(request, answer)
                return answer
        return ProxyResponse.of_json(
            412,
            {
                "error": {
                    "code": 412,
                    "message": "At least one of the pre-conditions you specified did not hold.",
                    "errors": [{"reason": "conditionNotMet", "location": "If-Match", "locationType": "header"}],
                }
            },
        )

    def _remember(self, request: ProxyRequest, response: ProxyResponse) -> None:
        location = response.header("location")
        target = self._target(request)
        if location and target is not None:
            upload_id = urllib.parse.parse_qs(urllib.parse.urlsplit(location).query).get("upload_id", [None])[0]
            if upload_id:
                self.sessions[upload_id] = target
        return None


def _object_name_from_body(request: ProxyRequest) -> str | None:
    """The object name of a resumable start (a JSON body) or a multipart upload (a JSON part)."""
    content_type = request.headers.get("content-type", "")
    text = request.body[:65536].decode("utf-8", errors="replace")
    if content_type.startswith("application/json"):
        with contextlib.suppress(ValueError):
            name = json.loads(text).get("name")
            return name if isinstance(name, str) else None
    match = re.search(r"\{.*?\}\s*(\r?\n)", text, re.DOTALL)
    if match:
        with contextlib.suppress(ValueError):
            name = json.loads(match.group(0)).get("name")
            return name if isinstance(name, str) else None
    return None


def gcs_preconditions(proxy: FaultProxy, *, atomic: bool = False) -> Rule:
    """The rule that makes the proxy enforce upload preconditions (see GcsPreconditions)."""
    return GcsPreconditions(proxy, atomic=atomic).rule()
