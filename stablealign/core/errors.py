"""Errors that cross service boundaries.

Each maps to one gRPC status and one NATS error code, so that a caller sees the same kind of
failure whichever transport it used (``stablealign.serving.rpc`` and ``stablealign.nats.client`` do the mapping).
"""

from __future__ import annotations


class StableAlignError(Exception):
    """Base class; ``code`` is the NATS service error code (HTTP-like)."""

    code = 500


class ValidationError(StableAlignError, ValueError):
    """The request is malformed or out of range (gRPC INVALID_ARGUMENT)."""

    code = 400


class NotFoundError(StableAlignError, LookupError):
    """The world, agent or job does not exist (gRPC NOT_FOUND)."""

    code = 404


class ConflictError(StableAlignError):
    """The thing exists already or is in a state that forbids the call (gRPC FAILED_PRECONDITION)."""

    code = 409


class PayloadTooLargeError(StableAlignError):
    """The request exceeds the configured size limit (gRPC RESOURCE_EXHAUSTED)."""

    code = 413


class UnavailableError(StableAlignError):
    """A dependency (NATS, a backend) did not answer in time; the call may be retried (gRPC UNAVAILABLE)."""

    code = 503


class BackendError(StableAlignError):
    """An LLM backend failed after its retries (gRPC UNAVAILABLE)."""

    code = 502


class LLMRequestError(BackendError):
    """An LLM server refused the request itself: HTTP 4xx other than 408, 409 and 429 (400, 401, 403, 404,
    422...). The same request would get the same answer, so no layer retries it (backend, NATS, the
    world's failure budget): the step fails at once with the status and the reason. 401/403 mean the
    API key was refused. Crosses NATS as code 424 (Failed Dependency); gRPC FAILED_PRECONDITION."""

    code = 424

    def __init__(self, message: str = "", *, status: int = 0) -> None:
        super().__init__(message)
        self.status = status  # the HTTP status (0 when rebuilt from a NATS error reply)


class ConfigError(StableAlignError):
    """A setting (flag or environment variable) has a bad value; raised at start-up."""

    code = 400


ERRORS_BY_CODE: dict[int, type[StableAlignError]] = {
    400: ValidationError,
    404: NotFoundError,
    409: ConflictError,
    413: PayloadTooLargeError,
    424: LLMRequestError,
    502: BackendError,
    503: UnavailableError,
}


def error_from_code(code: int, message: str) -> StableAlignError:
    """Rebuilds the typed error a remote handler raised, from its NATS error code."""
    cls = ERRORS_BY_CODE.get(code, StableAlignError)
    return cls(message)
