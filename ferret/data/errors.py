"""Errors raised by the data pipeline and the json reader that names where a file is broken."""

from __future__ import annotations

import json
import os
from typing import Any


class DataFormatError(ValueError):
    """A data file cannot be used at all (malformed json, wrong top-level structure)."""


class SampleError(ValueError):
    """One sample is unusable; the dataset skips it and counts it under `reason`."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason


def read_json(path: str | os.PathLike) -> Any:
    """Parse a json file; a syntax error names the file, line and column."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file not found: {path}")
    with open(path, "r", encoding="utf-8") as handle:
        text = handle.read()
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataFormatError(
            f"malformed json in {path} at line {err.lineno}, column {err.colno}: {err.msg}"
        ) from err
