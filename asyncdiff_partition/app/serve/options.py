"""The service's settings: one frozen value, checked before anything loads."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from asyncdiff_partition.core.config import ParallelConfig
from asyncdiff_partition.core.errors import ConfigError

__all__ = ["BATCHING", "ServeOptions"]

BATCHING = ("exact", "fused")  # Note [exact batching] in app/serve/rows.py


@dataclass(frozen=True)
class ServeOptions:
    """What ``asyncdiff-partition serve`` was asked for.

    Attributes:
        model: the pipeline folder (``save_pretrained``'s).
        parallel: the engine's configuration; ``devices=1`` serves the plain pipeline in this process, no ranks.
        host, port: where to listen.
        max_queue: requests waiting at most (beyond: 429).
        max_batch: images in one pipeline call at most.
        max_n: images one request may ask for.
        admission_window_ms: how long the first request of a batch waits for others of its structure.
        request_timeout_s: a request not answered in this time is cancelled (504).
        batching: ``exact`` (each image as if alone) or ``fused`` (one batched call; close, not equal).
        max_size: the largest height or width in pixels.
        max_steps: the most denoising steps a request may ask for.
        drain_s: on SIGTERM, how long requests in flight may take to finish.
        restarts: how often the ranks are started again after a failure, in a row.
    """

    model: str
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    host: str = "127.0.0.1"
    port: int = 8000
    max_queue: int = 64
    max_batch: int = 4
    max_n: int = 4
    admission_window_ms: float = 20.0
    request_timeout_s: float = 300.0
    batching: str = "exact"
    max_size: int = 1024
    max_steps: int = 200
    drain_s: float = 60.0
    restarts: int = 2

    @property
    def engine(self) -> bool:
        """Whether the denoiser runs on ranks (``devices`` > 1) or in this process."""
        return self.parallel.devices > 1

    def checked(self) -> ServeOptions:
        """These options after every rule; raises :class:`ConfigError` naming the flag and the fix."""
        if not (Path(self.model) / "model_index.json").is_file():
            raise ConfigError(f"--model {self.model!r} is not a pipeline folder (no model_index.json); pass the folder "
                              "a pipeline's save_pretrained wrote")
        for flag, value in (("--max-queue", self.max_queue), ("--max-batch", self.max_batch), ("--max-n", self.max_n),
                            ("--max-size", self.max_size), ("--max-steps", self.max_steps)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{flag} must be a whole number >= 1, got {value!r}")
        if self.max_n > self.max_batch:
            raise ConfigError(f"--max-n {self.max_n} is more than --max-batch {self.max_batch}: such a request would "
                              "never fit a pipeline call; lower --max-n or raise --max-batch")
        for flag, number in (("--admission-window-ms", self.admission_window_ms), ("--drain", self.drain_s)):
            if not (math.isfinite(number) and number >= 0):
                raise ConfigError(f"{flag} must be a finite number >= 0, got {number!r}")
        if not (math.isfinite(self.request_timeout_s) and self.request_timeout_s > 0):
            raise ConfigError(f"--request-timeout must be a positive number of seconds, got {self.request_timeout_s!r}")
        if self.batching not in BATCHING:
            raise ConfigError(f"--batching must be one of {', '.join(BATCHING)}, got {self.batching!r}")
        if not 0 < self.port < 65536:
            raise ConfigError(f"--port must be between 1 and 65535, got {self.port}")
        if self.restarts < 0:
            raise ConfigError(f"--restarts must be >= 0, got {self.restarts}")
        self.parallel.checked()
        return self
