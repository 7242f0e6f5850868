"""What the tests of examples/train.py share: a tiny run's flags, the script loaded as a module to call its main()
in this process, the environment of a run in a subprocess, its log, and a handler that collects what it logs."""

import json
import logging
import os
from pathlib import Path

import pytest
import torch
from conftest import TINY_MODEL, load_script

REPO = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = REPO / "examples" / "train.py"
TINY = [
    "--max_corpus_mb", "0.15", "--tokenizer_vocab_size", "300", "--block_size", "32",
    "--per_device_train_batch_size", "4", "--learning_rate", "3e-3", "--logging_steps", "1", "--seed", "0",
    "--peak_tflops", "0.05", "--disable_tqdm", "true", "--sample_prompt", "", "--report_to", "none",
]


train_script = load_script(TRAIN_SCRIPT, "archlm_train_script")


def train(*args: str, callbacks=None) -> Path:
    return Path(train_script.main([*TINY, *args], callbacks=callbacks))


def tiny(*args: str) -> list[str]:
    return ["--config_overrides", TINY_MODEL, *args]


def subprocess_env() -> dict:
    # One thread: on a shared 2-core machine, two OpenMP threads per process are several times slower.
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}


def read_log(folder: Path) -> dict:
    return json.loads((folder / "training_log.json").read_text())


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Records(logging.Handler):
    """Collects what examples/train.py logs (the startup report, the sample, the folder)."""

    def __init__(self, logger: str = "train"):
        super().__init__(level=logging.INFO)
        self.messages, self.logger_name = [], logger

    def emit(self, record):
        self.messages.append(record.getMessage())

    def __enter__(self):
        self.logger = logging.getLogger(self.logger_name)
        self.level = self.logger.level
        self.logger.setLevel(logging.INFO)
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc_info):
        self.logger.removeHandler(self)
        self.logger.setLevel(self.level)

    @property
    def text(self) -> str:
        return "\n".join(self.messages)
