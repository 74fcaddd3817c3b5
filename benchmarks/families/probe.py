"""Probe: does today's ``parallelize`` take each new pipeline family, and reproduce it exactly?

    .venv/bin/python benchmarks/families/probe.py                      # every family of tests/tiny_families.py
    .venv/bin/python benchmarks/families/probe.py wan22 shap_e -v      # some families, with tracebacks

Diagnostic only, never run by CI. For each family of ``tests/tiny_families.NEW_FAMILIES``: build the
tiny pipeline, sample it unwrapped at T steps (T = 3, or the family's ``STEPS``), then

    parallelize(pipe, devices=2, warmup=T, reference=True, cache_dir=<tmp>, **kwargs)
    out = sample(pipe, kwargs, T)

and print one line: ``family | pipeline class | OK exact`` (bit-identical to the unwrapped output,
as W >= T must be), ``DIFF max abs x`` or ``ERROR <exception type: first line>`` (from either
call). ``-v`` adds, under each line, which denoiser attributes were wrapped and the end of any
traceback. Each family runs under a time limit (``--timeout``).
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

import tiny_families  # noqa: E402


class _Timeout(Exception):
    pass


def _alarm(_signum, _frame):
    raise _Timeout("time limit")


def probe(family: str, folder: str, cache_dir: str, timeout_s: int) -> tuple[str, str, list[str]]:
    """``(pipeline class, result, details)`` of one family."""
    from asyncdiff_partition.pipelines.parallelize import parallelize

    steps = tiny_families.STEPS.get(family, 3)
    name = "?"
    details: list[str] = []
    signal.alarm(timeout_s)
    try:
        pipe, kwargs = tiny_families.build(family, folder)
        name = type(pipe).__name__
        originals = {attr: getattr(pipe, attr) for attr in tiny_families.DENOISERS[family]}
        original = tiny_families.sample(pipe, kwargs, steps)
        parallelize(pipe, devices=2, warmup=steps, reference=True, cache_dir=cache_dir, **kwargs)
        wrapped = [attr for attr, module in originals.items() if getattr(pipe, attr) is not module]
        details.append(f"wrapped: {', '.join(wrapped) or 'none of ' + ', '.join(originals)}")
        out = tiny_families.sample(pipe, kwargs, steps)
        if out.shape == original.shape and torch.equal(out, original):
            result = "OK exact"
        elif out.shape != original.shape:
            result = f"DIFF shape {tuple(out.shape)} vs {tuple(original.shape)}"
        else:
            result = f"DIFF max abs {(out.float() - original.float()).abs().max().item():.3g}"
    except _Timeout:
        result = f"ERROR timeout after {timeout_s} s"
    except Exception as error:  # noqa: BLE001 - every failure is a result here
        first = (str(error).strip().splitlines() or [""])[0]
        result = f"ERROR {type(error).__name__}: {first}"[:300]
        details.extend(traceback.format_exc().strip().splitlines()[-12:])
    finally:
        signal.alarm(0)
    return name, result, details


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("families", nargs="*", help="default: all of NEW_FAMILIES")
    parser.add_argument("--timeout", type=int, default=300, help="seconds per family")
    parser.add_argument("-v", "--verbose", action="store_true", help="wrapped attributes and tracebacks")
    args = parser.parse_args()
    torch.set_num_threads(1)
    signal.signal(signal.SIGALRM, _alarm)
    families = args.families or list(tiny_families.NEW_FAMILIES)
    with tempfile.TemporaryDirectory() as folder, tempfile.TemporaryDirectory() as cache_dir:
        for family in families:
            start = time.perf_counter()
            name, result, details = probe(family, folder, cache_dir, args.timeout)
            print(f"{family} | {name} | {result}", flush=True)
            if args.verbose:
                print(f"    ({time.perf_counter() - start:.1f} s)", *(f"    {line}" for line in details), sep="\n", flush=True)


if __name__ == "__main__":
    main()
