"""Benchmark ArchLM's tokenizer against a plain `tokenizers` byte-level BPE of the same vocabulary size.

    .venv/bin/python benchmarks/tokenizer.py --vocab-size 8192 --train-bytes 10000000 --output benchmarks/results/tokenizer.json

Both are trained on the same ~10 MB of the Python standard library's source (every tenth file held
out, the rest taken in sorted order), and measured on the held-out files for
- training time (seconds, wall clock; ours reads the files, with its UTF-8 check, the plain one is
  handed the texts already in memory),
- characters per token (higher is better: more text per model step),
- whether decode(encode(text)) gives the text back.
The plain tokenizer is `tokenizers.ByteLevelBPETokenizer` with its defaults (GPT-2 split regex, no
special tokens, so all of its vocabulary goes to bytes and merges; ours spends 4 entries on special
tokens). The command exits with status 1 if ours compresses worse.
"""

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

import tokenizers
import transformers
from tokenizers import ByteLevelBPETokenizer

from archlm.data import stdlib_source_files
from archlm.tokenization_archlm import train_tokenizer

logger = logging.getLogger("benchmarks.tokenizer")


def stdlib_split(train_bytes: int) -> tuple[list[Path], list[Path]]:
    """(training files of about `train_bytes`, held-out files) from the standard library's UTF-8 .py files."""
    sources = stdlib_source_files()  # the default training corpus: UTF-8 .py files, tests and packages left out
    held_out = sources[::10]
    training, size = [], 0
    for index, path in enumerate(sources):
        if index % 10 and size < train_bytes:
            training.append(path)
            size += path.stat().st_size
    if size < train_bytes:
        logger.warning("The standard library only gave %d training bytes of the %d asked for", size, train_bytes)
    return training, held_out


def timed(train, repeats: int):
    """Runs `train` `repeats` times; returns (the last result, the seconds of each run)."""
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = train()
        seconds.append(time.perf_counter() - start)
    return result, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--train-bytes", type=int, default=10_000_000, help="size of the training text")
    parser.add_argument("--min-frequency", type=int, default=2, help="for both tokenizers")
    parser.add_argument("--repeats", type=int, default=3, help="training runs per tokenizer; the fastest is reported")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/tokenizer.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    training_files, held_out_files = stdlib_split(args.train_bytes)
    held_out = [path.read_text(encoding="utf-8") for path in held_out_files]
    held_out_chars = sum(len(text) for text in held_out)
    logger.info(
        "Training on %d files (%d bytes); %d held-out files (%d characters)",
        len(training_files),
        sum(path.stat().st_size for path in training_files),
        len(held_out_files),
        held_out_chars,
    )

    logger.info("Training ArchLM's tokenizer")
    ours, our_seconds = timed(
        lambda: train_tokenizer(training_files, vocab_size=args.vocab_size, min_frequency=args.min_frequency),
        args.repeats,
    )
    our_ids = ours(held_out, add_special_tokens=False)["input_ids"]

    # Whole files, from memory: `ByteLevelBPETokenizer.train(files)` would read them line by line
    # and never see the newline-plus-indentation pieces it meets when encoding (3.24 instead of
    # 3.53 chars/token at vocab 8192), which would flatter ours.
    training_texts = [path.read_text(encoding="utf-8") for path in training_files]

    def train_plain():
        plain = ByteLevelBPETokenizer()
        plain.train_from_iterator(
            training_texts, vocab_size=args.vocab_size, min_frequency=args.min_frequency, show_progress=False
        )
        return plain

    logger.info("Training plain byte-level BPE")
    plain, plain_seconds = timed(train_plain, args.repeats)
    plain_ids = [encoding.ids for encoding in plain.encode_batch(held_out)]

    results = {
        "archlm": {
            "vocab_size": len(ours),
            "train_seconds": min(our_seconds),
            "train_seconds_all": our_seconds,
            "held_out_tokens": sum(map(len, our_ids)),
            "chars_per_token": held_out_chars / sum(map(len, our_ids)),
            "lossless_on_held_out": ours.batch_decode(our_ids) == held_out,
        },
        "plain_byte_level_bpe": {
            "vocab_size": plain.get_vocab_size(),
            "train_seconds": min(plain_seconds),
            "train_seconds_all": plain_seconds,
            "held_out_tokens": sum(map(len, plain_ids)),
            "chars_per_token": held_out_chars / sum(map(len, plain_ids)),
            "lossless_on_held_out": plain.decode_batch(plain_ids, skip_special_tokens=False) == held_out,
        },
    }
    ratio = results["archlm"]["chars_per_token"] / results["plain_byte_level_bpe"]["chars_per_token"]
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "vocab_size": args.vocab_size,
        "min_frequency": args.min_frequency,
        "train_files": len(training_files),
        "train_bytes": sum(path.stat().st_size for path in training_files),
        "held_out_files": len(held_out_files),
        "held_out_chars": held_out_chars,
        "python": platform.python_version(),
        "tokenizers": tokenizers.__version__,
        "transformers": transformers.__version__,
        "cpu_count": os.cpu_count(),
        "results": results,
        "archlm_over_plain_chars_per_token": ratio,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    logger.info("Wrote %s", args.output)

    print(f"\nvocab {args.vocab_size}, trained on {report['train_bytes'] / 1e6:.1f} MB of stdlib source, "
          f"measured on {held_out_chars / 1e6:.1f} M held-out characters\n")
    print("| tokenizer | vocab | train s (best of %d) | chars/token | lossless |" % args.repeats)
    print("|---|---|---|---|---|")
    for name, result in results.items():
        print(
            f"| {name} | {result['vocab_size']} | {result['train_seconds']:.2f} | "
            f"{result['chars_per_token']:.3f} | {result['lossless_on_held_out']} |"
        )
    print(f"\narchlm / plain chars per token: {ratio:.4f}")

    if ratio < 1:
        logger.error("ArchLM's tokenizer compresses worse than plain byte-level BPE (%.4f)", ratio)
        sys.exit(1)


if __name__ == "__main__":
    main()
