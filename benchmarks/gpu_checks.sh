#!/usr/bin/env bash
# The GPU checks and benchmarks, in one run on a CUDA machine (CI has none; nothing else needs one):
#
#     bash benchmarks/gpu_checks.sh [OUTPUT_DIR] [STEPS]      # STEPS: any of syncs,parity,experts,loss,mixtral,mixtral64,llama
#
# 0. syncs: benchmarks/decode_syncs.py, whether a decoding step makes the host wait for the device.
# 1. parity: the modeling, loss, conversion, generation and mixture-of-experts tests with every tensor on the GPU
#    (ARCHLM_TEST_DEVICE=cuda): each family's logits, losses and greedy tokens against transformers' own class there.
# 2. experts: benchmarks/experts_paths.py in bf16, each way to compute one layer's experts at decoding sizes, eager
#    and compiled (which one ArchLMExperts.forward should take on a GPU).
# 2b. loss: benchmarks/loss_chunks.py in bf16 at the models' 8,192 tokens x 1,024 x 32k: the LM head and loss by the
#    plain path and by the fused loss at several chunk sizes (does the 64 MiB chunk cost the training step time?).
# 3. mixtral, mixtral64: benchmarks/vs_mixtral.py in bf16 at 8 experts top-2 and 64 experts top-8.
# 4. llama: benchmarks/vs_llama.py in bf16.
# Needs the versions constraints.txt pins for transformers and datasets (torch: any CUDA build with grouped_mm, 2.10+).
# Each step has its own time limit, so one that hangs leaves the others' results; logs and JSON go to OUTPUT_DIR.
set -u
cd "$(dirname "$0")/.."
OUT_DIR="${1:-benchmarks/results/gpu}"
STEPS="${2:-syncs,parity,experts,loss,mixtral,mixtral64,llama}"
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PYTHON="${PYTHON:-python3}"
$PYTHON -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,memory.used --format=csv,noheader

step() { [[ ",$STEPS," == *",$1,"* ]]; }
# a 1024-wide, 8-layer model: large enough that the matmuls fill an H200 in the forward and training step
MODEL=(--hidden 1024 --layers 8 --heads 16 --kv_heads 4 --vocab 32000 --seq 1024 --batch 8 --pairs 7)

if step syncs; then
  timeout 120 $PYTHON benchmarks/decode_syncs.py 2>&1 | tee "$OUT_DIR/syncs.log" | grep -vi warn | tail -6
fi
if step parity; then
  ARCHLM_TEST_DEVICE=cuda timeout 300 $PYTHON -m pytest -q -p no:cacheprovider -n 8 -m "not slow and not distributed" \
    tests/test_convert_families.py tests/test_modeling_moe.py tests/test_convert.py tests/test_generation.py \
    tests/test_modeling.py tests/test_modeling_attention.py tests/test_modeling_loss.py \
    2>&1 | tee "$OUT_DIR/parity.log" | grep -E "passed|failed|FAILED|Error|error" | tail -40
fi
if step experts; then
  timeout 120 $PYTHON benchmarks/experts_paths.py --hidden 1024 --expert_width 1408 --tokens 1,4 \
    --output_dir "$OUT_DIR" 2>&1 | tee "$OUT_DIR/experts.log" | grep -vi warn | tail -14
fi
if step loss; then
  timeout 120 $PYTHON benchmarks/loss_chunks.py --tokens 8192 --hidden 1024 --vocab 32000 --chunks 1024,2048,4096,8192 \
    --output_dir "$OUT_DIR" 2>&1 | tee "$OUT_DIR/loss.log" | grep -vi warn | tail -10
fi
if step mixtral; then
  timeout 240 $PYTHON benchmarks/vs_mixtral.py "${MODEL[@]}" --experts 8 --top_k 2 --expert_width 1408 \
    --output_dir "$OUT_DIR" 2>&1 | tee "$OUT_DIR/mixtral.log" | grep -vi warn | tail -12
fi
if step mixtral64; then
  mkdir -p "$OUT_DIR/vs_mixtral_64x8"
  timeout 240 $PYTHON benchmarks/vs_mixtral.py "${MODEL[@]}" --experts 64 --top_k 8 --expert_width 352 \
    --output_dir "$OUT_DIR/vs_mixtral_64x8" 2>&1 | tee "$OUT_DIR/mixtral64.log" | grep -vi warn | tail -12
fi
if step llama; then
  timeout 240 $PYTHON benchmarks/vs_llama.py "${MODEL[@]}" --output_dir "$OUT_DIR" 2>&1 | tee "$OUT_DIR/llama.log" \
    | grep -vi warn | tail -16
fi
