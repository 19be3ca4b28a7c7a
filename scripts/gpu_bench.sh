#!/usr/bin/env bash
# The GPU figures in docs/benchmarks.md, in one go on a CUDA machine: the CUDA tests, one image from the embedded
# model, the full-size KV benchmarks (2B: every policy and budget, original scoring, timing over 10 repeats, a
# profile of where the time goes, batches 4 and 8; 8B: three budgets, batch 4), and the fidelity benchmark through
# torchrun (NCCL) against one plain process. The whole script runs longer than one 10-minute device call: ONLY
# picks steps.
# Usage: [ONLY="kv_8b kv_8b_batch4"] bash scripts/gpu_bench.sh [OUT_DIR] [PYTHON]   (defaults: out/gpu, python3).
# A device session has 15 minutes, one command at most 10: pick one line per session, the open issue's first.
#   issue 20 figures:           ONLY="generate_cuda low_vram" (about 9 minutes)
#   issue 22 speed (+ graphs):  ONLY="speed"                (about 9.5; run gpu_speed.py --prepare-original here
#                                                             first and carry .original; ask for kind nvidia-h200:
#                                                             the original's 8B batch 4 needs about 89 GB)
#   issue 22 attention + tests: ONLY="test_cuda attention"  (at most 7; test_cuda includes the graph and backend
#                                                             checks that decide graphs' default and AUTO_ORDER)
# Each step has its own log; a failing step is reported and the next one still runs. ONLY names the steps to run.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-out/gpu}
py=${2:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
failed=()

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $out/NAME.log
    local name=$1 limit=$2
    shift 2
    if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return; fi
    echo "== $name: $*"
    local t0=$SECONDS
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    grep -v "^USDT" "$out/$name.log" | tail -n 25
    echo "== $name: rc=$rc in $((SECONDS - t0)) s"
    [ "$rc" -eq 0 ] || failed+=("$name")
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$py" -c "import torch, platform; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'python', platform.python_version())"
} | tee "$out/machine.txt"

step test_cuda 180 "$py" -m pytest -q -p no:cacheprovider tests/test_cuda.py
step generate_cuda 60 "$py" -m scalekv_core generate \
    --transformer default_model/infinity/infinity_shapes.safetensors \
    --vae default_model/vae/infinity_shapes_vae.safetensors --text-encoder default_model/text_encoders/t5_shapes \
    --prompt "a large red circle at the top left on a blue background" --seed 3 --cfg 3 --tau 0.5 \
    --width 256 --height 256 --kv-policy scalekv --budget 10% --device cuda \
    --memory-report "$out/memory_report_cuda.json" --out "$out/image_cuda.png"
bench=("$py" -m scalekv_core.bench kv --size 1M --device cuda --dtype bf16 --repeats 3)
step kv_2b 360 "${bench[@]}" --model 2b --json "$out/bench_kv_2b_cuda.json"
step kv_2b_original 120 "${bench[@]}" --model 2b --policies scalekv --budgets 10% --scoring original \
    --json "$out/bench_kv_2b_cuda_original.json"
step kv_2b_timing 180 "${bench[@]}" --model 2b --policies sliding_window,scalekv --budgets 10% --repeats 10 \
    --json "$out/bench_kv_2b_cuda_timing.json"
step profile_2b 120 "$py" scripts/profile_kv.py --model 2b --size 1M --policies full,sliding_window,scalekv --budget 10%
for b in 4 8; do
    step kv_2b_batch$b 150 "${bench[@]}" --model 2b --policies scalekv --budgets 10% --batch $b \
        --json "$out/bench_kv_2b_batch${b}_cuda.json"
done
bench8=("$py" -m scalekv_core.bench kv --size 1M --device cuda --dtype bf16 --repeats 2 --model 8b --policies scalekv)
step kv_8b 240 "${bench8[@]}" --budgets 4%,10%,20% --json "$out/bench_kv_8b_cuda.json"
step kv_8b_batch4 300 "${bench8[@]}" --budgets 10% --batch 4 --json "$out/bench_kv_8b_batch4_cuda.json"
# issue 20: the whole job of the real shapes under each memory cap (block swap, 8-bit and 4-bit weights)
step low_vram 480 "$py" scripts/gpu_low_vram.py --out "$out/gpu_low_vram.json"
fid=(-m scalekv_core.bench fidelity --num-pairs 24 --budgets 10%)
step fidelity_nccl 240 torchrun --standalone --nproc_per_node=1 "${fid[@]}" --out "$out/fidelity_nccl"
step fidelity_single 240 "$py" "${fid[@]}" --out "$out/fidelity_single"
step fidelity_equal 10 diff "$out/fidelity_nccl/fidelity.md" "$out/fidelity_single/fidelity.md"
# issue 22, item 5: every attention backend that runs here, 2B and 8B shapes at 1024x1024, batch 1 and 4; its
# fastest exact backend is what AUTO_ORDER in scalekv_core/kvcache/attention.py should follow (docs/attention.md)
step attention 240 "$py" scripts/gpu_attention.py --out "$out/gpu_attention.json"
# issue 22: the original Infinity code against ours (full, ScaleKV 10%), 2B and 8B, batch 1 and 4 (docs/speed.md;
# needs .original, written by `scripts/gpu_speed.py --prepare-original` and carried to the machine)
step speed 570 "$py" scripts/gpu_speed.py --original .original --out "$out/gpu_speed.json"

if [ ${#failed[@]} -gt 0 ]; then
    echo "FAILED steps: ${failed[*]}"
    exit 1
fi
echo "all steps passed; logs and JSON in $out"
