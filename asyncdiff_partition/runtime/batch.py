"""Batch groups: the denoiser batch split into B equal slices, one per group of ranks, and ε joined back.

Example::

    parts = [split_batch(inputs, 2, g, latent="sample") for g in range(2)]   # unconditional | conditional
    eps = torch.cat([denoise(part) for part in parts])

Note [batch slices]
~~~~~~~~~~~~~~~~~~~
A guided pipeline calls its denoiser on a batch of independent halves (unconditional,
conditional; three for InstructPix2Pix). Group g of B takes rows ``[g b, (g + 1) b)`` of every
input whose leading dimension is the latent's batch (latent, per-sample timesteps, text
embeddings, class labels); inputs of any other shape (a scalar timestep) go to every group whole.
Each sample's ε depends only on its own rows, so the groups' ε, concatenated in group order,
is the unsplit ε up to float reassociation: kernels may block a batch of b rows differently
from one of B b rows (observed up to ~1e-6 relative on CPU in float32; tests use rtol 1e-5).
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from asyncdiff_partition.core.errors import AsyncDiffError

__all__ = ["BatchSplitError", "group_batch", "split_batch"]


class BatchSplitError(AsyncDiffError, ValueError):
    """The denoiser batch does not split into the plan's B equal groups."""


def group_batch(batch: int, batch_parallel: int) -> int:
    """Rows per group; refuses a batch that does not split evenly.

    Raises:
        BatchSplitError: ``batch`` is not a multiple of ``batch_parallel``.
    """
    if batch_parallel < 1 or batch % batch_parallel:
        divisors = [b for b in range(1, batch + 1) if batch % b == 0]
        raise BatchSplitError(
            f"the denoiser batch of {batch} does not split into batch_parallel={batch_parallel} equal groups; "
            f"use a batch_parallel that divides it ({', '.join(map(str, divisors))}) or a batch that "
            f"{batch_parallel} divides"
        )
    return batch // batch_parallel


def split_batch(inputs: Mapping[str, Tensor], batch_parallel: int, group: int, *, latent: str,
                rows: int | None = None) -> dict[str, Tensor]:
    """Group ``group``'s slice of the model inputs (Note [batch slices]).

    Args:
        inputs: the model inputs by captured placeholder name, at the full batch.
        batch_parallel: B.
        group: 0 <= group < B.
        latent: name of the latent input, whose leading dimension is the batch.
        rows: the rows per group the group's segments were captured at; checked when given.

    Raises:
        BatchSplitError: no latent input, a batch that does not split into B groups, or one
            whose slice is not ``rows``.
    """
    if batch_parallel == 1:
        return dict(inputs)
    if latent not in inputs:
        raise BatchSplitError(f"batch groups slice the latent input {latent!r}, but the inputs are {sorted(inputs)}")
    batch = inputs[latent].shape[0]
    size = group_batch(batch, batch_parallel)
    if rows is not None and size != rows:
        raise BatchSplitError(
            f"the denoiser batch of {batch} gives {size} rows to each of B={batch_parallel} groups, but the "
            f"segments were captured at {rows} rows; capture the model at batch {batch} / {batch_parallel} = {size}"
        )
    lo, hi = group * size, (group + 1) * size
    return {name: t[lo:hi] if t.dim() >= 1 and t.shape[0] == batch else t for name, t in inputs.items()}
