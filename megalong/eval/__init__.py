"""Evaluation: perplexity (LongLoRA and standard protocols), passkey retrieval, model loading for eval."""

from megalong.eval.loading import load_eval_model
from megalong.eval.passkey import PasskeyReport, run_passkey
from megalong.eval.perplexity import PerplexityResult, evaluate_perplexity

__all__ = ["PasskeyReport", "PerplexityResult", "evaluate_perplexity", "load_eval_model", "run_passkey"]
