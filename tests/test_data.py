"""archlm.data: the default corpus, loading each file format, EOS-separated packing, validation carving, the
block-size schedule, and the errors for bad data. No model is trained here."""

import copy
import json
import sysconfig
from pathlib import Path

import pytest
from datasets import Dataset, DatasetDict, IterableDataset

from archlm import data as data_module
from archlm.data import (
    DEFAULT_CHAT,
    ChatTemplate,
    DataArguments,
    check_data_arguments,
    block_size_at,
    characters_per_token,
    load_raw_data,
    pack_datasets,
    parse_block_size_schedule,
    stdlib_source_files,
)
from archlm.tokenization_archlm import EOS_TOKEN, EOS_TOKEN_ID, IM_END_TOKEN_ID, IM_START_TOKEN_ID, train_tokenizer

SAMPLE_TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "class Point:\r\n    x = 1\r\n\r\n    y = 2\r\n",  # CRLF line ends must survive
    "# héllo wörld ✓\n\n\nprint('done')",  # no final newline
]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(SAMPLE_TEXTS * 20 + [Path(p).read_text(encoding="utf-8") for p in stdlib_source_files(0.05)], 300)


def decode_stream(dataset, tokenizer) -> str:
    """All tokens of all blocks, in order, decoded with special tokens kept."""
    return tokenizer.decode([token for row in dataset["input_ids"] for token in row], skip_special_tokens=False)


def write(path: Path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode("utf-8"))
    return str(path)


# ------------------------------------------------------------------------------------------------
# The default corpus
# ------------------------------------------------------------------------------------------------
def test_stdlib_corpus_is_sorted_utf8_python_without_tests_or_site_packages():
    root = Path(sysconfig.get_paths()["stdlib"])
    files = stdlib_source_files()
    relative = [path.relative_to(root).as_posix() for path in files]
    assert relative == sorted(relative)
    assert len(files) > 100 and all(path.suffix == ".py" for path in files)
    excluded = {"site-packages", "dist-packages", "test", "tests", "idle_test", "encodings", "pydoc_data"}
    assert not any(excluded & set(Path(name).parts) for name in relative)
    assert "os.py" in relative and "json/__init__.py" in relative
    assert stdlib_source_files() == files  # deterministic


def test_stdlib_corpus_cap_draws_files_across_the_library_and_records_are_whole_files():
    files = stdlib_source_files(max_mb=0.2)
    assert 0 < sum(len(path.read_text(encoding="utf-8")) for path in files) <= 200_000
    assert files == stdlib_source_files(max_mb=0.2)  # deterministic
    everything = stdlib_source_files()
    assert everything.index(files[-1]) > len(everything) / 2  # not just the first packages of the alphabet
    raw = load_raw_data(DataArguments(max_corpus_mb=0.2))
    assert "standard library" in raw.description
    assert raw.train.num_rows == len(files) and raw.validation is None
    assert raw.train[0]["text"] == files[0].read_text(encoding="utf-8") and raw.train[0]["document_end"]


# ------------------------------------------------------------------------------------------------
# Packing: EOS between documents, text kept exactly as written
# ------------------------------------------------------------------------------------------------
def test_text_files_keep_their_line_breaks_with_eos_only_between_files(tmp_path, tokenizer):
    files = [write(tmp_path / f"doc{i}.txt", text) for i, text in enumerate(SAMPLE_TEXTS)]
    args = DataArguments(train_file=files, validation_split_percentage=0)
    packed = pack_datasets(load_raw_data(args), tokenizer, block_size=1, args=args)  # block 1: nothing dropped
    assert decode_stream(packed.train, tokenizer) == "".join(text + EOS_TOKEN for text in SAMPLE_TEXTS)


@pytest.mark.parametrize("eol", ["\n", "\r\n"])
def test_large_text_file_is_read_in_pieces_that_tokenize_as_the_whole_file(tmp_path, monkeypatch, eol):
    """Cut only where the pre-tokenizer splits anyway (before an unindented line, after a line break it takes on its
    own): a CRLF line break at a piece's end would otherwise become one token where the whole file has two."""
    monkeypatch.setattr(data_module, "TEXT_CHUNK_CHARS", 40)
    text = "".join(f"def f{i}():{eol}    return {i}{eol}{eol if i % 4 == 0 else ''}" for i in range(20))  # < 16 x 40
    tokenizer = train_tokenizer([text] * 20, 300)
    assert eol == "\n" or "\u010d\u010a" in tokenizer.get_vocab()  # "\r\n" is one token where nothing follows it
    path = tmp_path / "big.txt"
    path.write_bytes(text.encode())
    args = DataArguments(train_file=[str(path)], validation_split_percentage=0)
    raw = load_raw_data(args)
    records = raw.train.to_list()
    assert "".join(r["text"] for r in records) == text
    # every "return N\n" ends a piece once it holds 40 characters; CRLF after a word or bracket is no safe cut, so
    # the file stays whole until 16 pieces' length
    assert len(records) == (1 if eol == "\r\n" else 10)
    assert [r["document_end"] for r in records] == [False] * (len(records) - 1) + [True]
    assert all(r["text"][:1] not in " \r\n" for r in records)  # never cut inside an indented block
    packed = pack_datasets(raw, tokenizer, block_size=1, args=args)
    assert [row[0] for row in packed.train["input_ids"]] == tokenizer(text)["input_ids"] + [EOS_TOKEN_ID]


def test_a_long_line_is_cut_before_a_space_into_pieces_that_tokenize_as_the_whole_file(tmp_path, monkeypatch, tokenizer):
    """A file of one line (no line break to cut at) was one record, tokenized in one call: ~0.4 KB a token, 14 GB
    for 100 MB of text. It is cut where a space follows a non-space, where the pre-tokenizer splits anyway."""
    monkeypatch.setattr(data_module, "TEXT_CHUNK_CHARS", 40)
    text = " ".join(f"word{i}  x" if i % 3 else f"w{i}" for i in range(200))  # (double spaces: not cut inside them)
    path = write(tmp_path / "one_line.txt", text)
    args = DataArguments(train_file=[path], validation_split_percentage=0)
    raw = load_raw_data(args)
    records = raw.train.to_list()
    assert "".join(record["text"] for record in records) == text and len(records) > 10
    assert all(after["text"][:1] == " " and not before["text"][-1].isspace() for before, after in zip(records, records[1:]))
    packed = pack_datasets(raw, tokenizer, block_size=1, args=args)
    assert [row[0] for row in packed.train["input_ids"]] == tokenizer(text)["input_ids"] + [EOS_TOKEN_ID]


def test_a_tokenizer_that_prepends_to_each_call_gets_text_files_whole(tmp_path, monkeypatch, tokenizer, caplog):
    """Llama 2's and Mistral's tokenizers prepend "▁" to each call: a file tokenized in pieces got one more token at
    every cut. Such a tokenizer gets each file whole (ArchLM's own tokenizes the pieces as the whole)."""
    from tokenizers import Tokenizer, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "</s>": 1, **{char: i + 2 for i, char in enumerate("▁abcdefghijklmnopqrstuvwxyz\n.")}}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    prepending = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>")
    assert data_module.tokenizes_pieces_as_whole(tokenizer) and not data_module.tokenizes_pieces_as_whole(prepending)
    monkeypatch.setattr(data_module, "TEXT_CHUNK_CHARS", 40)
    text = "".join(f"line {'abc'[i % 3]} of the file.\n" for i in range(60))
    args = DataArguments(train_file=[write(tmp_path / "a.txt", text)], validation_split_percentage=0)
    raw = load_raw_data(args)
    assert raw.train.num_rows > 10  # in pieces
    with caplog.at_level("WARNING", logger="archlm.data"):
        packed = pack_datasets(raw, prepending, block_size=1, args=args)
    assert "text files are tokenized whole" in caplog.text
    assert [row[0] for row in packed.train["input_ids"]] == prepending(text)["input_ids"] + [1]


def test_an_empty_text_file_adds_no_end_of_document_token(tmp_path, tokenizer):
    files = [write(tmp_path / "a.txt", SAMPLE_TEXTS[0]), write(tmp_path / "b.txt", ""),
             write(tmp_path / "c.txt", SAMPLE_TEXTS[1])]
    args = DataArguments(train_file=files, validation_split_percentage=0)
    packed = pack_datasets(load_raw_data(args), tokenizer, block_size=1, args=args)
    assert decode_stream(packed.train, tokenizer) == SAMPLE_TEXTS[0] + EOS_TOKEN + SAMPLE_TEXTS[1] + EOS_TOKEN


@pytest.mark.parametrize("streaming", [False, True], ids=["dataset", "streaming"])
def test_packing_keeps_every_token_but_the_last_partial_block(tokenizer, streaming):
    """One stream over all records: datasets.map's batches of 1000 records each dropped their own remainder (15%
    of short records' tokens in blocks of 1024, all of them in blocks of 8192)."""
    texts = [f"x = {i}\n" * (1 + i % 5) for i in range(2500)]
    expected = [token for text in texts for token in tokenizer(text)["input_ids"] + [EOS_TOKEN_ID]]
    records = Dataset.from_dict({"text": texts})
    block_size = len(expected) // 3 + 1  # > 1000 records' tokens: each map batch dropped all of its own
    packed = data_module.pack(records.to_iterable_dataset() if streaming else records, tokenizer, block_size,
                              DataArguments(), "records")
    ids = [token for row in packed for token in row["input_ids"]]
    assert len(ids) == 2 * block_size and ids == expected[:2 * block_size]


def test_records_without_text_are_left_out_with_a_warning(tmp_path, tokenizer, caplog):
    """A null or empty text field (a csv's empty cell, a jsonl null) is no document: it would train on a bare
    end-of-document token."""
    rows = [{"content": SAMPLE_TEXTS[0]}, {"content": None}, {"content": ""}, {"content": SAMPLE_TEXTS[1]}]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    args = DataArguments(train_file=[str(path)], text_column="content", validation_split_percentage=0)
    with caplog.at_level("WARNING", logger="archlm.data"):
        raw = load_raw_data(args)
    assert raw.train["text"] == SAMPLE_TEXTS[:2]
    assert "2 of 4 records have no text in 'content'" in caplog.text
    packed = pack_datasets(raw, tokenizer, block_size=1, args=args)
    assert decode_stream(packed.train, tokenizer) == SAMPLE_TEXTS[0] + EOS_TOKEN + SAMPLE_TEXTS[1] + EOS_TOKEN


@pytest.mark.parametrize("extension", ["jsonl", "json", "csv", "parquet"])
def test_structured_files_use_text_column_and_each_record_is_a_document(tmp_path, tokenizer, extension):
    rows = [{"id": i, "content": text} for i, text in enumerate(SAMPLE_TEXTS)]
    path = tmp_path / f"data.{extension}"
    if extension == "csv":
        Dataset.from_list(rows).to_csv(str(path), index=False)
    elif extension == "parquet":
        Dataset.from_list(rows).to_parquet(str(path))
    else:
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    args = DataArguments(train_file=[str(path)], text_column="content", validation_split_percentage=0)
    raw = load_raw_data(args)
    assert raw.train.column_names == ["text"]
    packed = pack_datasets(raw, tokenizer, block_size=1, args=args)
    expected = "".join(text + EOS_TOKEN for text in SAMPLE_TEXTS)
    if extension == "csv":  # the csv writer normalises \r\n inside a quoted field
        expected = expected.replace("\r\n", "\n")
        assert decode_stream(packed.train, tokenizer).replace("\r\n", "\n") == expected
    else:
        assert decode_stream(packed.train, tokenizer) == expected


def test_blocks_are_full_length_with_labels_equal_to_inputs(tokenizer):
    args = DataArguments(max_corpus_mb=0.05)
    packed = pack_datasets(load_raw_data(args), tokenizer, block_size=16, args=args)
    rows = packed.train[:50]
    assert all(len(ids) == 16 for ids in rows["input_ids"])
    assert rows["labels"] == rows["input_ids"]
    assert all(mask == [1] * 16 for mask in rows["attention_mask"])
    assert EOS_TOKEN_ID in {token for row in packed.train["input_ids"] for token in row}


# ------------------------------------------------------------------------------------------------
# Validation split
# ------------------------------------------------------------------------------------------------
def test_validation_is_the_tail_of_the_blocks_when_none_is_given(tokenizer):
    args = DataArguments(max_corpus_mb=0.05, validation_split_percentage=10)
    raw = load_raw_data(args)
    everything = pack_datasets(raw, tokenizer, 16, DataArguments(max_corpus_mb=0.05, validation_split_percentage=0)).train
    packed = pack_datasets(raw, tokenizer, 16, args)
    assert packed.validation_blocks == round(everything.num_rows * 0.1)
    assert packed.train_blocks + packed.validation_blocks == everything.num_rows
    assert packed.validation["input_ids"] == everything["input_ids"][packed.train_blocks:]


def test_validation_file_is_used_and_max_samples_cap_both_splits(tmp_path, tokenizer):
    train = write(tmp_path / "train.txt", SAMPLE_TEXTS[0] * 30)
    validation = write(tmp_path / "valid.txt", SAMPLE_TEXTS[1] * 30)
    args = DataArguments(train_file=[train], validation_file=[validation], max_train_samples=3, max_eval_samples=2)
    packed = pack_datasets(load_raw_data(args), tokenizer, 8, args)
    assert packed.train_blocks == 3 and packed.validation_blocks == 2
    assert "Point" in tokenizer.decode(packed.validation[0]["input_ids"] + packed.validation[1]["input_ids"])


def test_too_little_data_for_a_validation_split_is_an_error(tmp_path, tokenizer):
    args = DataArguments(train_file=[write(tmp_path / "tiny.txt", "x = 1\n")])
    with pytest.raises(ValueError, match="too few|fewer tokens"):
        pack_datasets(load_raw_data(args), tokenizer, 4, args)


def test_fewer_tokens_than_one_block_is_an_error(tmp_path, tokenizer):
    args = DataArguments(train_file=[write(tmp_path / "tiny.txt", "x = 1\n")])
    with pytest.raises(ValueError, match="fewer tokens than one block of --block_size 512"):
        pack_datasets(load_raw_data(args), tokenizer, 512, args)


# ------------------------------------------------------------------------------------------------
# Streaming
# ------------------------------------------------------------------------------------------------
def test_streaming_gives_iterable_blocks_and_holds_out_the_first_blocks(tokenizer):
    args = DataArguments(max_corpus_mb=0.05, streaming=True, max_eval_samples=3)
    raw = load_raw_data(args)
    assert isinstance(raw.train, IterableDataset)
    packed = pack_datasets(raw, tokenizer, 16, args)
    assert isinstance(packed.train, IterableDataset) and packed.train_blocks is None
    validation = [row["input_ids"] for row in packed.validation]
    train = [row["input_ids"] for row in packed.train.take(5)]
    in_memory = pack_datasets(load_raw_data(DataArguments(max_corpus_mb=0.05, validation_split_percentage=0)), tokenizer, 16,
                              DataArguments(validation_split_percentage=0)).train["input_ids"]
    assert validation == in_memory[:3] and train == in_memory[3:8]


def test_streaming_json_with_text_column(tmp_path, tokenizer):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"body": text * 10}) + "\n" for text in SAMPLE_TEXTS), encoding="utf-8")
    args = DataArguments(train_file=[str(path)], text_column="body", streaming=True, max_eval_samples=1)
    packed = pack_datasets(load_raw_data(args), tokenizer, 8, args)
    assert len(list(packed.train.take(4))) == 4


# ------------------------------------------------------------------------------------------------
# Block-size schedule
# ------------------------------------------------------------------------------------------------
def test_block_size_schedule_parses_and_gives_the_size_of_each_step():
    schedule = parse_block_size_schedule("256:0, 512:1000,1024:3000")
    assert schedule == [(0, 256), (1000, 512), (3000, 1024)]
    assert [block_size_at(schedule, step) for step in (0, 999, 1000, 2999, 3000, 10**6)] == [256, 256, 512, 512, 1024, 1024]


@pytest.mark.parametrize(
    "schedule, message",
    [
        ("256-0", "not 'size:step'"),
        ("256:0,512", "not 'size:step'"),
        ("256:zero", "not 'size:step'"),
        ("256:10,512:20", "must start at step 0"),
        ("256:0,512:100,1024:100", "strictly increase"),
        ("0:0,512:100", "positive"),
        ("96:0,256:100", "divide the largest"),
    ],
)
def test_malformed_block_size_schedule_is_refused(schedule, message):
    with pytest.raises(ValueError, match=message):
        parse_block_size_schedule(schedule)


# ------------------------------------------------------------------------------------------------
# Bad data
# ------------------------------------------------------------------------------------------------
def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_raw_data(DataArguments(train_file=[str(tmp_path / "nope.txt")]))


def test_folder_without_supported_files_is_an_error(tmp_path):
    (tmp_path / "dir.txt").mkdir()
    write(tmp_path / "dir.txt" / "notes.docx", "x")
    with pytest.raises(ValueError, match="dir.txt' is a folder with no file of a supported type"):
        load_raw_data(DataArguments(train_file=[str(tmp_path / "dir.txt")]))


def test_a_folder_stands_for_its_text_files_of_any_text_type(tmp_path, tokenizer):
    """Markdown, source code and .txt are all plain text; a folder is read recursively, in path order, without
    hidden folders or __pycache__; the description names the folder, not every path."""
    corpus = tmp_path / "corpus"
    write(corpus / "b.md", "# title\n")
    write(corpus / "a.py", "print(1)\n")
    write(corpus / "sub" / "c.txt", "plain\n")
    write(corpus / ".git" / "HEAD.txt", "hidden\n")
    write(corpus / "__pycache__" / "x.py", "cached\n")
    write(corpus / "image.docx", "not text")
    args = DataArguments(train_file=[str(corpus)])
    raw = load_raw_data(args)
    assert raw.train["text"] == ["print(1)\n", "# title\n", "plain\n"]
    assert raw.description.startswith("3 file(s) corpus") and str(tmp_path) not in raw.description


def test_unsupported_extension_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"unsupported extension '\.docx'.*\.jsonl"):
        load_raw_data(DataArguments(train_file=[write(tmp_path / "a.docx", "x")]))
    # a mistyped folder has no extension either: what is wrong is that it does not exist
    with pytest.raises(ValueError, match=r"my_corpsu' does not exist \(relative paths start at"):
        load_raw_data(DataArguments(train_file=[str(tmp_path / "my_corpsu")]))


def test_non_utf8_text_file_is_an_error(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8 text: invalid byte 0xe9"):
        load_raw_data(DataArguments(train_file=[str(path)]))


def test_malformed_json_is_an_error_naming_the_file(tmp_path):
    path = write(tmp_path / "bad.jsonl", '{"text": "a"}\n{not json\n')
    with pytest.raises(ValueError, match="bad.jsonl.*could not be read as json"):
        load_raw_data(DataArguments(train_file=[path]))


@pytest.mark.parametrize("name, content", [("empty.txt", ""), ("empty.jsonl", ""), ("blank.jsonl", '{"text": ""}\n')])
def test_empty_data_is_an_error(tmp_path, name, content):
    with pytest.raises(ValueError, match="empty"):
        load_raw_data(DataArguments(train_file=[write(tmp_path / name, content)]))


def test_missing_text_column_lists_the_columns(tmp_path):
    path = write(tmp_path / "data.jsonl", json.dumps({"title": "t", "body": "b"}) + "\n")
    with pytest.raises(ValueError, match=r"--text_column 'text' is not a column.*\['title', 'body'\]"):
        load_raw_data(DataArguments(train_file=[path]))


def test_a_text_column_where_there_are_no_columns_is_reported(tmp_path, caplog):
    txt, jsonl = write(tmp_path / "a.txt", "x = 1\n"), write(tmp_path / "b.jsonl", '{"body": "x = 1"}\n')
    with caplog.at_level("WARNING", logger="archlm.data"):
        check_data_arguments(DataArguments(train_file=[txt], text_column="body"))
        check_data_arguments(DataArguments(text_column="body"))
        assert caplog.text.count("--text_column 'body' is ignored") == 2
        assert "plain-text files have no columns" in caplog.text and "the default corpus has no columns" in caplog.text
        caplog.clear()
        assert load_raw_data(DataArguments(train_file=[jsonl], text_column="body",
                                           validation_split_percentage=0)).train["text"] == ["x = 1"]
        check_data_arguments(DataArguments(train_file=[txt]))  # the default: nothing to report
    assert "--text_column" not in caplog.text


def test_non_text_column_is_an_error(tmp_path):
    path = write(tmp_path / "data.jsonl", json.dumps({"text": 3}) + "\n")
    with pytest.raises(ValueError, match="holds .*int64.*not text"):
        load_raw_data(DataArguments(train_file=[path]))


CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
]


def chatml(conversation: list[dict]) -> str:
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in conversation)


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("source", ["jsonl", "parquet", "saved"])
def test_conversations_are_written_out_by_the_chat_template_and_packed_with_its_control_tokens(tmp_path, tokenizer,
                                                                                              source, streaming):
    """TRL's conversational format (a "messages" column of {"role", "content"} lists) is found without
    --text_column; each conversation becomes one document written out by the chat template: ArchLM's ChatML by
    default (the tokenizer trained on the data carries it), whose turn markers pack as their control tokens."""
    records = [{"messages": conversation, "id": index} for index, conversation in enumerate(CONVERSATIONS * 2)]
    if source == "jsonl":
        args = DataArguments(train_file=[write(tmp_path / "chat.jsonl", "".join(json.dumps(r) + "\n" for r in records))])
    elif source == "parquet":
        Dataset.from_list(records).to_parquet(tmp_path / "chat.parquet")
        args = DataArguments(train_file=[str(tmp_path / "chat.parquet")])
    else:
        Dataset.from_list(records).save_to_disk(tmp_path / "saved")
        args = DataArguments(dataset_name=str(tmp_path / "saved"))
    args.streaming, args.validation_split_percentage = streaming, 0
    raw = load_raw_data(args)
    expected = [chatml(conversation) for conversation in CONVERSATIONS * 2]
    assert [record["text"] for record in raw.train] == expected
    packed = pack_datasets(raw, tokenizer, block_size=1, args=args)  # (streamed: the first blocks are held out)
    ids = [block["input_ids"][0] for split in (packed.validation or [], packed.train) for block in split]
    assert ids.count(IM_START_TOKEN_ID) == ids.count(IM_END_TOKEN_ID) == sum(map(len, CONVERSATIONS * 2))
    assert tokenizer.decode(ids, skip_special_tokens=False) == "".join(text + EOS_TOKEN for text in expected)


def test_conversations_are_written_out_by_a_given_tokenizers_template_with_its_special_tokens(tmp_path, tokenizer):
    """A tokenizer given to fine-tune with brings its own template, which may read its special tokens (as
    apply_chat_template lets it: Llama 3's opens with bos_token); the same text as apply_chat_template's."""
    llama_like = copy.deepcopy(tokenizer)
    llama_like.chat_template = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] | upper }}] {{ m['content'] }}"
                                "{{ eos_token }}{% endfor %}")
    path = write(tmp_path / "chat.jsonl", "".join(json.dumps({"messages": c}) + "\n" for c in CONVERSATIONS))
    raw = load_raw_data(DataArguments(train_file=[path], validation_split_percentage=0),
                        ChatTemplate.of(llama_like, "--tokenizer_name X"))
    assert raw.train["text"] == [llama_like.apply_chat_template(c, tokenize=False) for c in CONVERSATIONS]
    assert raw.train["text"][0] == f"{EOS_TOKEN}[USER] What is 2 + 2?{EOS_TOKEN}[ASSISTANT] 4{EOS_TOKEN}"


@pytest.mark.parametrize("source", ["jsonl", "parquet"])
def test_conversations_with_tool_calls_and_keys_some_messages_lack_are_written_as_apply_chat_template_does(
        tmp_path, tokenizer, source, caplog):
    """Messages whose keys differ (a name, tool calls): jsonl reads them as Json (refused as "not text"), parquet
    fills the missing keys with None (a template asking `'tool_calls' in m` then failed on None). ArchLM's ChatML
    writes a missing content as empty, and says which keys it does not write."""
    conversation = [{"role": "user", "content": "weather?", "name": "bob"},
                    {"role": "assistant", "content": None, "tool_calls": [{"name": "w", "arguments": "{}"}]},
                    {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "sunny"}]
    if source == "jsonl":
        path = write(tmp_path / "chat.jsonl", json.dumps({"messages": conversation}) + "\n")
    else:
        Dataset.from_list([{"messages": conversation}]).to_parquet(tmp_path / "chat.parquet")
        path = str(tmp_path / "chat.parquet")
    tools = copy.deepcopy(tokenizer)
    tools.chat_template = ("{% for m in messages %}{{ m['role'] }}: {% if 'tool_calls' in m %}<call>"
                           "{{ m.tool_calls | length }}</call>{% else %}{{ m['content'] }}{% endif %}\n{% endfor %}")
    raw = load_raw_data(DataArguments(train_file=[path], validation_split_percentage=0), ChatTemplate.of(tools, "T"))
    assert raw.train["text"] == [tools.apply_chat_template(conversation, tokenize=False)]
    with caplog.at_level("WARNING", logger="archlm.data"):
        raw = load_raw_data(DataArguments(train_file=[path], validation_split_percentage=0))
    assert raw.train["text"] == [tokenizer.apply_chat_template(conversation, tokenize=False)]
    assert "<|im_start|>assistant\n<|im_end|>" in raw.train["text"][0]
    assert "messages hold ['name', 'tool_calls'], which the chat template of ArchLM's tokenizer" in caplog.text


def test_conversations_without_a_chat_template_or_with_bad_messages_are_refused_naming_them(tmp_path, tokenizer):
    path = write(tmp_path / "chat.jsonl", "".join(json.dumps({"messages": c}) + "\n" for c in CONVERSATIONS))
    no_template = train_tokenizer(SAMPLE_TEXTS * 5, 300)
    no_template.chat_template = None
    with pytest.raises(ValueError, match=r"chat.jsonl'\] holds conversations in 'messages', and the tokenizer of "
                                         r"--tokenizer_name X has no chat template.*--text_column"):
        load_raw_data(DataArguments(train_file=[path]), ChatTemplate.of(no_template, "--tokenizer_name X"))
    bad = write(tmp_path / "bad.jsonl", json.dumps({"messages": [{"content": "no role"}]}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl'\]: a conversation in 'messages' holds .*'no role'.*not a message"):
        load_raw_data(DataArguments(train_file=[bad]))
    strict = ChatTemplate("{{ raise_exception('only user turns') }}", "the tokenizer of Y")
    with pytest.raises(ValueError, match=r"the chat template of the tokenizer of Y could not write out .*only user turns"):
        load_raw_data(DataArguments(train_file=[path]), strict)
    assert DEFAULT_CHAT.template == tokenizer.chat_template  # what a tokenizer trained on the data carries


@pytest.mark.parametrize("streaming", [False, True])
def test_assistant_only_loss_trains_the_assistants_turns_and_the_end_after_them(tmp_path, tokenizer, streaming):
    """--assistant_only_loss: labels -100 everywhere but each assistant turn as the template writes it (its text and
    end-of-turn marker, not the header that opens it: the generation prompt) and the end-of-document token after
    a conversation that ends with one."""
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"},
                    {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3 + 3?"},
                    {"role": "assistant", "content": "6"}]
    asked = conversation[:2]  # a conversation without an answer trains nothing
    path = write(tmp_path / "chat.jsonl", "".join(json.dumps({"messages": c}) + "\n" for c in [conversation, asked] * 3))
    args = DataArguments(train_file=[path], assistant_only_loss=True, validation_split_percentage=0,
                         streaming=streaming, max_eval_samples=1)
    raw = load_raw_data(args)
    # the token stream, and which of its tokens train
    tokens = data_module._tokenize_turns(tokenizer, EOS_TOKEN_ID)({"text": [r["text"] for r in raw.train],
                                                                  "assistant_spans": [r["assistant_spans"] for r in raw.train]})
    ids = [int(token) for row in tokens["input_ids"] for token in row]
    labels = [token if trained else -100 for token, trained in zip(ids, [t for row in tokens["trained"] for t in row])]
    assert tokenizer.decode(ids, skip_special_tokens=False) == (chatml(conversation) + EOS_TOKEN + chatml(asked) + EOS_TOKEN) * 3
    trained = tokenizer.decode([token for token, label in zip(ids, labels) if label != -100], skip_special_tokens=False)
    assert trained == "4<|im_end|>\n6<|im_end|>\n<|endoftext|>" * 3
    # blocks of one token: those of the trained tokens, the others dropped (nothing in them to learn)
    packed = pack_datasets(raw, tokenizer, block_size=1, args=args)
    blocks = [block for split in (packed.validation or [], packed.train) for block in split]
    assert [block["labels"][0] for block in blocks] == [block["input_ids"][0] for block in blocks] == [
        label for label in labels if label != -100]
    # eval_nats_per_char divides by the characters of the predicted (trained) tokens only
    one_block = Dataset.from_dict({"input_ids": [ids], "labels": [labels]})
    assert characters_per_token(one_block, tokenizer) == len("4\n6\n" * 3) / sum(label != -100 for label in labels)


def test_assistant_only_loss_edges_found_in_review(tmp_path, tokenizer):
    """A block without any trained token is dropped (its loss was 0/0: the run stopped on a NaN); a template's
    {% generation %} marks are used as transformers' assistant mask is; an assistant turn first with a template that
    reads messages[0] (Qwen's, Llama 3's) is found; a template that ends a turn with the end-of-document token gets
    no second one."""
    long_question = [{"role": "user", "content": "word " * 60}, {"role": "assistant", "content": "ok"}]
    path = write(tmp_path / "long.jsonl", "".join(json.dumps({"messages": long_question}) + "\n" for _ in range(6)))
    args = DataArguments(train_file=[path], assistant_only_loss=True, validation_split_percentage=0)
    blocks = pack_datasets(load_raw_data(args), tokenizer, block_size=8, args=args).train
    assert blocks.num_rows and all(any(label != -100 for label in labels) for labels in blocks["labels"])

    conversation = [{"role": "assistant", "content": "Hi, ask me."}, {"role": "user", "content": "2 + 2?"},
                    {"role": "assistant", "content": "4"}]
    tagged = copy.deepcopy(tokenizer)
    tagged.chat_template = ("{{ messages[0]['role'] }}|{% for m in messages %}{{ m['role'] }}: {% if m['role'] == 'assistant' %}"
                            "{% generation %}{{ m['content'] }}{{ eos_token }}{% endgeneration %}{% else %}{{ m['content'] }}"
                            "{% endif %}{% endfor %}")
    expected = {  # with the tags, transformers' mask: the tagged text alone; without, what each turn adds
        "tags": f"Hi, ask me.{EOS_TOKEN}4{EOS_TOKEN}",
        "no tags": f"assistant|assistant: Hi, ask me.{EOS_TOKEN}assistant: 4{EOS_TOKEN}",  # (the first from the start)
    }
    path = write(tmp_path / "first.jsonl", json.dumps({"messages": conversation}) + "\n")
    for case, template in (("tags", tagged.chat_template),
                           ("no tags", tagged.chat_template.replace("{% generation %}", "").replace("{% endgeneration %}", ""))):
        tagged.chat_template = template
        args = DataArguments(train_file=[path], assistant_only_loss=True, validation_split_percentage=0)
        raw = load_raw_data(args, ChatTemplate.of(tagged, "T"))
        tokens = data_module._tokenize_turns(tagged, EOS_TOKEN_ID)(raw.train[:1])
        ids, trained = tokens["input_ids"][0].tolist(), tokens["trained"][0].tolist()
        # the text ends with the end-of-document token already: no second one
        assert tagged.decode(ids, skip_special_tokens=False) == raw.train["text"][0] == tagged.apply_chat_template(
            conversation, tokenize=False) and raw.train["text"][0].endswith(EOS_TOKEN) and ids[-2] != EOS_TOKEN_ID
        assert tagged.decode([token for token, keep in zip(ids, trained) if keep], skip_special_tokens=False) == expected[case]


def test_assistant_only_loss_refuses_text_and_a_template_whose_beginnings_differ_from_the_whole(tmp_path):
    text = write(tmp_path / "a.txt", "x = 1\n")
    with pytest.raises(ValueError, match="--assistant_only_loss trains on the assistant's turns.*plain-text files hold none"):
        load_raw_data(DataArguments(train_file=[text], assistant_only_loss=True))
    with pytest.raises(ValueError, match="--assistant_only_loss .* the default corpus holds none"):
        check_data_arguments(DataArguments(assistant_only_loss=True))
    chat = write(tmp_path / "c.jsonl", json.dumps({"messages": CONVERSATIONS[0]}) + "\n")
    with pytest.raises(ValueError, match="--validation_file's plain-text files hold none"):
        check_data_arguments(DataArguments(train_file=[chat], validation_file=[text], assistant_only_loss=True))
    rows = write(tmp_path / "rows.jsonl", json.dumps({"text": "x = 1"}) + "\n")
    with pytest.raises(ValueError, match=r"rows.jsonl'\]'s 'text' holds text"):
        load_raw_data(DataArguments(train_file=[rows], assistant_only_loss=True))
    chats = write(tmp_path / "chat.jsonl", "".join(json.dumps({"messages": c}) + "\n" for c in CONVERSATIONS))
    counting = ChatTemplate("{{ messages | length }} turns: {% for m in messages %}{{ m['content'] }} {% endfor %}", "T")
    with pytest.raises(ValueError, match="template writes the conversation up to turn 1 otherwise than the start"):
        load_raw_data(DataArguments(train_file=[chats], assistant_only_loss=True), counting)


def test_mixed_formats_and_validation_without_training_data_are_errors(tmp_path, caplog):
    txt, jsonl = write(tmp_path / "a.txt", "x"), write(tmp_path / "b.jsonl", '{"text": "x"}\n')
    with pytest.raises(ValueError, match="one format.*'.jsonl', '.txt'"):
        load_raw_data(DataArguments(train_file=[txt, jsonl]))
    with pytest.raises(ValueError, match="--validation_file needs --train_file"):
        load_raw_data(DataArguments(validation_file=[txt]))
    caplog.clear()
    with caplog.at_level("WARNING", logger="archlm.data"):
        load_raw_data(DataArguments(train_file=[txt], max_corpus_mb=1))
    assert "--max_corpus_mb sizes the default corpus (Python's standard library) and is ignored" in caplog.text


def test_dataset_name_loads_a_datasets_folder_with_its_own_validation_split(tmp_path, tokenizer):
    folder = tmp_path / "my_dataset"
    folder.mkdir()
    for split, texts in (("train", SAMPLE_TEXTS * 5), ("validation", SAMPLE_TEXTS[:1] * 5)):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps({"code": t}) + "\n" for t in texts), encoding="utf-8")
    args = DataArguments(dataset_name=str(folder), text_column="code")
    raw = load_raw_data(args)
    assert raw.train.num_rows == 15 and raw.validation.num_rows == 5
    packed = pack_datasets(raw, tokenizer, block_size=1, args=args)
    assert decode_stream(packed.validation, tokenizer) == (SAMPLE_TEXTS[0] + EOS_TOKEN) * 5
    with pytest.raises(ValueError, match="no_such_dataset': no such folder"):
        load_raw_data(DataArguments(dataset_name=str(tmp_path / "no_such_dataset")))


@pytest.mark.parametrize("streaming", [False, True])
def test_dataset_name_loads_a_dataset_dict_saved_with_save_to_disk_after_training_on_one_split(tmp_path, tokenizer,
                                                                                            streaming):
    """Packing a split read on its own leaves datasets' cache files in that split's folder; the whole DatasetDict
    still loads, each split from its own files (reading every .arrow file there failed on the caches' columns)."""
    DatasetDict({"train": Dataset.from_dict({"text": SAMPLE_TEXTS * 3}),
                 "validation": Dataset.from_dict({"text": SAMPLE_TEXTS[:1]})}).save_to_disk(tmp_path / "saved")
    one_split = DataArguments(dataset_name=str(tmp_path / "saved" / "train"))
    pack_datasets(load_raw_data(one_split), tokenizer, block_size=8, args=one_split)
    assert list((tmp_path / "saved" / "train").glob("cache-*.arrow"))  # what made the next load fail
    raw = load_raw_data(DataArguments(dataset_name=str(tmp_path / "saved"), streaming=streaming))
    assert [record["text"] for record in raw.train] == SAMPLE_TEXTS * 3
    assert [record["text"] for record in raw.validation] == SAMPLE_TEXTS[:1]


def test_characters_per_token_counts_the_texts_characters_not_the_end_of_document_tokens(tokenizer):
    """eval_nats_per_char divides by the characters of text the predicted tokens hold: an end-of-document token
    holds none (its name, 13 characters, counted once per document, understated the metric on short records)."""
    first, second = SAMPLE_TEXTS[0], SAMPLE_TEXTS[2]
    ids = tokenizer(first)["input_ids"] + [EOS_TOKEN_ID] + tokenizer(second)["input_ids"] + [EOS_TOKEN_ID]
    assert tokenizer.decode(ids, skip_special_tokens=False) == first + EOS_TOKEN + second + EOS_TOKEN
    characters = len(first) - len(tokenizer.decode(ids[:1])) + len(second)  # the first token is not predicted
    assert characters_per_token(Dataset.from_dict({"input_ids": [ids]}), tokenizer) == characters / (len(ids) - 1)


@pytest.mark.parametrize("streaming", [False, True])
def test_dataset_name_loads_a_single_dataset_saved_with_save_to_disk(tmp_path, streaming):
    Dataset.from_dict({"text": SAMPLE_TEXTS * 3}).save_to_disk(tmp_path / "saved")
    raw = load_raw_data(DataArguments(dataset_name=str(tmp_path / "saved"), streaming=streaming))
    assert [record["text"] for record in raw.train] == SAMPLE_TEXTS * 3 and raw.validation is None
