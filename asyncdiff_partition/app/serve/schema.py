"""The request a client sends (OpenAI's image generation fields and diffusion ones) and the error shape it gets back."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["ImageRequest", "RequestError", "error_body"]


class ImageRequest(BaseModel):
    """``POST /v1/images/generations``: OpenAI's fields, then the diffusion pipeline's; any other field is refused."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1)
    model: str | None = None
    n: int = Field(default=1, ge=1)
    size: str | None = Field(default=None, pattern=r"^[0-9]+x[0-9]+$")  # "WxH"; default: the pipeline's own
    response_format: Literal["b64_json"] = "b64_json"
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    user: str | None = None
    negative_prompt: str | None = None
    num_inference_steps: int | None = Field(default=None, ge=1)
    guidance_scale: float | None = Field(default=None, ge=0, le=100)
    image: str | None = None  # base64 PNG/JPEG: the input of image-to-X pipelines
    stream: bool = False  # server-sent events: one per denoising step, then the result

    def pixels(self) -> tuple[int, int] | None:
        """(width, height) of ``size``, None when not given."""
        if self.size is None:
            return None
        width, height = self.size.split("x")
        return int(width), int(height)


class RequestError(ValueError):
    """A request the service cannot take as it is: HTTP ``status`` and OpenAI's error fields."""

    def __init__(self, message: str, *, status: int = 400, kind: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.status, self.kind, self.param, self.code = message, status, kind, param, code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.kind, self.param, self.code)


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
