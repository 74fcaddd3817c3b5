"""Export a plan's segments as ONNX models, one file per segment, each checked against its source.

Example::

    manifest = export_plan_onnx("plan.json", "segments/")      # a torch plan (zoo name, directory)
    [s["max_abs_error"] for s in manifest["segments"]]         # vs the torch segment
    segments = load_exported("segments/")                      # split.Segment list, onnxruntime inside
    ReferenceSchedule(segments, warmup=1)                       # the same schedule, on ONNX

For a torch plan the model is captured at the plan's shapes, split at the plan's boundaries
(:func:`~asyncdiff_partition.fx.split.split_graph`) and every segment's ``fx.GraphModule`` goes
through ``torch.onnx.export``: the TorchScript exporter (``dynamo=False``) first, the
torch.export-based one (``dynamo=True``, which needs onnxscript) if that fails. For a plan of an
``.onnx`` model the segments are the extracted ones (:func:`~asyncdiff_partition.onnx.segments.split_onnx`).
Each file is run by onnxruntime on the segment's real inputs (the example inputs pushed through
the segments before it) and compared with the source segment; ``segments.json`` lists the
files, their inputs and outputs and the largest absolute error.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx
import torch
import torch.utils._pytree as pytree

from asyncdiff_partition.core.errors import AsyncDiffError
from asyncdiff_partition.core.files import atomic_path, read_json, write_atomic, write_json_atomic
from asyncdiff_partition.core.plan import Plan
from asyncdiff_partition.fx.split import Segment
from asyncdiff_partition.onnx.model import is_onnx_path
from asyncdiff_partition.onnx.segments import OnnxSegmentModule

__all__ = ["MANIFEST", "ExportError", "export_plan_onnx", "load_exported"]

MANIFEST = "segments.json"
SCHEMA_VERSION = 1
_OPSET = 17  # LayerNormalization is an ONNX op from 17 on


class ExportError(AsyncDiffError, ValueError):
    """A segment that no exporter could write, or an export folder that cannot be read."""


def export_plan_onnx(plan_path: str | Path, out_dir: str | Path, *, model_spec: str | None = None,
                     opset: int = _OPSET) -> dict[str, Any]:
    """Write one ONNX model per segment of a plan, and ``segments.json`` describing them.

    Args:
        plan_path: the plan file.
        out_dir: folder for ``segment{k}.onnx`` and ``segments.json`` (made if missing).
        model_spec: where to load the model from; default the plan's model.
        opset: ONNX opset for the torch exporter.

    Returns:
        The manifest (what ``segments.json`` holds).

    Raises:
        FileFormatError, PlanError: the plan cannot be read or is not this model's.
        ExportError: a segment neither exporter could write.
    """
    plan = Plan.load(plan_path)
    spec = model_spec or plan.model
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if is_onnx_path(spec):
        segments, args = _onnx_segments(spec, plan, plan_path)
    else:
        segments, args = _torch_segments(spec, plan, plan_path)
    entries = []
    for segment, example in zip(segments, args):
        path = out / f"segment{segment.index}.onnx"
        with torch.no_grad():
            expected = segment.module(*example)
        if isinstance(segment.module, OnnxSegmentModule):
            write_atomic(path, segment.module.model)
            exporter, names_in, names_out = "onnx.utils.Extractor", segment.module.args, segment.module.outputs
        else:
            names_in = _leaf_names(segment.inputs + segment.receives, example)
            names_out = _leaf_names(segment.outputs, expected)
            exporter = _export(segment, example, path, names_in, names_out, opset)
        module = _module(path.read_bytes(), names_in, names_out)
        error = max((float((a - b).abs().max()) for a, b in zip(_leaves(module(*example)), _leaves(expected))),
                    default=0.0)
        entries.append({"index": segment.index, "file": path.name, "inputs": segment.inputs,
                        "receives": segment.receives, "outputs": segment.outputs, "onnx_inputs": names_in,
                        "onnx_outputs": names_out, "exporter": exporter, "max_abs_error": error})
    manifest = {"kind": "onnx_segments", "schema_version": SCHEMA_VERSION, "model": spec, "plan": str(plan_path),
                "fingerprint": plan.fingerprint, "boundaries": plan.boundaries, "segments": entries}
    write_json_atomic(out / MANIFEST, manifest)
    return manifest


def load_exported(out_dir: str | Path, *, threads: int = 1, optimization: str = "all") -> list[Segment]:
    """The segments an export wrote, as :class:`~asyncdiff_partition.fx.split.Segment` objects run by onnxruntime.

    Raises:
        FileFormatError: no readable ``segments.json`` in ``out_dir``.
    """
    folder = Path(out_dir)
    manifest = read_json(folder / MANIFEST, kind="onnx_segments", schema_version=SCHEMA_VERSION,
                         fix="re-run 'asyncdiff-partition export-onnx'")
    segments = []
    for entry in manifest["segments"]:
        module = _module((folder / entry["file"]).read_bytes(), entry["onnx_inputs"], entry["onnx_outputs"],
                         threads=threads, optimization=optimization)
        segments.append(Segment(index=entry["index"], module=module, inputs=entry["inputs"],  # type: ignore[arg-type]
                                receives=entry["receives"], outputs=entry["outputs"], replicated=[]))
    return segments


# --- sources ----------------------------------------------------------------------------------


def _torch_segments(spec: str, plan: Plan, plan_path: str | Path) -> tuple[list[Any], list[list[Any]]]:
    from asyncdiff_partition.app.api import capture_spec
    from asyncdiff_partition.app.settings import plan_input_shapes
    from asyncdiff_partition.fx.ready import ready_segments

    shapes = plan_input_shapes(plan, plan_path)
    latent = next((s["shape"] for s in shapes or [] if s["latent"]), None)
    _, captured = capture_spec(spec, batch=latent[0] if latent else 2, sample_size=latent[-1] if latent else None)
    segments = ready_segments(captured, plan)
    return segments, _chain(segments, dict(zip((s.name for s in captured.inputs), captured.example)))


def _onnx_segments(spec: str, plan: Plan, plan_path: str | Path) -> tuple[list[Any], list[list[Any]]]:
    from asyncdiff_partition.app.settings import plan_input_shapes
    from asyncdiff_partition.onnx.model import load_onnx
    from asyncdiff_partition.onnx.profiler import example_feed
    from asyncdiff_partition.onnx.segments import ready_onnx_segments

    shapes = plan_input_shapes(plan, plan_path) or []
    model = load_onnx(spec, input_shapes={s["name"]: s["shape"] for s in shapes},
                      latent=next((s["name"] for s in shapes if s["latent"]), None))
    segments = ready_onnx_segments(model, plan)
    return segments, _chain(segments, {k: torch.from_numpy(v) for k, v in example_feed(model).items()})


def _chain(segments: Sequence[Any], inputs: dict[str, Any]) -> list[list[Any]]:
    """Each segment's real arguments: the inputs pushed through the segments before it."""
    values: dict[str, Any] = {}
    args = []
    with torch.no_grad():
        for segment in segments:
            args.append([inputs[n] for n in segment.inputs] + [values[n] for n in segment.receives])
            values.update(zip(segment.outputs, segment.module(*args[-1])))
    return args


# --- export -----------------------------------------------------------------------------------


def _export(segment: Segment, example: list[Any], path: Path, names_in: list[list[str]],
            names_out: list[list[str]], opset: int) -> str:
    """Export with dynamo=False, else dynamo=True; the exporter that worked."""
    flat_in = [n for names in names_in for n in names]
    flat_out = [n for names in names_out for n in names]
    failures = []
    for dynamo in (False, True):
        try:
            with warnings.catch_warnings(), atomic_path(path) as tmp:
                warnings.simplefilter("ignore")
                torch.onnx.export(segment.module, tuple(example), str(tmp), input_names=flat_in,
                                  output_names=flat_out, opset_version=opset, dynamo=dynamo)
                onnx.checker.check_model(str(tmp))
            return f"torch.onnx.export(dynamo={dynamo})"
        except Exception as error:  # noqa: BLE001 - both are tried, both reported
            text = " ".join(str(error).split())[:200] or type(error).__name__
            failures.append(f"dynamo={dynamo}: {type(error).__name__}: {text}")
    raise ExportError(f"segment {segment.index} could not be exported to ONNX ({'; '.join(failures)})")


def _leaf_names(names: Sequence[str], values: Sequence[Any]) -> list[list[str]]:
    """ONNX tensor names per value: its own name, or ``name.i`` for each tensor of a tuple value."""
    out = []
    for name, value in zip(names, values):
        leaves = [x for x in pytree.tree_leaves(value) if isinstance(x, torch.Tensor)]
        out.append([name] if isinstance(value, torch.Tensor) else [f"{name}.{i}" for i in range(len(leaves))])
    return out


def _leaves(values: Sequence[Any]) -> list[torch.Tensor]:
    return [x for x in pytree.tree_leaves(list(values)) if isinstance(x, torch.Tensor)]


def _module(blob: bytes, names_in: list[list[str]], names_out: list[list[str]], **options: Any) -> OnnxSegmentModule:
    proto = onnx.load_model_from_string(blob)
    dtypes = {v.name: onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name for v in proto.graph.input}
    for names in names_in:  # an input the exporter dropped (unused) keeps its place, fed to no one
        for n in names:
            dtypes.setdefault(n, "float32")
    return OnnxSegmentModule(blob, names_in, names_out, dtypes=dtypes, **options)
