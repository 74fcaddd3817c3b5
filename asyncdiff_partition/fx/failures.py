"""Why a capture method failed, in one line: the error, the operation, the module being traced and the model's source line.

Example::

    try:
        trace(model)
    except Exception as error:
        describe_failure(error, model)
    # "module 'transformer_blocks.0.attn1' (Attention), operation torch.Tensor.__bool__: GuardOnData... [at ...]"

Everything comes from the traceback: the innermost frame whose ``self`` is a submodule of the
model names the module (its dotted path, as ``named_modules`` gives it); the innermost
``__torch_function__`` / ``__torch_dispatch__`` frame names the operator the tracer was handling,
and a frame of ``torch.fx.Proxy`` the Python construct fx cannot follow. An error raised after
tracing (torch.export's checks) may name a model attribute instead (``model.patch_embed.lifted_tensor_0``):
its module is taken from there.
"""

from __future__ import annotations

import os
import re
import traceback
import types
from typing import Any

import torch

__all__ = ["describe_failure", "failed_module", "failed_operation"]

_TORCH_DIR = os.path.dirname(torch.__file__)
_OWN_DIR = os.path.dirname(__file__)
_PROXY_FILE = os.path.join(_TORCH_DIR, "fx", "proxy.py")
_WRAPPED = "model"  # the attribute under which capture's flat wrapper holds the model (capture._WRAPPED)
# What a torch.fx.Proxy method that raises means in the model's code.
_PROXY_CONSTRUCTS = {
    "__bool__": "a Python branch (if / while / assert / and / or) on a traced tensor",
    "__iter__": "iteration over a traced tensor (unpacking, for loop)",
    "__len__": "len() of a traced tensor",
    "keys": "** unpacking of a traced value",
}


def describe_failure(error: BaseException, model: torch.nn.Module) -> str:
    """``module '...' (Type), operation ...: ErrorType: message [at file:line in fn: code]``.

    The parts that cannot be found are left out; the message is cut at 300 characters.
    """
    message = " ".join(str(error).split()) or type(error).__name__
    if len(message) > 300:
        message = message[:297] + "..."
    found = []
    module = failed_module(error, model)
    if module is not None:
        path, kind = module
        found.append(f"module {path!r} ({kind})" if path else f"module: the model itself ({kind})")
    operation = failed_operation(error)
    if operation is not None:
        found.append(f"operation {operation}")
    where = _model_source_line(error)
    return (", ".join(found) + ": " if found else "") + f"{type(error).__name__}: {message}" + (
        f" [at {where}]" if where else "")


def failed_module(error: BaseException, model: torch.nn.Module) -> tuple[str, str] | None:
    """(dotted path, class name) of the submodule of ``model`` that was running when ``error`` was raised."""
    paths = {id(module): name for name, module in model.named_modules()}
    for frame in reversed(_frames(error)):
        owner = frame.f_locals.get("self")
        if isinstance(owner, torch.nn.Module) and id(owner) in paths:
            return paths[id(owner)], type(owner).__name__
    for dotted in re.findall(rf"\b{_WRAPPED}\.([\w.]+)", str(error)):  # an attribute an export check names
        parts = dotted.split(".")
        for end in range(len(parts), 0, -1):
            path = ".".join(parts[:end])
            try:
                module = model.get_submodule(path)
            except AttributeError:
                continue
            return path, type(module).__name__
    return None


def failed_operation(error: BaseException) -> str | None:
    """The operator or Python construct the tracer was handling when ``error`` was raised."""
    for frame in reversed(_frames(error)):
        code = frame.f_code
        if code.co_name in ("__torch_function__", "__torch_dispatch__") and "func" in frame.f_locals:
            return _op_name(frame.f_locals["func"])
        if code.co_filename == _PROXY_FILE and isinstance(frame.f_locals.get("self"), torch.fx.Proxy):
            construct = _PROXY_CONSTRUCTS.get(code.co_name)
            return f"torch.fx.Proxy.{code.co_name}" + (f" ({construct})" if construct else "")
    return None


def _op_name(func: Any) -> str:
    if isinstance(func, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return str(func)
    try:
        return torch.overrides.resolve_name(func) or getattr(func, "__qualname__", repr(func))
    except Exception:  # noqa: BLE001 - a name is only a hint
        return getattr(func, "__qualname__", repr(func))


def _frames(error: BaseException) -> list[types.FrameType]:
    frames = []
    tb = error.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    return frames


def _model_source_line(error: BaseException) -> str | None:
    """The deepest traceback frame outside torch and this package: where the model broke."""
    for frame in reversed(traceback.extract_tb(error.__traceback__)):
        filename = frame.filename
        if filename.startswith((_TORCH_DIR, _OWN_DIR)) or filename.startswith("<"):
            continue
        code = (frame.line or "").strip()
        return f"{filename}:{frame.lineno} in {frame.name}: {code}"
    return None
