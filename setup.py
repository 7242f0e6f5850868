"""ArchLM: decoder-only language models whose architecture is chosen by configuration.

Install for development (torch first, pinned, so pip takes the CPU build):
    pip install torch==2.13.0 -c constraints.txt && pip install -e ".[dev]" -c constraints.txt
"""

from setuptools import find_packages, setup

setup(
    name="archlm",
    version="0.1.0",
    description="Hugging Face transformers-compatible decoder-only LMs with a configurable architecture",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["archlm", "archlm.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.6,<2.14",
        "transformers>=5.23,<5.24",
        "safetensors>=0.6",
        "tokenizers>=0.22",
        "huggingface_hub>=1.0",
        "accelerate>=1.10",
        "datasets>=4.0",
        "peft>=0.18",
        "tqdm>=4.66",
        "matplotlib>=3.8",
        "psutil>=5.9",
    ],
    extras_require={
        "dev": ["pytest>=8", "pytest-timeout>=2.3", "pytest-xdist>=3.5", "hypothesis>=6.100", "tensorboard>=2.18"],
        "deepspeed": ["deepspeed>=0.17"],
        "wandb": ["wandb>=0.19"],
        "tensorboard": ["tensorboard>=2.18"],
        # the clients: lm-evaluation-harness (examples/evaluate.py), transformers serve and the openai client
        "eval": ["lm_eval>=0.4.9"],
        "serve": ["transformers[serving]>=5.23,<5.24", "openai>=1.98"],
        # GGUF files for llama.cpp; llama-cpp-python (their check by llama.cpp itself) compiles llama.cpp on install,
        # ~30 minutes on one core, so `make` leaves it out and its tests skip without it
        "gguf": ["gguf>=0.10"],
        "llamacpp": ["llama-cpp-python>=0.3"],
        # int8 weight-only inference through transformers' TorchAoConfig (benchmarks/quantized.py)
        "quantize": ["torchao>=0.18"],
    },
)
