"""Errors in OpenAI's format: `{"error": {"message", "type", "param", "code"}}` with the matching status.

OpenAI's clients turn the status into an exception class (400 BadRequestError, 404 NotFoundError, 429
RateLimitError, 503 InternalServerError...), so the status matters as much as the message.
"""

from __future__ import annotations

TYPES = {
    400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error", 405: "invalid_request_error",
    413: "invalid_request_error", 429: "rate_limit_exceeded", 500: "server_error", 502: "server_error",
    503: "service_unavailable",
}


class ApiError(Exception):
    """An error to answer with; raised anywhere below a route."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}
