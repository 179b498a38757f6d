"""Errors in OpenAI's shape, as vLLM sends them: {"error": {"message", "type", "param", "code"}}."""
from __future__ import annotations

from shardserve.sampling_params import ParameterError

_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
          500: "InternalServerError", 503: "ServiceUnavailableError"}


class APIError(Exception):
    def __init__(self, message: str, status: int = 400, param: str | None = None, type: str | None = None):
        super().__init__(message)
        self.message, self.status, self.param = message, status, param
        self.type = type or _TYPES.get(status, "Error")  # vLLM names some errors otherwise (InvalidUserInput)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.status}}


def to_api_error(e: BaseException) -> APIError:
    """Bad input (the processor's ValueError / TypeError) is the client's fault; anything else is ours."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, ParameterError):
        return APIError(str(e), 400, param=e.parameter)
    if isinstance(e, (ValueError, TypeError)):
        return APIError(str(e), 400)
    from shardserve.engine.async_engine import EngineDeadError
    if isinstance(e, EngineDeadError):
        return APIError(str(e), 503)
    return APIError(f"Internal error: {type(e).__name__}: {e}", 500)
