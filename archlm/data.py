"""Training data for ArchLM: load a corpus, then pack it into fixed-length blocks.

    raw corpus ──► records {"text", "document_end"} ──► token ids (+ EOS after each document)
               ──► concatenated ──► blocks of `block_size` tokens {"input_ids", "attention_mask", "labels"}

Sources, chosen by `DataArguments` (flags of the main job, archlm.train):

- `--dataset_name` / `--dataset_config_name`: a `datasets` dataset (Hub name or local builder).
- `--train_file` / `--validation_file`: `.txt`, `.json` / `.jsonl`, `.csv`, `.parquet` (several files allowed).
- nothing: the default corpus, the `.py` source of Python's own standard library, which every Python
  installation has offline (tests and `site-packages` left out; sorted, so the same Python gives the
  same corpus).

A record of a dataset, a json/csv/parquet row or a whole `.txt` / `.py` file is one document, and an
EOS token follows every document, so the model learns where documents end. A text file is read as
written, line breaks and all (what run_clm.py's `keep_linebreaks` keeps); a large one is read in
pieces, cut only at line starts, with EOS after its last piece only.

When no validation data is given, the last `validation_split_percentage` % of the packed blocks are
held out (a contiguous tail, so at most one document straddles the two splits). With `--streaming`
the first `max_eval_samples` blocks are held out instead.
"""

import codecs
import logging
import math
import os
import random
import re
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import pyarrow.compute as pc
from datasets import Dataset, Features, IterableDataset, Value
from transformers.utils.chat_template_utils import render_jinja_template

from .tokenization_archlm import CHAT_TEMPLATE, safe_cut_between

logger = logging.getLogger(__name__)

# file extension -> `datasets` builder; prose, markup and source code are read as plain text
TEXT_EXTENSIONS = ("txt", "text", "md", "markdown", "rst", "tex", "py", "pyi", "c", "h", "cc", "cpp", "hpp", "java",
                   "js", "ts", "go", "rs", "rb", "sh", "sql", "html", "css", "yaml", "yml", "toml")
FILE_BUILDERS = {**dict.fromkeys(TEXT_EXTENSIONS, "text"), "json": "json", "jsonl": "json", "csv": "csv",
                 "parquet": "parquet"}
# A stdlib folder whose name is one of these is left out of the default corpus: installed packages, tests, and
# generated data tables (the codecs' charmaps in `encodings`, pydoc's topic texts), which are code in name only.
STDLIB_EXCLUDED_DIRS = frozenset(
    {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test", "encodings", "pydoc_data"}
)
RECORD_FEATURES = Features({"text": Value("string"), "document_end": Value("bool")})
TEXT_CHUNK_CHARS = 1 << 20  # a text file is handed to the tokenizer in pieces of about this many characters
TOKENIZE_BATCH_CHARS = 1 << 23  # about this many characters of records per tokenizing map batch
BLOCK_FEATURES = Features({name: datasets.List(Value("int64")) for name in ("input_ids", "attention_mask", "labels")})
DEFAULT_STREAMING_EVAL_BLOCKS = 32
CONVERSATION_COLUMN = "messages"  # TRL's conversational records: [{"role": ..., "content": ...}, ...]
ASSISTANT_SPANS = "assistant_spans"  # [start, end) characters of each assistant turn in a conversation's text
SPANS_FEATURE = datasets.List(datasets.List(Value("int64")))
GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")  # a template's marks of the assistant's text


@dataclass
class DataArguments:
    """Where the training text comes from and how it is cut into blocks."""

    dataset_name: str | None = field(default=None, metadata={"help": "A `datasets` dataset (Hub name or local path)."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Its configuration name."})
    train_file: list[str] | None = field(
        default=None, metadata={"help": "Training files or folders: plain text (.txt, .md, .py, ...), .json/.jsonl, .csv "
                                        "or .parquet. A folder stands for its files of those types, recursively."}
    )
    validation_file: list[str] | None = field(
        default=None, metadata={"help": "Validation files, same formats. Default: a split carved from the training data."}
    )
    text_column: str | None = field(default=None, metadata={
        "help": "Column holding the text of json/csv/parquet files and datasets (default: 'text'; where there is none, "
                "'messages': conversations, written out by the tokenizer's chat template)."})
    assistant_only_loss: bool = field(default=False, metadata={
        "help": "With conversations: train on the assistant's turns only (each one's text as the chat template writes "
                "it, its end-of-turn marker included); every other token is masked out of the loss."})
    streaming: bool = field(default=False, metadata={"help": "Read the data lazily as an IterableDataset (needs --max_steps)."})
    block_size: int | None = field(
        default=None,
        metadata={"help": "Tokens per training sequence. Default: the largest of --block_size_schedule, "
                          "else min(1024, the model's max_position_embeddings)."},
    )
    block_size_schedule: str | None = field(
        default=None,
        metadata={"help": 'Sequence-length curriculum "size:from_step,...", e.g. "256:0,512:1000,1024:3000". '
                          "Each size must divide the largest; a step of the largest size is cut into shorter rows."},
    )
    validation_split_percentage: float = field(
        default=5.0, metadata={"help": "Percent of the training blocks held out when no validation data is given."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep at most this many training blocks."})
    max_eval_samples: int | None = field(
        default=None, metadata={"help": f"Keep at most this many validation blocks (streaming default {DEFAULT_STREAMING_EVAL_BLOCKS})."}
    )
    max_corpus_mb: float | None = field(
        default=None, metadata={"help": "Default corpus only: read at most this many MB of standard-library source."}
    )
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for tokenization."})
    overwrite_cache: bool = field(default=False, metadata={"help": "Re-tokenize instead of using the datasets cache."})

    @property
    def source_name(self) -> str:
        if self.dataset_name:
            return self.dataset_name + (f"/{self.dataset_config_name}" if self.dataset_config_name else "")
        if self.train_file:  # names, not paths: this lands in the training log and the model card
            names = [Path(path).name or path for path in self.train_file]
            return ",".join(names[:3]) + (f",... ({len(names)} paths)" if len(names) > 3 else "")
        return f"python{sysconfig.get_python_version()}-stdlib"


@dataclass
class RawData:
    """Records {"text", "document_end"} before tokenization, and what they amount to."""

    train: Dataset | IterableDataset
    validation: Dataset | IterableDataset | None
    description: str


# ------------------------------------------------------------------------------------------------
# Checks that need no data (run first, so a bad flag costs nothing)
# ------------------------------------------------------------------------------------------------
def parse_block_size_schedule(schedule: str) -> list[tuple[int, int]]:
    """`"256:0,512:1000"` -> `[(0, 256), (1000, 512)]`: (first optimizer step, block size), sorted by step.

    The first entry must start at step 0, steps must increase, and every size must divide the largest
    (a block of the largest size is cut into whole rows of the current size).
    """
    entries = []
    for item in schedule.split(","):
        size, sep, step = item.strip().partition(":")
        try:
            if not sep:
                raise ValueError
            entries.append((int(step), int(size)))
        except ValueError:
            raise ValueError(
                f"--block_size_schedule: entry {item.strip()!r} is not 'size:step' with two integers "
                f'(expected e.g. "256:0,512:1000,1024:3000"), in {schedule!r}.'
            ) from None
    steps = [step for step, _ in entries]
    if steps[0] != 0:
        raise ValueError(f"--block_size_schedule: the first entry must start at step 0, got step {steps[0]} in {schedule!r}.")
    if any(later <= earlier for earlier, later in zip(steps, steps[1:])):
        raise ValueError(f"--block_size_schedule: steps must strictly increase, got {steps} in {schedule!r}.")
    sizes = [size for _, size in entries]
    if any(size <= 0 for size in sizes):
        raise ValueError(f"--block_size_schedule: block sizes must be positive, got {sizes} in {schedule!r}.")
    largest = max(sizes)
    if any(largest % size for size in sizes):
        raise ValueError(
            f"--block_size_schedule: every block size must divide the largest ({largest}), got {sizes} in {schedule!r}."
        )
    return entries


def block_size_at(schedule: list[tuple[int, int]], step: int) -> int:
    """The block size of optimizer step `step` (0-based: the number of steps already taken)."""
    return [size for start, size in schedule if start <= step][-1]


def check_data_arguments(args: DataArguments) -> None:
    """Refuses contradictory flags and missing or unsupported files, before anything is loaded."""
    if args.dataset_name and args.train_file:
        raise ValueError("Pass either --dataset_name or --train_file, not both.")
    if args.validation_file and not (args.train_file or args.dataset_name):
        raise ValueError("--validation_file needs --train_file (or --dataset_name) for the training data.")
    formats_of = {}  # flag -> the formats of its files
    for flag, paths in (("--train_file", args.train_file), ("--validation_file", args.validation_file)):
        files = expand_data_files(paths or [], flag)
        formats = formats_of[flag] = {FILE_BUILDERS.get(file_extension(path), "?") for path in files}
        if len(formats) > 1:
            extensions = sorted({Path(path).suffix or "(none)" for path in files})
            raise ValueError(f"{flag}: all files must be of one format (plain text, json, csv or parquet), got "
                             f"extensions {extensions}.")
        for path in files:
            check_readable_file(path, flag)
    if args.block_size is not None and args.block_size <= 0:
        raise ValueError(f"--block_size must be a positive integer, got {args.block_size}.")
    if not 0 <= args.validation_split_percentage < 100:
        raise ValueError(f"--validation_split_percentage must be in [0, 100), got {args.validation_split_percentage}.")
    for flag in ("max_train_samples", "max_eval_samples", "max_corpus_mb"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            raise ValueError(f"--{flag} must be positive, got {value}.")
    if args.assistant_only_loss and not args.dataset_name and formats_of["--train_file"] <= {"text"}:
        raise ValueError("--assistant_only_loss trains on the assistant's turns of conversations (a 'messages' column "
                         f"of json/parquet records or a dataset); {'plain-text files hold' if args.train_file else 'the default corpus holds'} none.")
    if args.assistant_only_loss and formats_of["--validation_file"] == {"text"}:
        raise ValueError("--assistant_only_loss trains on the assistant's turns of conversations: --validation_file's "
                         "plain-text files hold none (their loss would measure something else).")
    if args.text_column is not None and not args.dataset_name and formats_of["--train_file"] <= {"text"}:
        # plain text has no columns: each file is a document (the default corpus too)
        logger.warning("--text_column %r is ignored: %s", args.text_column, "plain-text files have no columns"
                       if formats_of["--train_file"] else "the default corpus has no columns")
    if args.max_corpus_mb is not None and (args.train_file or args.dataset_name):
        # a warning, not an error: flags shared by several runs (compare_architectures) may hold it
        logger.warning("--max_corpus_mb sizes the default corpus (Python's standard library) and is ignored with "
                       "--train_file or --dataset_name data: --max_train_samples cuts those.")


def expand_data_files(paths: list[str], flag: str) -> list[str]:
    """The files named by `paths`, a folder standing for every file below it with a supported extension (sorted;
    hidden folders and __pycache__ skipped). Other paths pass through, to be checked one by one."""
    files = []
    for path in paths:
        if not os.path.isdir(path):
            files.append(path)
            continue
        found = sorted(
            str(file) for file in Path(path).rglob("*")
            if file.is_file() and file_extension(str(file)) in FILE_BUILDERS
            and not any(part.startswith(".") or part == "__pycache__" for part in file.relative_to(path).parts)
        )
        if not found:
            raise ValueError(f"{flag} {path!r} is a folder with no file of a supported type "
                             f"({', '.join('.' + ext for ext in FILE_BUILDERS)}).")
        files += found
    return files


def file_extension(path: str) -> str:
    return Path(path).suffix.lstrip(".").lower()


def check_readable_file(path: str, flag: str) -> None:
    if not os.path.exists(path):  # first: a mistyped folder name has no extension either
        raise ValueError(f"{flag} {path!r} does not exist (relative paths start at {os.getcwd()!r}).")
    if file_extension(path) not in FILE_BUILDERS:
        raise ValueError(
            f"{flag} {path!r}: unsupported extension {Path(path).suffix or '(none)'!r}; "
            f"supported: {', '.join('.' + ext for ext in FILE_BUILDERS)}."
        )
    if not os.path.isfile(path):
        raise ValueError(f"{flag} {path!r} is not a regular file.")
    try:
        with open(path, "rb") as file:
            file.read(1)
    except OSError as error:
        raise ValueError(f"{flag} {path!r} cannot be read: {error.strerror or error}.") from None


# ------------------------------------------------------------------------------------------------
# Loading: every source becomes records {"text": str, "document_end": bool}
# ------------------------------------------------------------------------------------------------
def stdlib_source_files(max_mb: float | None = None) -> list[Path]:
    """The standard library's `.py` files that are UTF-8, sorted by path.

    With `max_mb`, a subset of about that many MB drawn across the whole library (files in a fixed pseudo-random
    order, each taken if it still fits), still returned sorted: a prefix of the sorted list would be a few
    packages only (all of `asyncio`, `email` and the `encodings` tables, say).
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [name for name in subfolders if name not in STDLIB_EXCLUDED_DIRS]
        paths += [Path(folder) / name for name in names if name.endswith(".py")]
    paths.sort(key=lambda path: path.relative_to(root).as_posix())
    order = list(paths)
    if max_mb is not None:
        random.Random(0).shuffle(order)
    budget = math.inf if max_mb is None else max_mb * 1e6
    selected, total = set(), 0
    for path in order:
        try:
            size = len(path.read_bytes().decode("utf-8"))
        except (OSError, UnicodeDecodeError):
            continue  # a few files (encoding tests, unreadable ones) are not UTF-8 text
        if size and total + size <= budget:
            selected.add(path)
            total += size
    if not selected:
        raise ValueError(f"Found no UTF-8 .py files of at most {max_mb} MB in the standard library at {root}.")
    return [path for path in paths if path in selected]


def _file_signatures(paths: Iterable[os.PathLike | str]) -> list[tuple[str, int, int]]:
    """(path, size, mtime): part of the datasets cache key, so an edited file is read again."""
    signatures = []
    for path in paths:
        stat = os.stat(path)
        signatures.append((os.path.abspath(path), stat.st_size, stat.st_mtime_ns))
    return signatures


def _text_file_records(files: list[tuple[str, int, int]]) -> Iterator[dict]:
    """Each file as written (newline="" keeps \\r\\n), in pieces of about TEXT_CHUNK_CHARS cut where tokenizing the
    pieces gives the tokens of the whole (tokenization_archlm.safe_cut_between: before a line that starts with a
    non-space character, after a line break the pre-tokenizer splits off either way; where none comes, at any line
    start past 16 pieces' length; inside a line longer than that, before a space that follows a non-space, where
    the pre-tokenizer splits too); `document_end` marks a file's last piece."""
    for path, _, _ in files:
        pieces, size = [], 0
        with open(path, encoding="utf-8", newline="") as file:
            for line in file:
                cut = size >= TEXT_CHUNK_CHARS and (safe_cut_between(pieces[-1], line) or (
                    size >= 16 * TEXT_CHUNK_CHARS and not line[:1].isspace()))
                if cut:
                    yield {"text": "".join(pieces), "document_end": False}
                    pieces, size = [], 0
                # a file of one long line would be one record, tokenized in one call (~0.4 KB a token)
                while len(line) > TEXT_CHUNK_CHARS and size + len(line) >= 2 * TEXT_CHUNK_CHARS and (
                        split := _long_line_cut(line, size)):
                    pieces.append(line[:split])
                    yield {"text": "".join(pieces), "document_end": False}
                    pieces, size, line = [], 0, line[split:]
                pieces.append(line)
                size += len(line)
        yield {"text": "".join(pieces), "document_end": True}  # (an empty file's: no tokens, no EOS either)


def _long_line_cut(line: str, size: int) -> int:
    """Where to cut `line` (0: nowhere) for a piece of about TEXT_CHUNK_CHARS: the first space past that which
    follows a non-space character."""
    start = max(1, TEXT_CHUNK_CHARS - size)
    while (at := line.find(" ", start)) > 0:
        if not line[at - 1].isspace():
            return at
        start = at + 1
    return 0


def _check_utf8(path: str, flag: str, whole_file: bool) -> None:
    """Decodes the file (streaming: its first MB) so a non-UTF-8 file fails before any training."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    with open(path, "rb") as file:
        offset = 0
        while block := file.read(TEXT_CHUNK_CHARS):
            try:
                decoder.decode(block, final=False)
            except UnicodeDecodeError as error:
                raise ValueError(
                    f"{flag} {path!r} is not UTF-8 text: invalid byte 0x{block[error.start]:02x} near offset "
                    f"{offset + error.start}."
                ) from None
            offset += len(block)
            if not whole_file:
                return
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise ValueError(f"{flag} {path!r} is not UTF-8 text: it ends inside a character.") from None


def _text_files_dataset(paths: list[str] | list[Path], streaming: bool) -> Dataset | IterableDataset:
    gen_kwargs = {"files": _file_signatures(paths)}
    if streaming:
        return IterableDataset.from_generator(_text_file_records, features=RECORD_FEATURES, gen_kwargs=gen_kwargs)
    # records of up to ~1 MiB: the writer's default buffer of 1000 records would hold the whole corpus in memory
    return Dataset.from_generator(_text_file_records, features=RECORD_FEATURES, gen_kwargs=gen_kwargs,
                                  writer_batch_size=8)


def _column_names(dataset: Dataset | IterableDataset) -> list[str]:
    if dataset.column_names is not None:
        return list(dataset.column_names)
    first = next(iter(dataset), None)  # a streamed dataset may know its columns only once read
    return list(first) if first is not None else []


@dataclass(frozen=True)
class ChatTemplate:
    """How a conversation becomes a document: a chat template and the special tokens it may read (as
    `apply_chat_template` passes them). `DEFAULT_CHAT` is ArchLM's ChatML, which a tokenizer trained on the data
    carries; a given tokenizer brings its own (`ChatTemplate.of`)."""

    template: str | None
    source: str
    variables: tuple[tuple[str, object], ...] = ()

    @classmethod
    def of(cls, tokenizer, source: str) -> "ChatTemplate":
        try:
            template = tokenizer.get_chat_template()
        except ValueError:  # (no template: refused only if the data holds conversations)
            template = None
        return cls(template, f"the tokenizer of {source}", tuple(tokenizer.special_tokens_map.items()))

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return render_jinja_template([messages], chat_template=self.template, add_generation_prompt=add_generation_prompt,
                                     **dict(self.variables))[0][0]

    def unwritten_keys(self, messages: list[dict]) -> set[str]:
        """Keys of `messages` (besides role and content) that the template never reads: left out of the text."""
        return {key for message in messages for key in message if key not in ("role", "content")
                and key not in (self.template or "")}

    def assistant_spans(self, messages: list[dict], text: str, where: str) -> list[list[int]]:
        """The [start, end) characters of each assistant turn in `text` (the whole conversation written out): those
        a template marks with {% generation %} tags (transformers' assistant mask), else what the template adds for
        the turn to the conversation before it, with its generation prompt. A template without tags that writes a
        conversation's beginning otherwise than the whole is refused (the turns could not be found)."""
        if GENERATION_TAG.search(self.template):
            return [[start, end] for start, end in render_jinja_template(
                [messages], chat_template=self.template, return_assistant_tokens_mask=True, **dict(self.variables))[1][0]]
        spans = []
        for turn, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            try:
                before = self.render(messages[:turn], add_generation_prompt=True)
            except Exception:  # noqa: BLE001 - a template that reads messages[0] (Qwen's, Llama 3's) cannot write
                if turn:       # an empty conversation: a first turn starts the text
                    raise
                before = ""
            through = self.render(messages[:turn + 1])
            if not (through.startswith(before) and text.startswith(through)):
                raise ValueError(f"{where}: --assistant_only_loss finds each assistant turn as what the chat template "
                                 f"of {self.source} adds for it, but the template writes the conversation up to turn "
                                 f"{turn} otherwise than the start of the whole (it writes the last turn apart, as "
                                 "Qwen3's thinking markers or an end token on the last message only): give a template "
                                 "that marks the assistant's turns with {% generation %} tags.")
            spans.append([len(before), len(through)])
        return spans

    def renderer(self, where: str, column: str, assistant_spans: bool = False):
        """A batched map function: the conversations of `column` -> their texts (and with `assistant_spans`, each
        one's assistant turns as character spans)."""
        if self.template is None:
            raise ValueError(f"{where} holds conversations in {column!r}, and {self.source} has no chat template to "
                             "write them as text: give a tokenizer with one (--tokenizer_name), or a text column "
                             "(--text_column).")

        def render(batch: dict) -> dict:
            texts, spans = [], []
            for messages in batch[column]:
                for message in messages or ():
                    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                        raise ValueError(f"{where}: a conversation in {column!r} holds {message!r}, not a message "
                                         '{"role": ..., "content": ...}.')
                # Arrow gives every message every key any message has, None where it had none: a template that
                # asks whether a message has a key (tool calls) must see it absent
                messages = [{key: value for key, value in message.items() if value is not None or key == "content"}
                            for message in messages or ()]
                unwritten = self.unwritten_keys(messages) - warned
                if unwritten:
                    warned.update(unwritten)
                    logger.warning("%s: messages hold %s, which the chat template of %s does not write out: they are "
                                   "left out of the text.", where, sorted(unwritten), self.source)
                try:
                    texts.append(self.render(messages) if messages else "")  # (no messages: no document)
                    if assistant_spans:
                        spans.append(self.assistant_spans(messages, texts[-1], where) if messages else [])
                except ValueError:
                    raise
                except Exception as error:  # noqa: BLE001 - the template's own complaint, naming the data
                    raise ValueError(f"{where}: the chat template of {self.source} could not write out a "
                                     f"conversation of {column!r} ({type(error).__name__}: {error}).") from error
            return {"text": texts, **({ASSISTANT_SPANS: spans} if assistant_spans else {})}

        warned: set[str] = set()
        return render


DEFAULT_CHAT = ChatTemplate(CHAT_TEMPLATE, "ArchLM's tokenizer (ChatML; a tokenizer trained on the data carries it)")


def _holds_conversations(dataset: Dataset | IterableDataset, column: str) -> bool:
    """Whether `column` holds lists of messages (dicts), by its feature, or by its first record where it has none."""
    feature = (dataset.features or {}).get(column)
    if feature is not None:  # a list (List, LargeList) of structs, or of Json where messages' keys differ (a name,
        # tool calls): datasets gives both as dicts
        return isinstance(getattr(feature, "feature", None), (dict, datasets.Json))
    first = next(iter(dataset), None) if isinstance(dataset, IterableDataset) else None
    value = (first or {}).get(column)
    return isinstance(value, list) and bool(value) and isinstance(value[0], dict)


def _select_text_column(dataset: Dataset | IterableDataset, text_column: str | None, where: str, chat: ChatTemplate,
                        assistant_only: bool = False) -> Dataset | IterableDataset:
    """Keeps only `text_column`, renamed "text"; every record is a document. By default the column is "text", or
    "messages" where there is none: conversations, each written out by `chat`'s template (TRL's conversational
    format; the whole conversation is trained on, markup included, as TRL's SFTTrainer does by default)."""
    columns = _column_names(dataset)
    if text_column is None:
        text_column = CONVERSATION_COLUMN if "text" not in columns and CONVERSATION_COLUMN in columns else "text"
    if text_column not in columns:
        raise ValueError(
            f"--text_column {text_column!r} is not a column of {where}; its columns are {columns}. "
            f"Pass --text_column with one of them (text, or conversations as lists of messages like {CONVERSATION_COLUMN!r})."
        )
    kept = [text_column]
    if _holds_conversations(dataset, text_column):
        render = chat.renderer(where, text_column, assistant_spans=assistant_only)
        dataset = dataset.select_columns([text_column])
        features = Features({"text": Value("string"), **({ASSISTANT_SPANS: SPANS_FEATURE} if assistant_only else {})})
        progress = {"desc": f"Writing out {text_column!r}"} if isinstance(dataset, Dataset) else {}  # (a streamed map has none)
        dataset = dataset.map(render, batched=True, remove_columns=[text_column], features=features, **progress)
        text_column, kept = "text", list(features)
    elif assistant_only:
        raise ValueError(f"--assistant_only_loss trains on the assistant's turns of conversations; {where}'s "
                         f"{text_column!r} holds text.")
    features = dataset.features
    if features is not None and text_column in features:
        feature = features[text_column]
        if not (isinstance(feature, Value) and feature.dtype in ("string", "large_string")):
            raise ValueError(f"--text_column {text_column!r} of {where} holds {feature}, not text.")
    dataset = dataset.select_columns(kept)
    if text_column != "text":
        dataset = dataset.rename_column(text_column, "text")
    # a null or empty record holds no document: kept, it would train on a bare end-of-document token
    rows = dataset.num_rows if isinstance(dataset, Dataset) else None
    dataset = dataset.filter(lambda record: bool(record["text"]))
    if rows is not None and dataset.num_rows < rows:
        logger.warning("%s: %d of %d records have no text in %r (null or empty); they are left out.",
                       where, rows - dataset.num_rows, rows, text_column)
    return dataset


def _load_files(files: list[str], flag: str, args: DataArguments, chat: ChatTemplate) -> Dataset | IterableDataset:
    builder = FILE_BUILDERS[file_extension(files[0])]
    if builder == "text":
        for path in files:
            _check_utf8(path, flag, whole_file=not args.streaming)
        return _text_files_dataset(files, args.streaming)
    try:
        dataset = datasets.load_dataset(builder, data_files={"split": files}, split="split", streaming=args.streaming)
    except Exception as error:  # noqa: BLE001 - any parser error becomes one message naming the files
        cause = error.__cause__ or error
        raise ValueError(f"{flag} {files}: could not be read as {builder}: {cause}") from error
    return _select_text_column(dataset, args.text_column, f"{flag} {files}", chat, args.assistant_only_loss)


def _load_hub_dataset(args: DataArguments, chat: ChatTemplate) -> tuple[Dataset | IterableDataset, Dataset | IterableDataset | None]:
    name = args.dataset_name
    if name.startswith((".", "/", "~")) and not os.path.exists(os.path.expanduser(name)):
        raise ValueError(f"--dataset_name {name!r}: no such folder.")
    try:
        if os.path.isfile(os.path.join(name, "state.json")):  # one Dataset written by save_to_disk: the train split
            splits = {"train": datasets.load_from_disk(name)}
        elif os.path.isfile(os.path.join(name, "dataset_dict.json")):
            # a DatasetDict written by save_to_disk: its splits' own files (load_dataset would read every .arrow file
            # in the folder, the cache files that mapping a split leaves beside it included)
            splits = dict(datasets.load_from_disk(name))
        else:
            splits = datasets.load_dataset(name, args.dataset_config_name, streaming=args.streaming)
        if args.streaming:  # (a folder saved by save_to_disk is read whole)
            splits = {split: data.to_iterable_dataset() if isinstance(data, Dataset) else data
                      for split, data in splits.items()}
    except Exception as error:  # noqa: BLE001 - offline, unknown name, bad config: one message
        raise ValueError(f"--dataset_name {args.source_name!r} could not be loaded: {error}") from error
    if "train" not in splits:
        raise ValueError(f"--dataset_name {args.dataset_name!r} has no 'train' split; its splits are {list(splits)}.")
    where = f"--dataset_name {args.dataset_name!r}"
    train = _select_text_column(splits["train"], args.text_column, where, chat, args.assistant_only_loss)
    validation = splits.get("validation")
    if validation is not None:
        validation = _select_text_column(validation, args.text_column, where + " (validation)", chat,
                                         args.assistant_only_loss)
    return train, validation


def load_raw_data(args: DataArguments, chat: ChatTemplate = DEFAULT_CHAT) -> RawData:
    """Records {"text", "document_end"} for training and (when given) validation; conversations written out by
    `chat`."""
    check_data_arguments(args)
    validation = None
    if args.dataset_name:
        train, validation = _load_hub_dataset(args, chat)
        description = f"dataset {args.source_name}"
    elif args.train_file:
        files = expand_data_files(args.train_file, "--train_file")
        train = _load_files(files, "--train_file", args, chat)
        description = f"{len(files)} file(s) {args.source_name}"
    else:
        files = stdlib_source_files(args.max_corpus_mb)
        train = _text_files_dataset(files, args.streaming)
        megabytes = sum(os.path.getsize(path) for path in files) / 1e6
        description = f"default corpus: Python {sysconfig.get_python_version()} standard library, {len(files)} files, {megabytes:.1f} MB"
    if args.validation_file:
        validation = _load_files(expand_data_files(args.validation_file, "--validation_file"), "--validation_file", args,
                                 chat)
    _check_not_empty(train, "the training data")
    if validation is not None:
        _check_not_empty(validation, "the validation data")
    if isinstance(train, Dataset):
        description += f" ({train.num_rows:,} records)"
    return RawData(train=train, validation=validation, description=description)


def _check_not_empty(dataset: Dataset | IterableDataset, what: str) -> None:
    if isinstance(dataset, Dataset) and dataset.num_rows == 0:
        raise ValueError(f"{what} is empty: it holds no records.")
    for record in dataset.take(10_000) if isinstance(dataset, IterableDataset) else dataset.select_columns("text"):
        if record["text"]:
            return
    raise ValueError(f"{what} is empty: no record holds any text.")


def iter_texts(dataset: Dataset | IterableDataset, max_chars: float = math.inf) -> Iterator[str]:
    """The texts of a records dataset, in order, up to about `max_chars` characters (for tokenizer training)."""
    seen = 0
    batches = dataset.iter(batch_size=256)
    for batch in batches:
        for text in batch["text"]:
            if text:
                yield text
                seen += len(text)
                if seen >= max_chars:
                    return


# ------------------------------------------------------------------------------------------------
# Tokenization and packing
# ------------------------------------------------------------------------------------------------
def _tokenize_function(tokenizer, eos_token_id: int):
    def ids_of(texts: list[str]) -> list[np.ndarray]:
        ids = tokenizer(texts, add_special_tokens=False, return_attention_mask=False,
                        return_token_type_ids=False)["input_ids"]
        return [np.asarray(row, dtype=np.int32) for row in ids]

    def tokenize(batch: dict) -> dict:
        """int32 ids, EOS after each document; the tokenizer sees about TEXT_CHUNK_CHARS at a time: its Python
        lists of ids (~0.4 KB a token) live only that long."""
        texts = [text or "" for text in batch["text"]]
        rows, pending, size = [], [], 0
        for text in texts:
            pending.append(text)
            size += len(text)
            if size >= TEXT_CHUNK_CHARS:
                rows += ids_of(pending)
                pending, size = [], 0
        rows += ids_of(pending) if pending else []
        ends = batch.get("document_end") or [True] * len(rows)
        eos = np.array([eos_token_id], dtype=np.int32)
        # (an empty document, e.g. an empty text file, gets no end-of-document token: it would train on a bare one)
        # (a text that ends with the end-of-document token, a chat template's last turn, gets no second one)
        return {"input_ids": [np.concatenate([row, eos]) if end and len(text) and (not len(row) or row[-1] != eos_token_id)
                              else row for row, end, text in zip(rows, ends, texts)]}

    return tokenize


def _tokenize_turns(tokenizer, eos_token_id: int):
    """Conversations with their assistant spans -> int32 ids (EOS after each) and which tokens train: those that
    overlap an assistant turn's characters, and the EOS after a conversation that ends with one."""
    def tokenize(batch: dict) -> dict:
        encoded = tokenizer(batch["text"], add_special_tokens=False, return_offsets_mapping=True,
                            return_attention_mask=False, return_token_type_ids=False)
        ids_rows, trained_rows = [], []
        for ids, offsets, spans in zip(encoded["input_ids"], encoded["offset_mapping"], batch[ASSISTANT_SPANS]):
            offsets, spans = np.asarray(offsets).reshape(-1, 2), np.asarray(spans, dtype=np.int64).reshape(-1, 2)
            trained = ((offsets[:, None, 0] < spans[None, :, 1]) & (offsets[:, None, 1] > spans[None, :, 0])).any(axis=1)
            ids = np.asarray(ids, dtype=np.int32)
            if not len(ids) or ids[-1] != eos_token_id:  # (unless the template's last turn ends with it)
                ids, trained = np.append(ids, np.int32(eos_token_id)), np.append(trained, bool(trained[-1:].any()))
            ids_rows.append(ids)
            trained_rows.append(trained)
        return {"input_ids": ids_rows, "trained": trained_rows}

    return tokenize


# the cuts _text_file_records makes (after a line break, before an unindented line; before a space that follows a
# non-space) as (before, after) pairs: a tokenizer that splits there as in the joined text may tokenize the pieces
CUT_PROBES = (("x = 1\n", "def f():\n"), ("return x\n\n", "class A:\n"), ("said", " that"), ("2.5", " more"))


def tokenizes_pieces_as_whole(tokenizer) -> bool:
    """Whether text cut where _text_file_records cuts tokenizes as the whole: ArchLM's byte-level BPE does; one that
    prepends to each call (Llama 2's and Mistral's "▁") would add a token at every cut."""
    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    return all(ids(before) + ids(after) == ids(before + after) for before, after in CUT_PROBES)


def _whole_files(records: Iterable[dict]) -> Iterator[dict]:
    """The pieces of each text file joined again (for a tokenizer that tokenizes pieces apart): exact tokens, for
    the memory of tokenizing each file in one call."""
    pieces = []
    for record in records:
        pieces.append(record["text"] or "")
        if record["document_end"]:
            yield {"text": "".join(pieces), "document_end": True}
            pieces = []


def _blocks(token_runs: Iterable[tuple[np.ndarray, np.ndarray | None]], block_size: int) -> Iterator[dict]:
    """The runs of token ids concatenated, in order, and cut into blocks of `block_size`, one at a time; only the
    last partial block is dropped. A run's mask of trained tokens (--assistant_only_loss) makes the others' labels
    -100, and drops a block with none."""
    carry, carry_trained = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=bool)
    for run, trained in token_runs:
        carry = np.concatenate([carry, run.astype(np.int64)])
        carry_trained = np.concatenate([carry_trained, np.ones(len(run), bool) if trained is None else trained])
        whole = len(carry) // block_size * block_size
        for start in range(0, whole, block_size):
            block, trained_block = carry[start:start + block_size], carry_trained[start:start + block_size]
            if not trained_block.any():  # (its loss would be 0 / 0: a NaN step, a NaN evaluation)
                continue
            labels = np.where(trained_block, block, -100)
            yield {"input_ids": block.tolist(), "attention_mask": [1] * block_size, "labels": labels.tolist()}
        carry, carry_trained = carry[whole:], carry_trained[whole:]


def _token_runs(tokens: Dataset | IterableDataset, rows: int) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """The tokenized records' ids, and which train where they say ("trained"), `rows` records at a time (a Dataset's
    straight from its Arrow table)."""
    def joined(lists: list) -> np.ndarray:
        return np.concatenate([np.asarray(row) for row in lists] or [np.zeros(0, np.int64)])

    if isinstance(tokens, IterableDataset):
        for batch in tokens.iter(batch_size=rows):
            yield joined(batch["input_ids"]).astype(np.int64), joined(batch["trained"]).astype(bool) if "trained" in batch else None
        return
    table = tokens.with_format("arrow")
    for first in range(0, tokens.num_rows, rows):
        part = table[first:first + rows]
        trained = part.column("trained") if "trained" in part.column_names else None
        yield (pc.list_flatten(part["input_ids"]).to_numpy(zero_copy_only=False),
               None if trained is None else pc.list_flatten(trained).to_numpy(zero_copy_only=False).astype(bool))


def _packed_blocks(tokens: Dataset | IterableDataset, block_size: int, rows: int) -> Iterator[dict]:
    yield from _blocks(_token_runs(tokens, rows), block_size)


def pack(records: Dataset | IterableDataset, tokenizer, block_size: int, args: DataArguments, what: str):
    """Tokenized, EOS after each document, concatenated and cut into `block_size` blocks: one stream over the whole
    data (datasets.map's batches would each drop their remainder: 15% of the tokens of short records in blocks of
    1024, all of them in blocks of 8192), in memory that does not grow with the data (int32 ids, a few MB of text
    tokenized at a time, blocks written one at a time)."""
    if tokenizer.eos_token_id is None:
        raise ValueError("The tokenizer has no eos_token: packing needs one to mark where documents end.")
    columns = list(records.column_names or ["text"])
    turns = ASSISTANT_SPANS in columns
    tokenize = (_tokenize_turns if turns else _tokenize_function)(tokenizer, tokenizer.eos_token_id)
    token_features = Features({"input_ids": datasets.List(Value("int32")),
                               **({"trained": datasets.List(Value("bool"))} if turns else {})})
    if "document_end" in columns and not tokenizes_pieces_as_whole(tokenizer):
        logger.warning("The tokenizer tokenizes the start of a text apart from the same text inside a longer one (it "
                       "prepends a marker, as Llama 2's does): text files are tokenized whole, each in one call (~0.4 "
                       "KB of memory a token), not in pieces of 1 MiB.")
        joined = dict(features=RECORD_FEATURES, gen_kwargs={"records": records})
        records = (IterableDataset.from_generator(_whole_files, **joined) if isinstance(records, IterableDataset)
                   else Dataset.from_generator(_whole_files, writer_batch_size=8, **joined))
    if isinstance(records, IterableDataset):
        # (records of unknown size, up to ~1 MiB of a text file each: 64 at a time, not map's default 1000)
        token_ids = records.map(tokenize, batched=True, batch_size=64, remove_columns=columns)
        return IterableDataset.from_generator(_packed_blocks, features=BLOCK_FEATURES,
                                              gen_kwargs={"tokens": token_ids, "block_size": block_size, "rows": 64})
    characters = max(1, records.data.nbytes // max(1, records.num_rows))  # about, per record
    rows = max(1, min(1000, TOKENIZE_BATCH_CHARS // characters))
    token_ids = records.map(
        tokenize, batched=True, batch_size=rows, writer_batch_size=rows, remove_columns=columns,
        features=token_features, num_proc=args.preprocessing_num_workers,
        load_from_cache_file=not args.overwrite_cache, desc=f"Tokenizing {what}")
    tokens = pc.sum(pc.list_value_length(token_ids.data.column("input_ids"))).as_py() or 0
    if tokens < block_size:  # (datasets cannot build a dataset from a generator that yields nothing)
        return Dataset.from_dict({name: [] for name in BLOCK_FEATURES}, features=BLOCK_FEATURES)
    # the blocks are cached as the map is: by the tokenized data's fingerprint (and the block size)
    fingerprint = datasets.fingerprint.Hasher.hash(
        [token_ids._fingerprint, block_size, os.urandom(8) if args.overwrite_cache else None])
    return Dataset.from_generator(_packed_blocks, features=BLOCK_FEATURES, fingerprint=fingerprint,
                                  writer_batch_size=100,
                                  gen_kwargs={"tokens": token_ids, "block_size": block_size, "rows": rows})


@dataclass
class PackedData:
    train: Dataset | IterableDataset
    validation: Dataset | IterableDataset | None
    block_size: int

    @property
    def train_blocks(self) -> int | None:
        return self.train.num_rows if isinstance(self.train, Dataset) else None

    @property
    def validation_blocks(self) -> int | None:
        return self.validation.num_rows if isinstance(self.validation, Dataset) else None


def pack_datasets(raw: RawData, tokenizer, block_size: int, args: DataArguments) -> PackedData:
    """Packs training and validation data; carves validation blocks off the training data when none was given."""
    train = pack(raw.train, tokenizer, block_size, args, "training data")
    validation = pack(raw.validation, tokenizer, block_size, args, "validation data") if raw.validation is not None else None
    if isinstance(train, IterableDataset):
        eval_blocks = args.max_eval_samples or DEFAULT_STREAMING_EVAL_BLOCKS
        if validation is None:
            validation, train = train.take(eval_blocks), train.skip(eval_blocks)
        else:
            validation = validation.take(eval_blocks)
        if next(iter(train.take(1)), None) is None:
            raise ValueError(f"The training data holds fewer tokens than {eval_blocks} validation blocks plus one block of {block_size}.")
        if args.max_train_samples is not None:
            train = train.take(args.max_train_samples)
        return PackedData(train=train, validation=validation, block_size=block_size)

    if train.num_rows == 0:
        raise ValueError(
            f"The training data holds fewer tokens than one block of --block_size {block_size}: "
            "use more data or a smaller --block_size."
        )
    if validation is None and args.validation_split_percentage > 0:
        held_out = max(1, round(train.num_rows * args.validation_split_percentage / 100))
        if held_out >= train.num_rows:
            raise ValueError(
                f"The training data makes only {train.num_rows} block(s) of {block_size} tokens, too few to hold "
                f"{args.validation_split_percentage}% out for validation: use more data, a smaller --block_size, "
                "a --validation_file, or --validation_split_percentage 0."
            )
        validation = train.select(range(train.num_rows - held_out, train.num_rows))
        train = train.select(range(train.num_rows - held_out))
    if validation is not None and validation.num_rows == 0:
        raise ValueError(f"The validation data holds fewer tokens than one block of --block_size {block_size}.")
    if args.max_train_samples is not None:
        train = train.select(range(min(args.max_train_samples, train.num_rows)))
    if validation is not None and args.max_eval_samples is not None:
        validation = validation.select(range(min(args.max_eval_samples, validation.num_rows)))
    return PackedData(train=train, validation=validation, block_size=block_size)


def characters_per_token(blocks: Dataset | IterableDataset | None, tokenizer, max_blocks: int = 4096) -> float | None:
    """Characters of text per predicted token of the validation blocks (the first `max_blocks`): eval_loss divided
    by it is the loss in nats per character, which compares runs whose tokenizers differ (a loss per token does
    not: a larger vocabulary has fewer, harder tokens). Each block's first token is not predicted, so not counted;
    special tokens (the end of each document) are predicted but hold no text: they count no characters, whatever
    their name's length. Tokens masked out of the loss (labels -100: --assistant_only_loss) are not predicted either."""
    if not isinstance(blocks, Dataset) or blocks.num_rows == 0:
        return None
    characters = tokens = 0
    chosen = blocks.select(range(min(max_blocks, blocks.num_rows)))
    for ids, labels in zip(chosen["input_ids"], chosen["labels"] if "labels" in chosen.column_names else chosen["input_ids"]):
        predicted = [token for token, label in zip(ids[1:], labels[1:]) if label != -100]
        characters += len(tokenizer.decode(predicted, skip_special_tokens=True))
        tokens += len(predicted)
    return characters / tokens if characters and tokens else None
