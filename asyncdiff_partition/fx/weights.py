"""What a rank keeps of a model's weights: its segments' own, read by name from the saved files where they are unchanged.

Example::

    kept = release_weights(pipe.unet, torch.nn.ModuleList([segment.module]), used=ids_the_graph_reads)
"""

from __future__ import annotations

import os
from collections.abc import Set
from pathlib import Path
from typing import Any

import torch

from asyncdiff_partition.fx.pickling import is_stand_in

__all__ = ["release_named", "release_weights", "saved_sources"]


def release_weights(model: torch.nn.Module, keep: torch.nn.Module, used: Set[int] | None = None) -> int:
    """Swap every parameter and buffer of ``model`` that ``keep`` does not hold for a stand-in.

    With ``used`` (ids of the tensors the captured graphs read), only those are swapped: a
    pipeline may read others outside the model's ``forward`` (a prior's ``clip_mean`` and
    ``clip_std`` in ``post_process_latents``), and they stay.

    A rank's pipeline keeps the original denoiser for its attributes (``config``, ``dtype``,
    ``device``, ...), not its weights: after this, only the weights of this rank's segments
    (``keep``) stay in memory, once nothing else refers to the old tensors (drop the capture
    first). A stand-in is one element on the tensor's device, expanded to its shape and dtype
    (Note [weight stand-ins] in fx/pickling.py). Returns the bytes kept.
    """
    own = {id(t) for t in (*keep.parameters(), *keep.buffers())}
    kept = 0
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for name, t in store.items():
                if t is None or t.device.type == "meta" or is_stand_in(t) or (used is not None and id(t) not in used):
                    continue
                if id(t) in own:
                    kept += t.numel() * t.element_size()
                    continue
                empty = torch.zeros((), dtype=t.dtype, device=t.device).expand(t.shape)
                is_param = isinstance(t, torch.nn.Parameter)
                store[name] = torch.nn.Parameter(empty, requires_grad=False) if is_param else empty  # type: ignore[assignment]
    return kept


def release_named(model: torch.nn.Module, names: Set[str]) -> int:
    """Swap the named parameters and buffers of ``model`` for stand-ins (their values came to this rank in
    its shipped segments); returns the bytes released.

    Example:
        >>> release_named(pipe.unet, {"conv_in.weight", "conv_in.bias"})  # doctest: +SKIP
    """
    released = 0
    for name in names:
        owner_path, _, leaf = name.rpartition(".")
        try:
            owner = model.get_submodule(owner_path)
        except AttributeError:
            continue
        for store in (owner._parameters, owner._buffers):
            t = store.get(leaf)
            if t is None or t.device.type == "meta" or is_stand_in(t):
                continue
            released += t.numel() * t.element_size()
            empty = torch.zeros((), dtype=t.dtype, device=t.device).expand(t.shape)
            store[leaf] = torch.nn.Parameter(empty, requires_grad=False) if isinstance(t, torch.nn.Parameter) else empty  # type: ignore[assignment]
    return released


def saved_sources(module: torch.nn.Module, folder: str | os.PathLike[str]) -> dict[int, tuple[str, str]]:
    """The weights of ``module`` that ``folder``'s safetensors files hold unchanged: id -> (file, key).

    A weight counts when the file has its name with the same dtype and shape, and the same values
    at the start and the end of the tensor (a sample: a model changed after loading, by fused LoRA
    say, differs there); any other weight ships with its segment (Note [weights by name] in
    fx/pickling.py). A folder without safetensors files gives none.
    """
    from safetensors import safe_open

    files = sorted(Path(folder).glob("*.safetensors"))
    found: dict[int, tuple[str, str]] = {}
    tensors: dict[str, torch.Tensor] = dict(module.named_parameters(remove_duplicate=False))
    tensors.update(module.named_buffers(remove_duplicate=False))
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            for key in handle.keys():
                t = tensors.get(key)
                if t is None or t.device.type == "meta" or is_stand_in(t):
                    continue
                stored = handle.get_slice(key)
                if tuple(stored.get_shape()) != tuple(t.shape) or str(stored.get_dtype()) != _safetensors_dtype(t.dtype):
                    continue
                if _same_ends(stored, t):
                    found[id(t)] = (str(file.resolve()), key)
    return found


_SAMPLE = 64  # elements compared at each end of a weight


def _same_ends(stored: Any, t: torch.Tensor) -> bool:
    flat = t.detach().reshape(-1)
    if flat.numel() == 0:
        return True
    if t.dim() == 0:
        return bool(torch.equal(stored[...], t.detach().cpu()))
    rows = t.shape[0]
    first = stored[0:1].reshape(-1)[:_SAMPLE]
    last = stored[rows - 1:rows].reshape(-1)[-_SAMPLE:]
    mine = t.detach().cpu()
    return bool(torch.equal(first, mine[0:1].reshape(-1)[:_SAMPLE]) and
                torch.equal(last, mine[rows - 1:rows].reshape(-1)[-_SAMPLE:]))


def _safetensors_dtype(dtype: torch.dtype) -> str:
    return {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
            torch.int64: "I64", torch.int32: "I32", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}.get(dtype, "?")
