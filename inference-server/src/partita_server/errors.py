"""Errors of the inference server, each with the HTTP status a v2 client can act on.

One base (`ServerError`); the HTTP layer turns any of them into `{"error": message}` with
`status`. Anything else escaping the data plane is a bug in the server, not in the caller's
input.
"""

from __future__ import annotations


class ServerError(Exception):
    """Base of every error the server reports to a caller or an operator."""

    status: int = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(ServerError):
    """The request is malformed or its tensors do not match the model (names the tensor)."""

    status = 400


class Unauthorized(ServerError):
    """An internal endpoint was called without the stage-to-stage token."""

    status = 401


class ModelNotFound(ServerError):
    """The request names a model this server does not serve."""

    status = 404


class RunLost(ServerError):
    """A shard was asked for a later segment of a request it does not hold (it restarted,
    or the request's deadline passed): the server driving the stage runs it again."""

    status = 409


class PayloadTooLarge(ServerError):
    """The request body exceeds the configured limit."""

    status = 413


class BadGateway(ServerError):
    """The next stage answered, but not with a usable v2 response; `downstream_status` is
    the status it answered with, when it answered one."""

    status = 502

    def __init__(self, message: str, *, downstream_status: int | None = None) -> None:
        super().__init__(message)
        self.downstream_status = downstream_status


class Relayed(ServerError):
    """What the serving stage answered a router's client with, passed on as it was (a 4xx
    is the client's mistake: not retried, not hidden behind a 502)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class StageUnavailable(ServerError):
    """Every endpoint of the next stage refused the connection or failed."""

    status = 503


class StageTimeout(ServerError):
    """The next stage did not answer in time."""

    status = 504


class StageSpecError(ServerError):
    """The stage spec (ConfigMap, file or flags) is invalid or its model cannot be loaded.

    Raised at start-up, never per request: the process exits with the message.
    """
