#!/usr/bin/env bash
# `make mac-check`: ground truth from a Mac, in one command (the macOS CI job runs it too).
#
#   1. the venv, as every make target sets it up (make $VENV/bin/anechain);
#   2. the macOS-marked tests (real compile, plan, predict, states; `ane` ones need an ANE);
#   3. the tiny pipeline through real Core ML (`anechain build --backend coreml`: export,
#      compile, residency, golden validation with its late window, manifest, generation),
#      residency report-only when Core ML lists no Neural Engine; then per shard a residency
#      report checked by scripts/check_residency.py, and generation from the manifest;
#   4. `anechain capture` of the built packages into tests/data/captures/, replayed by the
#      suite's replay test; prints what to commit.
#
# Outputs: artifacts/mac-check/ (build, reports, plans) and tests/data/captures/*.capture.json.
# Env: VENV (default .venv), PYTHON (for a new venv), OUT (default artifacts/mac-check).
set -euo pipefail

fail() {
    echo "Error: $*" >&2
    exit 1
}

cd "$(dirname "$0")/.."
# Before anything is installed: Core ML's stateful models need macOS 15+.
if [ "$(uname -s)" != "Darwin" ]; then
    fail "make mac-check needs macOS 15+ with Core ML; this machine runs $(uname -s | tr '[:upper:]' '[:lower:]')"
fi
macos="$(sw_vers -productVersion)"
if [ "${macos%%.*}" -lt 15 ]; then
    fail "make mac-check needs macOS 15+ with Core ML; this Mac runs macOS $macos"
fi

VENV="${VENV:-.venv}"
OUT="${OUT:-artifacts/mac-check}"
CAPTURES=tests/data/captures
BIN="$VENV/bin"
step() { printf '\n== %s (%s)\n' "$1" "$(date +%H:%M:%S)"; }

step "venv"
make --no-print-directory VENV="$VENV" ${PYTHON:+PYTHON="$PYTHON"} "$BIN/anechain"
case "$BIN" in /*) ;; *) BIN="$PWD/$BIN" ;; esac
export PATH="$BIN:$PATH" TQDM_DISABLE=1
sw_vers
xcrun --find coremlcompiler || echo "no xcrun coremlcompiler: coremltools' compile_model is used"
python -c 'import coremltools as ct; print("coremltools", ct.__version__)'
ane="$(python -c 'from anechain.platform import has_neural_engine as h; print(int(h()))')"
chip="$(sysctl -n machdep.cpu.brand_string 2>/dev/null || uname -m)"
echo "chip: $chip; Neural Engine listed by Core ML: $([ "$ane" = 1 ] && echo yes || echo no)"
# Without an ANE residency is counted, not gated. A plain word, unquoted below: macOS's
# bash 3.2 calls an empty array unbound under `set -u`.
report_only=""
[ "$ane" = 1 ] || report_only=--report-only

step "macOS-marked tests"
python -m pytest -m 'macos or ane' -ra -p no:cacheprovider

step "tiny pipeline through Core ML"
mkdir -p "$OUT"
anechain build --config configs/tiny.yaml --out "$OUT/build" --backend coreml \
    $report_only --json "$OUT/build-summary.json"
anechain manifest verify "$OUT/build/manifest.json"
shards=("$OUT"/build/layers_*.mlpackage)
for pkg in "${shards[@]}"; do
    stem="$(basename "$pkg" .mlpackage)" # layers_A_B
    range="${stem#layers_}"
    layers=$((${range#*_} - ${range%_*}))
    anechain residency "$OUT/build/$stem.mlmodelc" --config configs/tiny.yaml $report_only \
        --save-plan "$OUT/$stem.plan.json" --json "$OUT/$stem.residency.json"
    # conv_total = 4 x layers in every function, and each function's usage was reported.
    python scripts/check_residency.py "$OUT/$stem.residency.json" --layers "$layers"
    # A saved plan replays anywhere and must still belong to its model.
    anechain residency "$OUT/build/$stem.mlmodelc" --config configs/tiny.yaml \
        --compute-plan "$OUT/$stem.plan.json" --report-only >/dev/null
done
anechain generate --manifest "$OUT/build/manifest.json" --prompt-ids 1,2,3,4 \
    --backend coreml --profile

step "capture"
tag="$(printf '%s-macos%s' "$chip" "$macos" | tr '[:upper:]' '[:lower:]' | tr -cs 'a-z0-9.' '-')"
rm -rf "$OUT/captures"
anechain capture "${shards[@]}" "$OUT/build/head.mlpackage" --model "$OUT/build/checkpoint" \
    --config configs/tiny.yaml --random-preset tiny --random-seed 0 --out "$OUT/captures"
mkdir -p "$CAPTURES"
written=()
for bundle in "$OUT"/captures/*.capture.json; do
    dest="$CAPTURES/$tag.$(basename "$bundle")"
    cp "$bundle" "$dest"
    written+=("$dest")
done
# The bundles must replay through the suite's own test, as they will on Linux.
python -m pytest tests/test_capture.py -k every_captured_bundle -ra -p no:cacheprovider

step "done"
echo "Ground truth from this Mac ($chip, macOS $macos). Commit the bundles:"
echo "  git add ${written[*]}"
echo "  git commit -m 'captures: tiny model on $chip, macOS $macos'"
echo "Reports and plans (not to commit, attach them to the issue): $OUT/"
