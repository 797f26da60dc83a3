"""The topology search, pure: fewest shards that pass, given an injected validator.

`search_topology` knows nothing of exports: it calls `validate(range) -> RangeResult` and
splits failing ranges where the failure appeared. `anechain.plan` gives it the real
validator (export + validate_shard, cached).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from anechain.config import Architecture, LayerRange
from anechain.errors import AnechainError
from anechain.shards import coverage_problems

Progress = Callable[[str], None]


class PlanError(AnechainError):
    """No topology passes (a single layer fails on its own), or the plan cannot start."""

    def __init__(self, message: str, attempts: tuple[Attempt, ...] = ()) -> None:
        super().__init__(message)
        self.attempts = attempts


# ---- limits -----------------------------------------------------------------------------


# Documented size limits (docs/field notes: ANEMLL, CoreML-LLM and coremltools reports).
# iOS refuses a model file above about 1 GB.
IOS_FILE_LIMIT_BYTES = 1_000_000_000
# On macOS, models above about 1.4 GB are reported to run on the GPU at run time although
# the compute plan prefers the ANE: the plan would pass a shard the ANE never runs.
MACOS_ANE_SIZE_LIMIT_BYTES = 1_400_000_000
# The default budget per package: the smaller of the two, so a shard runs on both.
DEFAULT_SIZE_BUDGET_BYTES = min(IOS_FILE_LIMIT_BYTES, MACOS_ANE_SIZE_LIMIT_BYTES)


@dataclass(frozen=True)
class PlanLimits:
    max_layers_per_shard: int | None = None
    size_budget_bytes: int | None = DEFAULT_SIZE_BUDGET_BYTES  # per package


def estimate_shard_bytes(arch: Architecture, num_layers: int, quantization: str) -> int:
    """Package size of `num_layers` decoder layers, from the architecture alone.

    The four projections' weights (INT8 plus one fp16 scale per output channel, or fp16
    when quantization is none) and the two fp16 RMSNorm gains per layer. Phi-4-mini's
    8-layer INT8 shard comes to about 806 MB; the program's own description is small.
    """
    h, i, d = arch.hidden_size, arch.intermediate_size, arch.head_dim
    heads = arch.num_attention_heads * d
    # (out_channels, in_channels) of qkv_proj, o_proj, gate_up_proj, down_proj
    projections = [((arch.num_attention_heads + 2 * arch.num_key_value_heads) * d, h)]
    projections += [(h, heads), (2 * i, h), (h, i)]
    weights = sum(o * n for o, n in projections)
    if quantization == "int8":
        per_layer = weights + 2 * sum(o for o, _ in projections)
    else:
        per_layer = 2 * weights
    per_layer += 2 * 2 * h
    return num_layers * per_layer


def layers_per_shard_limit(arch: Architecture, limits: PlanLimits, quantization: str) -> int:
    """The most layers one shard may hold under both limits (at most the model's)."""
    most = arch.num_hidden_layers
    if limits.max_layers_per_shard is not None:
        if limits.max_layers_per_shard < 1:
            raise PlanError("the layer limit per shard must be at least 1")
        most = min(most, limits.max_layers_per_shard)
    if limits.size_budget_bytes is not None:
        one = estimate_shard_bytes(arch, 1, quantization)
        fit = limits.size_budget_bytes // one
        if fit < 1:
            raise PlanError(
                f"one decoder layer needs about {one / 1e6:.1f} MB ({quantization}), more "
                f"than the size budget of {limits.size_budget_bytes / 1e6:.1f} MB per shard"
            )
        most = min(most, fit)
    return most


# ---- the search (pure) ----------------------------------------------------------------------


@dataclass(frozen=True)
class RangeResult:
    """What validating one range said. The search reads the first four fields only."""

    passed: bool
    failed_gates: tuple[str, ...] = ()
    failing_layer: int | None = None  # absolute layer where a non-finite value first appeared
    reason: str = ""
    # For display: residency status, package size, whether it came from the cache, report.
    residency: str = ""
    size_bytes: int | None = None
    reused: bool = False
    report: Path | None = None


Validator = Callable[[LayerRange], RangeResult]


@dataclass(frozen=True)
class Attempt:
    """One range validated during the search."""

    layers: LayerRange
    result: RangeResult
    phase: str  # "initial" | "split" | "rebalance"
    decision: str  # "kept", "split into 3:4 + 4:6", "fails alone", "rejected", ...


@dataclass(frozen=True)
class SearchResult:
    topology: tuple[LayerRange, ...]  # in layer order, tiling [0, num_layers)
    initial: tuple[LayerRange, ...]  # the balanced starting partition
    first_passing: tuple[LayerRange, ...]  # what splitting alone found (before re-balancing)
    attempts: tuple[Attempt, ...]  # in the order validated; each range at most once


def _score(topology: tuple[LayerRange, ...]) -> tuple[int, int]:
    return len(topology), max(r.num_layers for r in topology)


def best_partition(
    num_layers: int,
    max_layers: int,
    allowed: Callable[[LayerRange], bool] = lambda r: True,
    untested: Callable[[LayerRange], bool] = lambda r: True,
    risk: Callable[[LayerRange], int] = lambda r: 0,
) -> tuple[LayerRange, ...] | None:
    """The best tiling of [0, num_layers) from allowed ranges of at most max_layers layers.

    Best is: fewest ranges, then the smallest largest range, then the fewest untested
    ranges, then the least total risk, then the most even lengths (least sum of squares),
    then longer ranges first (deterministic). None when no tiling exists.
    """
    best: tuple[int, int, int, int, int, tuple[int, ...]] | None = None
    for cap in range(1, min(max_layers, num_layers) + 1):
        # suffix[i]: (ranges, untested, risk, sum of squared lengths, -lengths) of the best
        # tiling of [i, num_layers); each part is additive, so a best suffix extends best.
        suffix: list[tuple[int, int, int, int, tuple[int, ...]] | None]
        suffix = [None] * (num_layers + 1)
        suffix[num_layers] = (0, 0, 0, 0, ())
        for i in range(num_layers - 1, -1, -1):
            for j in range(i + 1, min(num_layers, i + cap) + 1):
                rest = suffix[j]
                r = LayerRange(i, j)
                if rest is None or not allowed(r):
                    continue
                n = j - i
                key = (
                    rest[0] + 1,
                    rest[1] + untested(r),
                    rest[2] + risk(r),
                    rest[3] + n * n,
                    (-n, *rest[4]),
                )
                if suffix[i] is None or key < suffix[i]:  # type: ignore[operator]
                    suffix[i] = key
        if suffix[0] is not None:
            # The smallest cap reaching the fewest ranges is the largest range's true size.
            candidate = (suffix[0][0], cap, *suffix[0][1:])
            if best is None or candidate < best:
                best = candidate
    if best is None:
        return None
    out, start = [], 0
    for neg in best[5]:
        out.append(LayerRange(start, start - neg))
        start -= neg
    return tuple(out)


def initial_partition(num_layers: int, max_layers: int) -> tuple[LayerRange, ...]:
    """The fewest ranges of at most max_layers layers, as equal as possible (longer first)."""
    if max_layers < 1 or num_layers < 1:
        raise PlanError(f"cannot cut {num_layers} layers into shards of {max_layers}")
    topology = best_partition(num_layers, max_layers)
    assert topology is not None  # every range is allowed
    return topology


def split_range(r: LayerRange, failing_layer: int | None) -> tuple[LayerRange, LayerRange]:
    """Cut a failed range in two where the failure points.

    The failing layer starts the right half (it then gets the reference input rather than
    the fp16 stream it overflowed on); a failure in the first layer isolates that layer;
    without a layer (a gate failed without NaN, residency, export) the range is bisected.
    """
    if r.num_layers < 2:
        raise ValueError(f"cannot split the single layer {r}")
    if failing_layer is None or not r.start <= failing_layer < r.end:
        cut = r.start + (r.num_layers + 1) // 2
    elif failing_layer == r.start:
        cut = r.start + 1
    else:
        cut = failing_layer
    return LayerRange(r.start, cut), LayerRange(cut, r.end)


def _describe(result: RangeResult) -> str:
    if result.passed:
        return "pass"
    return f"FAIL ({result.reason or ', '.join(result.failed_gates) or 'no reason given'})"


def search_topology(
    num_layers: int,
    max_layers: int,
    validate: Validator,
    rebalance: bool = True,
    progress: Progress | None = None,
) -> SearchResult:
    """The passing topology with the fewest shards, then the smallest largest shard.

    1. Start from the balanced partition into the fewest shards of <= max_layers layers.
    2. Validate each range; split a failing one (`split_range`) and validate the halves,
       the half holding the failing layer first, until every range passes. A single layer
       that fails on its own means no topology can pass: PlanError naming it.
    3. Re-balance (unless rebalance=False): take the best tiling (`best_partition`) that
       uses only ranges not known to fail, validate its untried ranges, learn, repeat until
       the best tiling has passed entirely. Ranges that passed stay usable, so this ends.

    Known to fail: every range validated as failing, and every range containing one; a
    range whose first non-finite value appeared in layer L also condemns its prefix
    [start, L+1), which computed the same values up to L. A range that passed is usable
    even if it contains one of these.

    Guarantees: every range of the result passed `validate`; the ranges tile
    [0, num_layers) with at most max_layers layers each; each range is validated at most
    once per call. With re-balancing, the result is also optimal (fewest shards, then
    the smallest largest shard) among all tilings within the limits whose ranges would all
    pass, provided failures behave as assumed above: a range containing a failing range
    fails (the premise of splitting), and a failure's prefix fails (exact for the MIL
    runner; for Core ML's compiler an assumption, as graph size can matter). The price is
    validating ranges splitting never needed; without re-balancing the first topology
    splitting finds is returned, which can have more shards than necessary.
    """
    say = progress or (lambda message: None)
    results: dict[LayerRange, RangeResult] = {}
    attempts: list[Attempt] = []
    condemned: set[LayerRange] = set()

    def check(r: LayerRange, phase: str) -> RangeResult:
        if r in results:
            return results[r]
        result = validate(r)
        if result.failing_layer is not None and not r.start <= result.failing_layer < r.end:
            result = replace(result, failing_layer=None)  # a hint outside the range is no hint
        results[r] = result
        attempts.append(Attempt(r, result, phase, ""))
        if not result.passed:
            condemned.add(r)
            if result.failing_layer is not None:
                condemned.add(LayerRange(r.start, result.failing_layer + 1))
        return result

    def decide(r: LayerRange, decision: str) -> None:
        i = next(n for n, a in enumerate(attempts) if a.layers == r)
        attempts[i] = replace(attempts[i], decision=decision)
        say(f"{r} {_describe(results[r])} -> {decision}")

    initial = initial_partition(num_layers, max_layers)
    say(
        f"start: {len(initial)} shard(s) of at most {max_layers} layers: "
        + " ".join(map(str, initial))
    )
    kept: list[LayerRange] = []
    todo = [(r, "initial") for r in initial]
    while todo:
        r, phase = todo.pop(0)
        result = check(r, phase)
        if result.passed:
            kept.append(r)
            decide(r, "kept")
            continue
        if r.num_layers == 1:
            decide(r, "fails alone")
            where = f"; report {result.report}" if result.report else ""
            raise PlanError(
                f"no topology passes: layer {r.start} fails on its own "
                f"({result.reason or ', '.join(result.failed_gates) or 'failed'}){where}",
                tuple(attempts),
            )
        left, right = split_range(r, result.failing_layer)
        decide(r, f"split into {left} + {right}")
        halves = [(left, "split"), (right, "split")]
        if result.failing_layer is not None and result.failing_layer >= right.start:
            halves.reverse()  # the likelier failure first: a failing single layer ends the plan
        todo[:0] = halves
    first = tuple(sorted(kept))
    topology = first

    def allowed(r: LayerRange) -> bool:
        if r in results and results[r].passed:
            return True
        return not any(r.start <= c.start and c.end <= r.end for c in condemned)

    def untried(r: LayerRange) -> bool:
        return r not in results

    def suspect(r: LayerRange) -> bool:
        failed_at = {res.failing_layer for res in results.values() if not res.passed}
        return any(r.start <= x < r.end for x in failed_at - {None})

    def risk(r: LayerRange) -> int:
        # Among equally good tilings, try the shortest untried range around a layer that
        # failed before: the likeliest to pass, and its failure rules out every range
        # containing it.
        return r.num_layers if untried(r) and suspect(r) else 0

    while rebalance:
        candidate = best_partition(num_layers, max_layers, allowed, untried, risk)
        assert candidate is not None  # the ranges that passed still tile the model
        new = [r for r in candidate if untried(r)]
        if not new:
            # Never worse: the tiling splitting found is made of allowed, tried ranges.
            if candidate != topology:
                say(f"re-balanced: {' '.join(map(str, candidate))}")
            topology = candidate
            break
        say(
            f"re-balance: trying {' '.join(map(str, candidate))} "
            f"({len(candidate)} shards, largest {_score(candidate)[1]} layers)"
        )
        # Ranges holding a layer that failed before are the likeliest to fail: try them first,
        # so a doomed candidate costs one export, not one per range.
        new.sort(key=lambda r: (not suspect(r), r.start))
        for r in new:
            if check(r, "rebalance").passed:
                decide(r, "passed")
            else:
                decide(r, "rejected")
                break

    problems = coverage_problems([(str(r), r) for r in topology], num_layers)
    if problems:  # internal invariant: every step above keeps a tiling
        raise PlanError(f"internal error: the plan does not tile the model: {problems[0]}")
    for n, a in enumerate(attempts):
        if a.result.passed:
            attempts[n] = replace(a, decision="chosen" if a.layers in topology else "not used")
    say(f"chosen: {' '.join(map(str, topology))}")
    return SearchResult(topology, initial, first, tuple(attempts))
