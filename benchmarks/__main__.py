"""`make bench` / `python -m benchmarks`: run every benchmark, rewrite RESULTS.md.

Each `benchmarks/<name>.py` (other than `common.py`) is a script run as
`python -m benchmarks.<name>`; it prints one Markdown section (what it
measured, a table with medians and spread over repeats, and the command that
reproduces it) to stdout, and progress to stderr. This runner runs them one
after another in fresh processes (with the arguments in `ARGS`; every
discovered module runs, `fine_tuning` included), shows progress, and writes
`benchmarks/RESULTS.md` from this run only.

Per-step overhead of the library (the `GuardedOptimizer`, with and without
ZClip, the monitor and the detector) is measured in one place by one method:
the overhead part of `benchmarks.gradient_health` (interleaved bursts of
fit's inner loop, paired per-round ratios in wall and process CPU time, a
bootstrap interval of the median).

Usage: python -m benchmarks [--only NAME[,NAME...]] [--output PATH]
"""

import argparse
import datetime
import os
import pkgutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SKIP = {"common", "__main__"}
# Arguments a benchmark runs with here, so RESULTS.md gets the section as
# committed (fine_tuning: the variants that meet the goal and the
# LoRA rows at <= 5% of the parameters are in `--explore`).
ARGS = {"fine_tuning": ["--explore"]}


def discover():
    return sorted(
        m.name
        for m in pkgutil.iter_modules([HERE])
        if m.name not in SKIP and not m.ispkg
    )


def main(argv=None):
    names = discover()
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--only", default=",".join(names), help="comma-separated names")
    parser.add_argument("--output", default=os.path.join(HERE, "RESULTS.md"))
    args = parser.parse_args(argv)
    chosen = [n for n in args.only.split(",") if n]
    unknown = sorted(set(chosen) - set(names))
    if unknown:
        parser.error(
            f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(names)}"
        )

    from benchmarks.common import environment

    sections, failures = [], []
    env = dict(
        os.environ, TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "3")
    )
    for i, name in enumerate(chosen, 1):
        print(f"[{i}/{len(chosen)}] benchmarks.{name} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", f"benchmarks.{name}", *ARGS.get(name, [])],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        seconds = time.perf_counter() - start
        status = "ok" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
        print(
            f"[{i}/{len(chosen)}] benchmarks.{name}: {status} in {seconds:.0f} s",
            file=sys.stderr,
            flush=True,
        )
        if proc.returncode != 0:
            failures.append(name)
            continue
        sections.append(proc.stdout.strip() + f"\n\n_Ran in {seconds:.0f} s._")

    header = (
        "# Benchmark results\n\n"
        f"Written by `make bench` (`python -m benchmarks`) on "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC.\n\n"
        f"Machine: {environment()}.\n\n"
        "Every section names the command that reproduces it alone. Speed and "
        "memory claims of the README come from here, nowhere else.\n"
    )
    if args.only != ",".join(names):
        print(
            "--only given: RESULTS.md not rewritten; sections follow.\n",
            file=sys.stderr,
        )
        print("\n\n".join(sections))
    else:
        with open(args.output, "w") as f:
            f.write(header + "\n" + "\n\n".join(sections) + "\n")
        print(f"wrote {args.output}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
