#!/usr/bin/env bash
# The GPU checks of the fused loss kernels (issue #8) on ONE GPU, in under 8 minutes, installing
# nothing from the network:
#   1. the gpu-marked tests (tests/test_kernels*.py on CUDA)           100 s budget
#   (--tune: tools/tune_kernels.py sweeps the kernels' tiles and the
#    benchmarks below run with the winners; 120 s more)
#   2. tools/bench_loss.py --device cuda at N = 16384, every case        150 s budget
#      (torch.compile in a part of its own: its compile time)             90 s budget
#   3. the same at N = 4096, without torch.compile                        70 s budget
# then a summary table, printed last.
#
#   tools/gpu_check.sh [--tune] [WHEEL_DIR]
#
# WHEEL_DIR (optional): wheels to install with `pip --no-index --no-deps` into /tmp/steer_site,
# e.g. liger-kernel (pure Python + Triton) and megatron-core (cp312) for the comparison cases;
# without them those cases print "missing". Logs and JSON land in $OUT when set (the device
# machine's return folder), else ./gpu_check_out. Exit status: 0 only if every part passed.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEST=${OUT:-$PWD/gpu_check_out}
mkdir -p "$DEST"
export PYTHONUNBUFFERED=1
T0=$(date +%s)
declare -a SUMMARY=()
RC=0

TUNE=0
if [ "${1:-}" = "--tune" ]; then TUNE=1; shift; fi
if [ $# -ge 1 ]; then
  if ls "$1"/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/steer_site "$1"/*.whl \
      && export PYTHONPATH=/tmp/steer_site${PYTHONPATH:+:$PYTHONPATH} \
      || echo "gpu_check: installing wheels from $1 failed; comparison cases will report missing packages"
  else
    echo "gpu_check: no wheels in '$1'; going on without them"
  fi
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # the repo itself, without installing it
unset TRITON_INTERPRET  # compiled kernels here

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY - <<'EOF' || { echo "gpu_check: torch/triton/CUDA unusable"; exit 2; }
import torch, triton
assert torch.cuda.is_available(), "no CUDA device"
print("torch", torch.__version__, "| triton", triton.__version__, "|", torch.cuda.get_device_name())
EOF

part() {  # part NAME SECONDS CMD... : run under a timeout, log to $DEST/NAME.log, record status
  local name=$1 limit=$2; shift 2
  local t=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$DEST/$name.log"
  local rc=${PIPESTATUS[0]}
  local what="ok"
  [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && what="TIMEOUT(${limit}s)"
  [ "$rc" -ne 0 ] && [ "$what" = ok ] && what="FAILED(rc=$rc)"
  [ "$rc" -ne 0 ] && RC=1
  SUMMARY+=("$(printf '%-14s %-16s %4ss' "$name" "$what" "$(( $(date +%s) - t ))")")
}

part tests 100 $PY -m pytest -q -p no:cacheprovider -m gpu -o addopts="-ra" tests/test_kernels_gpu.py
TUNED=${TMPDIR:-/tmp}/steer_tuned.env  # outside $DEST: the device machine returns at most 8 files
rm -f "$TUNED"
if [ $TUNE = 1 ]; then
  part tune 120 $PY tools/tune_kernels.py --n 16384 --vocab 152064 38016 --budget-s 100 --env "$TUNED" --json "${TMPDIR:-/tmp}/steer_tune.json"
  if [ -f "$TUNED" ]; then . "$TUNED"; echo "gpu_check: benchmarks use the tuned tiles:"; cat "$TUNED"; fi
fi
part bench_16k 150 $PY tools/bench_loss.py --device cuda --sizes 16384x152064 16384x38016 --graph \
  --cases steer_triton steer_triton_inplace steer_torch plain_pytorch megatron_vocab_parallel_ce liger_ce \
  steer_fused_token_loss steer_fused_lm_head lmhead_steer_triton liger_fused_linear_ce \
  --lmhead 16384x3584x152064 --rep-ms 150 --json "$DEST/bench_16k.json"
# torch.compile on its own: its compile takes tens of seconds per shape, and a slow one must not
# starve the cases above of their time limit
part compile_16k 90 $PY tools/bench_loss.py --device cuda --sizes 16384x152064 16384x38016 --cases torch_compile \
  --lmhead --rep-ms 150 --json "$DEST/compile_16k.json"
part bench_4k 70 $PY tools/bench_loss.py --device cuda --sizes 4096x152064 4096x38016 --lmhead --graph \
  --cases steer_triton steer_triton_inplace steer_torch plain_pytorch megatron_vocab_parallel_ce liger_ce \
  --rep-ms 100 --json "$DEST/bench_4k.json"

echo
echo "================ gpu_check summary ($(( $(date +%s) - T0 )) s) ================"
grep -E "^[0-9]+ (passed|failed)|passed|failed|error" "$DEST/tests.log" | tail -1 | sed 's/^/tests: /'
$PY - "$DEST" <<'EOF'
import json, sys
from pathlib import Path

dest = Path(sys.argv[1])
files = [(n, json.loads((dest / n).read_text())) for n in ("bench_16k.json", "compile_16k.json", "bench_4k.json")
         if (dest / n).exists()]
liger = {(r["N"], r["V"]): r.get("ms") for _, d in files for r in d["rows"] if r["case"] == "liger_ce"}
print(f"{'case':28s} {'N':>6s} {'V':>7s} {'ms':>8s} {'x floor':>7s} {'graph':>7s} {'x floor':>7s} {'peak GiB':>8s}  target")
for name, data in files:
    info = data["info"]
    print(f"-- {name}: {info['device']}, copy {info['copy_TBps']} TB/s, bf16 {info['bf16_TFLOPs']} TFLOP/s, "
          f"torch {info.get('torch')}, triton {info.get('triton')}, liger {info.get('liger_kernel')}, "
          f"mcore {info.get('megatron.core')}")
    for r in data["rows"]:
        if "ms" not in r:
            print(f"{r['case']:28s} {r['N']:6d} {r['V']:7d}  error: {r['error'][:60]}")
            continue
        goal = ""
        if r["case"] == "steer_triton" and r["N"] == 16384:  # issue #8's done-when
            lg = liger.get((r["N"], r["V"]))
            mem = r["peak_extra_GiB"] <= r["grad_GiB"] + 0.25
            faster = lg is None or r["ms"] < lg
            eager = r["x_floor"] <= 1.25 and mem and faster
            graph = r.get("x_floor_graph", 9.0) <= 1.25 and mem and faster
            goal = ("MET" if eager else "MET on device time (graph), host-bound eager" if graph else "NOT MET") + \
                " (<=1.25x floor, peak <= grad+0.25 GiB, < Liger CE)"
        if r["case"].startswith(("steer_fused_lm_head", "steer_fused_token_loss")):
            ok = r["x_floor"] <= 1.25 and r["peak_extra_GiB"] < 1.5
            goal = ("MET" if ok else "NOT MET") + " (<=1.25x 6NHV, peak < 1.5 GiB)"
        print(f"{r['case']:28s} {r['N']:6d} {r['V']:7d} {r['ms']:8.2f} {r['x_floor']:7.2f} "
              f"{r.get('graph_ms', ''):>7} {r.get('x_floor_graph', ''):>7} {r['peak_extra_GiB']:8.3f}  {goal}")
EOF
if [ -f "$TUNED" ]; then echo "tuned tiles: $(tr '\n' ' ' < "$TUNED")"; fi
printf '%s\n' "part           status           time" "${SUMMARY[@]}"
exit $RC
