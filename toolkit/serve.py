"""The completions API over HTTP: `toolkit serve MODEL`, or `toolkit.serve(llm)` from Python.

`POST /v1/completions` takes exactly what `llm.completions.create` takes and answers with
its JSON (`model_dump(exclude_none=True)`), or with `stream` as server-sent events
(`data: {chunk}` lines, then `data: [DONE]`); `GET /v1/models` lists the model and its
aliases. Errors have the hosted API's shape and status. Perf metrics ride in
`fireworks-*` headers of a whole response, as the hosted API sends them (and in the body
too when `perf_metrics_in_response` asks), and on the finishing chunk of a stream.

Built on Starlette and uvicorn, not FastAPI: `toolkit.schema` already validates every
field with API-shaped errors, and FastAPI's request models would be a second schema to
keep in step with it (Starlette is the toolkit FastAPI itself is built on).

Each request runs `create` on a worker thread, while the engine steps every live request
on a thread of its own (`Engine.driven`): requests from many clients decode side by side,
each with the numbers it would get alone, and a client that goes away (mid-stream, or
while its whole response is made) has its request cancelled at once. Safe by default:
loopback only unless a host is named, and then only with an API key (a bearer token,
compared in constant time); limits on body size, `n`, prompt count and concurrent requests
each answer with a clear error.
"""
from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import threading
import time
from concurrent.futures import CancelledError
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, AsyncIterator, Iterator, Optional

import anyio
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .engine.engine import CancelScope
from .errors import (APIError, AuthenticationError, InvalidRequestError, NotFoundError,
                     RateLimitError, RequestTooLargeError)
from .responses import DETAILS_FIELD, DETAILS_HEADER
from .schema import validate_request

if TYPE_CHECKING:
    from .llm import LLM

logger = logging.getLogger("toolkit")
CLIENT_CLOSED_REQUEST = 499     # (nginx's status for it: nobody is left to read it)


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the server; beyond each, a clear error, not a crash."""

    max_body_bytes: int = 8 * 2**20    # images come as data URLs: a few MB
    max_n: int = 64
    max_prompts: int = 64
    max_concurrent: int = 32           # requests in flight, streams until they end


def is_loopback(host: str) -> bool:
    """Whether `host` is reachable only from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:                 # a host name: it may resolve anywhere
        return False


def app(llm: "LLM", *, api_key: Optional[str] = None, limits: Limits = Limits()) -> Starlette:
    """The ASGI application serving `llm` (for uvicorn or any ASGI server). With `api_key`,
    every request must carry `Authorization: Bearer <api_key>`."""
    api = _API(llm, api_key, limits)
    return Starlette(
        routes=[Route("/v1/completions", api.guarded(api.completions), methods=["POST"]),
                Route("/v1/models", api.guarded(api.models), methods=["GET"]),
                Route("/v1/models/{model:path}", api.guarded(api.model), methods=["GET"])],
        exception_handlers={HTTPException: _http_error}, lifespan=api.lifespan)


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own errors (unknown path, wrong method) in the API's shape."""
    status = getattr(exc, "status_code", 500)
    err = NotFoundError(f"no route {request.method} {request.url.path}") if status == 404 \
        else APIError(str(getattr(exc, "detail", exc)))
    return JSONResponse(err.body, status_code=status)


class _API:
    """The routes, over one loaded model."""

    def __init__(self, llm: "LLM", api_key: Optional[str], limits: Limits) -> None:
        self.llm, self.limits = llm, limits
        self.api_key = None if api_key is None else api_key.encode()
        self.active = 0                    # requests in flight (touched on the event loop)
        self.threads = anyio.CapacityLimiter(limits.max_concurrent)
        self.created = int(time.time())

    @asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        with self.llm.engine.driven():
            yield

    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise AuthenticationError("missing API key: send 'Authorization: Bearer <key>'")
        if not hmac.compare_digest(token.strip().encode(), self.api_key):
            raise AuthenticationError("invalid API key")

    def guarded(self, handler: Any) -> Any:
        """`handler` behind the API key, its API errors answered as the hosted API does."""
        async def endpoint(request: Request) -> Response:
            try:
                self._authorize(request)
                return await handler(request)
            except APIError as err:
                return JSONResponse(err.body, status_code=err.status_code)
            except Exception as err:           # a bug: logged, and said in the API's shape
                logger.exception("a request failed")
                return JSONResponse(APIError(f"internal error: {err}").body, status_code=500)
        return endpoint

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [
            self._card(name) for name in (self.llm.name, *self.llm.aliases)]})

    async def model(self, request: Request) -> Response:
        name = request.path_params["model"]
        self.llm.resolve_model(name)       # a 404 for any other name
        return JSONResponse(self._card(name))

    def _card(self, name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": self.created, "owned_by": "toolkit"}

    async def completions(self, request: Request) -> Response:
        fields = await self._body(request)
        if self.active >= self.limits.max_concurrent:
            raise RateLimitError(f"the server is serving its limit of "
                                 f"{self.limits.max_concurrent} concurrent requests; retry "
                                 f"shortly")
        self.active += 1               # a stream is uncounted when it ends (`_closed`)
        try:
            response = await self._complete(request, fields,
                                             request.headers.get(DETAILS_HEADER) == "1")
        except BaseException:
            self.active -= 1
            raise
        if not isinstance(response, _EventStream):
            self.active -= 1
        return response

    async def _body(self, request: Request) -> dict[str, Any]:
        """The request's JSON object, read no further than the size limit."""
        limit = self.limits.max_body_bytes
        too_large = RequestTooLargeError(f"the request body is over this server's limit of "
                                         f"{limit} bytes")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_large
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > limit:
                raise too_large
        try:
            fields = json.loads(body)
        except ValueError as err:
            raise InvalidRequestError(f"the request body is not valid JSON: {err}") from None
        if not isinstance(fields, dict):
            raise InvalidRequestError("the request body must be a JSON object of request "
                                      "fields")
        return fields

    def _check_limits(self, fields: dict[str, Any]) -> None:
        req = validate_request(fields)
        if req.n > self.limits.max_n:
            raise InvalidRequestError(f"n is {req.n}; this server allows up to "
                                      f"{self.limits.max_n}", "n")
        if len(req.prompts) > self.limits.max_prompts:
            raise InvalidRequestError(f"{len(req.prompts)} prompts; this server takes up to "
                                      f"{self.limits.max_prompts} per request", "prompt")

    async def _complete(self, request: Request, fields: dict[str, Any], details: bool
                        ) -> Response:
        self._check_limits(fields)
        if fields.get("stream"):
            chunks = await self._in_thread(partial(self.llm.completions.create, **fields))
            return _EventStream(self._events(chunks, details), partial(self._closed, chunks))
        try:
            resp = await self._while_connected(request, partial(
                self.llm.completions.create,
                **{**fields, "perf_metrics_in_response": True}))   # always sent as headers
        except CancelledError:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        perf = resp.perf_metrics or {}
        body = _json(resp, details, keep_perf=bool(fields.get("perf_metrics_in_response")))
        return Response(body, media_type="application/json",
                        headers={f"fireworks-{k}": _header(v) for k, v in perf.items()})

    async def _in_thread(self, call: Any, *args: Any) -> Any:
        return await anyio.to_thread.run_sync(call, *args, limiter=self.threads)

    async def _while_connected(self, request: Request, call: Any) -> Any:
        """`call()` on a worker thread, its requests cancelled should the client go away
        first (it then raises CancelledError). A stream's requests are cancelled when its
        sending stops (`_EventStream`)."""
        scope = CancelScope()
        failure: Optional[Exception] = None
        async with anyio.create_task_group() as watch:
            watch.start_soon(_cancel_when_gone, request, scope)
            try:
                result = await self._in_thread(partial(_within, scope, call))
            except Exception as err:        # raised after the group, which would wrap it
                failure = err
            finally:
                watch.cancel_scope.cancel()
        if failure is not None:
            raise failure
        return result

    async def _events(self, chunks: Iterator[Any], details: bool) -> AsyncIterator[str]:
        """Server-sent events of a stream's chunks; a failure mid-stream is sent as an
        error event (the status line has gone out already)."""
        try:
            while (chunk := await self._in_thread(next, chunks, None)) is not None:
                yield f"data: {_json(chunk, details)}\n\n"
        except APIError as err:
            yield f"data: {json.dumps(err.body)}\n\n"
            return
        except Exception as err:               # a bug: logged, and said to the client
            logger.exception("a streamed request failed")
            yield f"data: {json.dumps(APIError(f'internal error: {err}').body)}\n\n"
            return
        yield "data: [DONE]\n\n"

    def _closed(self, chunks: Iterator[Any]) -> None:
        """A stream's response has ended, sent in full or its client gone: its request
        is cancelled (if still running) and uncounted."""
        chunks.close()
        self.active -= 1


def _within(scope: CancelScope, call: Any) -> Any:
    with scope:
        return call()


async def _cancel_when_gone(request: Request, scope: CancelScope) -> None:
    """Cancel the scope's requests once the client disconnects. (The body has been read,
    so the next message the connection brings is that one.)"""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    scope.cancel()


def _header(value: Any) -> str:
    """A header value: HTTP headers are Latin-1, and names (aliases) may not be."""
    return str(value).encode("ascii", "backslashreplace").decode("ascii")


def _json(resp: Any, details: bool, keep_perf: bool = True) -> str:
    """A response or chunk as the wire has it; with `details`, plus the frames' details
    under `DETAILS_FIELD` (for `toolkit.remote`)."""
    body = resp.model_dump_json(exclude_none=True,
                                exclude=None if keep_perf else {"perf_metrics"})
    if not details:
        return body
    extra = json.dumps({str(k): d.to_json() for k, d in resp.details.items()})
    return f'{body[:-1]},"{DETAILS_FIELD}":{extra}}}'


class _EventStream(StreamingResponse):
    """A stream of server-sent events that calls `on_close` once it ends however it ends:
    sent in full, its client gone (Starlette cancels the sending), or never started."""

    def __init__(self, events: AsyncIterator[str], on_close: Any) -> None:
        super().__init__(events, media_type="text/event-stream",
                         headers={"cache-control": "no-cache"})
        self.on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def check_host(host: str, api_key: Optional[str]) -> None:
    """Refuse to listen beyond this machine without an API key."""
    if not is_loopback(host) and not api_key:
        raise InvalidRequestError(f"listening on {host!r} reaches beyond this machine: it "
                                  f"needs an API key (toolkit serve --api-key-env VAR)",
                                  "host")


class Server:
    """A server running on a background thread (what `serve` returns): its `url` is the
    base URL for the SDKs and `toolkit.remote`; `stop()` (or leaving a `with` block) shuts
    it down."""

    def __init__(self, llm: "LLM", host: str, port: int, api_key: Optional[str],
                 limits: Limits, log_level: str) -> None:
        check_host(host, api_key)
        config = uvicorn.Config(app(llm, api_key=api_key, limits=limits), host=host,
                                port=port, log_level=log_level, lifespan="on")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True,
                                        name="toolkit-serve")
        self._thread.start()
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError(f"the server did not start on {host}:{port} (see the log)")
            time.sleep(0.01)
        sock = self._server.servers[0].sockets[0]
        self.host, self.port = host, sock.getsockname()[1]
        self.url = f"http://{host if ':' not in host else f'[{host}]'}:{self.port}/v1"

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join()

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self._thread.is_alive() else "stopped"
        return f"Server({self.url!r}, {state})"


def serve(llm: "LLM", *, host: str = "127.0.0.1", port: int = 8000,
          api_key: Optional[str] = None, limits: Limits = Limits(),
          log_level: str = "warning") -> Server:
    """Serve `llm` over HTTP on a background thread and return the running `Server`
    (`port=0` picks a free port; `server.url` says which). Beyond loopback `api_key` is
    required. In-process requests keep working beside it; while it runs, the engine
    steps every request on a thread of its own."""
    return Server(llm, host, port, api_key, limits, log_level)
