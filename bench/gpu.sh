#!/usr/bin/env bash
# The GPU checks in one go: the GPU-marked tests (pytest -m gpu) and the speed benches
# (bench/train.py, bench/scaling.py, bench/extract.py, bench/routes.py) sized to finish within 8 minutes on one H200,
# then ONE table: bench, metric, value, ratio (against the baseline the metric names).
#
#   bench/gpu.sh              on a CUDA machine; without CUDA it prints one line and exits 0
#   bench/gpu.sh --dry-run    (or USAE_GPU_DRY_RUN=1) every step at toy sizes on CPU: the plumbing
#
# Each step runs under its own time limit (timeout); a failed or timed-out step is a FAILED row and
# the script exits 1 after the table. Logs and JSON go to $USAE_GPU_OUT (default: a new temp dir).
# Runs from the repository root with .venv/bin/python if present, else python.
set -u -o pipefail

cd "$(dirname "$0")/.." || exit 2
PY=python
[ -x .venv/bin/python ] && PY=.venv/bin/python
DRY=${USAE_GPU_DRY_RUN:-0}
for arg in "$@"; do
  case $arg in
    --dry-run) DRY=1 ;;
    -h | --help) sed -n '2,11p' "$0" | cut -c3-; exit 0 ;;
    *) echo "bench/gpu.sh: unknown argument $arg (try --help)" >&2; exit 2 ;;
  esac
done

if [ "$DRY" != 1 ] && ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "bench/gpu.sh: no CUDA device here, skipped (bench/gpu.sh --dry-run checks the script on CPU)"
  exit 0
fi

OUT=${USAE_GPU_OUT:-$(mktemp -d "${TMPDIR:-/tmp}/usae-gpu.XXXXXX")}
mkdir -p "$OUT"
: >"$OUT/steps"
# The test files that hold GPU-marked tests: collecting only these keeps an unrelated test module's
# import error (a missing optional package) out of this run.
mapfile -t GPU_TESTS < <(grep -rlE --include='*.py' 'mark\.gpu' tests | sort)

# Sizes and limits. GPU: 90 + 110 + 80 + 90 + 100 = 470 s of limits, inside the 8 minutes with room
# for the CUDA check and the table. Dry run: toy sizes that only prove each step runs and reports.
if [ "$DRY" = 1 ]; then
  DEVICE=cpu
  TRAIN=(--widths 16 24 --latent-mult 2 --k 4 --batch-size 128 --steps 4 --repeats 1)
  SCALING=(--tiny)
  EXTRACT=(--models fake:w16s8 fake:w8s4i32 --n-images 8 --batch-size 4 --repeats 1)
  ROUTES=(--models fake:w16s8 fake:w8s4i32 --n-images 8 --steps 3 --batch-size 64 --n-latents 32 --k 4 --released-steps 0)
  LIMIT_TESTS=120 LIMIT_TRAIN=120 LIMIT_SCALING=120 LIMIT_EXTRACT=120 LIMIT_ROUTES=120
else
  DEVICE=cuda
  # bench/train.py defaults: M=3, widths 384/512/768, n_latents 6144, k 32, batch 4096.
  TRAIN=(--steps 200 --repeats 2)
  SCALING=()  # full sizes: the same M=3 step vs its floor matmul; M = 2..16 at d 256
  EXTRACT=(--n-images 256 --batch-size 64 --repeats 2)  # the three built-in models on builtin:demo
  # the three routes (store, subsampled store, backbones in the loop) with two timm ViTs, random weights
  ROUTES=(--models vits=timm:vit_small_patch16_224 vitb=timm:vit_base_patch16_224 --random-init
    --n-images 512 --steps 100 --batch-size 8192 --n-latents 6144 --k 32 --released-steps 0)
  LIMIT_TESTS=90 LIMIT_TRAIN=110 LIMIT_SCALING=80 LIMIT_EXTRACT=90 LIMIT_ROUTES=100
fi

# step NAME LIMIT CMD...: run CMD under LIMIT seconds, log to $OUT/NAME.log, record "NAME rc seconds".
step() {
  local name=$1 limit=$2 began rc
  shift 2
  began=$(date +%s)
  echo "== $name (limit ${limit} s): $*"
  timeout -k 10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  echo "$name $rc $(($(date +%s) - began)) $limit" >>"$OUT/steps"
  if [ "$rc" != 0 ] && [ "$name" != pytest -o "$rc" != 5 ]; then
    echo "   FAILED (exit $rc); last lines of $OUT/$name.log:"
    tail -n 15 "$OUT/$name.log" | sed 's/^/   | /'
  fi
}

export PYTHONUNBUFFERED=1
if [ "${#GPU_TESTS[@]}" -gt 0 ]; then
  step pytest "$LIMIT_TESTS" "$PY" -m pytest -q -m gpu -p no:cacheprovider --junitxml="$OUT/pytest.xml" "${GPU_TESTS[@]}"
else
  echo "pytest 5 0 $LIMIT_TESTS" >>"$OUT/steps"  # no GPU-marked test file: as pytest's "none collected"
fi
step train "$LIMIT_TRAIN" "$PY" bench/train.py --device "$DEVICE" "${TRAIN[@]}" --json "$OUT/train.json"
step scaling "$LIMIT_SCALING" "$PY" bench/scaling.py --device "$DEVICE" ${SCALING[@]+"${SCALING[@]}"} --json "$OUT/scaling.json"
step extract "$LIMIT_EXTRACT" "$PY" bench/extract.py --device "$DEVICE" "${EXTRACT[@]}" --json "$OUT/extract.json"
step routes "$LIMIT_ROUTES" "$PY" bench/routes.py --device "$DEVICE" "${ROUTES[@]}" --json "$OUT/routes.json"

"$PY" - "$OUT" "$DEVICE" <<'EOF'
"""Print the one table from the steps' records, JSON rows and pytest's JUnit XML; exit 1 on a failure."""
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

out, device = Path(sys.argv[1]), sys.argv[2]
rows, failed, total = [], False, 0
for line in (out / "steps").read_text().splitlines():
    name, rc, seconds, limit = line.split()
    rc, seconds = int(rc), int(seconds)
    total += seconds
    if name == "pytest" and (rc == 5 or rc in (0, 1) and (out / "pytest.xml").is_file()):
        counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
        if (out / "pytest.xml").is_file():
            for suite in ET.parse(out / "pytest.xml").getroot().iter("testsuite"):
                for key in counts:
                    counts[key] += int(suite.get(key, 0))
        bad = counts["failures"] + counts["errors"]
        passed = counts["tests"] - bad - counts["skipped"]
        failed |= bad > 0 or rc not in (0, 5)
        rows.append((name, "gpu tests passed / failed / skipped", f"{passed} / {bad} / {counts['skipped']}", ""))
        continue
    result = out / f"{name}.json"
    if rc != 0 or not result.is_file():
        failed = True
        why = f"timed out after {limit} s" if rc in (124, 137) else f"exit {rc}"
        rows.append((name, f"FAILED ({why}; log {out / (name + '.log')})", "-", ""))
        continue
    for row in json.loads(result.read_text()):
        ratio = row.get("ratio")
        rows.append((name, row["metric"], f"{row['value']:,.1f}", "" if ratio is None else f"{ratio:.2f}x"))

head = ("bench", "metric", "value", "ratio")
widths = [max(len(r[i]) for r in [head, *rows]) for i in range(4)]
print(f"\n## bench/gpu.sh on {device}: {total} s of steps")
for r in [head, tuple("-" * w for w in widths), *rows]:
    print("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
print(f"logs: {out}")
sys.exit(1 if failed else 0)
EOF
