"""Samples at exact token lengths: prompt format (base or chat), haystack fitting, needle positions.

    task text ──chat template (user turn) or plain──► + answer prefix ──tokenizer──► prompt ids
    fit n (haystack units) so that  len(prompt ids) + tokens_to_generate <= length < that for n + 1

Chat prompts are the tokenizer's own template with the task as the user turn and the generation
prompt opened, then RULER's answer prefix as the start of the assistant's reply (RULER does the
same with its per-model templates). Base prompts are the task text and the prefix, tokenized with
the tokenizer's special tokens (e.g. a BOS).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from megalong.eval.ruler.tasks import GENERATORS, Rendered, TaskSpec, VariableTracking, sample_seed


class PromptTooShort(ValueError):
    """The requested length cannot hold a task's prompt without any haystack plus its answer budget."""


@dataclass
class Sample:
    """One prompt of the suite and what a correct answer contains."""

    task: str
    length: int
    index: int
    input_ids: list[int]
    expected: list[str]
    max_new_tokens: int
    units: int
    """Haystack units the fit chose (noise sentences, essay words, list words ...)."""
    unit_tokens: int = 0
    """Tokens one more unit would add (the fit's tolerance: prompt + budget is within it of the length)."""
    depths: list[int] = field(default_factory=list)
    """Requested depth (percent of the haystack) of each needle that holds the answer (niah)."""
    needle_positions: list[int] = field(default_factory=list)
    """Token index in the prompt where each answer needle (niah) or chain statement (vt) starts."""
    context_span: tuple[int, int] = (0, 0)
    """Token indices [start, end) of the haystack in the prompt (niah, vt): a needle's measured depth is
    (position - start) / (end - start)."""

    @property
    def prompt_sha(self) -> str:
        return hashlib.sha1(",".join(map(str, self.input_ids)).encode()).hexdigest()[:16]

    def record(self) -> dict:
        """The sample's JSON fields (everything but the prompt ids)."""
        return {"task": self.task, "length": self.length, "index": self.index, "prompt_tokens": len(self.input_ids),
                "units": self.units, "unit_tokens": self.unit_tokens, "depths": self.depths, "needle_positions": self.needle_positions,
                "context_span": list(self.context_span),
                "expected": self.expected, "prompt_sha": self.prompt_sha}


@dataclass
class Generation:
    """What a model (or a reader) answered to one sample."""

    text: str
    ids: list[int] = field(default_factory=list)
    """The generated token ids (empty for rule-based readers)."""


class PromptFormat:
    """Base (completion) or chat prompts for one tokenizer."""

    def __init__(self, tokenizer, chat: bool):
        if chat and not getattr(tokenizer, "chat_template", None):
            raise ValueError("--chat on: the tokenizer has no chat template; use --chat off (completion prompts)")
        self.tokenizer, self.chat = tokenizer, chat

    def text(self, task_text: str, answer_prefix: str) -> str:
        if not self.chat:
            return task_text + answer_prefix
        head = self.tokenizer.apply_chat_template([{"role": "user", "content": task_text}], tokenize=False,
                                                  add_generation_prompt=True)
        return head + answer_prefix

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=not self.chat, verbose=False)["input_ids"])


def fit_units(make_ids: Callable[[int], list[int]], budget: int, hint: int = 0) -> tuple[int, list[int], int]:
    """The largest n whose ``make_ids(n)`` has at most ``budget`` tokens, those ids, and the token count
    of ``make_ids(n + 1)`` (which exceeds the budget: the prompt is within one unit of it).

    Exponential search from ``hint`` (the previous sample's n: usually a few tokenizations), then
    bisection; the token count grows with n (one unit is one sentence, word or list entry)."""
    cache: dict[int, list[int]] = {}

    def fits(n: int) -> bool:
        if n not in cache:
            cache[n] = make_ids(n)
        return len(cache[n]) <= budget

    if not fits(0):
        raise PromptTooShort(f"the prompt without any haystack already has {len(cache[0])} tokens (budget {budget})")
    cap = 8 * budget + 16
    lo, hi = 0, None
    n, step = max(0, min(hint, cap)), max(1, hint // 32)
    if n and fits(n):
        lo = n
    elif n:
        hi = n
        while True:
            n = max(0, n - step)
            if fits(n):
                lo = n
                break
            hi, step = n, step * 2
    if hi is None:
        n = lo
        while True:
            n = min(cap, n + step)
            if not fits(n):
                hi = n
                break
            lo, step = n, step * 2
            if n == cap:
                raise PromptTooShort(f"{cap} haystack units still fit in {budget} tokens; the haystack does not grow")
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo, cache[lo], len(cache[hi])


class SampleBuilder:
    """Builds the samples of one task at one length (keeps the last fit as the next one's hint)."""

    def __init__(self, spec: TaskSpec, length: int, fmt: PromptFormat, *, seed: int = 0,
                 haystack_file: str | None = None, depths: list[float] | None = None):
        self.spec, self.length, self.fmt, self.seed, self.depths = spec, length, fmt, seed, depths
        self.gen = GENERATORS[spec.kind](spec, haystack_file)
        self.budget = length - spec.tokens_to_generate
        self.hint = 0
        self._example_hint = 0
        if self.budget < 1:
            raise PromptTooShort(f"length {length} is not more than {spec.name}'s answer budget "
                                 f"({spec.tokens_to_generate} tokens)")

    def _plan(self, rng: random.Random, index: int) -> dict:
        depth = self.depths[index % len(self.depths)] if self.depths else None
        if self.spec.kind == "fwe":
            return self.gen.plan(rng, depth, length=self.length)
        return self.gen.plan(rng, depth)

    def _render_fn(self, plan: dict) -> Callable[[int], Rendered]:
        if self.spec.kind == "cwe":
            return lambda n: self.gen.render(plan, n, length=self.length)
        if self.spec.kind == "vt":
            example = self._vt_example(plan)
            return lambda n: self.gen.render(plan, n, example=example)
        return lambda n: self.gen.render(plan, n)

    def _vt_example(self, plan: dict) -> str:
        """RULER's in-context example: fitted alone (as a completion prompt) to 500 tokens with its answer."""
        gen: VariableTracking = self.gen
        base = PromptFormat(self.fmt.tokenizer, chat=False)
        n, _, _ = fit_units(lambda k: base.encode(gen.example(plan, k)),
                         gen.EXAMPLE_LENGTH - self.spec.tokens_to_generate, self._example_hint)
        self._example_hint = n
        return gen.example(plan, n)

    def build(self, index: int) -> Sample:
        rng = random.Random(sample_seed(self.seed, self.spec.name, self.length, index))
        plan = self._plan(rng, index)
        render = self._render_fn(plan)
        try:
            n, ids, longer = fit_units(lambda k: self.fmt.encode(self.fmt.text(*self._text_parts(render(k)))), self.budget,
                               self.hint)
        except PromptTooShort as e:
            raise PromptTooShort(f"{self.spec.name} at {self.length} tokens: {e}; ask for a longer length") from None
        self.hint = n
        rendered = render(n)
        full = self.fmt.text(rendered.text, rendered.answer_prefix)
        return Sample(self.spec.name, self.length, index, ids, rendered.expected, self.spec.tokens_to_generate, n,
                      unit_tokens=longer - len(ids), depths=list(plan.get("depths", [])) if self.spec.kind == "niah" else [],
                      needle_positions=self._positions(full, rendered.needles),
                      context_span=self._span(full, rendered.context))

    @staticmethod
    def _text_parts(r: Rendered) -> tuple[str, str]:
        return r.text, r.answer_prefix

    def _span(self, full: str, context: str) -> tuple[int, int]:
        if not context:
            return (0, 0)
        at = full.index(context)
        return (len(self.fmt.encode(full[:at])) if at else 0, len(self.fmt.encode(full[:at + len(context)])))

    def _positions(self, full: str, needles: list[str]) -> list[int]:
        """Token index where each needle starts; every needle must occur exactly once in the prompt."""
        out = []
        for needle in needles:
            count = full.count(needle)
            if count != 1:
                raise RuntimeError(f"{self.spec.name}: needle {needle!r} occurs {count} times in the prompt "
                                   "(expected once); please report this")
            at = full.index(needle)
            out.append(len(self.fmt.encode(full[:at])) if at else 0)
        return out
