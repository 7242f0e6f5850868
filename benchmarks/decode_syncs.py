"""On a GPU: does a cached decoding step make the host wait for the device? (It should not: transformers' generate
no longer waits between steps, and every wait stalls the queue of kernels the host has launched ahead.)

    python benchmarks/decode_syncs.py            # a dense and a mixture-of-experts model, bf16 and float32

Runs a prefill, then decoding steps of one token under torch.cuda.set_sync_debug_mode("error"), which raises at the
first synchronising call; prints one line per model and dtype, and exits non-zero if any step waited.
"""

import sys

import torch

from archlm import ArchLMConfig, ArchLMForCausalLM
from transformers import DynamicCache

SMALL = dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=512,
             vocab_size=1024, max_position_embeddings=256)
MODELS = {"dense": {}, "moe-8x2": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=256)}


def main() -> int:
    if not torch.cuda.is_available():
        print("decode_syncs.py needs a CUDA device")
        return 2
    failures = 0
    for name, overrides in MODELS.items():
        for dtype in (torch.bfloat16, torch.float32):
            torch.manual_seed(0)
            model = ArchLMForCausalLM(ArchLMConfig.from_preset("llama", **SMALL, **overrides)).to("cuda", dtype).eval()
            cache = DynamicCache(config=model.config)
            with torch.no_grad():
                token = model(torch.randint(3, 1024, (2, 16), device="cuda"), past_key_values=cache).logits[:, -1:].argmax(-1)
                torch.cuda.synchronize()
                try:
                    torch.cuda.set_sync_debug_mode("error")
                    for _ in range(4):
                        token = model(token, past_key_values=cache).logits[:, -1:].argmax(-1)
                    verdict = "no host waits in 4 decoding steps"
                except RuntimeError as error:
                    failures += 1
                    verdict = f"WAITS: {str(error).splitlines()[0][:160]}"
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            print(f"{name} {str(dtype).removeprefix('torch.')}: {verdict}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
