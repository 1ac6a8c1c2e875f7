"""OpenAI-shaped errors: the exception types handlers raise and the one handler that renders them.

Every non-2xx response of the server, including the ones Sanic raises itself (404 unknown route,
405 wrong method, 408 request timeout, 413 body too large, 503 response timeout), has the body
``{"error": {"message": str, "type": str, "param": str | null, "code": int}}``, the shape vLLM
uses since v0.10.1 (``code`` is the HTTP status). Validation problems are 400, never 422.
A 500 never carries a traceback or an exception class name; the traceback goes to the log.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from sanic import HTTPResponse, Request
from sanic.exceptions import SanicException
from sanic.handlers import ErrorHandler

logger = logging.getLogger("xlaserve.api")

# HTTP status → the ``type`` string of the error body (vLLM's names where it has one).
ERROR_TYPES: dict[int, str] = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    408: "RequestTimeoutError",
    413: "RequestTooLargeError",
    415: "UnsupportedMediaTypeError",
    431: "RequestHeaderFieldsTooLargeError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}

# Error messages are cut to this many characters so that a bad request cannot make the server
# echo megabytes back (vLLM #49239).
MAX_ERROR_MESSAGE_CHARS = 2000


class APIError(Exception):
    """An error with an HTTP status, raised anywhere under a route handler.

    ``param`` names the offending request field where one is known.
    """

    status: int = 400
    error_type: str | None = None  # the body's ``type``; None: the status's (ERROR_TYPES)
    headers: dict[str, str] | None = None

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class BadRequest(APIError):
    status = 400


class NotFound(APIError):
    status = 404


class ServiceUnavailable(APIError):
    status = 503


class InternalError(APIError):
    status = 500


def error_body(message: str, status: int, param: str | None = None,
               error_type: str | None = None) -> dict[str, Any]:
    if len(message) > MAX_ERROR_MESSAGE_CHARS:
        message = message[:MAX_ERROR_MESSAGE_CHARS] + "... (truncated)"
    return {"error": {"message": message,
                      "type": error_type or ERROR_TYPES.get(status, "APIError"),
                      "param": param, "code": status}}


def error_response(status: int, message: str, param: str | None = None,
                   headers: dict[str, str] | None = None,
                   error_type: str | None = None) -> HTTPResponse:
    return HTTPResponse(json.dumps(error_body(message, status, param, error_type)),
                        status=status, headers=headers, content_type="application/json")


class OpenAIErrorHandler(ErrorHandler):
    """Sanic's error handler, replaced so that every error leaves in the OpenAI shape."""

    def default(self, request: Request, exception: BaseException) -> HTTPResponse:
        if isinstance(exception, APIError):
            return error_response(exception.status, exception.message, exception.param,
                                  exception.headers, exception.error_type)
        if isinstance(exception, SanicException):
            status = int(getattr(exception, "status_code", 500) or 500)
            headers = dict(getattr(exception, "headers", None) or {})
            if status == 413 and "header" in str(exception).lower():
                status = 431  # Sanic reports oversized headers as 413
            if status >= 500:
                # Sanic's 503 "Response Timeout" and its own ServerErrors: keep the text, which
                # Sanic writes for users, but log where it came from.
                logger.warning("%s %s failed: %s", request.method, request.path, exception)
            return error_response(status, _sanic_message(exception, status), None, headers)
        if isinstance(exception, asyncio.CancelledError):
            # Sanic's RequestCancelled: the client hung up before a non-streaming answer (the
            # handler's cancellation already aborted its engine request). Nobody reads this
            # response; 499 (nginx's "client closed request") keeps it apart from server
            # errors in the access log.
            logger.info("%s %s: the client closed the connection", request.method, request.path)
            return error_response(499, "Client closed the request.")
        logger.error("Unhandled error in %s %s", request.method, request.path,
                     exc_info=exception)
        return error_response(500, "Internal server error. The server logged the details.")


def _sanic_message(exc: SanicException, status: int) -> str:
    text = str(exc.message if hasattr(exc, "message") else exc) or ""
    if status == 404 and text.startswith("Requested URL"):
        return text
    if status == 413:
        return f"{text} (see --max-request-body)"
    return text or ERROR_TYPES.get(status, "Error")
