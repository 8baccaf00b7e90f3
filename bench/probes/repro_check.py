"""Is a training run reproducible? Relaunch a finished run and compare its first logged steps bit for bit.

    python bench/probes/repro_check.py --reference checkpoints/full_coordpe_v2 --steps 100 \
        --out bench/probes/results/repro_full_coordpe_v2.json

Launches `torchrun --nproc_per_node=2 train/ferret_train.py` on the reference run's own resolved
config (`config.json`, which the trainer writes at start), only the output folder changed, waits
until the relaunch has logged step `--steps` of the LLM stage, stops it, and compares every
logged number of those steps (loss, its parts, grad norm, learning rate) with the reference's
`metrics.jsonl` for exact equality; throughput is not compared. The stage-1 warm-up's printed
readout losses (4 decimals) are compared too when `--reference-log` gives the reference's stdout.
Issue 13 asks that a second launch match the first for 100 steps; this is that check, across
sessions as well (the reference may be days old: same code, same data, same result).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from ferret.eval.common import write_json

TIMING = {"samples_per_s", "tokens_per_s"}
WARM_UP = re.compile(r"vision warm-up (\d+)/\d+ readout loss ([0-9.]+)")


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # the relaunch may be writing this line now
            break
    return rows


def compare(reference: list[dict], rerun: list[dict], steps: int) -> list[dict]:
    by_step = {row["step"]: row for row in reference}
    out = []
    for row in rerun:
        if row["step"] > steps:
            break
        ref = by_step.get(row["step"])
        if ref is None:
            out.append({"step": row["step"], "equal": False, "why": "not in the reference log"})
            continue
        # Every number the reference logged must come back equal (a missing one differs); numbers
        # the reference could not log (logging added since) are listed, not compared.
        keys = sorted(set(ref) - TIMING - {"step"})
        differ = {k: [ref.get(k), row.get(k)] for k in keys if ref.get(k) != row.get(k)}
        new_keys = sorted(set(row) - set(ref) - TIMING)
        out.append({"step": row["step"], "loss": [ref["loss"], row["loss"]], "equal": not differ, "differ": differ,
                    **({"new_keys": new_keys} if new_keys else {})})
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", required=True, type=Path, help="a run folder with config.json and metrics.jsonl")
    parser.add_argument("--reference-log", type=Path, default=None, help="the reference run's stdout (warm-up losses)")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--rerun-dir", type=Path, default=None, help="default: checkpoints/repro_<reference name>")
    parser.add_argument("--timeout-min", type=float, default=40)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    reference = read_metrics(args.reference / "metrics.jsonl")
    if not reference or reference[-1]["step"] < args.steps:
        raise SystemExit(f"{args.reference}/metrics.jsonl: the reference logged fewer than {args.steps} steps")
    rerun_dir = args.rerun_dir or Path("checkpoints") / f"repro_{args.reference.name}"
    if (rerun_dir / "metrics.jsonl").exists():
        raise SystemExit(f"{rerun_dir} already holds a run: remove it or pass --rerun-dir")
    rerun_dir.mkdir(parents=True, exist_ok=True)
    command = ["torchrun", "--nproc_per_node=2", "train/ferret_train.py", "--config", str(args.reference / "config.json"),
               f"train.output_dir={rerun_dir}"]
    log_path = rerun_dir / "train.log"
    print("launching:", " ".join(command), f"> {log_path}", flush=True)
    start = time.time()
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            while True:
                rows = read_metrics(rerun_dir / "metrics.jsonl")
                if rows and rows[-1]["step"] >= args.steps:
                    break
                if process.poll() is not None:
                    raise SystemExit(f"the relaunch exited ({process.returncode}) before step {args.steps}: see {log_path}")
                if time.time() - start > args.timeout_min * 60:
                    raise SystemExit(f"the relaunch had not reached step {args.steps} in {args.timeout_min} min")
                time.sleep(5)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                process.wait(timeout=60)
    steps = compare(reference, rows, args.steps)
    result = {"reference": str(args.reference), "command": " ".join(command), "steps": args.steps,
              "logged_steps_compared": len(steps), "all_equal": bool(steps) and all(s["equal"] for s in steps),
              "wall_s": round(time.time() - start), "per_step": steps}
    if args.reference_log is not None:
        ref_warm = WARM_UP.findall(args.reference_log.read_text())
        new_warm = WARM_UP.findall(log_path.read_text())
        result["warm_up"] = {"reference": ref_warm, "rerun": new_warm,
                             "equal": bool(ref_warm) and ref_warm == new_warm}
        result["all_equal"] = result["all_equal"] and result["warm_up"]["equal"]
    print(json.dumps({k: v for k, v in result.items() if k != "per_step"}, indent=1))
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    sys.exit(0 if main()["all_equal"] else 1)
