"""How fast a run binds: the box head's attention mass on the asked object, averaged over windows
of LLM steps, from each run's per-10-step metrics (issue 13; the learning curve the LLM-stage
probes are judged on).

    python bench/probes/binding_curve.py full_rot45 full_rot45_w2400 p1_rot45_w2400_s073 --window 100

A run is read from checkpoints/RUN/metrics.jsonl while it trains, else from
bench/probes/results/RUN_metrics.jsonl (val_probes.sh copies it there); a run with neither shows "-". The logged mass is one
rank's last micro-batch, so single steps move by +-0.1; windows of 100+ steps are what to compare.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def read_metrics(run: str, root: Path = ROOT) -> list[dict]:
    """The run's logged records; [] when it has none yet (a run still in its warm-up)."""
    for path in (root / "checkpoints" / run / "metrics.jsonl", root / "bench" / "probes" / "results" / f"{run}_metrics.jsonl"):
        if path.is_file():
            return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return []


def curve(rows: list[dict], window: int, last_step: int, key: str = "attention_mass") -> list[float | None]:
    """Mean of `key` over steps (w*window, (w+1)*window] for each window up to last_step; None
    where a window has no value (not reached yet, or no supervision)."""
    out = []
    for start in range(0, last_step, window):
        values = [r[key] for r in rows if start < r["step"] <= start + window
                  and isinstance(r.get(key), (int, float)) and not math.isnan(r[key])]
        out.append(sum(values) / len(values) if values else None)
    return out


def main(argv=None) -> dict[str, list[float | None]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--window", type=int, default=150)
    parser.add_argument("--steps", type=int, default=1800, help="last step shown")
    parser.add_argument("--key", default="attention_mass", help="another logged metric, e.g. dense_loss")
    args = parser.parse_args(argv)
    curves = {}
    width = max(len(r) for r in args.runs)
    print(" " * width + "  " + " ".join(f"{s + args.window:>5d}" for s in range(0, args.steps, args.window)))
    for run in args.runs:
        curves[run] = curve(read_metrics(run), args.window, args.steps, args.key)
        print(f"{run:<{width}}  " + " ".join("    -" if v is None else f"{v:5.2f}" for v in curves[run]))
    return curves


if __name__ == "__main__":
    main()
