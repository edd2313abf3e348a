"""The GPU tier in groups, inside one device call's time: each group is one pytest run with
its own time limit, so a slow or hanging group costs only its share and every other
group's failures still print with their tracebacks.

    python benchmarks/gpu_tier.py [--groups kernels,parallel,...] [--budget-s 540] [--out DIR]
                                  [--wheels .whl]

Groups run in the order given (default: all, in GROUPS order); each gets
min(its limit, what is left of the budget). Writes DIR/gpu_tier.log (every group's pytest
output, `-rfE --tb=short`) and DIR/gpu_tier.json (per group: passed, failed, skipped,
seconds, the FAILED lines, or "timed out"), and prints a table last. Ranks of the
multi-rank groups share one GPU over gloo when the machine has fewer GPUs than ranks
(tests/distributed.py). The HF group needs transformers >= 5.25: `--wheels DIR` installs
every wheel in DIR (no dependencies resolved, one by one so that one unusable wheel does not
stop the rest) into a private folder that the groups import first; carry DIR to the GPU
machine (the device tool's `carry`: a git-ignored folder does not travel otherwise).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

# name -> (pytest paths, seconds): limits a little above what the groups took on an H100
# with cold Triton caches (2026-12-06: kernels ~300 s, the HF tests 31 s; parallel passed
# 200 s before reaching LASP-2H at W = 4).
GROUPS = {
    "kernels": (["tests/kernels"], 330),
    "layers": (["tests/layers", "tests/test_sync.py"], 90),
    "parallel": (["tests/parallel", "tests/test_hybrid_step_gpu.py"], 400),
    "integrations": (["tests/integrations"], 90),
}
# A count of pytest's summary line, e.g. "3 failed, 40 passed, 2 skipped, 1 error in 10.2s".
SUMMARY_COUNT = re.compile(r"(\d+) (passed|failed|skipped|error)")


def install_wheels(folder: str, target: str) -> list[str]:
    """pip-install each wheel of `folder` into `target` without dependencies; returns the
    wheels that failed (with pip's last line)."""
    failed = []
    for name in sorted(os.listdir(folder)):
        if name.endswith(".whl"):
            run = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--upgrade",
                                  "--target", target, os.path.join(folder, name)], capture_output=True, text=True)
            if run.returncode:
                failed.append(f"{name}: {(run.stderr.strip().splitlines() or ['?'])[-1]}")
    return failed


def run_group(paths, limit_s, log):
    """One pytest run of the GPU tests under `paths`, interrupted (SIGINT: pytest still prints
    its summary of the tests so far) at `limit_s`: (summary dict)."""
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", *paths, "-q", "-rfE", "--tb=short", "-p", "no:cacheprovider"]
    start = time.monotonic()
    # SIGINT restored in the child: a shell's background job ignores it, and Python keeps an
    # ignored SIGINT ignored, so pytest would never stop to print its summary.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        out, _ = proc.communicate(timeout=limit_s)
        timed_out = False
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        timed_out = True
    totals = [line for line in out.splitlines() if SUMMARY_COUNT.search(line)]
    counts = {kind: int(n) for n, kind in SUMMARY_COUNT.findall(totals[-1] if totals else "")}
    log.write(f"\n===== {' '.join(paths)} ({'interrupted at the limit' if timed_out else 'done'}) =====\n{out}")
    log.flush()
    return dict(paths=paths, seconds=round(time.monotonic() - start, 1), timed_out=timed_out,
                passed=counts.get("passed", 0), failed=counts.get("failed", 0) + counts.get("error", 0),
                skipped=counts.get("skipped", 0),
                failures=[line for line in out.splitlines() if line.startswith(("FAILED", "ERROR"))])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", default=",".join(GROUPS), help=f"comma-separated, of {', '.join(GROUPS)}")
    parser.add_argument("--budget-s", type=float, default=540.0, help="seconds for all groups together")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--wheels", default=None, help="a folder of wheels to install first (see above)")
    args = parser.parse_args()
    names = args.groups.split(",")
    unknown = [n for n in names if n not in GROUPS]
    if unknown:
        parser.error(f"--groups: unknown {unknown}; known: {list(GROUPS)}")
    os.makedirs(args.out, exist_ok=True)
    deadline = time.monotonic() + args.budget_s
    if args.wheels:
        site = os.path.join(tempfile.gettempdir(), "gpu_tier_site")
        for line in install_wheels(args.wheels, site):
            print(f"wheel not installed: {line}", flush=True)
        os.environ["PYTHONPATH"] = os.pathsep.join([site, os.getcwd(), os.environ.get("PYTHONPATH", "")])
    results = {}
    with open(os.path.join(args.out, "gpu_tier.log"), "w") as log:
        for name in names:
            paths, limit_s = GROUPS[name]
            left = deadline - time.monotonic()
            if left < 10:
                results[name] = dict(paths=paths, not_run="budget spent")
                continue
            results[name] = run_group(paths, min(limit_s, left), log)
            with open(os.path.join(args.out, "gpu_tier.json"), "w") as f:   # after every group
                json.dump(results, f, indent=1)
    print(f"\n{'group':14s} {'passed':>6s} {'failed':>6s} {'skipped':>7s} {'s':>6s}  note")
    for name, r in results.items():
        if "not_run" in r:
            print(f"{name:14s} {'-':>6s} {'-':>6s} {'-':>7s} {'-':>6s}  not run: {r['not_run']}")
            continue
        note = "interrupted at its limit: later tests did not run" if r["timed_out"] else ""
        print(f"{name:14s} {r['passed']:6d} {r['failed']:6d} {r['skipped']:7d} {r['seconds']:6.0f}  {note}")
        for line in r["failures"]:
            print(f"    {line[:150]}")


if __name__ == "__main__":
    main()
