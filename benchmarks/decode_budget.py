"""Where the time of one batch-1 decode step goes: the llama preset against transformers' Llama, down to the floor.

    python benchmarks/decode_budget.py                      # ~2 minutes on 2 CPU cores
    python benchmarks/decode_budget.py --layers 8 --rounds 9

Same weights everywhere, one new token per step after a 32-token prompt, ms per token (median of --rounds
interleaved rounds of --steps steps):

- matmuls only: the step's linear layers alone (q/k/v/o, gate/up/down per layer, lm_head) on a 1-token input.
  At batch 1 each weight is read once per token, so this is the memory traffic of the weights: no eager
  implementation can go below it.
- eager floor: a hand-written step with no modules, no checks, no mask builder and a preallocated K/V buffer,
  one torch call per operation. Its logits are checked against ArchLM's (the difference is written to the JSON).
  It is what eager PyTorch can do on this machine; the gap between it and a model is Python and dispatch.
- ArchLM / Llama forward: `model(token, past_key_values=DynamicCache)` in a loop, as generate runs them.
- compiled: the same forward compiled with torch.compile over a StaticCache (fixed shapes).
- generate: ms per token inside `model.generate` (dynamic cache): the forward plus generate's own per-token work
  (logits processors, stopping criteria, input preparation).

Writes decode_budget.json, .md and .png to --output_dir.
"""

import argparse
import logging
import time

import torch
import torch.nn.functional as F
from common import (
    add_model_flags,
    decode_ms_per_token,
    interleaved,
    llama_config,
    machine_description,
    write_results,
)
from transformers import DynamicCache, StaticCache

from archlm import ArchLMForCausalLM
from archlm.convert import to_transformers

logger = logging.getLogger("benchmarks.decode_budget")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(parser)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--steps", type=int, default=32, help="decode steps per timed round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--output_dir", default="benchmarks/results")
    return parser.parse_args(argv)


class FloorDecoder:
    """The llama preset's decode step written out with one torch call per operation: the eager floor."""

    def __init__(self, model: ArchLMForCausalLM, max_length: int):
        config = model.config
        if (config.norm_type, config.mlp_type, config.hidden_act, config.position_embedding_type) != (
                "rmsnorm", "gated", "silu", "rope") or config.attention_bias or config.mlp_bias or config.qk_norm:
            raise SystemExit("the eager floor is written for the llama preset (RMSNorm, SwiGLU, rope, no biases)")
        self.model, self.config = model, config
        self.heads, self.kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        shape = (config.num_hidden_layers, 1, self.kv_heads, max_length, self.head_dim)
        self.keys, self.values = torch.zeros(shape), torch.zeros(shape)
        self.layers = [(layer.input_layernorm.weight, layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight,
                        layer.self_attn.v_proj.weight, layer.self_attn.o_proj.weight,
                        layer.post_attention_layernorm.weight, layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight,
                        layer.mlp.down_proj.weight) for layer in model.model.layers]

    def prefill(self, ids: torch.Tensor) -> None:
        cache = DynamicCache(config=self.config)
        self.model(ids, past_key_values=cache)
        for index, layer in enumerate(cache.layers):
            self.keys[index, :, :, : ids.shape[1]] = layer.keys
            self.values[index, :, :, : ids.shape[1]] = layer.values

    def step(self, token: torch.Tensor, position: int) -> torch.Tensor:
        eps, width, half, hd = self.config.norm_eps, (self.config.hidden_size,), self.head_dim // 2, self.head_dim
        hidden = F.embedding(token, self.model.model.embed_tokens.weight)  # (1, 1, C)
        freqs = position * self.model.model.rotary_emb.inv_freq
        angles = torch.cat((freqs, freqs))
        cos, sin = angles.cos(), angles.sin()
        for index, (norm1, wq, wk, wv, wo, norm2, wg, wu, wd) in enumerate(self.layers):
            x = F.rms_norm(hidden, width, norm1, eps)
            q = F.linear(x, wq).view(1, self.heads, 1, hd)
            k = F.linear(x, wk).view(1, self.kv_heads, 1, hd)
            q = q * cos + torch.cat((-q[..., half:], q[..., :half]), -1) * sin
            k = k * cos + torch.cat((-k[..., half:], k[..., :half]), -1) * sin
            self.keys[index, :, :, position] = k[:, :, 0]
            self.values[index, :, :, position] = F.linear(x, wv).view(1, self.kv_heads, hd)
            attended = F.scaled_dot_product_attention(q, self.keys[index, :, :, : position + 1],
                                                      self.values[index, :, :, : position + 1], enable_gqa=True)
            hidden = hidden + F.linear(attended.view(1, 1, -1), wo)
            x = F.rms_norm(hidden, width, norm2, eps)
            hidden = hidden + F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd)
        return F.linear(F.rms_norm(hidden, width, self.model.model.norm.weight, eps), self.model.lm_head.weight)


def forward_loop(model, prompt, static_length: int | None = None, forward=None):
    """ms per token of a greedy batch-1 decode loop through `model`'s forward (or `forward`, e.g. a compiled one),
    after an untimed prefill of `prompt`."""
    forward = forward or model

    def run(steps: int) -> float:
        if static_length:
            cache = StaticCache(config=model.config, max_cache_len=static_length)
        else:
            cache = DynamicCache(config=model.config)
        token = model(prompt, past_key_values=cache).logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for offset in range(steps):
            position = torch.tensor([prompt.shape[1] + offset])
            logits = forward(token, past_key_values=cache, position_ids=position[None], cache_position=position).logits
            token = logits[:, -1:].argmax(-1)
        return (time.perf_counter() - start) / steps * 1000
    return run


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)
    config = llama_config(args, bos_token_id=1, eos_token_id=2)
    archlm = ArchLMForCausalLM(config).eval()
    archlm.set_attn_implementation("sdpa")
    llama = to_transformers(archlm).eval()
    llama.set_attn_implementation("sdpa")
    prompt = torch.randint(3, args.vocab, (1, args.prompt))
    length = args.prompt + args.steps + 1
    floor = FloorDecoder(archlm, length)
    linears = [(torch.ones(1, 1, module.in_features), module.weight) for module in archlm.modules()
               if isinstance(module, torch.nn.Linear)]

    def matmuls(steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            for inputs, weight in linears:
                F.linear(inputs, weight)
        return (time.perf_counter() - start) / steps * 1000

    def floor_loop(steps: int) -> float:
        floor.prefill(prompt)
        token = prompt[:, -1:]
        start = time.perf_counter()
        for offset in range(steps):
            token = floor.step(token, args.prompt + offset).argmax(-1)
        return (time.perf_counter() - start) / steps * 1000

    with torch.no_grad():
        # the floor is only a floor if it computes the same thing: its logits against ArchLM's, 4 steps
        floor.prefill(prompt[:, :-1])
        cache = DynamicCache(config=config)
        archlm(prompt[:, :-1], past_key_values=cache)
        token, floor_error = prompt[:, -1:], 0.0
        for offset in range(4):
            expected = archlm(token, past_key_values=cache).logits
            floor_error = max(floor_error, (floor.step(token, args.prompt - 1 + offset) - expected).abs().max().item())
            token = expected.argmax(-1)
        logger.info("eager floor logits vs ArchLM: max abs difference %.2e", floor_error)
        if floor_error > 1e-4:
            raise SystemExit(f"the eager floor does not compute ArchLM's logits (max abs difference {floor_error})")

        logger.info("compiling both forwards (static cache)")
        compiled = {name: torch.compile(model.forward, fullgraph=True) for name, model in
                    (("archlm", archlm), ("llama", llama))}
        loops = {
            "matmuls only": matmuls,
            "eager floor": floor_loop,
            "ArchLM forward": forward_loop(archlm, prompt),
            "Llama forward": forward_loop(llama, prompt),
            "ArchLM forward, compiled": forward_loop(archlm, prompt, length, compiled["archlm"]),
            "Llama forward, compiled": forward_loop(llama, prompt, length, compiled["llama"]),
        }
        times = interleaved(loops, lambda loop: loop(args.steps), args.rounds)
        generate = interleaved({"ArchLM generate": archlm, "Llama generate": llama},
                               lambda model: decode_ms_per_token(model, prompt, args.steps, 1), args.rounds)
    times.update(generate)

    results = {"architecture": config.architecture_name, "parameters": archlm.num_parameters(),
               "machine": machine_description(), "prompt": args.prompt, "steps": args.steps, "rounds": args.rounds,
               "floor_max_abs_logit_difference": floor_error, "ms_per_token": times}
    table = markdown(results)
    write_results(args.output_dir, "decode_budget", results, table, plot)


def markdown(results: dict) -> str:
    times = results["ms_per_token"]
    llama = times["Llama generate"]
    lines = [f"`{results['architecture']}` ({results['parameters'] / 1e6:.1f}M parameters), fp32, batch 1, "
             f"{results['prompt']}-token prompt; {results['machine']}; median of {results['rounds']} interleaved "
             f"rounds of {results['steps']} steps.", "",
             "| decode step | ms/token | Llama generate / this |", "|---|---:|---:|"]
    lines += [f"| {name} | {ms:.2f} | {llama / ms:.2f}x |" for name, ms in times.items()]
    overhead = times["ArchLM generate"] - times["ArchLM forward"]
    lines += ["", f"generate's own work per token (ArchLM generate - ArchLM forward): {overhead:.2f} ms. "
                  f"Through generate, a model at the eager floor would decode "
                  f"{llama / (times['eager floor'] + overhead):.2f}x as fast as Llama, one at the matmuls alone "
                  f"{llama / (times['matmuls only'] + overhead):.2f}x."]
    return "\n".join(lines)


def plot(results: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    times = results["ms_per_token"]
    fig, axis = plt.subplots(figsize=(8, 4))
    axis.barh(list(times), list(times.values()), color="C0")
    axis.invert_yaxis()
    axis.set(xlabel="ms per generated token (lower is better)", title=f"decode step budget: {results['architecture']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
