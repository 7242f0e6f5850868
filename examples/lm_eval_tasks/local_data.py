"""Loads the example tasks' data from the JSON-lines files beside this module, offline.

lm-evaluation-harness calls a task's `custom_dataset` (named in its YAML with `!function local_data.NAME`) instead
of `datasets.load_dataset`, with the task's metadata as keyword arguments, which these loaders ignore.
"""

import json
from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


def _test_split(file_name: str) -> datasets.DatasetDict:
    with open(HERE / file_name, encoding="utf-8") as lines:
        rows = [json.loads(line) for line in lines if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def python_snippets(**_metadata) -> datasets.DatasetDict:
    """Eight short Python functions and classes, one per row (`text`)."""
    return _test_split("python_snippets.jsonl")


def python_next_line(**_metadata) -> datasets.DatasetDict:
    """Sixteen code prefixes (`context`), four continuations each (`choices`), the correct one's index (`label`)."""
    return _test_split("python_next_line.jsonl")
