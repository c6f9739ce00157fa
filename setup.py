"""megalong: LongLoRA context extension on DeepSpeed, from one CPU to many GPU nodes."""

from setuptools import find_packages, setup

setup(
    name="megalong",
    version="0.1.0",
    description="Extend the context window of pretrained LLMs with LongLoRA (S2-Attn, LoRA+, PI) on DeepSpeed",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megalong", "megalong.*"]),
    package_data={"megalong": ["py.typed"]},
    install_requires=[
        # Install torch yourself first (a CPU or CUDA build to match your machine);
        # this range only states what megalong is tested with.
        "torch>=2.5",
        "deepspeed>=0.17,<0.20",
        "transformers>=5.0,<6",
        "peft>=0.17",
        "sentencepiece>=0.2",
        "tokenizers>=0.21",
        "numpy>=1.24",
        "pyyaml>=6",
        "safetensors>=0.4",
        "tqdm>=4.60",
        "wonderwords>=2.2",  # English word lists for the task suite (megalong.eval.ruler)
    ],
    extras_require={
        "flash": ["flash-attn>=2.6"],
        "parquet": ["pyarrow>=14"],
        "plot": ["matplotlib>=3.7"],
        "gguf": ["gguf>=0.10"],
        "tensorboard": ["tensorboard>=2.14"],
        "dev": ["pytest>=8", "ruff>=0.6", "pyarrow>=14", "matplotlib>=3.7", "mistral-common>=1.5", "gguf>=0.10"],
    },
)
