"""What a `run` was asked for and what it resolves to: settings, the plan's shapes, the backend protocol."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from asyncdiff_partition.core.errors import ConfigError

__all__ = ["Backend", "RunConfig", "RunSettings", "latent_shape", "plan_input_shapes", "run_settings"]


# --- the `run` command: one sampling run from a plan ------------------------------------------


@dataclass(frozen=True)
class RunConfig:
    """What ``asyncdiff-partition run`` was asked for; handed (pickled) to every worker.

    ``steps``, ``warmup`` and ``stride`` default to the plan's; ``threads`` to one per rank's
    share of the CPU cores.
    """

    model: str | None  # None: the plan's
    plan: str
    steps: int | None = None
    warmup: int | None = None
    stride: int | None = None
    seed: int = 0
    guidance: float | None = None  # None: the model's own (see default_guidance)
    out_dir: str = "run"
    trace: str | None = None
    reference: bool = False
    nproc: int | None = None
    threads: int | None = None
    timeout_s: float = 300.0
    progress: bool = True
    oversubscribe: bool = False  # start more ranks than devices (runtime.preflight)
    compile: bool = False  # torch.compile each segment (fx.compile.compile_segment)


def plan_input_shapes(plan: Any, plan_path: str | Path | None = None) -> list[dict[str, Any]] | None:
    """The input specs (name, shape, dtype, latent) the plan's profile was made with, if known.

    Read from ``plan.profile["inputs"]`` when the plan records them, else from the profile file
    the plan names (as given, or next to the plan file).
    """
    if plan.profile.get("inputs"):
        return list(plan.profile["inputs"])
    recorded = plan.profile.get("path")
    if not recorded:
        return None
    from asyncdiff_partition.core.files import FileFormatError
    from asyncdiff_partition.core.profile import Profile, ProfileError

    candidates = [Path(recorded)]
    if plan_path is not None and not Path(recorded).is_absolute():
        candidates.append(Path(plan_path).parent / recorded)
    for candidate in candidates:
        if candidate.is_file():
            try:
                profile = Profile.load(candidate)
            except (FileFormatError, ProfileError):
                continue
            if profile.fingerprint == plan.fingerprint:
                return list(profile.inputs)
    return None


def latent_shape(plan: Any, plan_path: str | Path | None) -> tuple[int, Any, str]:
    """(denoiser batch, latent size, how it is known) for the plan's profile."""
    inputs = plan_input_shapes(plan, plan_path)
    if inputs is None:
        return 2, None, "the plan's profile file was not found, so batch 2 and the model's sample_size were assumed"
    shape = next(i["shape"] for i in inputs if i["latent"])
    h, w = shape[-2:]
    return int(shape[0]), (h if h == w else (h, w)), "the shape of the plan's profile"


@dataclass(frozen=True)
class RunSettings:
    """Steps, warm-up, stride and world size of a run, after defaulting to the plan's."""

    steps: int
    warmup: int
    stride: int
    world: int

    @property
    def note(self) -> str | None:
        """What a user may not have meant: a warm-up that covers every step runs no step asynchronously."""
        if self.warmup >= self.steps:
            return (f"warm-up {self.warmup} >= steps {self.steps}: every step runs exactly (the unsplit model's "
                    f"output) and none asynchronously; lower --warmup for a speedup")
        return None


def run_settings(config: RunConfig, plan: Any) -> RunSettings:
    """The run's settings: ``config``'s, else the plan's; and the ``--nproc`` check.

    Raises:
        ConfigError: steps < 1, warmup < 0, a stride other than 1 or 2, or ``nproc`` other than
            the plan's world size (B x (N + stride - 1), core.schedule.world_size).
    """
    from asyncdiff_partition.core.schedule import world_size

    steps = config.steps if config.steps is not None else plan.steps
    warmup = config.warmup if config.warmup is not None else plan.warmup
    stride = config.stride if config.stride is not None else plan.stride
    if steps < 1 or warmup < 0:
        raise ConfigError(f"need steps >= 1 and warmup >= 0; got {steps}, {warmup}")
    groups = getattr(plan, "batch_parallel", 1)
    world = world_size(plan.n_devices, stride, groups)
    if not config.reference and config.nproc is not None and config.nproc != world:
        shape = "" if groups == 1 else f" in each of {groups} batch groups"
        raise ConfigError(
            f"the plan needs {world} processes ({plan.n_devices} segments, stride {stride}{shape}) but --nproc is "
            f"{config.nproc}; leave --nproc out or make a plan for {config.nproc} devices"
        )
    return RunSettings(steps, warmup, stride, world)


class Backend(Protocol):
    """How one kind of model goes through :func:`run_plan` (module-level and picklable)."""

    runtime: str  # recorded in the report

    def configure(self, config: RunConfig, plan: Any) -> RunConfig:
        """``config`` with the model and guidance defaults of this kind of model."""

    def compile(self, config: RunConfig, plan: Any, settings: RunSettings) -> Any:
        """Load and check the model, build its op graph once, and make its ready segments."""

    def ship(self, job: Any, directory: str) -> Any:
        """Write each segment's file for the ranks; returns what ``run_rank`` loads them from."""

    def reference(self, config: RunConfig, plan: Any, job: Any, settings: RunSettings) -> dict[str, Any]:
        """The single-process reference run (rank 0's results)."""

    def run_rank(self, config: RunConfig, plan: Any, shipped: Any, settings: RunSettings) -> dict[str, Any]:
        """One rank (process group joined): load its segment, sample; this rank's results."""

    def write(self, config: RunConfig, result: Mapping[str, Any], out: Path) -> dict[str, Any]:
        """Rank 0: this kind's outputs (images, latent) and their report meta."""
