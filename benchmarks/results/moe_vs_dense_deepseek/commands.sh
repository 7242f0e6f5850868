#!/usr/bin/env bash
# How comparison.md and loss_curves.png here were made (2 CPU cores, fp32): a dense model, Mixtral's mixture and
# DeepSeek-V3's (the dots1 preset) with the same active MLP width (512), trained on the same data, seed and steps.
# The mixtures need different expert sizes; this was run before compare_architectures.py had --preset_overrides,
# so dots1 trains with train.py beside them (the same flags, the first run's tokenizer and peak) and the three run
# folders are compared afterwards. Today one compare_architectures.py call with --preset_overrides does the same.
set -euo pipefail
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/moe_vs_dense_deepseek}
SHAPE="num_hidden_layers=4,hidden_size=256,num_attention_heads=4,num_key_value_heads=2,head_dim=64,intermediate_size=512"
COMMON=(--per_device_train_batch_size 8 --block_size 128 --learning_rate 3e-3 --lr_scheduler_type cosine --max_corpus_mb 4)
# dense width 512 | 8 experts of 256, top-2 | 32 experts of 64, top-6, + a shared expert of 128 (first layer dense)
$PY examples/compare_architectures.py --presets llama,mixtral --max_steps 400 --output_dir "$OUT" --overwrite -- \
    --config_overrides "$SHAPE,moe_intermediate_size=256" "${COMMON[@]}"
PEAK=$($PY -c "import json,sys; print(json.load(open(sys.argv[1]))['peak_tflops'])" "$OUT/llama/training_log.json")
$PY examples/train.py --preset dots1 --max_steps 400 --seed 42 --data_seed 42 --output_dir "$OUT/dots1" \
    --overwrite_output_dir --tokenizer_name "$OUT/llama" --peak_tflops "$PEAK" \
    --config_overrides "$SHAPE,num_experts=32,num_experts_per_tok=6,moe_intermediate_size=64,shared_expert_intermediate_size=128" \
    "${COMMON[@]}"
$PY examples/compare_architectures.py "$OUT/llama" "$OUT/mixtral" "$OUT/dots1" --output_dir benchmarks/results/moe_vs_dense_deepseek
