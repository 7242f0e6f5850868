"""int8 weight-only quantization on a CPU: batch-1 decode speed and held-out perplexity, fp32 against int8, ArchLM
against transformers' LlamaForCausalLM holding the same weights and quantized the same way.

    python benchmarks/quantized.py                   # trains a small model first (see below for the time)
    python benchmarks/quantized.py --model_dir runs/demo --train_corpus_mb 6 --threads 1   # make demo's model
    python benchmarks/quantized.py --library quanto  # optimum-quanto instead of torchao

The quantized models load as a user loads them: `from_pretrained(folder, quantization_config=...)`, the ArchLM
folder with `trust_remote_code=True`, the Llama one (written by `archlm.convert.to_transformers`) without.
--library torchao (the default) is transformers' `TorchAoConfig(Int8WeightOnlyConfig())`; --library quanto is
`QuantoConfig(weights="int8")`. Both quantize every Linear of the decoder layers to int8 with one scale per output
row and keep the embeddings and the LM head in fp32 (transformers' default for both).

Why torchao is the default, measured on the default model (4 layers, 256 wide, trained here) on 2 shared AVX2 CPU
cores, one thread, the three interleaved in one process: int8 decoding ran at 75.8 tokens/s with torchao and 55.7
with optimum-quanto (fp32: 96.7), and 1.7x faster than quanto's on a random 512-wide model; the held-out
perplexities were equal (fp32 477.76, torchao 477.75, quanto 477.74; greedy tokens all equal to fp32's); and only
torchao's quantized model saves and reloads (`save_pretrained` refuses a quanto model). Neither is faster than fp32
on such a CPU: both run the matmul in fp32 on weights converted from int8 at every call (quanto's int8 kernel,
`torch._weight_int8pack_mm`, is for bf16 activations only; torch.compile made torchao's int8 slower still here).
What int8 weight-only gives on a CPU is memory: the quantized layers take 4x less.

Without --model_dir, a llama-preset model is trained first with examples/train.py on --train_corpus_mb MB of the
default corpus (Python's standard library); held-out perplexity is then measured on standard-library files outside
that training subset (the same subset `--max_corpus_mb` of train.py selects), so pass the --max_corpus_mb the model
was trained with. Decode speed is the median over --pairs interleaved rounds of the four models (alternating the
order, after a warm-up), so the ratios hold on a busy machine. Most of the default run is training: 400 steps of
make demo's recipe, which runs 900 steps in 3-5 minutes on 2 idle cores (the measurements take under a minute);
it took 32 minutes on 2 shared, busy cores. Writes quantized.json, quantized.md and quantized.png to --output_dir.
"""

import argparse
import logging
import math
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from common import decode_ms_per_token, interleaved, machine_description, write_results
from transformers import AutoModelForCausalLM, AutoTokenizer, QuantoConfig, TorchAoConfig

from archlm.convert import to_transformers
from archlm.data import stdlib_source_files

logger = logging.getLogger("benchmarks.quantized")

REPO = Path(__file__).resolve().parents[1]
MODELS = ("archlm fp32", "archlm int8", "llama fp32", "llama int8")
DEFAULT_OVERRIDES = "num_hidden_layers=4,hidden_size=256,num_attention_heads=4,num_key_value_heads=2"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", default=None, help="an existing ArchLM llama-preset folder (default: train one)")
    parser.add_argument("--library", choices=["torchao", "quanto"], default="torchao")
    parser.add_argument("--train_corpus_mb", type=float, default=6.0,
                        help="MB of the default corpus the model trains (was trained) on: train.py's --max_corpus_mb")
    parser.add_argument("--train_steps", type=int, default=400)
    parser.add_argument("--train_output_dir", default=None, help="keep the trained model here (default: a temp folder)")
    parser.add_argument("--train_overrides", default=DEFAULT_OVERRIDES, help="--config_overrides of the trained model")
    parser.add_argument("--train_vocab", type=int, default=4096)
    parser.add_argument("--train_block", type=int, default=128)
    parser.add_argument("--eval_blocks", type=int, default=32, help="held-out blocks for the perplexity")
    parser.add_argument("--eval_block", type=int, default=128, help="tokens per held-out block")
    parser.add_argument("--decode_prompt", type=int, default=32)
    parser.add_argument("--decode_tokens", type=int, default=32)
    parser.add_argument("--agreement_prompts", type=int, default=4, help="held-out prompts of the greedy comparison")
    parser.add_argument("--pairs", type=int, default=5, help="interleaved decode rounds")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--output_dir", default="benchmarks/results")
    return parser.parse_args(argv)


def quantization_config(library: str):
    """A fresh int8 weight-only config of `library` (transformers may write into the one it is given)."""
    if library == "torchao":
        from torchao.quantization import Int8WeightOnlyConfig

        return TorchAoConfig(Int8WeightOnlyConfig())
    return QuantoConfig(weights="int8")


def train_model(args, output_dir: Path) -> Path:
    """A llama-preset model trained briefly by examples/train.py on the default corpus (make demo's recipe, shorter)."""
    command = [
        sys.executable, str(REPO / "examples" / "train.py"), "--preset", "llama",
        "--config_overrides", args.train_overrides, "--tokenizer_vocab_size", str(args.train_vocab),
        "--max_corpus_mb", str(args.train_corpus_mb), "--block_size", str(args.train_block),
        "--per_device_train_batch_size", "8", "--max_steps", str(args.train_steps), "--learning_rate", "3e-3",
        "--lr_scheduler_type", "cosine", "--warmup_steps", "20", "--weight_decay", "0.1", "--adam_beta2", "0.95",
        "--logging_steps", "50", "--eval_strategy", "no", "--max_eval_samples", "64", "--save_strategy", "no",
        "--disable_tqdm", "true", "--report_to", "none", "--sample_prompt", "",
        "--output_dir", str(output_dir), "--overwrite_output_dir",
    ]
    logger.info("training %s for %d steps on %.1f MB of the standard library", args.train_overrides, args.train_steps,
                args.train_corpus_mb)
    subprocess.run(command, check=True, cwd=REPO)
    return output_dir


def held_out_blocks(tokenizer, train_corpus_mb: float, blocks: int, block: int) -> torch.Tensor:
    """(blocks, block) token ids from standard-library files outside the training subset, in a fixed shuffled order
    across the whole library, each file followed by EOS."""
    seen = set(stdlib_source_files(train_corpus_mb))
    unseen = [path for path in stdlib_source_files() if path not in seen]
    if not unseen:
        raise SystemExit(f"--train_corpus_mb {train_corpus_mb} covers the whole standard library: nothing is held out")
    random.Random(0).shuffle(unseen)
    ids, needed = [], blocks * block
    for path in unseen:
        ids += tokenizer(path.read_text(encoding="utf-8"))["input_ids"] + [tokenizer.eos_token_id]
        if len(ids) >= needed:
            return torch.tensor(ids[:needed]).view(blocks, block)
    raise SystemExit(f"the held-out files hold {len(ids)} tokens, fewer than {needed}")


def perplexity(model, blocks: torch.Tensor, batch: int = 8) -> float:
    """exp(mean next-token cross-entropy) over every position of every block, from the model's logits."""
    total, count = 0.0, 0
    with torch.no_grad():
        for rows in blocks.split(batch):
            logits = model(rows).logits[:, :-1].float()  # (B, L-1, V)
            targets = rows[:, 1:].reshape(-1)
            total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets, reduction="sum").item()
            count += targets.numel()
    return math.exp(total / count)


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor holds; a quantized tensor subclass counts its inner tensors (int8 data, scales)."""
    if type(tensor) in (torch.Tensor, torch.nn.Parameter) or not hasattr(tensor, "__tensor_flatten__"):
        return tensor.numel() * tensor.element_size()
    names, _ = tensor.__tensor_flatten__()
    return sum(tensor_bytes(getattr(tensor, name)) for name in names)


def quantized_linears(model) -> tuple[int, int]:
    """(Linear layers whose weight is a quantized tensor subclass, all Linear layers)."""
    linears = [module for module in model.modules() if isinstance(module, torch.nn.Linear)]
    return sum(type(module.weight) not in (torch.Tensor, torch.nn.Parameter) for module in linears), len(linears)


def greedy(model, prompts: torch.Tensor, new_tokens: int) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model.generate(prompt[None], max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                         do_sample=False, pad_token_id=0)[0, prompt.shape[0]:] for prompt in prompts])


def load_models(model_dir: Path, llama_dir: Path, library: str) -> dict:
    """The four models, each loaded from a folder: ArchLM's (remote code) and the Llama export of the same weights."""
    archlm = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True).eval()
    to_transformers(archlm).save_pretrained(llama_dir)
    return {
        "archlm fp32": archlm,
        "archlm int8": AutoModelForCausalLM.from_pretrained(
            model_dir, trust_remote_code=True, quantization_config=quantization_config(library)).eval(),
        "llama fp32": AutoModelForCausalLM.from_pretrained(llama_dir).eval(),
        "llama int8": AutoModelForCausalLM.from_pretrained(
            llama_dir, quantization_config=quantization_config(library)).eval(),
    }


def measure(args, model_dir: Path, work_dir: Path) -> dict:
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=True)
    blocks = held_out_blocks(tokenizer, args.train_corpus_mb, args.eval_blocks, args.eval_block)
    models = load_models(model_dir, work_dir / "llama", args.library)
    archlm = models["archlm fp32"]
    with torch.no_grad():
        export_difference = (archlm(blocks[:2]).logits - models["llama fp32"](blocks[:2]).logits).abs().max().item()
    logger.info("ArchLM and Llama fp32 logits differ by at most %.2e", export_difference)

    logger.info("held-out perplexity over %d x %d tokens", *blocks.shape)
    ppl = {name: perplexity(model, blocks) for name, model in models.items()}
    prompts = blocks[: args.agreement_prompts, : args.decode_prompt]
    tokens = {name: greedy(model, prompts, args.decode_tokens) for name, model in models.items()}
    agreement = {name: (tokens[name] == tokens[name.split()[0] + " fp32"]).float().mean().item() for name in models}
    agreement["archlm int8 = llama int8"] = (tokens["archlm int8"] == tokens["llama int8"]).float().mean().item()

    logger.info("batch-1 decode: %d-token prompt, %d new tokens, %d interleaved rounds", args.decode_prompt,
                args.decode_tokens, args.pairs)
    with torch.no_grad():
        decode = interleaved(models, lambda model: decode_ms_per_token(model, blocks[:1, : args.decode_prompt],
                                                                       args.decode_tokens, 1), args.pairs)
    rows = [
        {"measure": "decode tokens/s", **{name: 1000 / ms for name, ms in decode.items()}, "higher_is_better": True},
        {"measure": "held-out perplexity", **ppl, "higher_is_better": False},
        {"measure": "weights MiB", **{name: sum(tensor_bytes(p) for p in model.parameters()) / 2**20
                                      for name, model in models.items()}, "higher_is_better": False},
    ]
    return {
        "architecture": archlm.config.architecture_name, "parameters": archlm.num_parameters(),
        "library": args.library, "model_dir": str(model_dir), "machine": machine_description(), "pairs": args.pairs,
        "decode_prompt": args.decode_prompt, "decode_tokens": args.decode_tokens,
        "eval_tokens": blocks.numel(), "eval_block": args.eval_block, "train_corpus_mb": args.train_corpus_mb,
        "export_max_abs_logit_difference": export_difference,
        "quantized_linears": {name: quantized_linears(model) for name, model in models.items()},
        "greedy_agreement": agreement, "rows": rows,
    }


def markdown(results: dict) -> str:
    lines = [
        f"`{results['architecture']}` ({results['parameters'] / 1e6:.1f}M parameters), int8 weight-only "
        f"({results['library']}); {results['machine']}; decode: batch 1, {results['decode_prompt']}-token prompt, "
        f"{results['decode_tokens']} new tokens, median of {results['pairs']} interleaved rounds; perplexity over "
        f"{results['eval_tokens']:,} held-out tokens in blocks of {results['eval_block']}.", "",
        "| measure | ArchLM fp32 | ArchLM int8 | Llama fp32 | Llama int8 | ArchLM int8 / fp32 | Llama int8 / fp32 "
        "| ArchLM int8 / Llama int8 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in results["rows"]:
        a32, a8, l32, l8 = (row[name] for name in MODELS)
        lines.append(f"| {row['measure']} | {a32:,.2f} | {a8:,.2f} | {l32:,.2f} | {l8:,.2f} | {a8 / a32:.3f}x "
                     f"| {l8 / l32:.3f}x | {a8 / l8:.3f}x |")
    agreement, quantized = results["greedy_agreement"], results["quantized_linears"]
    lines += [
        "", f"Greedy tokens equal to the same model's fp32 tokens ({results['decode_tokens']} per prompt): ArchLM int8 "
            f"{agreement['archlm int8']:.0%}, Llama int8 {agreement['llama int8']:.0%}; ArchLM int8 = Llama int8: "
            f"{agreement['archlm int8 = llama int8']:.0%}. Quantized Linear layers: ArchLM {quantized['archlm int8'][0]} "
            f"of {quantized['archlm int8'][1]}, Llama {quantized['llama int8'][0]} of {quantized['llama int8'][1]} "
            "(the LM head stays fp32). ArchLM and Llama fp32 logits differ by at most "
            f"{results['export_max_abs_logit_difference']:.1e}. Ratios are plain quotients: int8 / fp32 > 1 is faster "
            "decoding, but a worse perplexity and more memory.",
    ]
    return "\n".join(lines)


def plot(results: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {row["measure"]: row for row in results["rows"]}
    shown = ["decode tokens/s", "held-out perplexity", "weights MiB"]
    fig, axes = plt.subplots(1, len(shown), figsize=(12, 3.8))
    labels = ["ArchLM\nfp32", "ArchLM\nint8", "Llama\nfp32", "Llama\nint8"]
    for axis, measure in zip(axes, shown):
        values = [rows[measure][name] for name in MODELS]
        bars = axis.bar(labels, values, color=["C0", "C1", "C7", "C3"])
        axis.bar_label(bars, fmt="%.1f", fontsize=8)
        axis.set_title(measure)
    fig.suptitle(f"{results['architecture']}: int8 weight-only ({results['library']}) vs fp32, CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("torchao", "torch.utils._pytree"):  # torchao's CUDA-only libraries, enum registrations
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="archlm-quantized-") as work_dir:
        work_dir = Path(work_dir)
        model_dir = args.model_dir or train_model(args, Path(args.train_output_dir or work_dir / "archlm"))
        model_dir = Path(model_dir)
        results = measure(args, model_dir, work_dir)
    if not args.model_dir:
        results["model_dir"] = f"trained here: {args.train_steps} steps, {args.train_overrides}"
    write_results(args.output_dir, "quantized", results, markdown(results), plot)


if __name__ == "__main__":
    main()
