"""API errors, rendered in OpenAI's or Anthropic's error shape."""

from __future__ import annotations

import json

from aiohttp import web

from blockserve.scheduler import (
    MemoryPressureError,
    PromptTooLongError,
    QueueFullError,
    RequestTooLargeError,
    SchedulerClosedError,
    SchedulerError,
)

# OpenAI type -> Anthropic type, by HTTP status.
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    409: "invalid_request_error",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
}
_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    409: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def openai_body(self) -> dict:
        return {"error": {"message": self.message, "type": _OPENAI_TYPES.get(self.status,
                                                                           "server_error"),
                          "param": self.param, "code": self.code}}

    def anthropic_body(self) -> dict:
        return {"type": "error", "error": {"type": _ANTHROPIC_TYPES.get(self.status,
                                                                        "api_error"),
                                           "message": self.message}}

    def response(self, anthropic: bool = False) -> web.Response:
        body = self.anthropic_body() if anthropic else self.openai_body()
        return web.Response(status=self.status, text=json.dumps(body),
                            content_type="application/json", headers=self.headers)


def invalid(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code="invalid_value" if param else None)


def from_scheduler(e: SchedulerError) -> ApiError:
    if isinstance(e, QueueFullError):
        return ApiError(429, str(e), code="queue_full", headers={"Retry-After": "1"})
    if isinstance(e, PromptTooLongError):
        return ApiError(400, str(e), param="messages", code="context_length_exceeded")
    if isinstance(e, RequestTooLargeError):
        return ApiError(400, str(e), param="messages", code="request_too_large")
    if isinstance(e, MemoryPressureError):
        return ApiError(503, str(e), code="memory_pressure", headers={"Retry-After": "2"})
    if isinstance(e, SchedulerClosedError):
        return ApiError(503, str(e), code="shutting_down", headers={"Retry-After": "5"})
    return ApiError(400, str(e))
