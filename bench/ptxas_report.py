"""Registers, spill bytes, shared memory and occupancy of every Triton kernel, compiled offline.

    python bench/ptxas_report.py [--out bench/results/ptxas_report.json] [--arch 90] [--dtype bf16]

No GPU needed: `ferret_kernels.compile_check` records each launcher's launches at the released and
embedded shapes and compiles them for sm_90a / sm_80 with Triton's own ptxas. Prints a table and
writes a JSON (one row per distinct compiled kernel; `cases` says which shapes hit it), so a change
that adds spills shows in review. Runs with TRITON_INTERPRET unset (it is removed here).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "ptxas_report.json")
    parser.add_argument("--arch", type=int, action="append", choices=[80, 90], help="default: 90 and 80")
    parser.add_argument("--dtype", action="append", choices=["fp32", "bf16", "fp16"], help="default: all three")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":  # kernels must be JITFunctions: re-run without it
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.call([sys.executable, *sys.argv], env=env)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated; launches that need it off say so
    sys.path.insert(0, str(ROOT / "kernels"))
    import torch
    import triton

    from ferret_kernels import compile_check

    rows = compile_check.run(tuple(args.arch or (90, 80)), dtypes=tuple(args.dtype or compile_check.DTYPES))
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    report = {
        "what": "offline compile of every Triton kernel at its launcher's configuration (ferret_kernels.compile_check)",
        "triton": triton.__version__, "torch": torch.__version__, "commit": commit,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cases": compile_check.CASES, "rows": rows,
    }
    print(f"{'kernel':<24}{'dtypes':<18}{'arch':<7}{'warps':>6}{'regs':>6}{'spill st':>9}{'spill ld':>9}{'smem':>8}{'occ':>7}  constexprs")
    for r in rows:
        print(f"{r['kernel']:<24}{'/'.join(d.replace('float', 'f').replace('bf', 'bf') for d in r['dtypes']) or '-':<18}{r['arch']:<7}"
              f"{r['num_warps']:>6}{r['registers']:>6}{r['spill_store_bytes']:>9}{r['spill_load_bytes']:>9}{r['smem_bytes']:>8}"
              f"{r['occupancy']:>7.2f}  {r['constexprs']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
