"""One line per run of the val numbers that decide issue 13's goals, from bench/probes/results/.

    python bench/probes/compare_runs.py ft_small ft_fine ...

Naming box / point / free-form and "No" / "Yes" (RUN_direct_val200.json, 200 val scenes), val and
out-of-generator grounding (RUN_grounding_{val,ood}.json, 60 scenes each), LVIS box / point
(RUN_report_val200.json), out-of-generator naming (naming_errors/RUN_ood.json) and the image
tokens' and region embeddings' shape readout (token/RUN.json). A missing file prints "-".
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def _read(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def _get(data, *keys):
    for key in keys:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def row(run: str, results: Path = RESULTS) -> dict[str, float | None]:
    direct = _get(_read(results / f"{run}_direct_val200.json"), "accuracy") or {}
    lvis = _get(_read(results / f"{run}_report_val200.json"), "summary", "lvis") or {}
    ood = _read(results / "naming_errors" / f"{run}_ood.json")
    tokens = _read(results / "token" / f"{run}.json")
    return {
        "name box": direct.get("refer_box"), "name point": direct.get("refer_point"),
        "name free": direct.get("refer_free_form"), "No": direct.get("yes_no_absent"),
        "Yes": direct.get("yes_no_present"),
        "ground val": _get(_read(results / f"{run}_grounding_val.json"), "acc50"),
        "ground ood": _get(_read(results / f"{run}_grounding_ood.json"), "acc50"),
        "LVIS box": lvis.get("acc_box"), "LVIS point": lvis.get("acc_point"),
        "ood name box": _get(ood, "refer_box", "accuracy"), "ood name point": _get(ood, "refer_point", "accuracy"),
        "ood name free": _get(ood, "refer_free_form", "accuracy"),
        "tokens shape": _get(tokens, "readout", "projected/own", "shape"),
        "region shape": _get(tokens, "readout", "region/own", "shape"),
    }


def main(argv=None) -> None:
    runs = (argv if argv is not None else sys.argv[1:]) or ["ft_small"]
    for run in runs:
        cells = []
        for key, value in row(run).items():
            if isinstance(value, float):
                value = f"{value:.3f}"
            cells.append(f"{key} {value if value is not None else '-'}")
        print(f"{run}: " + ", ".join(cells))


if __name__ == "__main__":
    main()
