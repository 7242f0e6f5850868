"""Tests of archlm/tokenization_archlm.py on real text: the Python standard library's own sources.

    .venv/bin/python -m pytest tests/test_tokenization.py -q
"""

import ast
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import ByteLevelBPETokenizer
from transformers import AutoTokenizer

from archlm.data import stdlib_source_files
from archlm.tokenization_archlm import (
    BOS_TOKEN_ID,
    CHAT_TEMPLATE,
    EOS_TOKEN,
    EOS_TOKEN_ID,
    IM_END_TOKEN,
    IM_END_TOKEN_ID,
    IM_START_TOKEN,
    IM_START_TOKEN_ID,
    PAD_TOKEN,
    PAD_TOKEN_ID,
    ArchLMTokenizerFast,
    iter_text_chunks,
    main,
    new_backend,
    train_tokenizer,
)


REPO_ROOT = Path(__file__).resolve().parent.parent
VOCAB_SIZE = 2048
TRAIN_BYTES = 1_500_000
HELD_OUT_BYTES = 800_000

HARD_STRINGS = [
    "",
    " ",
    "  leading and trailing spaces  ",
    "\t\ttabs\tinside\t",
    "windows\r\nline\r\nendings\r\n",
    "old mac\rline endings\r",
    "\n\n\nblank lines\n\n",
    "def f(x):\n    if x:\n        return x  # comment\n\treturn None\n",
    "         \n    \n",
    "emoji 😀 family 👩\u200d👩\u200d👧 flag 🇺🇳 skin 👍🏽",
    "中文文本，日本語のテキスト、한국어 텍스트",
    "combining: e\u0301 a\u0308 o\u0302\u0323 vs precomposed é ä ộ",
    "right-to-left: שלום عربى",
    "zero width: a\u200bb\u200cc\u200dd\ufeff",
    "\x00nul\x01control\x7f\x1b[31mansi\x1b[0m",
    "\u00a0no-break\u3000ideographic\u2028line\u2029paragraph",
    "12345678901234567890 3.14159 1e-10 0x_dead_beef",
    "I'm can't we'll THEY'RE",
    "\U0010ffff\U000e0001 private \ue000",
]

SPECIAL_TOKEN_IDS = {
    PAD_TOKEN: PAD_TOKEN_ID,
    EOS_TOKEN: EOS_TOKEN_ID,
    IM_START_TOKEN: IM_START_TOKEN_ID,
    IM_END_TOKEN: IM_END_TOKEN_ID,
}


def _stdlib_sources():
    """The standard library's UTF-8 .py files, sorted: every tenth held out, the rest for training."""
    sources = stdlib_source_files()  # the default training corpus: UTF-8 .py files, tests and packages left out
    held_out = sources[::10]
    training = [path for index, path in enumerate(sources) if index % 10]
    return _take_bytes(training, TRAIN_BYTES), _take_bytes(held_out, HELD_OUT_BYTES)


def _take_bytes(paths, budget):
    taken, size = [], 0
    for path in paths:
        if size >= budget:
            break
        taken.append(path)
        size += path.stat().st_size
    return taken


@pytest.fixture(scope="module")
def stdlib_split():
    training_files, held_out_files = _stdlib_sources()
    assert sum(path.stat().st_size for path in training_files) >= TRAIN_BYTES
    return training_files, held_out_files


@pytest.fixture(scope="module")
def held_out_texts(stdlib_split):
    """Held-out sources and the docstrings in them (prose rather than code)."""
    _, held_out_files = stdlib_split
    sources = [path.read_text(encoding="utf-8") for path in held_out_files]
    docstrings = []
    for source in sources:
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                docstring = ast.get_docstring(node, clean=False)
                if docstring:
                    docstrings.append(docstring)
    assert len(docstrings) > 100
    return sources + docstrings


@pytest.fixture(scope="module")
def tokenizer(stdlib_split):
    training_files, _ = stdlib_split
    return train_tokenizer(training_files, vocab_size=VOCAB_SIZE)


def _chars_per_token(encode, texts):
    return sum(len(text) for text in texts) / sum(len(encode(text)) for text in texts)


def test_special_tokens_have_fixed_ids(tokenizer):
    assert {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKEN_IDS} == SPECIAL_TOKEN_IDS
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (
        BOS_TOKEN_ID,
        EOS_TOKEN_ID,
        PAD_TOKEN_ID,
    )
    assert tokenizer.extra_special_tokens == [IM_START_TOKEN, IM_END_TOKEN]
    assert len(tokenizer) == VOCAB_SIZE
    assert max(tokenizer.get_vocab().values()) == VOCAB_SIZE - 1


def test_extra_special_tokens_follow_the_reserved_ones(stdlib_split):
    training_files, _ = stdlib_split
    tokenizer = train_tokenizer(training_files[:3], vocab_size=300, special_tokens=["<|tool|>", "<|fim|>"])
    assert tokenizer.convert_tokens_to_ids(["<|tool|>", "<|fim|>"]) == [4, 5]
    assert tokenizer.encode("a<|tool|>b") == tokenizer.encode("a") + [4] + tokenizer.encode("b")


@pytest.mark.parametrize("text", HARD_STRINGS)
def test_hard_strings_round_trip(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text


@settings(max_examples=300, deadline=None)
@given(
    text=st.one_of(
        # Any text UTF-8 can encode: lone surrogates cannot be encoded, so they are left out.
        st.text(alphabet=st.characters(codec="utf-8")),
        # Pieces that BPE and whitespace handling get wrong, in random order and repetition.
        st.lists(st.sampled_from([" ", "  ", "\t", "\r\n", "\n", "\r", "x", "é", "e\u0301", "😀", "中", "'s", "0"]))
        .map("".join),
    )
)
def test_generated_text_round_trips(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


def test_held_out_stdlib_sources_and_docstrings_round_trip(tokenizer, held_out_texts):
    encodings = tokenizer(held_out_texts, add_special_tokens=False)["input_ids"]
    decoded = tokenizer.batch_decode(encodings)
    mismatches = [index for index, (text, back) in enumerate(zip(held_out_texts, decoded)) if text != back]
    assert mismatches == []


def test_every_byte_has_a_token_even_if_unseen_in_training(tokenizer):
    # The training sources are (nearly) ASCII, so most of these bytes never occurred in training.
    text = bytes(range(256)).decode("latin-1") + "\U0001f9ec\U0002a6d6"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.unk_token_id is None
    assert tokenizer.decode(ids) == text


def test_text_is_not_normalized(tokenizer):
    decomposed, precomposed = "e\u0301", "\u00e9"
    assert tokenizer.encode(decomposed) != tokenizer.encode(precomposed)
    assert tokenizer.decode(tokenizer.encode(decomposed)) == decomposed


def test_encode_adds_no_special_tokens(tokenizer):
    text = "import os\n"
    assert tokenizer.encode(text, add_special_tokens=True) == tokenizer.encode(text, add_special_tokens=False)
    assert not set(tokenizer.encode(text)) & set(SPECIAL_TOKEN_IDS.values())


def test_special_token_strings_encode_to_their_ids_and_can_be_skipped(tokenizer):
    ids = tokenizer.encode(f"{IM_START_TOKEN}user\nhi{IM_END_TOKEN}{EOS_TOKEN}")
    assert ids[0] == IM_START_TOKEN_ID
    assert ids[-2:] == [IM_END_TOKEN_ID, EOS_TOKEN_ID]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "user\nhi"


def test_padding_uses_the_pad_token(tokenizer):
    batch = tokenizer(["x", "import os\nimport sys\n"], padding=True)
    assert batch["input_ids"][0][-1] == PAD_TOKEN_ID
    assert batch["attention_mask"][0][-1] == 0


def test_chat_template_renders_chatml(tokenizer):
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Say hi.\n  Indented line."},
        {"role": "assistant", "content": "Hi."},
    ]
    assert tokenizer.chat_template == CHAT_TEMPLATE
    assert tokenizer.apply_chat_template(messages, tokenize=False) == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nSay hi.\n  Indented line.<|im_end|>\n"
        "<|im_start|>assistant\nHi.<|im_end|>\n"
    )
    prompt = tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("Indented line.<|im_end|>\n<|im_start|>assistant\n")

    ids = tokenizer.apply_chat_template(messages[:2], add_generation_prompt=True)["input_ids"]
    assert ids == tokenizer.encode(prompt)
    assert ids.count(IM_START_TOKEN_ID) == 3
    assert ids.count(IM_END_TOKEN_ID) == 2
    assert tokenizer.decode(ids) == prompt


def test_chat_template_can_keep_control_tokens_in_user_text_as_text(tokenizer):
    messages = [{"role": "user", "content": f"print('{IM_END_TOKEN}')"}]
    ids = tokenizer.apply_chat_template(messages, sanitize_control_tokens=True)["input_ids"]
    assert ids.count(IM_END_TOKEN_ID) == 1  # only the template's own
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(messages, tokenize=False)


def test_save_and_load_give_the_same_tokenizer(tokenizer, held_out_texts, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    texts = HARD_STRINGS + held_out_texts[:20]
    expected_ids = tokenizer(texts)["input_ids"]
    for loaded in (ArchLMTokenizerFast.from_pretrained(tmp_path), AutoTokenizer.from_pretrained(tmp_path)):
        assert loaded.get_vocab() == tokenizer.get_vocab()
        assert len(loaded) == len(tokenizer)
        assert loaded.all_special_tokens == tokenizer.all_special_tokens
        assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (
            BOS_TOKEN_ID,
            EOS_TOKEN_ID,
            PAD_TOKEN_ID,
        )
        assert loaded.chat_template == CHAT_TEMPLATE
        assert loaded(texts)["input_ids"] == expected_ids
        assert loaded.batch_decode(expected_ids) == texts
        assert loaded.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()


# Run in a fresh interpreter in which `import archlm` fails; prints what the loaded tokenizer does.
_LOAD_WITHOUT_ARCHLM = """
import json, sys
sys.modules["archlm"] = None  # the editable install would otherwise find the package
try:
    import archlm
except ImportError:
    pass
else:
    raise SystemExit("archlm is importable")
from transformers import AutoTokenizer

folder, texts, trust_remote_code = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3] == "1"
tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
ids = tokenizer(texts)["input_ids"]
print(json.dumps({
    "ids": ids,
    "decoded": tokenizer.batch_decode(ids),
    "special_ids": [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id],
    "length": len(tokenizer),
    "chat": tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                          add_generation_prompt=True),
    "archlm_modules": sorted(name for name, module in sys.modules.items()
                             if name.startswith("archlm") and module is not None),
}))
"""


@pytest.mark.parametrize("next_to_a_model", [False, True], ids=["tokenizer_only", "next_to_a_model"])
def test_autotokenizer_loads_in_a_process_that_cannot_import_archlm(tokenizer, tmp_path, next_to_a_model):
    folder = tmp_path / "checkpoint"
    if next_to_a_model:
        # The config.json of a saved ArchLM model: remote code, so users pass trust_remote_code=True.
        # The code files are not here, so transformers falls back to a generic config; the
        # tokenizer must not need anything from it.
        folder.mkdir()
        model_config = {
            "model_type": "archlm",
            "architectures": ["ArchLMForCausalLM"],
            "auto_map": {
                "AutoConfig": "configuration_archlm.ArchLMConfig",
                "AutoModelForCausalLM": "modeling_archlm.ArchLMForCausalLM",
            },
            "vocab_size": len(tokenizer),
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        }
        (folder / "config.json").write_text(json.dumps(model_config))
    tokenizer.save_pretrained(folder)
    environment = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}
    environment["HF_HUB_OFFLINE"] = "1"
    result = subprocess.run(
        [sys.executable, "-c", _LOAD_WITHOUT_ARCHLM, str(folder), json.dumps(HARD_STRINGS), str(int(next_to_a_model))],
        cwd=tmp_path,  # outside the repository, so the working directory does not provide archlm either
        env=environment,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded["archlm_modules"] == []
    assert loaded["ids"] == tokenizer(HARD_STRINGS)["input_ids"]
    assert loaded["decoded"] == HARD_STRINGS
    assert loaded["special_ids"] == [BOS_TOKEN_ID, EOS_TOKEN_ID, PAD_TOKEN_ID]
    assert loaded["length"] == len(tokenizer)
    assert loaded["chat"] == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_training_on_files_in_chunks_equals_training_on_whole_texts(stdlib_split):
    training_files, _ = stdlib_split
    files = training_files[:40]
    # 4 KiB pieces cut most files many times; the cuts must not change what the trainer counts.
    assert sum(1 for path in files for _ in iter_text_chunks(path, chunk_bytes=4096)) > 2 * len(files)
    from_files = train_tokenizer(files, vocab_size=1024, chunk_bytes=4096)
    texts = (path.read_text(encoding="utf-8") for path in files)  # a generator: length unknown
    from_texts = train_tokenizer(texts, vocab_size=1024)
    assert from_files.backend_tokenizer.to_str() == from_texts.backend_tokenizer.to_str()


def _pre_tokenized_words(pre_tokenizer, texts):
    return [word for text in texts for word, _ in pre_tokenizer.pre_tokenize_str(text)]


# Lines built to land on the places where cutting a file is and is not safe: indentation (including
# spaces the two regex engines disagree on: U+3000 is a space to both, U+001C only to Python),
# words, punctuation, and every kind of line end.
_LINES = st.lists(
    st.tuples(
        st.sampled_from(["", " ", "    ", "\t", "\u3000", "\x1c"]),
        st.lists(st.sampled_from(["x", "'s", "_", "):", "é", "12345", " ", "\x85", "\u0301"]), max_size=4).map(
            "".join
        ),
        st.sampled_from(["\n", "\r\n", "\r", "\n\n", " \n", ""]),
    ).map("".join)
).map("".join)


@settings(max_examples=300, deadline=None)
@given(text=_LINES, chunk_bytes=st.integers(min_value=1, max_value=16))
def test_file_chunks_pre_tokenize_like_the_whole_file(text, chunk_bytes):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "text.txt"
        path.write_bytes(text.encode("utf-8"))  # write_text would turn "\n" into os.linesep
        chunks = list(iter_text_chunks(path, chunk_bytes=chunk_bytes))
    assert "".join(chunks) == text
    pre_tokenizer = new_backend().pre_tokenizer
    assert _pre_tokenized_words(pre_tokenizer, chunks) == _pre_tokenized_words(pre_tokenizer, [text])


def test_a_file_with_nowhere_to_cut_is_cut_at_the_length_limit(tmp_path):
    path = tmp_path / "one_line.txt"
    text = "word " * 2_000  # no newline at all
    path.write_text(text)
    chunks = list(iter_text_chunks(path, chunk_bytes=256, max_chunk_chars=1_000))
    assert "".join(chunks) == text
    assert max(len(chunk) for chunk in chunks) < 1_000 + 256
    assert len(chunks) > 5


def test_compresses_no_worse_than_plain_byte_level_bpe(tokenizer, stdlib_split, held_out_texts):
    training_files, _ = stdlib_split
    plain = ByteLevelBPETokenizer()
    # Whole files as texts: its file reader would train on single lines, and compress worse.
    texts = [path.read_text(encoding="utf-8") for path in training_files]
    plain.train_from_iterator(texts, vocab_size=VOCAB_SIZE, min_frequency=2, show_progress=False)
    assert plain.get_vocab_size() == len(tokenizer)
    ours = _chars_per_token(lambda text: tokenizer.encode(text, add_special_tokens=False), held_out_texts)
    theirs = _chars_per_token(lambda text: plain.encode(text).ids, held_out_texts)
    assert ours >= theirs


def test_smallest_allowed_vocabulary_is_bytes_and_special_tokens(stdlib_split):
    training_files, _ = stdlib_split
    tokenizer = train_tokenizer(training_files[:2], vocab_size=260)
    assert len(tokenizer) == 260
    for text in HARD_STRINGS:
        assert tokenizer.decode(tokenizer.encode(text)) == text


# ---------------------------------------------------------------------------------------------
# Bad input: each is a ValueError naming the problem, raised before training and before writing.


def test_vocab_size_below_bytes_plus_special_tokens_is_rejected():
    with pytest.raises(ValueError, match=r"vocab_size=259 .* at least 260"):
        train_tokenizer(["some text"], vocab_size=259)
    with pytest.raises(ValueError, match=r"vocab_size=260 .* at least 261"):
        train_tokenizer(["some text"], vocab_size=260, special_tokens=["<|tool|>"])


@pytest.mark.parametrize(
    "special_tokens, message",
    [([PAD_TOKEN], "reserved"), (["<|a|>", "<|a|>"], "repeats"), ([""], "non-empty")],
)
def test_bad_special_tokens_are_rejected(special_tokens, message):
    with pytest.raises(ValueError, match=message):
        train_tokenizer(["some text"], vocab_size=300, special_tokens=special_tokens)


@pytest.mark.parametrize(
    "corpus", [[], ["", ""], iter(["", ""])], ids=["no_texts", "empty_texts", "generator_of_empty_texts"]
)
def test_empty_corpus_of_texts_is_rejected(corpus):
    with pytest.raises(ValueError, match="corpus is empty"):
        train_tokenizer(corpus, vocab_size=300)


def test_empty_files_are_rejected(tmp_path):
    files = [tmp_path / "a.txt", tmp_path / "b.txt"]
    for path in files:
        path.write_bytes(b"")
    with pytest.raises(ValueError, match="corpus is empty: all 2 training files are empty"):
        train_tokenizer(files, vocab_size=300)


def test_missing_file_is_named(tmp_path):
    present = tmp_path / "present.txt"
    present.write_text("text\n")
    missing = tmp_path / "missing.txt"
    with pytest.raises(ValueError, match=f"'{missing}' does not exist"):
        train_tokenizer([present, missing], vocab_size=300)


def test_folder_given_as_a_file_is_rejected(tmp_path):
    with pytest.raises(ValueError, match=f"'{tmp_path}' is not a regular file"):
        train_tokenizer([tmp_path], vocab_size=300)


@pytest.mark.parametrize(
    "content, chunk_bytes, bad_offset",
    [
        ("café\n".encode("latin-1"), 1 << 20, 3),  # latin-1 é
        (b"ok\n" * 10 + b"\xff rest\n", 1 << 20, 30),
        (b"abc\xe2\x82X", 4, 3),  # a 3-byte character broken, cut by the 4-byte read boundary
        (b"x" * 100 + b"\xe2\x82", 64, 100),  # a character cut off by the end of the file
    ],
    ids=["latin1", "stray_byte", "across_read_boundary", "truncated_at_end"],
)
def test_non_utf8_file_is_named_with_the_byte_offset(tmp_path, content, chunk_bytes, bad_offset):
    good = tmp_path / "good.txt"
    good.write_text("fine\n")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(content)
    with pytest.raises(ValueError, match=f"'{bad}' is not UTF-8: .* at byte offset {bad_offset} "):
        train_tokenizer([good, bad], vocab_size=300, chunk_bytes=chunk_bytes)


def test_corpus_argument_types_are_checked(tmp_path):
    with pytest.raises(TypeError, match="single str"):
        train_tokenizer("a text, not a list of texts", vocab_size=300)
    with pytest.raises(ValueError, match="mixes paths and texts"):
        train_tokenizer([tmp_path / "a.txt", "a text"], vocab_size=300)
    with pytest.raises(TypeError, match="texts must be str"):
        train_tokenizer([b"bytes"], vocab_size=300)


# ---------------------------------------------------------------------------------------------
# The command line.


def test_command_trains_and_saves_a_loadable_tokenizer(stdlib_split, tmp_path):
    training_files, _ = stdlib_split
    output = tmp_path / "tokenizer"
    result = subprocess.run(
        [sys.executable, "-m", "archlm.tokenization_archlm", "--train", *map(str, _take_bytes(training_files, 100_000))]
        + ["--vocab-size", "400", "--output", str(output)],
        cwd=REPO_ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "Saved a tokenizer of 400 tokens" in result.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["tokenizer"]  # no staging folder left
    loaded = AutoTokenizer.from_pretrained(output)
    assert len(loaded) == 400
    assert loaded.decode(loaded.encode(HARD_STRINGS[9])) == HARD_STRINGS[9]


def test_command_saves_next_to_a_model_without_touching_its_files(stdlib_split, tmp_path):
    training_files, _ = stdlib_split
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text('{"model_type": "archlm"}')
    main(["--train", str(training_files[0]), "--vocab-size", "300", "--output", str(model_dir)])
    assert sorted(path.name for path in model_dir.iterdir()) == [
        "chat_template.jinja",
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert (model_dir / "config.json").read_text() == '{"model_type": "archlm"}'
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model"]


def _write_bad_input(kind, folder):
    """Returns the command-line arguments for one kind of bad input, with its files in `folder`."""
    good = folder / "good.txt"
    good.write_text("def f():\n    return 1\n")
    if kind == "vocab_too_small":
        return ["--train", str(good), "--vocab-size", "100"]
    if kind == "missing_file":
        return ["--train", str(good), str(folder / "missing.txt"), "--vocab-size", "300"]
    if kind == "not_utf8":
        bad = folder / "bad.txt"
        bad.write_bytes(b"caf\xe9\n")
        return ["--train", str(good), str(bad), "--vocab-size", "300"]
    if kind == "empty":
        empty = folder / "empty.txt"
        empty.write_bytes(b"")
        return ["--train", str(empty), "--vocab-size", "300"]
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind, message",
    [
        ("vocab_too_small", "vocab_size=100 is too small"),
        ("missing_file", "missing.txt' does not exist"),
        ("not_utf8", "bad.txt' is not UTF-8: invalid byte 0xe9 at byte offset 3"),
        ("empty", "corpus is empty"),
    ],
)
def test_command_rejects_bad_input_and_writes_nothing(tmp_path, capsys, kind, message):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    arguments = _write_bad_input(kind, inputs) + ["--output", str(outputs / "tokenizer")]
    with pytest.raises(SystemExit) as exit_info:
        main(arguments)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert list(outputs.iterdir()) == []


def test_command_rejects_an_output_that_is_a_file_before_training(tmp_path, capsys):
    output = tmp_path / "tokenizer"
    output.write_text("not a folder")
    with pytest.raises(SystemExit):
        main(["--train", str(tmp_path / "missing.txt"), "--vocab-size", "300", "--output", str(output)])
    assert "is not a folder" in capsys.readouterr().err
    assert output.read_text() == "not a folder"
