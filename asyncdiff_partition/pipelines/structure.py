"""The structure of a denoiser call: what makes two calls share one capture, and the output's own form.

Example::

    call = normalize_call(pipe.unet, args, kwargs)      # {'sample': ..., 'timestep': ..., ...}
    key = call_key(pipe.unet, call)                       # equal keys: the same capture serves both
    form = OutputForm.of(pipe.unet(**call))              # later: form.build(eps, return_dict=True)

Note [call structure]
~~~~~~~~~~~~~~~~~~~~~
A capture is valid for the calls whose argument tree, tensor shapes, dtypes and devices and
non-tensor values equal those it was made from, on a model configured as it was then. The
configuration that changes the graph without changing a weight is the attention processors
(PAG, ``set_attn_processor``, IP-Adapter) and PEFT's LoRA scales: their kinds and scales are part
of the key, so a pipeline that reconfigures its denoiser gets a new capture, never the old graph.
Prompts, seeds and guidance scales are tensor *values*: they never change the key.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Hashable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor

from asyncdiff_partition.core.errors import UnsupportedError

__all__ = ["DenoiserOutput", "OutputForm", "call_key", "configuration", "configuration_state", "configured",
           "normalize_call"]

CallKey = Hashable


def normalize_call(module: torch.nn.Module, args: tuple, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """A call as ``{parameter: value}``: ``return_dict`` and arguments left at their defaults dropped.

    Pipelines pass what the model's defaults already say (``timestep_cond=None``,
    ``cross_attention_kwargs=None``); two calls that differ only there are the same call.

    Raises:
        UnsupportedError: the call does not bind to the model's ``forward``, or uses ``*args``.
    """
    signature = inspect.signature(type(module).forward)
    try:
        bound = signature.bind(module, *args, **kwargs).arguments
    except TypeError as error:
        raise UnsupportedError(f"the pipeline's call does not fit {type(module).__name__}.forward: {error}") from None
    call: dict[str, Any] = {}
    for name, value in list(bound.items())[1:]:
        param = signature.parameters[name]
        if param.kind == param.VAR_KEYWORD:
            call.update({k: v for k, v in value.items() if k != "return_dict"})
        elif param.kind == param.VAR_POSITIONAL:
            if value:
                raise UnsupportedError(f"{type(module).__name__}.forward takes *{name}; the pipeline must call it "
                                       "with named arguments")
        elif name != "return_dict" and not (value is param.default or (value is None and param.default is None)):
            call[name] = value
    return call


def configuration(module: torch.nn.Module) -> tuple[Any, ...]:
    """What of the model's set-up changes its graph without changing its weights (Note [call structure])."""
    found: list[Any] = []
    for name, sub in module.named_modules():
        processor = sub.__dict__.get("processor")
        processor = processor if processor is not None else sub._modules.get("processor")
        if processor is not None:
            found.append((name, type(processor).__qualname__, _scale(processor)))
        scaling = sub.__dict__.get("scaling")
        if isinstance(scaling, dict) and scaling:
            found.append((name, "lora", tuple(sorted(scaling.items())),
                          tuple(getattr(sub, "active_adapters", ()) or ()), bool(getattr(sub, "merged", False))))
    return tuple(found)


def configuration_state(module: torch.nn.Module) -> dict[str, Any]:
    """The attention processors in place now, by module path: what :func:`configured` puts back."""
    return {name: sub.__dict__["processor"] if "processor" in sub.__dict__ else sub._modules["processor"]
            for name, sub in module.named_modules()
            if sub.__dict__.get("processor") is not None or sub._modules.get("processor") is not None}


@contextlib.contextmanager
def configured(module: torch.nn.Module, state: Mapping[str, Any] | None) -> Iterator[None]:
    """The model with the attention processors of ``state`` for a while (a pipeline sets its own during its
    call, PAG's for instance, and puts the old ones back after it: the capture must see the call's)."""
    if not state:
        yield
        return
    before = configuration_state(module)
    _set_processors(module, state)
    try:
        yield
    finally:
        _set_processors(module, before)


def _set_processors(module: torch.nn.Module, state: Mapping[str, Any]) -> None:
    for name, processor in state.items():
        sub = module.get_submodule(name)
        setter = getattr(sub, "set_processor", None)
        if callable(setter):
            setter(processor)
        else:
            sub.processor = processor


def _scale(processor: Any) -> Any:
    scale = getattr(processor, "scale", None)
    return tuple(scale) if isinstance(scale, (list, tuple)) else scale if isinstance(scale, (int, float)) else None


def call_key(module: torch.nn.Module, call: Mapping[str, Any]) -> CallKey:
    """The structure of a normalized call on ``module`` as it is configured now (Note [call structure])."""
    leaves, spec = pytree.tree_flatten(dict(call))
    shapes = tuple((tuple(x.shape), x.dtype, x.device.type) if isinstance(x, Tensor) else ("value", repr(x))
                   for x in leaves)
    return str(spec), shapes, configuration(module)


@dataclass(frozen=True)
class OutputForm:
    """How a model returns its prediction: a tensor, a tuple, or its output class's field.

    Only the first tensor travels through a split; a model that returns more (a second tensor
    the pipeline may read) is refused rather than answered with part of its output.
    """

    kind: str = "tuple"  # "tensor", "tuple" or "class" (a diffusers BaseOutput with return_dict=True)
    cls: Any = None
    field: str = "sample"

    @classmethod
    def of(cls, output: Any, model: str = "the denoiser") -> OutputForm:
        """The form of one real output.

        Raises:
            UnsupportedError: the output holds more than one tensor.
        """
        entries = _entries(output)
        tensors = [x for x in pytree.tree_leaves(entries) if isinstance(x, Tensor)]
        if len(tensors) != 1:
            raise UnsupportedError(f"{model} returns {len(tensors)} tensors; a split model yields its first output "
                                   "only, so a model that returns several cannot be parallelized")
        if isinstance(output, Tensor):
            return cls("tensor")
        if isinstance(output, (tuple, list)):
            return cls("tuple")
        field = next((k for k, v in entries.items() if isinstance(v, Tensor)), "sample")
        return cls("class", type(output), field)

    def build(self, eps: Tensor, return_dict: bool) -> Any:
        """The model's own answer holding ``eps``."""
        if self.kind == "tensor":
            return eps
        if not return_dict:
            return (eps,)
        if self.kind == "class":
            return self.cls(**{self.field: eps})
        return DenoiserOutput(eps)


@dataclass
class DenoiserOutput:
    """A prediction asked for with ``return_dict=True`` from a model seen only as a tuple: ``out.sample``, ``out[0]``."""

    sample: Tensor

    def __getitem__(self, index: int) -> Tensor:
        return (self.sample,)[index]

    def to_tuple(self) -> tuple[Tensor]:
        return (self.sample,)


def _entries(output: Any) -> Any:
    if isinstance(output, (tuple, list, Tensor)):
        return output
    if isinstance(output, Mapping):
        return dict(output)
    if hasattr(output, "__dataclass_fields__"):
        return {name: getattr(output, name) for name in output.__dataclass_fields__}
    return output
