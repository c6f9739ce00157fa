"""megalong: extend the context window of pretrained LLMs with LongLoRA, on DeepSpeed."""

__version__ = "0.1.0"
