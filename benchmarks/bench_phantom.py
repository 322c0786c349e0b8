"""Speed and peak memory of the phantom: one 300-slice 512x512 study (prints figures, not a test).

    .venv/bin/python -m benchmarks.bench_phantom [--slices 300] [--matrix 512] [--repeat 3] [--write]

Results: ``benchmarks/results/phantom-latest.json`` (stamped). Each repeat runs in a fresh process so that ``ru_maxrss`` is that run's own peak resident set
(interpreter and libraries included); ``make_cpu_s`` is the process CPU time, which is what the
wall time would be on an idle core. Goal (issue #2):
<= 15 s and < 2 GB on a 2-core machine. Report the load average with the figure: on a shared
machine the wall time grows with the load.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

_CHILD = r"""
import json, resource, sys, time
import numpy as np
import phantom
seed, slices, matrix, write = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
phantom.make_study(seed, "covid", n_slices=4, matrix=64)  # imports and first-call costs
t0, c0 = time.perf_counter(), time.process_time()
s = phantom.make_study(seed, "covid", n_slices=slices, matrix=matrix)
wall, cpu = time.perf_counter() - t0, time.process_time() - c0
out = {"make_s": wall, "make_cpu_s": cpu,
       "volume_mb": (s.hu.nbytes + s.lung_mask.nbytes + s.lesion_mask.nbytes + s.finding_mask.nbytes) / 2**20,
       "shape": list(s.hu.shape), "lesion_slices": len(s.manifest["lesion_slices"])}
if write:
    t0 = time.perf_counter()
    phantom.write_study(s, sys.argv[5], encoding="explicit")
    out["write_s"] = time.perf_counter() - t0
out["maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(out))
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ctscreen bench phantom", description=__doc__.split("\n\n")[0])
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--matrix", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--write", action="store_true", help="also time write_study (explicit VR)")
    a = ap.parse_args(argv)
    for name, value, lo, hi in (("--slices", a.slices, 1, 2000), ("--matrix", a.matrix, 64, 1024),
                                ("--repeat", a.repeat, 1, 100), ("--seed", a.seed, 0, 2**31)):
        if not lo <= value <= hi:
            ap.error(f"{name} must be in {lo}..{hi}, got {value}")
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(a.repeat):
            r = subprocess.run([sys.executable, "-c", _CHILD, str(a.seed + i), str(a.slices), str(a.matrix),
                                "1" if a.write else "0", os.path.join(tmp, f"s{i}")],
                               capture_output=True, text=True)
            if r.returncode != 0:
                last = (r.stderr.strip().splitlines() or ["no message"])[-1]
                print(f"bench_phantom: run {i} failed (exit {r.returncode}): {last}", file=sys.stderr)
                return 1
            runs.append(json.loads(r.stdout.strip().splitlines()[-1]))
            print(f"run {i}: " + ", ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}"
                                           for k, v in runs[-1].items()))
    best = min(r["make_s"] for r in runs)
    med = sorted(r["make_s"] for r in runs)[len(runs) // 2]
    peak = max(r["maxrss_mb"] for r in runs)
    load = os.getloadavg()[0]
    cpu = min(r["make_cpu_s"] for r in runs)
    print(f"make_study {a.slices}x{a.matrix}x{a.matrix}: best {best:.2f} s, median {med:.2f} s wall, "
          f"best {cpu:.2f} s CPU, "
          f"peak RSS {peak:.0f} MB (cpus={os.cpu_count()}, load1={load:.1f})")
    from benchmarks.common import machine_info, results_dir, write_json

    doc = {"benchmark": "phantom", "slices": a.slices, "matrix": a.matrix, "machine": machine_info(), "runs": runs,
           "summary": {"make_best_s": round(best, 2), "make_median_s": round(med, 2), "make_cpu_best_s": round(cpu, 2),
                       "peak_rss_mb": round(peak)}}
    print(f"wrote {write_json(results_dir() / 'phantom-latest.json', doc)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
