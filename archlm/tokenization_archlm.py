"""ArchLM's tokenizer: a lossless byte-level BPE, trained with the `tokenizers` library.

Train one from the command line (the trainer draws a progress bar on stderr):
    python -m archlm.tokenization_archlm --train corpus/*.txt --vocab-size 32000 --output runs/tokenizer

or from Python:
    from pathlib import Path
    from archlm.tokenization_archlm import train_tokenizer
    tokenizer = train_tokenizer([Path("a.txt"), Path("b.txt")], vocab_size=32000)
    tokenizer.save_pretrained("runs/model")  # next to the model's config.json and weights

Decisions, and why:

- Lossless. There is no normalizer (NFC would merge "e" + U+0301 into "é"), the text is split with a
  regex and then mapped byte by byte to 256 printable symbols (`ByteLevel`), and all 256 byte symbols
  are in the vocabulary whatever the corpus holds. So `decode(encode(s)) == s` for every string that
  UTF-8 can encode: runs of spaces, tabs, CRLF, emoji, CJK and combining marks included.
- The split regex is GPT-4's (Llama 3's), but a line ending in punctuation keeps its line break
  and the next line's indentation in one piece. On held-out standard-library source that
  compresses better than both GPT-4's split and the GPT-2 one of plain `ByteLevelBPETokenizer`
  (see PRETOKENIZE_REGEX and benchmarks/tokenizer.py).
- Files are streamed to the trainer in pieces of about 1 MiB, cut only where the split regex
  splits anyway, so a corpus larger than memory trains to exactly the vocabulary it would give
  read whole. Every file is checked (exists, UTF-8, not all empty) before training starts.
- Special tokens hold fixed ids at the start of the vocabulary (the constants below), so a model
  config can be written before the tokenizer is trained. `bos_token` is `eos_token` is
  `<|endoftext|>`, as in GPT-2: one document-boundary token. The pad token is a separate one, so
  masking padding out of the labels never masks the real end of a document.
- `encode` adds no special tokens, even with `add_special_tokens=True`: the training-data pipeline
  puts `<|endoftext|>` between documents, and the chat template writes its own markers.
- The chat template is ChatML (`<|im_start|>role\\ncontent<|im_end|>\\n`).
- Saved with `save_pretrained`, the folder names `PreTrainedTokenizerFast` as its tokenizer class and
  `tokenizer.json` holds the whole pipeline, so `AutoTokenizer.from_pretrained(folder)` loads it
  without archlm installed and without `trust_remote_code` for the tokenizer. (Next to a model, the
  model's own config.json is remote code: pass `trust_remote_code=True` there, as for the model.)
  `ArchLMTokenizerFast` adds no behaviour over what is saved, so both load to the same tokenizer.
"""

from __future__ import annotations

import argparse
import codecs
import itertools
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers, processors, trainers
from tokenizers.models import BPE
from transformers import PreTrainedTokenizerFast


logger = logging.getLogger(__name__)

# The files a saved tokenizer may consist of, and those of them that hold a vocabulary (one is needed to load it)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "tokenizer.model", "vocab.json", "merges.txt")
VOCABULARY_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")

PAD_TOKEN = "<|pad|>"
PAD_TOKEN_ID = 0
EOS_TOKEN = "<|endoftext|>"
"""Ends a document; also the tokenizer's `bos_token`, as in GPT-2."""
EOS_TOKEN_ID = 1
BOS_TOKEN = EOS_TOKEN
BOS_TOKEN_ID = EOS_TOKEN_ID
IM_START_TOKEN = "<|im_start|>"
"""Opens a chat turn: `<|im_start|>role\\n`."""
IM_START_TOKEN_ID = 2
IM_END_TOKEN = "<|im_end|>"
"""Closes a chat turn."""
IM_END_TOKEN_ID = 3

RESERVED_SPECIAL_TOKENS = (PAD_TOKEN, EOS_TOKEN, IM_START_TOKEN, IM_END_TOKEN)
"""Always ids 0..3, in this order; extra special tokens passed to `train_tokenizer` follow them."""

BYTE_ALPHABET_SIZE = 256
"""Every byte has its own token, so nothing is ever out of vocabulary."""

PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"""
    r"""| ?[^\s\p{L}\p{N}]+(?:[\r\n]+(?:[^\S\r\n]*(?=[^\S\r\n]))?)?|\s+(?!\S)|\s+"""
)
"""How text is split before BPE; no token crosses a split. In order: English contractions; a word
with one leading space or symbol (` self`, `.append`); numbers in groups of up to three digits; a
run of punctuation with one leading space, which takes the line breaks after it and the next line's
indentation but for its last character (`"):\n       "` then `" return"`); whitespace, leaving
its last space to the word that follows. This is the GPT-4 / Llama 3 split but for the line breaks:
GPT-4 splits them from the indentation after them, GPT-2 from the punctuation before them. At
vocab 8192, on held-out standard-library source, this split gives 3.96 characters per token,
GPT-4's 3.69 and GPT-2's 3.53 (benchmarks/tokenizer.py)."""

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + (message['content'] or '') + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)
"""ChatML. `add_generation_prompt=True` opens the assistant's turn."""

DEFAULT_CHUNK_BYTES = 1 << 20
"""Files are read and handed to the trainer in pieces of about this size, so a corpus need not fit
in memory."""
MAX_CHUNK_CHARS = 1 << 24
"""A file piece with no place to cut it cleanly is cut anyway at this length."""

# A chunk of a file is cut just before a line that is not indented, where the line before ends in a
# non-space character and "\n", or in punctuation and "\r\n". PRETOKENIZE_REGEX splits the whole
# text there, and the chunk's end changes none of the pieces before: the last line break is either
# taken by the punctuation before it, or a piece of its own, whether or not text follows. (After a
# longer run of spaces, `\s+(?!\S)` would split the run differently at the end of the chunk.) So
# the pre-tokenized words, and the trained vocabulary, are the same as with the whole file in one
# piece. `\s` and `\w` here cover all of what the tokenizers regex engine calls `\s`, `\p{L}` and
# `\p{N}`, so a character that is `\S` or punctuation here is so there too.
_SAFE_CUT = re.compile(r".*(?:\S\n|[^\s\w]\r\n)(?=\S)", re.DOTALL)
_SAFE_CUT_END = re.compile(r"(?:\S\n|[^\s\w]\r\n)\Z")


def safe_cut_between(before: str, after: str) -> bool:
    """Whether text cut between `before` and `after` pre-tokenizes into the same words as joined (see _SAFE_CUT)."""
    return bool(_SAFE_CUT_END.search(before)) and after[:1] != "" and not after[:1].isspace()


class ArchLMTokenizerFast(PreTrainedTokenizerFast):
    """Byte-level BPE tokenizer of ArchLM models.

    | id | token           | role                                   |
    |----|-----------------|----------------------------------------|
    | 0  | `<|pad|>`       | `pad_token`                            |
    | 1  | `<|endoftext|>` | `eos_token` and `bos_token`            |
    | 2  | `<|im_start|>`  | opens a chat turn (extra special token)|
    | 3  | `<|im_end|>`    | closes a chat turn (extra special token)|

    Make one with `train_tokenizer`, or load one with `from_pretrained` (or `AutoTokenizer`, which
    returns the plain `PreTrainedTokenizerFast` with the same behaviour). A model config is built
    from `len(tokenizer)`, `tokenizer.bos_token_id`, `tokenizer.eos_token_id` and
    `tokenizer.pad_token_id`.
    """

    model_input_names = ["input_ids", "attention_mask"]

    @classmethod
    def from_backend(cls, backend: Tokenizer, extra_special_tokens: Sequence[str] = ()) -> ArchLMTokenizerFast:
        """Wraps a trained `tokenizers.Tokenizer` whose vocabulary starts with `RESERVED_SPECIAL_TOKENS`."""
        vocab = backend.get_vocab()
        for token_id, token in enumerate((*RESERVED_SPECIAL_TOKENS, *extra_special_tokens)):
            if vocab.get(token) != token_id:
                raise ValueError(
                    f"special token {token!r} must have id {token_id}, the backend gives {vocab.get(token)}"
                )
        return cls(
            tokenizer_object=backend,
            bos_token=BOS_TOKEN,
            eos_token=EOS_TOKEN,
            pad_token=PAD_TOKEN,
            extra_special_tokens=[IM_START_TOKEN, IM_END_TOKEN, *extra_special_tokens],
            chat_template=CHAT_TEMPLATE,
            clean_up_tokenization_spaces=False,
        )

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs) -> tuple[str, ...]:
        """`save_pretrained`, with `PreTrainedTokenizerFast` written as the tokenizer class.

        transformers writes this class's own name, which only a process that imports archlm can
        resolve. Everything the tokenizer does is in the saved files, so the generic class loads it
        identically, anywhere.
        """
        saved_files = super().save_pretrained(save_directory, *args, **kwargs)
        for saved_file in saved_files:
            if os.path.basename(saved_file).endswith("tokenizer_config.json"):
                with open(saved_file, encoding="utf-8") as config_file:
                    tokenizer_config = json.load(config_file)
                tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
                with open(saved_file, "w", encoding="utf-8") as config_file:
                    json.dump(tokenizer_config, config_file, indent=2, sort_keys=True, ensure_ascii=False)
                    config_file.write("\n")
        return saved_files


def new_backend() -> Tokenizer:
    """An untrained `tokenizers.Tokenizer` with ArchLM's pipeline: no normalizer, regex split, bytes."""
    backend = Tokenizer(BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            # The regex already split the text; ByteLevel only maps bytes to symbols. No prefix
            # space: it would add a character that decoding cannot tell from a real one.
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    # Nothing is added around a sequence: documents are joined with <|endoftext|> by the data pipeline.
    backend.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B:1")
    return backend


def train_tokenizer(
    texts_or_files: Iterable[str] | Sequence[os.PathLike] | os.PathLike,
    vocab_size: int,
    min_frequency: int = 2,
    special_tokens: Sequence[str] = (),
    *,
    show_progress: bool = False,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> ArchLMTokenizerFast:
    """Trains a byte-level BPE tokenizer and returns it wrapped as an `ArchLMTokenizerFast`.

    Args:
        texts_or_files: the corpus. Either an iterable of `str` texts (a list, a generator, a
            `datasets` column), or `pathlib.Path`s (a list, or one) of UTF-8 text files, which are
            streamed in pieces of `chunk_bytes`. A `str` is always text, never a path.
        vocab_size: size of the vocabulary, special tokens included. At least
            256 + 4 + `len(special_tokens)`. A corpus too small or repetitive for that many merges
            gives a smaller vocabulary (logged as a warning).
        min_frequency: a pair must occur this often to be merged.
        special_tokens: extra special tokens, given ids 4, 5, ... after the reserved
            `RESERVED_SPECIAL_TOKENS` (which always hold ids 0-3).
        show_progress: draw the trainer's progress bar.
        chunk_bytes: how much of a file is read at a time.

    Raises:
        ValueError: `vocab_size` too small, a special token repeated or reserved, a missing file, a
            file that is not UTF-8 (the message names it and the offset of the first bad byte), or
            a corpus with no text. All are checked before training starts.
    """
    special_tokens = list(special_tokens)
    _check_special_tokens(special_tokens)
    minimum_vocab_size = BYTE_ALPHABET_SIZE + len(RESERVED_SPECIAL_TOKENS) + len(special_tokens)
    if vocab_size < minimum_vocab_size:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: it must hold the {BYTE_ALPHABET_SIZE} byte tokens and "
            f"{minimum_vocab_size - BYTE_ALPHABET_SIZE} special tokens, so at least {minimum_vocab_size}"
        )
    if min_frequency < 1:
        raise ValueError(f"min_frequency={min_frequency} must be at least 1")

    texts, length = _corpus_texts(texts_or_files, chunk_bytes)
    backend = new_backend()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[*RESERVED_SPECIAL_TOKENS, *special_tokens],
        # All 256 bytes, seen in the corpus or not: what makes every string encodable.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    backend.train_from_iterator(texts, trainer=trainer, length=length)
    if backend.get_vocab_size() < vocab_size:
        logger.warning(
            "The corpus only allowed a vocabulary of %d tokens (vocab_size=%d was asked): no pair left occurs "
            "min_frequency=%d times.",
            backend.get_vocab_size(),
            vocab_size,
            min_frequency,
        )
    return ArchLMTokenizerFast.from_backend(backend, extra_special_tokens=special_tokens)


def _check_special_tokens(special_tokens: list[str]) -> None:
    for token in special_tokens:
        if not isinstance(token, str) or not token:
            raise ValueError(f"special_tokens must be non-empty strings, got {token!r}")
        if token in RESERVED_SPECIAL_TOKENS:
            raise ValueError(f"special token {token!r} is reserved (ids 0-3 always hold {RESERVED_SPECIAL_TOKENS})")
    repeated = sorted({token for token in special_tokens if special_tokens.count(token) > 1})
    if repeated:
        raise ValueError(f"special_tokens repeats {repeated}")


def _corpus_texts(
    texts_or_files: Iterable[str] | Sequence[os.PathLike] | os.PathLike, chunk_bytes: int
) -> tuple[Iterator[str], int | None]:
    """Checks the corpus and returns (the texts to train on, how many there are if known)."""
    if isinstance(texts_or_files, str):
        raise TypeError("texts_or_files is a single str: pass a list of texts, or pathlib.Path objects for files")
    if isinstance(texts_or_files, os.PathLike):
        texts_or_files = [texts_or_files]

    if isinstance(texts_or_files, (list, tuple)) and any(isinstance(item, os.PathLike) for item in texts_or_files):
        if not all(isinstance(item, os.PathLike) for item in texts_or_files):
            raise ValueError("texts_or_files mixes paths and texts: pass either pathlib.Path objects or str texts")
        paths = [Path(item) for item in texts_or_files]
        _check_files(paths, chunk_bytes)
        length = sum(math.ceil(path.stat().st_size / chunk_bytes) for path in paths)
        return itertools.chain.from_iterable(iter_text_chunks(path, chunk_bytes) for path in paths), length

    length = len(texts_or_files) if isinstance(texts_or_files, Sequence) else None
    texts = iter(texts_or_files)
    # Read up to the first non-empty text, so an empty corpus fails before training starts, even
    # when the texts come from a generator.
    skipped = 0
    for first_text in texts:
        _check_is_text(first_text)
        if first_text:
            break
        skipped += 1
    else:
        raise ValueError(f"the corpus is empty: it holds {skipped} texts, none with any characters")
    return itertools.chain([first_text], map(_check_is_text, texts)), length


def _check_is_text(text: object) -> str:
    if not isinstance(text, str):
        raise TypeError(f"texts must be str (use pathlib.Path for files), got {type(text).__name__}")
    return text


def _check_files(paths: list[Path], chunk_bytes: int) -> None:
    """Reads every file once, so a bad one fails here and not an hour into training."""
    for path in paths:
        if not path.exists():
            raise ValueError(f"training file {str(path)!r} does not exist")
        if not path.is_file():
            raise ValueError(f"training file {str(path)!r} is not a regular file")
    total_bytes = sum(path.stat().st_size for path in paths)
    logger.info("Checking that %d training files (%d bytes) are UTF-8", len(paths), total_bytes)
    has_text = False
    for path in paths:
        for _ in _iter_utf8_blocks(path, chunk_bytes):
            has_text = True
    if not has_text:
        raise ValueError(f"the corpus is empty: all {len(paths)} training files are empty")


def _iter_utf8_blocks(path: Path, chunk_bytes: int) -> Iterator[str]:
    """Yields the non-empty decoded blocks of a file, raising a ValueError at its first non-UTF-8 byte."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="strict")
    offset = 0  # bytes of the file read so far
    with open(path, "rb") as file:
        while True:
            block = file.read(chunk_bytes)
            final = not block
            # The decoder holds back the start of a character cut by the block boundary; the
            # error's position counts from the start of those held-back bytes.
            held_back = len(decoder.getstate()[0])
            try:
                text = decoder.decode(block, final=final)
            except UnicodeDecodeError as error:
                bad_offset = offset - held_back + error.start
                raise ValueError(
                    f"training file {str(path)!r} is not UTF-8: invalid byte 0x{error.object[error.start]:02x} "
                    f"at byte offset {bad_offset} ({error.reason})"
                ) from None
            offset += len(block)
            if text:
                yield text
            if final:
                return


def iter_text_chunks(
    path: str | os.PathLike, chunk_bytes: int = DEFAULT_CHUNK_BYTES, max_chunk_chars: int = MAX_CHUNK_CHARS
) -> Iterator[str]:
    """Yields a UTF-8 file in pieces of about `chunk_bytes`, each cut where the split regex cuts anyway.

    The pieces join to the file's text, and pre-tokenizing them one by one gives the same words as
    pre-tokenizing the whole text. A stretch with no place to cut (one very long line) is cut
    anywhere once it reaches `max_chunk_chars`, splitting one word, so memory stays bounded.
    Raises a ValueError naming the file and the byte offset of its first byte that is not UTF-8.
    """
    carry = ""
    for block in _iter_utf8_blocks(Path(path), chunk_bytes):
        text = carry + block
        # The carry holds no place to cut, except maybe at its very end, which the new block's first
        # character can make one; a cut's pattern starts at most 3 characters before it. Searching
        # from there keeps a long stretch without cuts from being searched again and again.
        safe_cut = _SAFE_CUT.match(text, max(0, len(carry) - 3))
        cut = safe_cut.end() if safe_cut else (len(text) if len(text) >= max_chunk_chars else 0)
        if cut:
            yield text[:cut]
        carry = text[cut:]
    if carry:
        yield carry


def save_atomically(tokenizer: ArchLMTokenizerFast, output_dir: str | os.PathLike) -> None:
    """Saves into `output_dir` so that a failure leaves it as it was.

    The files are first written to a hidden sibling folder. A new `output_dir` is that folder
    renamed; an existing one (a model folder, say) gets the files moved in one by one, each move
    atomic, and keeps its other files.
    """
    output_dir = Path(output_dir)
    _check_output_dir(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging_dir = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", suffix=".partial", dir=output_dir.parent))
    try:
        tokenizer.save_pretrained(staging_dir)
        if output_dir.exists():
            for staged_file in sorted(staging_dir.iterdir()):
                os.replace(staged_file, output_dir / staged_file.name)
        else:
            os.replace(staging_dir, output_dir)
    finally:
        shutil.rmtree(staging_dir, ignore_errors=True)


def _check_output_dir(output_dir: Path) -> None:
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"output {str(output_dir)!r} exists and is not a folder")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m archlm.tokenization_archlm",
        description="Train ArchLM's byte-level BPE tokenizer on UTF-8 text files and save it for AutoTokenizer.",
    )
    parser.add_argument("--train", nargs="+", required=True, type=Path, metavar="FILE", help="UTF-8 text files")
    parser.add_argument("--vocab-size", type=int, required=True, help="vocabulary size, special tokens included")
    parser.add_argument("--output", type=Path, required=True, help="folder to save into (may hold a model already)")
    parser.add_argument("--min-frequency", type=int, default=2, help="fewest occurrences of a pair to merge it")
    parser.add_argument(
        "--special-tokens", nargs="*", default=[], metavar="TOKEN", help="extra special tokens, ids 4, 5, ..."
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    try:
        # The output is checked before training, so a bad path costs nothing; nothing is written
        # until training has succeeded.
        _check_output_dir(args.output)
        tokenizer = train_tokenizer(
            args.train,
            vocab_size=args.vocab_size,
            min_frequency=args.min_frequency,
            special_tokens=args.special_tokens,
            show_progress=True,
        )
        save_atomically(tokenizer, args.output)
    except ValueError as error:
        parser.error(str(error))
    logger.info(
        "Saved a tokenizer of %d tokens to %s (bos=eos=%d, pad=%d)",
        len(tokenizer),
        args.output,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
