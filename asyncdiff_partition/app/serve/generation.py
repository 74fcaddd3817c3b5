"""One batch of requests as one pipeline call, in the service's one worker thread.

Example::

    runner = Runner(options)                           # the pipeline loaded, parallelized on --devices ranks
    results = runner.run(batch)                        # {job: [entry per image]} (entry: {"b64_json": ...})
    runner.close()                                     # ranks ended

Every image of a batch is a row of the call with its own ``torch.Generator`` seeded from its
request's seed (image j of a request: seed + j), so a request gives the same images whoever shares
its batch: with ``exact`` batching bit for bit (Note [exact batching] in app/serve/rows.py), with
``fused`` to about 1e-6. A request whose client went away is dropped from its batch's result; when
every request of a call is gone, the call stops at the next step (its ``callback_on_step_end``),
and the ranks simply get no more steps of it (Note [engine]: the loop runs here).
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

import torch

from asyncdiff_partition.app.serve.batcher import Job
from asyncdiff_partition.app.serve.encoding import encode_output
from asyncdiff_partition.app.serve.options import ServeOptions
from asyncdiff_partition.app.serve.rows import exact_rows
from asyncdiff_partition.pipelines.loading import load_pipeline
from asyncdiff_partition.pipelines.parallelize import parallel_state, parallelize, warm
from asyncdiff_partition.pipelines.recording import components

__all__ = ["Cancelled", "ImageSpec", "Runner"]


class Cancelled(Exception):
    """Every request of a call went away: the call stops at its next step."""


@dataclass(frozen=True)
class ImageSpec:
    """One request's images, as the pipeline is called for them."""

    prompt: str
    n: int
    seed: int
    width: int | None
    height: int | None
    steps: int
    guidance: float | None
    negative: str | None = None
    image: Any = None  # an RGB PIL image

    def key(self) -> Hashable:
        """What one pipeline call has one value of (module docstring of app/serve/batcher.py)."""
        shown = None if self.image is None else self.image.size
        return (self.width, self.height, self.steps, self.guidance, self.negative is not None, shown)

    def shape(self) -> str:
        """The metrics label: size and steps."""
        size = f"{self.width}x{self.height}" if self.width else "default"
        return f"{size}/{self.steps}"


class Runner:
    """The pipeline and how a batch is called on it (module docstring).

    Raises:
        LoadError: the folder is not a pipeline (before any rank starts).
    """

    def __init__(self, options: ServeOptions, *, cache_dir: str | None = None):
        self.options = options
        begin = time.perf_counter()
        self.pipe = load_pipeline(options.model)
        self.setup = {"load_s": time.perf_counter() - begin}
        self.params = inspect.signature(self.pipe.__call__).parameters
        self.modules = {n: m for n, m in components(self.pipe).items() if isinstance(m, torch.nn.Module)}
        self.engine: Any = None
        self.prepared: set[Hashable] = set()
        if options.engine:
            parallelize(self.pipe, options.parallel, cache_dir=cache_dir, max_structures=64)
            self.engine = parallel_state(self.pipe)
            self.engine.restarts = options.restarts

    # --- what the pipeline takes --------------------------------------------------------------

    def takes(self, name: str) -> bool:
        return name in self.params

    def default(self, name: str) -> Any:
        """The pipeline's own default of call argument ``name`` (None when it has none)."""
        param = self.params.get(name)
        return None if param is None or param.default is inspect.Parameter.empty else param.default

    def scale(self) -> int:
        """What height and width must be multiples of: the VAE's scale factor, and 8 (what diffusers pipelines check)."""
        factor = int(getattr(self.pipe, "vae_scale_factor", 8) or 8)
        return factor * 8 // math.gcd(factor, 8)

    # --- running ------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the ranks now (else at the first request)."""
        if self.engine is not None:
            begin = time.perf_counter()
            self.engine.start()
            self.setup["start_s"] = time.perf_counter() - begin

    def run(self, jobs: list[Job]) -> dict[Job, list[dict[str, Any]]]:
        """``jobs`` (one key) as one pipeline call; each live job's response entries.

        Raises:
            Cancelled: every job was cancelled before the call ended.
            RankError, EngineError: the ranks failed (the next call starts new ones, bounded).
        """
        if self.engine is not None:
            self.engine.check_ranks()
        specs: list[ImageSpec] = [job.spec for job in jobs]
        first = specs[0]
        rows = [(s, s.seed + j) for s in specs for j in range(s.n)]
        call = self._call(first, [s.prompt for s, _ in rows], [s.negative for s, _ in rows],
                          [s.image for s, _ in rows])
        exact = self.options.batching == "exact" and len(rows) > 1
        if exact and self.engine is not None and first.key() not in self.prepared:
            warm(self.pipe, **self._call(first, [first.prompt], [first.negative], [first.image]))  # Note [exact batching]
        if self.takes("callback_on_step_end"):
            call["callback_on_step_end"] = self._on_step(jobs, first.steps)
        generators = [torch.Generator().manual_seed(seed) for _, seed in rows]
        with exact_rows(self.pipe, len(rows) if exact else 1, self.modules), torch.no_grad():
            output = self.pipe(**call, generator=generators)
        self.prepared.add(first.key())
        frames = getattr(output, "frames", None)
        items = list(frames) if frames is not None else list(output.images)
        found: dict[Job, list[dict[str, Any]]] = {}
        at = 0
        for job in jobs:
            mine, at = items[at:at + job.spec.n], at + job.spec.n
            if not job.cancelled.is_set():
                found[job] = [{**encode_output(item, frames is not None), "seed": job.spec.seed + j}
                              for j, item in enumerate(mine)]
        return found

    def _call(self, spec: ImageSpec, prompts: list[str], negatives: list[str | None], images: list[Any]) -> dict[str, Any]:
        call: dict[str, Any] = {"prompt": prompts, "num_inference_steps": spec.steps}
        if spec.width is not None:
            call.update(width=spec.width, height=spec.height)
        if spec.guidance is not None:
            call["guidance_scale"] = spec.guidance
        if spec.negative is not None:
            call["negative_prompt"] = negatives
        if spec.image is not None:
            call["image"] = images if len(images) > 1 else images[0]
        if self.takes("output_type"):
            call["output_type"] = "pil"
        return call

    def _on_step(self, jobs: list[Job], steps: int) -> Any:
        def on_step(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            for job in jobs:
                if job.progress is not None and not job.cancelled.is_set():
                    job.progress(step + 1, steps)
            if all(job.cancelled.is_set() for job in jobs):
                raise Cancelled(f"all {len(jobs)} request(s) of the call went away")
            return tensors

        return on_step

    def reports(self) -> dict[int, dict[str, Any]]:
        """The ranks' step reports of their streams' last runs (empty without ranks)."""
        if self.engine is None or self.engine.pool is None:
            return {}
        return dict(self.engine.reports())

    def close(self) -> None:
        if self.engine is not None:
            self.pipe.close()
            self.engine = None
