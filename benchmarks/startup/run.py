"""Wall time of the CLI's light paths (`--help`, `plan` on a bundled profile), fresh process each.

Several installations can be compared side by side in one run (repeats interleaved A B A B),
for example the tree before and after a change:

    python benchmarks/startup/run.py --exe before=/path/a/.venv/bin/asyncdiff-partition \
        --exe after=.venv/bin/asyncdiff-partition --repeats 7

Prints the median and spread of each command per installation and the ratio to the first.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

PROFILE = Path(__file__).resolve().parents[2] / "profiles" / "sd21-unet.cpu-1t.json"


def commands(exe: str, out: str) -> dict[str, list[str]]:
    return {
        "--help": [exe, "--help"],
        "plan": [exe, "plan", "--profile", str(PROFILE), "--devices", "2", "--out", out],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exe", action="append", required=True, metavar="NAME=PATH",
                        help="an asyncdiff-partition executable to time (repeat to compare)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    exes = dict(item.split("=", 1) for item in args.exe)
    times: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            for name, exe in exes.items():  # interleaved: A B A B
                for label, cmd in commands(exe, str(Path(tmp) / f"{name}.json")).items():
                    begin = time.perf_counter()
                    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    times.setdefault((name, label), []).append(time.perf_counter() - begin)
    first = next(iter(exes))
    print(f"{'command':<8} {'tree':<10} {'median s':>9} {'min':>7} {'max':>7} {'vs ' + first:>10}")
    for label in ("--help", "plan"):
        base = statistics.median(times[(first, label)])
        for name in exes:
            samples = times[(name, label)]
            median = statistics.median(samples)
            print(f"{label:<8} {name:<10} {median:9.2f} {min(samples):7.2f} {max(samples):7.2f} {median / base:9.2f}x")


if __name__ == "__main__":
    main()
