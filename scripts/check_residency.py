"""Check a residency report's structure: every function's plan has 4 convs per decoder layer,
and Core ML reported device usage for it.

    python scripts/check_residency.py REPORT.json --layers N [--require-all]

REPORT.json is what `anechain residency --json` writes, or a validation report (its
`residency` object). For every function (`main`, or `decode` and `prefill`) `conv_total` must
be 4 x N (qkv, o, gate_up and down per layer): fewer means the plan lost a conv, whose device
nobody then knows; more means it counts convs the program lacks. A function whose usage Core
ML did not report (MLComputePlan plans without naming a function) is printed as such; it fails
only under --require-all, since hosted runners may never get prefill's usage. Exit 0 when
everything holds, 1 when something does not, 2 for a bad invocation or an unreadable report.
It checks structure only; the residency gate itself is the report's `passed`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

CONVS_PER_LAYER = 4


def residency_of(data: Any) -> dict[str, Any]:
    """The residency object of a residency report or of a validation report."""
    if isinstance(data, dict) and isinstance(data.get("residency"), dict):
        data = data["residency"]
    if not isinstance(data, dict) or "status" not in data:
        raise ValueError("not a residency report (no `status`)")
    return data


def function_parts(residency: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Function name -> its part of the report (a report without `functions` is one `main`)."""
    functions = residency.get("functions")
    if isinstance(functions, dict) and functions:
        return {str(k): v for k, v in functions.items() if isinstance(v, dict)}
    return {"main": residency}


def conv_total(part: dict[str, Any]) -> int | None:
    """Convs in the function's plan: from its counts, or from the plan's structure when Core
    ML reported no usage (then there are no counts)."""
    counts = part.get("counts")
    if isinstance(counts, dict) and "conv_total" in counts:
        return int(counts["conv_total"])
    plan_ops = part.get("plan_ops")
    if isinstance(plan_ops, dict) and "conv_total" in plan_ops:
        return int(plan_ops["conv_total"])
    return None


def check(residency: dict[str, Any], layers: int, require_all: bool) -> tuple[list[str], bool]:
    """(lines to print, ok)."""
    if residency["status"] == "not_checked":
        return [f"residency not checked: {residency.get('reason', '')}"], False
    want = CONVS_PER_LAYER * layers
    lines, ok = [], True
    for name, part in sorted(function_parts(residency).items()):
        got = conv_total(part)
        reported = part.get("usage", "reported") == "reported" and part.get("counts") is not None
        if got != want:
            ok = False
            lines.append(f"{name}: FAIL conv_total {got}, expected {want} (4 x {layers} layers)")
        else:
            lines.append(f"{name}: conv_total {got} = 4 x {layers}")
        if not reported:
            ok = ok and not require_all
            tag = "FAIL" if require_all else "note"
            lines.append(f"{name}: {tag} device usage not reported by Core ML for this function")
        else:
            c = part["counts"]
            lines.append(
                f"{name}: compute on ANE {c.get('compute_ane')}/{c.get('compute_total')}, "
                f"conv on ANE {c.get('conv_ane')}/{c.get('conv_total')}"
            )
            if not c.get("compute_total"):
                ok = False
                lines.append(f"{name}: FAIL no fp16 compute op has a device usage")
    return lines, ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("report", type=Path, help="residency or validation report (JSON)")
    parser.add_argument("--layers", type=int, required=True, help="decoder layers in the shard")
    parser.add_argument(
        "--require-all",
        action="store_true",
        help="fail when Core ML reported no device usage for some function",
    )
    args = parser.parse_args(argv)
    if args.layers < 1:
        parser.error("--layers must be at least 1")
    try:
        residency = residency_of(json.loads(args.report.read_text()))
    except (OSError, ValueError) as exc:
        print(f"Error: {args.report}: {exc}", file=sys.stderr)
        return 2
    lines, ok = check(residency, args.layers, args.require_all)
    for line in lines:
        print(line)
    print(f"{args.report}: {'ok' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
