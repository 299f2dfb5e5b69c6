"""`toolkit.remote`: a hosted completions endpoint (or a `toolkit serve`) used like a loaded
model, so that frames, plots, sweeps and widgets work on its responses unchanged.

`remote(base_url, api_key=..., model=...).completions.create(...)` takes the same fields as
in-process, checks them with the same schema before anything is sent (the same errors,
raised at once), and returns the same `LocalCompletion`, or with `stream=True` an iterator
of `LocalChunk`s read as the server sends them. A hosted response carries only what the
wire has; a toolkit server also sends the frames' details (ranks, entropies, speculative
steps), so its frames equal the local ones. Hidden states never leave a hosted endpoint:
the fields asking for them are refused here.
"""
from __future__ import annotations

import inspect
import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator, Optional, Sequence

import httpx
from pydantic import ValidationError
from tqdm.auto import tqdm

from .completions import Completions
from .errors import APIError, InvalidRequestError, brief, from_http
from .frames import ChoiceDetails
from .responses import DETAILS_FIELD, DETAILS_HEADER, LocalChunk, LocalCompletion
from .schema import validate_request

# Fields that read a model's hidden states, which an endpoint does not send.
LOCAL_ONLY = ("include_last_activation", "activation_layers")


class Remote:
    """A completions endpoint: `completions.create` as on a loaded model, `model` the name
    requests use unless they name another, `close()` to drop its connections."""

    def __init__(self, base_url: str, api_key: Optional[str], model: Optional[str],
                 timeout: float, concurrency: int) -> None:
        headers = {DETAILS_HEADER: "1"}
        if api_key:
            headers["authorization"] = f"Bearer {api_key}"
        self.base_url = base_url.rstrip("/")
        self.concurrency = concurrency
        self.progress = True             # a bar for create_batch, as on a local model
        self.client = httpx.Client(base_url=self.base_url, headers=headers,
                                   timeout=httpx.Timeout(timeout, connect=10.0))
        self.model = model or self._only_model()
        self.completions = RemoteCompletions(self)

    @property
    def name(self) -> str:
        return self.model

    def _only_model(self) -> str:
        listed = [m["id"] for m in self.get("/models").get("data", [])]
        if len(listed) != 1:
            raise InvalidRequestError(f"{self.base_url} serves {len(listed)} models "
                                      f"({', '.join(listed[:5])}): name one with model=...",
                                      "model")
        return listed[0]

    def get(self, path: str) -> Any:
        return self.send("GET", path).json()

    def send(self, method: str, path: str, body: Any = None, stream: bool = False
             ) -> httpx.Response:
        """An HTTP request to the endpoint: its response, or the API's exception for an
        HTTP error, or `ConnectionError` when the endpoint cannot be reached."""
        try:
            response = self.client.send(self.client.build_request(method, path, json=body),
                                        stream=stream)
        except httpx.TransportError as err:
            raise ConnectionError(f"cannot reach {self.base_url}{path}: {err}") from err
        if stream and not response.is_success:
            response.read()
            response.close()
        return _checked(response)

    def close(self) -> None:
        self.client.close()

    def __repr__(self) -> str:
        return f"Remote({self.model!r} at {self.base_url!r})"


class RemoteCompletions:
    """The `/v1/completions` resource of an endpoint."""

    def __init__(self, remote: Remote) -> None:
        self._remote = remote

    def create(self, /, **fields: Any) -> Any:
        body = self._checked_body(fields)
        if body.get("stream"):
            return _Stream(self._remote.send("POST", "/completions", body, stream=True))
        return self._post(body)

    def _post(self, body: dict[str, Any]) -> LocalCompletion:
        return _parse(LocalCompletion, self._remote.send("POST", "/completions", body).json())

    def create_batch(self, requests: Sequence[dict[str, Any]],
                     progress: Optional[bool] = None) -> list[LocalCompletion]:
        """Several whole requests, sent `concurrency` at a time (see `Remote`); the
        responses in the order of the requests."""
        bodies = [self._checked_body(fields) for fields in requests]
        if any(body.get("stream") for body in bodies):
            raise InvalidRequestError("create_batch returns whole responses: stream must be "
                                      "false", "stream")
        show = self._remote.progress if progress is None else progress
        pool = ThreadPoolExecutor(self._remote.concurrency)
        try:
            return list(tqdm(pool.map(self._post, bodies), total=len(bodies), leave=False,
                             disable=not show or len(bodies) < 2, desc=self._remote.model))
        finally:
            pool.shutdown(cancel_futures=True)

    def _checked_body(self, fields: dict[str, Any]) -> dict[str, Any]:
        """The JSON body for `fields`, checked by the local schema first."""
        body = {"model": self._remote.model, **fields}
        req = validate_request(body)
        for name in LOCAL_ONLY:
            if getattr(req, name):
                raise InvalidRequestError(f"{name} reads the model's hidden states, which "
                                          f"an endpoint does not send: it needs a local "
                                          f"model (toolkit.load)", name)
        return body


RemoteCompletions.create.__signature__ = inspect.signature(Completions.create)  # type: ignore
RemoteCompletions.create.__doc__ = Completions.create.__doc__


class _Stream:
    """A streamed request's chunks, read as they arrive. The request is sent (and its
    errors raised) when it is made; closing the stream, or dropping it, closes the
    connection, which cancels the request on a toolkit server."""

    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        self._lines = response.iter_lines()

    def __iter__(self) -> Iterator[LocalChunk]:
        return self

    def __next__(self) -> LocalChunk:
        for line in self._lines:
            data = line.removeprefix("data:").strip() if line.startswith("data:") else None
            if not data:
                continue                   # comments, keep-alives, blank separators
            if data == "[DONE]":
                break
            event = json.loads(data)
            if "error" in event:
                self.close()
                raise from_http(500, event)
            return _parse(LocalChunk, event)
        self.close()
        raise StopIteration

    def close(self) -> None:
        self._response.close()

    def __del__(self) -> None:
        self.close()


def _checked(response: httpx.Response) -> httpx.Response:
    """The response, unless it is an HTTP error: then that error as the API's exception."""
    if response.is_success:
        return response
    try:
        body = response.json()
    except ValueError:
        body = response.text
    raise from_http(response.status_code, body)


def _parse(kind: type, body: dict[str, Any]) -> Any:
    """A response or chunk from its JSON, with the frames' details a toolkit server sent."""
    details = body.pop(DETAILS_FIELD, None) or {}
    try:
        resp = kind.model_validate(body)
    except ValidationError as err:
        raise APIError(f"the endpoint answered with something other than a completion: "
                       f"{brief(body)} ({err.error_count()} fields differ)") from err
    resp.details = {int(k): ChoiceDetails.from_json(v) for k, v in details.items()}
    return resp


def remote(base_url: str, *, api_key: Optional[str] = None, model: Optional[str] = None,
           timeout: float = 600.0, concurrency: int = 8) -> Remote:
    """An endpoint of the completions API, used like a loaded model.

    `base_url` is what the `openai` SDK takes (`http://127.0.0.1:8000/v1` for a
    `toolkit serve`, `https://api.fireworks.ai/inference/v1` for Fireworks); `api_key`
    goes as a bearer token; `model` is the name requests use by default (when left out,
    the endpoint's only model). `create_batch` (and so `toolkit.sweep`) sends
    `concurrency` requests at a time. `include_last_activation` and `activation_layers`
    need a local model; `toolkit.score` and `toolkit.compare` do too."""
    return Remote(base_url, api_key, model, timeout, concurrency)
