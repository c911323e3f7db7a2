"""Published figures the tests and reports compare against (sources in README.md here)."""

from __future__ import annotations

import json
import pathlib

_HERE = pathlib.Path(__file__).resolve().parent
NAMES = ("architectures", "results")


def load(name: str) -> dict:
  """The reference file `name` ('architectures': sizes; 'results': published accuracies)."""
  if name not in NAMES:
    raise ValueError(f"reference {name!r} is not one of {', '.join(NAMES)}")
  return json.loads((_HERE / f"{name}.json").read_text())
