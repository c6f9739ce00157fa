"""A RULER-style long-context task suite (Hsieh et al. 2024): does a model use its context?

    tasks.py    the tasks (needles, variable tracking, common/frequent words) as RULER defines them
    text.py     offline text: noise sentences, Python's documentation as the essay haystack, word lists
    prompts.py  samples at exact token lengths (base or chat prompts, haystack fitting, needle positions)
    generate.py greedy answers: batched KV-cached generate on one device, or under sequence parallelism
    readers.py  rule-based readers that check the suite (oracle, random, last-K-tokens window)
    score.py    RULER's string match, averages, effective length
    suite.py    the resumable runner and results.json / samples.jsonl
    report.py   the table and heat-maps

Entry point: tools/ruler.py.
"""

from megalong.eval.ruler.prompts import Generation, PromptFormat, Sample, SampleBuilder
from megalong.eval.ruler.score import RULER_THRESHOLD, effective_length, score_sample
from megalong.eval.ruler.suite import SuiteConfig, SuiteError, run_suite
from megalong.eval.ruler.tasks import TASKS, TaskSpec

__all__ = ["RULER_THRESHOLD", "TASKS", "Generation", "PromptFormat", "Sample", "SampleBuilder", "SuiteConfig",
           "SuiteError", "TaskSpec", "effective_length", "run_suite", "score_sample"]
