"""What a rank keeps of a model's weights: its segments' own, every other weight a stand-in.

Example::

    kept = release_weights(pipe.unet, torch.nn.ModuleList([segment.module]), used=ids_the_graph_reads)
"""

from __future__ import annotations

from collections.abc import Set

import torch

from asyncdiff_partition.fx.pickling import is_stand_in

__all__ = ["release_named", "release_weights"]


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
