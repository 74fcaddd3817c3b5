"""Capture of a noise-prediction model as one flat, verified ``torch.fx`` graph.

Example::

    captured = capture_model(unet, (latent, t), {"encoder_hidden_states": text})
    eps = captured.graph_module(*captured.flatten(latent, t, encoder_hidden_states=text))

Whatever the model's calling convention (positional, keyword, nested dicts such as SDXL's
``added_cond_kwargs``), the captured graph takes the model's tensor inputs as flat positional
placeholders and returns the single noise-prediction tensor. :class:`InputSpec` records which
placeholder is which model argument and which one is the latent.
"""

from __future__ import annotations

import contextlib
import inspect
import keyword
import logging
import re
from collections.abc import Callable, Iterator, Mapping, Sequence, Set
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree

from asyncdiff_partition.core.errors import AsyncDiffError, ConfigError
from asyncdiff_partition.core.quiet import quiet_loggers
from asyncdiff_partition.fx.failures import describe_failure
from asyncdiff_partition.fx.pickling import dump_graph, load_graph

__all__ = [
    "METHODS",
    "MODULE_KEY",
    "CallError",
    "CaptureError",
    "CapturedModel",
    "InputSpec",
    "capture_model",
    "pack_captured",
    "resolve_attr",
    "restore_captured",
]

METHODS = ("fx", "export")
MODULE_KEY = "asyncdiff_module"  # node.meta key: dotted path of the module a node came from

# Names under which a latent is usually passed, in order of preference.
_LATENT_NAMES = ("sample", "hidden_states", "latent", "latents", "x_t", "x", "z", "noisy_latents")
_WRAPPED = "model"  # attribute under which the flat wrapper holds the user's model


class CaptureError(AsyncDiffError, RuntimeError):
    """No capture method produced a graph that matches the model."""


class CallError(AsyncDiffError, ValueError):
    """A model call whose arguments do not fit the model or the captured call (structure, values, shapes)."""


@dataclass(frozen=True)
class InputSpec:
    """One tensor input of the captured graph.

    ``path`` is where the tensor sits in the model call, e.g. ``sample``, ``args[1]`` or
    ``added_cond_kwargs['text_embeds']``; ``name`` is the graph placeholder's name.
    """

    name: str
    path: str
    shape: tuple[int, ...]
    dtype: str
    is_latent: bool

    def to_dict(self) -> dict[str, Any]:
        """The form saved in profiles and plans (and hashed into the model fingerprint)."""
        return {"name": self.name, "path": self.path, "shape": list(self.shape), "dtype": self.dtype,
                "latent": self.is_latent}


@dataclass
class CapturedModel:
    """A model captured as a flat ``fx.GraphModule`` plus the facts needed to call it.

    Attributes:
        graph_module: ``forward(*tensors) -> noise prediction``; parameters and buffers are the
            original model's (shared, not copied).
        inputs: one :class:`InputSpec` per placeholder, in placeholder order.
        method: ``"fx"`` (torch.fx.symbolic_trace) or ``"export"`` (torch.export, non-strict).
        attempts: ``(method, error message)`` of each method that was tried and failed first.
        example: the example tensors, one per input, as given at capture time.
        treespec: the pytree structure of the bound model call (arguments by parameter name).
        constants: the call's non-tensor leaves by leaf index; they must not change.
        model: the original model, whose forward signature binds call arguments.
    """

    graph_module: torch.fx.GraphModule
    inputs: list[InputSpec]
    method: str
    example: list[torch.Tensor] = field(default_factory=list)
    attempts: list[tuple[str, str]] = field(default_factory=list)
    treespec: Any = None
    constants: dict[int, Any] = field(default_factory=dict)
    model: Any = None

    @property
    def latent(self) -> InputSpec:
        return next(spec for spec in self.inputs if spec.is_latent)

    def flatten(self, *args: Any, **kwargs: Any) -> list[torch.Tensor]:
        """Model-call arguments → the graph's positional tensors (same structure as captured)."""
        leaves, spec = pytree.tree_flatten(_bind(self.model, args, _with_defaults(self.model, kwargs)))
        if spec != self.treespec:
            raise CallError(
                "the call's argument structure differs from the captured one; pass the same "
                "arguments (and nesting) as at capture time"
            )
        for i, value in self.constants.items():
            if leaves[i] != value:
                raise CallError(f"a non-tensor argument was captured as {value!r} but is now {leaves[i]!r}; capture again")
        return [leaf for i, leaf in enumerate(leaves) if i not in self.constants]

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.graph_module(*self.flatten(*args, **kwargs))

    def call_eager(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """Run the original model (not the graph) on flat inputs: the eager baseline."""
        return _call_model(self.model, tensors, self.treespec, self.constants)

    def __reduce__(self) -> tuple[Any, ...]:
        return restore_captured, pack_captured(self)  # Note [pickling a captured model] (fx/pickling.py)


def pack_captured(captured: CapturedModel, stand_ins: Set[int] = frozenset(),
                  saved: Mapping[int, tuple[str, str]] | None = None) -> tuple[bytes, list[Any]]:
    """(graph blob, tensors) of a capture, for :func:`restore_captured`; weights whose ids are in
    ``stand_ins`` become stand-ins, those in ``saved`` are read by name where they are loaded
    (Notes [weight stand-ins], [weights by name] in fx/pickling.py)."""
    state = {"inputs": captured.inputs, "method": captured.method, "example": captured.example,
             "attempts": captured.attempts, "treespec": captured.treespec, "constants": captured.constants,
             "model": captured.model}
    return dump_graph(captured.graph_module, state, meta_key=MODULE_KEY, stand_ins=stand_ins, saved=saved)


def restore_captured(blob: bytes, tensors: list[torch.Tensor]) -> CapturedModel:
    """The capture that :func:`pack_captured` packed, graph rebuilt node for node."""
    gm, state = load_graph(blob, tensors, meta_key=MODULE_KEY)
    return CapturedModel(graph_module=gm, **state)


def capture_model(
    model: torch.nn.Module,
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    *,
    latent: str | None = None,
    methods: Sequence[str] = METHODS,
    verify: bool = True,
    seed: int = 0,
) -> CapturedModel:
    """Capture ``model(*args, **kwargs)`` as a flat, verified fx graph.

    ``torch.fx.symbolic_trace`` is tried first (keeps ``call_module`` nodes, fast); when it fails
    or its graph does not match eager, ``torch.export.export(..., strict=False)``. Each graph is
    checked against eager on the given inputs and on fresh random inputs of the same shapes.

    Args:
        model: the noise-prediction network, in eval mode.
        args, kwargs: one example call. Diffusers models get ``return_dict=False`` added.
        latent: name of the latent argument; guessed (``sample``, ``hidden_states``, ...) if None.
        methods: capture methods to try, in order (subset of :data:`METHODS`).
        verify: compare with eager (turn off only for models too large to run twice).
        seed: seed of the fresh random inputs used in verification.

    Returns:
        A :class:`CapturedModel`.

    Raises:
        CaptureError: every method failed; lists each method, its error and the model source
            line where it broke, with a hint.
        CallError: the example call does not fit the model or has no tensor input.
        ConfigError: an unknown method or latent name.
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ConfigError(f"unknown capture method(s) {unknown or list(methods)}; choose from {list(METHODS)}")
    kwargs = _with_defaults(model, kwargs or {})
    bound = _bind(model, tuple(args), kwargs)
    leaves_with_paths, treespec = pytree.tree_flatten_with_path(bound)
    tensors = [(i, _path_str(p), leaf) for i, (p, leaf) in enumerate(leaves_with_paths) if isinstance(leaf, torch.Tensor)]
    if not tensors:
        raise CallError("the example call has no tensor input; pass the latent and conditions as tensors")
    constants = {i: leaf for i, (_, leaf) in enumerate(leaves_with_paths) if not isinstance(leaf, torch.Tensor)}
    latent_path = _pick_latent([path for _, path, _ in tensors], latent)
    names = _placeholder_names([path for _, path, _ in tensors])
    specs = [
        InputSpec(name, path, tuple(t.shape), str(t.dtype).removeprefix("torch."), path == latent_path)
        for name, (_, path, t) in zip(names, tensors)
    ]
    example = [t for _, _, t in tensors]
    wrapper = _FlatCall(model, names, treespec, constants)

    attempts: list[tuple[str, str]] = []
    for method in methods:
        try:
            with torch.no_grad():
                gm = _unwrap(_TRACERS[method](wrapper, example), model)
                if verify:
                    _verify(gm, model, example, specs, treespec, constants, seed)
        except Exception as error:  # noqa: BLE001 - each failure is reported in CaptureError
            attempts.append((method, describe_failure(error, model)))
            continue
        return CapturedModel(
            graph_module=gm, inputs=specs, method=method, example=example, attempts=attempts,
            treespec=treespec, constants=constants, model=model,
        )
    raise CaptureError(_failure_message(type(model).__name__, attempts))


# --- the flat wrapper -------------------------------------------------------------------------


class _FlatCall(torch.nn.Module):
    """``forward(t0, t1, ...)`` → rebuild the model call from flat tensors → noise prediction."""

    def __init__(self, model: torch.nn.Module, names: list[str], treespec: Any, constants: dict[int, Any]) -> None:
        super().__init__()
        setattr(self, _WRAPPED, model)
        self._treespec, self._constants = treespec, constants
        # fx names placeholders after the forward's parameters: give it the inputs' names.
        params = ", ".join(names)
        namespace: dict[str, Any] = {}
        exec(f"def forward(self, {params}):\n    return self._call([{params}])", namespace)
        # fx traces type(root).forward, so the forward lives on a one-off subclass.
        self.__class__ = type("FlatCall", (_FlatCall,), {"forward": namespace["forward"]})

    def _call(self, tensors: list[Any]) -> Any:
        return _call_model(getattr(self, _WRAPPED), tensors, self._treespec, self._constants)


def _call_model(model: torch.nn.Module, tensors: Sequence[Any], treespec: Any, constants: dict[int, Any]) -> Any:
    """Flat tensors + the captured constants → the model's own call → noise prediction."""
    it = iter(tensors)
    leaves = [constants[i] if i in constants else next(it) for i in range(len(constants) + len(tensors))]
    call_args, call_kwargs = _split_bound(model, pytree.tree_unflatten(leaves, treespec))
    return _noise_prediction(model(*call_args, **call_kwargs))


def _noise_prediction(out: Any) -> Any:
    if isinstance(out, (tuple, list)):
        return out[0]
    if isinstance(out, (torch.Tensor, torch.fx.Proxy)):
        return out
    if hasattr(out, "sample"):  # a diffusers output dataclass
        return out.sample
    return out


def _trace_fx(wrapper: _FlatCall, example: list[torch.Tensor]) -> torch.fx.GraphModule:
    return torch.fx.symbolic_trace(wrapper)


@contextlib.contextmanager
def _data_as_detach() -> Iterator[None]:
    """While tracing, ``tensor.data`` reads as ``tensor.detach()``.

    Non-strict export cannot follow ``.data``: the tensor it returns is untracked, and export
    stops at it as a fake constant (diffusers' CogVideoX builds positional embeddings for a new
    size with ``joint.data[:, n:].copy_(pos)``). Under ``no_grad`` the two name the same tensor
    (same storage, same values), and ``detach`` is an op the tracer records, writes through it
    included. ``.data`` is a C attribute that no torch-function mode sees, so the property is
    shadowed on ``torch.Tensor`` for the trace and restored after; setting ``.data`` is unchanged.
    Verification against eager still guards the result.
    """
    setter = vars(torch._C.TensorBase)["data"].__set__
    had = "data" in vars(torch.Tensor)
    previous = vars(torch.Tensor).get("data")
    setattr(torch.Tensor, "data", property(lambda self: self.detach(), setter))  # noqa: B010 - a class attribute
    try:
        yield
    finally:
        if had:
            setattr(torch.Tensor, "data", previous)  # noqa: B010
        else:
            delattr(torch.Tensor, "data")


_EXPORT_LOGGERS = ("torch.fx.experimental.symbolic_shapes", "torch._dynamo", "torch.export", "torch._export")


def _trace_export(wrapper: _FlatCall, example: list[torch.Tensor]) -> torch.fx.GraphModule:
    # torch.export logs a whole graph when it gives up on a data-dependent value; the capture's own
    # error says what failed (fx/failures.py)
    with _data_as_detach(), quiet_loggers(*_EXPORT_LOGGERS, level=logging.ERROR):
        program = torch.export.export(wrapper, tuple(example), strict=False)
    gm = program.module()
    gm.graph._codegen = torch.fx.graph.CodeGen()  # plain positional forward(*tensors)
    for node in gm.graph.find_nodes(op="output"):
        out = node.args[0]
        if isinstance(out, (tuple, list)) and len(out) == 1:
            node.args = (out[0],)
    gm.recompile()
    return gm


_TRACERS: dict[str, Callable[[_FlatCall, list[torch.Tensor]], torch.fx.GraphModule]] = {
    "fx": _trace_fx,
    "export": _trace_export,
}


def _unwrap(gm: torch.fx.GraphModule, model: torch.nn.Module) -> torch.fx.GraphModule:
    """Re-root the graph on the user's model: targets and module paths lose the wrapper prefix.

    Parameters and submodules are the model's own objects (shared, not copied); attributes that
    only the capture created (torch.export's lifted constants) come from the traced module.
    """
    prefix = _WRAPPED + "."
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and str(node.target).startswith("_guards"):
            gm.graph.erase_node(node)  # torch.export's input-shape guard; verification covers it
    attrs: dict[str, Any] = {}
    for node in gm.graph.nodes:
        if node.op in ("call_module", "get_attr"):
            original = str(node.target)
            node.target = original.removeprefix(prefix)
            node._rename(node.name.removeprefix(_WRAPPED + "_"))
            try:
                attrs[node.target] = resolve_attr(model, node.target)
            except AttributeError:
                attrs[node.target] = resolve_attr(gm, original)
        node.meta[MODULE_KEY] = _module_path(node, prefix)
    return torch.fx.GraphModule(attrs, gm.graph, class_name=type(model).__name__ + "Graph")


def resolve_attr(root: Any, target: str) -> Any:
    """``root.a.b.c`` for the dotted target of a ``get_attr`` / ``call_module`` node."""
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _module_path(node: torch.fx.Node, prefix: str) -> str:
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = str(list(stack.values())[-1][0])
        # torch.export writes paths such as "L['self'].model.conv_in" or "model.conv_in".
        path = re.sub(r"^L\['self'\]\.?", "", path)
        path = path.removeprefix(prefix)
        return "" if path == _WRAPPED else path
    if node.op == "get_attr":
        return str(node.target).rpartition(".")[0]
    return ""


# --- verification ----------------------------------------------------------------------------


def _verify(gm, model, example, specs, treespec, constants, seed) -> None:
    generator = torch.Generator().manual_seed(seed)
    fresh = [
        torch.randn(t.shape, generator=generator, dtype=t.dtype) if t.is_floating_point() else t.clone()
        for t in example
    ]
    for inputs, label in ((example, "example inputs"), (fresh, "fresh random inputs")):
        expected = _call_model(model, inputs, treespec, constants)
        actual = gm(*inputs)
        try:
            torch.testing.assert_close(actual, expected)
        except AssertionError as error:
            first = str(error).strip().splitlines()[0]
            raise AssertionError(f"captured graph differs from eager on {label}: {first}") from None


# --- argument handling -----------------------------------------------------------------------


def _with_defaults(model: torch.nn.Module, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Diffusers models return a plain tuple with ``return_dict=False``: ask for it."""
    kwargs = dict(kwargs)
    if "return_dict" in inspect.signature(model.forward).parameters:
        kwargs.setdefault("return_dict", False)
    return kwargs


def _bind(model: torch.nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """Bind a call to the forward signature: {parameter: value}, defaults left out."""
    try:
        return dict(inspect.signature(model.forward).bind(*args, **kwargs).arguments)
    except TypeError as error:
        raise CallError(f"the example arguments do not fit {type(model).__name__}.forward: {error}") from None


def _split_bound(model: torch.nn.Module, arguments: dict[str, Any]) -> tuple[list[Any], dict[str, Any]]:
    call_args: list[Any] = []
    call_kwargs: dict[str, Any] = {}
    for name, param in inspect.signature(model.forward).parameters.items():
        if name not in arguments:
            continue
        if param.kind == param.VAR_POSITIONAL:
            call_args.extend(arguments[name])
        elif param.kind == param.VAR_KEYWORD:
            call_kwargs.update(arguments[name])
        elif param.kind == param.POSITIONAL_ONLY:
            call_args.append(arguments[name])
        else:
            call_kwargs[name] = arguments[name]
    return call_args, call_kwargs


def _path_str(path: tuple) -> str:
    """pytree key path → ``sample`` / ``added_cond_kwargs['text_embeds']`` / ``args[1]``."""
    text = pytree.keystr(path)  # e.g. "['sample']" or "['added_cond_kwargs']['text_embeds']"
    return re.sub(r"^\['([^']+)'\]", r"\1", text)


def _placeholder_names(paths: list[str]) -> list[str]:
    names: list[str] = []
    for path in paths:
        name = re.sub(r"\W+", "_", path).strip("_") or "input"
        if name[0].isdigit() or keyword.iskeyword(name) or name == "self":
            name = "in_" + name
        while name in names:
            name += "_"
        names.append(name)
    return names


def _pick_latent(paths: list[str], latent: str | None) -> str:
    if latent is not None:
        if latent not in paths:
            raise ConfigError(f"latent {latent!r} is not a tensor input of the call; tensor inputs: {paths}")
        return latent
    for candidate in _LATENT_NAMES:
        if candidate in paths:
            return candidate
    return paths[0]


# --- error reporting -------------------------------------------------------------------------

_HINTS = {
    "fx": "symbolic_trace cannot follow Python control flow on tensor values or iterate tensors",
    "export": "torch.export needs shape-static code: replace data-dependent branches with tensor "
    "ops (torch.where) or make the value a non-tensor argument",
}


def _failure_message(model_name: str, attempts: list[tuple[str, str]]) -> str:
    lines = [f"could not capture {model_name}; tried {', '.join(m for m, _ in attempts)}:"]
    for method, message in attempts:
        lines.append(f"  - {method}: {message}")
        lines.append(f"    hint: {_HINTS[method]}")
    return "\n".join(lines)
