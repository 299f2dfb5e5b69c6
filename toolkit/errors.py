"""API-shaped errors.

Code written against the hosted completions API catches HTTP errors whose JSON body says
what went wrong and which request field caused it. In-process there is no HTTP, so these
exceptions carry the same `status_code` and `body` the hosted API would send, while still
being ordinary Python exceptions (`ValueError` for a bad request, `LookupError` for an
unknown model) for callers that never think about HTTP.
"""
from __future__ import annotations

from typing import Any


class APIError(Exception):
    """Base class: an error the hosted API would answer with a non-2xx status."""

    status_code: int = 500
    type: str = "internal_error"
    code: str = "INTERNAL"

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    @property
    def body(self) -> dict[str, Any]:
        """The JSON body the hosted API returns with this error."""
        return {"error": {"object": "error", "type": self.type, "code": self.code,
                          "param": self.param, "message": self.message}}

    def __str__(self) -> str:
        return f"{self.message} (param: {self.param})" if self.param else self.message


class InvalidRequestError(APIError, ValueError):
    """A request field has a bad value (HTTP 400); `param` names the field."""

    status_code = 400
    type = "invalid_request_error"
    code = "BAD_REQUEST"


class NotFoundError(APIError, LookupError):
    """The model named in a request or given to `toolkit.load` does not exist (HTTP 404)."""

    status_code = 404
    type = "invalid_request_error"
    code = "NOT_FOUND"


class AuthenticationError(APIError, PermissionError):
    """The API key is missing or wrong (HTTP 401)."""

    status_code = 401
    type = "authentication_error"
    code = "UNAUTHORIZED"


class RequestTooLargeError(APIError, ValueError):
    """The request body is larger than the server accepts (HTTP 413)."""

    status_code = 413
    type = "invalid_request_error"
    code = "PAYLOAD_TOO_LARGE"


class RateLimitError(APIError):
    """The server is at its limit of concurrent requests (HTTP 429): retry later."""

    status_code = 429
    type = "rate_limit_error"
    code = "TOO_MANY_REQUESTS"


_BY_STATUS = {cls.status_code: cls for cls in (InvalidRequestError, AuthenticationError,
                                               NotFoundError, RequestTooLargeError,
                                               RateLimitError)}


def from_http(status: int, body: Any) -> APIError:
    """The exception for an HTTP error answer of a (hosted or toolkit) endpoint: the class
    its status maps to, with the message and `param` of its JSON body where it has them."""
    error = body.get("error", body) if isinstance(body, dict) else {}
    if not isinstance(error, dict):
        error = {"message": error}
    message = error.get("message") or (body if isinstance(body, str) and body
                                       else f"HTTP {status}")
    err = _BY_STATUS.get(status, APIError)(str(message), error.get("param"))
    err.status_code = status
    return err


def brief(value: Any) -> str:
    """A value as an error message shows it: a bounded repr, long values cut, integers too
    long to print (Python refuses past 4300 digits) described by their size, lone
    surrogates escaped so the message encodes as UTF-8."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"an integer of about {int(value.bit_length() * 0.30103)} digits"
    try:
        text = repr(value)
    except ValueError:              # a huge integer inside a container
        text = f"a {type(value).__name__} holding an integer too long to print"
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= 80 else text[:77] + "..."
