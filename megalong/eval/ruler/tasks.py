"""RULER's synthetic tasks (Hsieh et al. 2024, NVIDIA/RULER ``scripts/synthetic.yaml``), generated offline
with the evaluated model's own tokenizer at exact token lengths.

    one sample = plan (every random choice, drawn once from the sample's own seed)
               + render(plan, n)  (n haystack units: noise sentences, essay words, distractor needles,
                                   list words ...; more units, more tokens)
    the suite fits n so that  prompt tokens + tokens_to_generate <= length  and n + 1 would not fit,
    so a prompt is at most one haystack unit shorter than ``length - tokens_to_generate``.

| task            | haystack | needles (key -> value)         | asks for                       |
|-----------------|----------|--------------------------------|--------------------------------|
| niah_single_1   | noise    | 1: word -> 7-digit number      | the value                      |
| niah_single_2   | essay    | 1: word -> number              | the value                      |
| niah_single_3   | essay    | 1: word -> UUID                | the value                      |
| niah_multikey_1 | essay    | 4: word -> number (3 distract) | the queried key's value        |
| niah_multikey_2 | needles  | 1 among word -> number needles | the value                      |
| niah_multikey_3 | needles  | 1 among UUID -> UUID needles   | the value                      |
| niah_multivalue | essay    | 1 key, 4 values                | all 4 values                   |
| niah_multiquery | essay    | 4 keys                         | the values of all 4 keys       |
| vt              | noise    | 1 chain of 4 hops VAR B = VAR A| every variable holding X       |
| cwe             | list     | 10 words x30 among others x3   | the 10 most common words       |
| fwe             | coded    | Zipf(2) counts of coded words  | the 3 most frequent            |

Prompts, needle and answer-prefix wording are RULER's (so scores are comparable); where this
differs from RULER (sentence splitting, needle depths from RULER's 40-point grid for every
haystack, the variable-tracking and common-words few-shot examples placed inside the user turn,
the word sources, no QA tasks) is stated in docs/DESIGN.md ("Task suite").
"""

from __future__ import annotations

import hashlib
import random
import string
import uuid
from dataclasses import dataclass, field
from typing import Any

from megalong.eval.ruler.text import NOISE, essay_words, split_sentences, word_lists

DEPTHS = tuple(int(round(100 * i / 39)) for i in range(40))
"""RULER's needle depths in percent: 40 points from 0 to 100."""


@dataclass(frozen=True)
class TaskSpec:
    """One task: its kind and RULER's complexity settings for it."""

    name: str
    kind: str
    """``niah``, ``vt`` (variable tracking), ``cwe`` (common words) or ``fwe`` (frequent words)."""
    tokens_to_generate: int
    """Answer budget: counted into the length (prompt + this <= length) and the most tokens decoded."""
    haystack: str = "essay"
    """niah: ``noise`` (repeated sentences), ``essay`` (real prose) or ``needle`` (distractor needles)."""
    key: str = "words"
    """niah key kind: ``words``, ``numbers`` or ``uuids``."""
    value: str = "numbers"
    """niah value kind: ``words``, ``numbers`` or ``uuids``."""
    num_keys: int = 1
    num_values: int = 1
    num_queries: int = 1
    num_chains: int = 1
    num_hops: int = 4
    freq_cw: int = 30
    freq_ucw: int = 3
    num_cw: int = 10
    alpha: float = 2.0
    coded_wordlen: int = 6
    metric: str = "all"
    """Scoring: ``all`` (fraction of the expected strings found) or ``part`` (any one found)."""

    @property
    def category(self) -> str:
        return {"niah": "retrieval", "vt": "multi-hop tracing", "cwe": "aggregation", "fwe": "aggregation"}[self.kind]


def _niah(name: str, haystack: str, key: str = "words", value: str = "numbers", **kw) -> TaskSpec:
    return TaskSpec(name, "niah", 128, haystack=haystack, key=key, value=value, **kw)


TASKS: dict[str, TaskSpec] = {t.name: t for t in (
    _niah("niah_single_1", "noise"),
    _niah("niah_single_2", "essay"),
    _niah("niah_single_3", "essay", value="uuids"),
    _niah("niah_multikey_1", "essay", num_keys=4),
    _niah("niah_multikey_2", "needle"),
    _niah("niah_multikey_3", "needle", key="uuids", value="uuids"),
    _niah("niah_multivalue", "essay", num_values=4),
    _niah("niah_multiquery", "essay", num_queries=4, num_keys=4),
    TaskSpec("vt", "vt", 30),
    TaskSpec("cwe", "cwe", 120),
    TaskSpec("fwe", "fwe", 50),
)}
"""RULER's 13 tasks less the two QA tasks (they need SQuAD / HotpotQA from a hub)."""

NEEDLE = "One of the special magic {kind} for {key} is: {value}."


@dataclass
class Rendered:
    """A sample's task text for ``n`` haystack units (before the chat template / answer prefix)."""

    text: str
    answer_prefix: str
    expected: list[str]
    needles: list[str] = field(default_factory=list)
    """The needle sentences that hold the answer (niah) or the chain (vt), as they appear in ``text``."""
    context: str = ""
    """The haystack with its needles, as it appears in ``text`` (depths are relative to it)."""


def sample_seed(seed: int, task: str, length: int, index: int) -> int:
    """A stable seed for one sample: the same (seed, task, length, index) always draws the same sample."""
    digest = hashlib.sha256(f"ruler:{seed}:{task}:{length}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def _sub_rng(base: int, tag: str) -> random.Random:
    return random.Random(int.from_bytes(hashlib.sha256(f"{base}:{tag}".encode()).digest()[:8], "little"))


# ------------------------------------------------------------------------------------------ needles
def _random_item(rng: random.Random, kind: str) -> str:
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    if kind == "words":
        lists = word_lists()
        return f"{rng.choice(lists['adjectives'])}-{rng.choice(lists['nouns'])}"
    raise ValueError(f"needle kind {kind!r} is not one of numbers, words, uuids")


def _distinct(rng: random.Random, kind: str, count: int, avoid: set[str]) -> list[str]:
    out: list[str] = []
    while len(out) < count:
        item = _random_item(rng, kind)
        if item not in avoid and item not in out:
            out.append(item)
    return out


def _insert(units: list[str], inserts: list[str], fractions: list[float]) -> list[str]:
    """``units`` with ``inserts[i]`` placed before unit ⌊len(units) · fractions[i]⌋ (fractions ascending)."""
    out, last = [], 0
    for item, frac in zip(inserts, fractions):
        pos = int(len(units) * frac)
        out.extend(units[last:pos])
        out.append(item)
        last = pos
    out.extend(units[last:])
    return out


def _join_query(keys: list[str]) -> str:
    return keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + ", and " + keys[-1]


class Niah:
    """Needle in a haystack: single, multi-key (distractors), multi-value, multi-query."""

    def __init__(self, spec: TaskSpec, haystack_file: str | None = None):
        self.spec, self.haystack_file = spec, haystack_file

    def plan(self, rng: random.Random, depth: float | None = None) -> dict[str, Any]:
        s = self.spec
        n_keys = max(s.num_keys, s.num_queries)
        keys = _distinct(rng, s.key, n_keys, set())
        values = _distinct(rng, s.value, n_keys * s.num_values, set(keys))
        by_key = [values[i * s.num_values:(i + 1) * s.num_values] for i in range(n_keys)]
        needles = [(k, v) for k, vs in zip(keys, by_key) for v in vs]
        rng.shuffle(needles)
        depths = sorted(rng.sample(DEPTHS, len(needles)))
        queried = rng.sample(range(n_keys), s.num_queries)
        if depth is not None and len(needles) == 1:
            depths = [int(round(100 * depth))]
        return {"keys": keys, "values": by_key, "needles": needles, "depths": depths, "queried": queried,
                "seed": rng.getrandbits(63)}

    def _distractors(self, plan: dict, count: int) -> list[str]:
        """``count`` needle sentences with other keys and values (the same first ones for every count)."""
        rng = _sub_rng(plan["seed"], "distractors")
        real = set(plan["keys"]) | {v for vs in plan["values"] for v in vs}
        out = []
        for _ in range(count):
            key, value = _distinct(rng, self.spec.key, 1, real)[0], _distinct(rng, self.spec.value, 1, real)[0]
            out.append(NEEDLE.format(kind=self.spec.value, key=key, value=value))
        return out

    def render(self, plan: dict, n: int) -> Rendered:
        s = self.spec
        needles = [NEEDLE.format(kind=s.value, key=k, value=v) for k, v in plan["needles"]]
        fractions = [d / 100 for d in plan["depths"]]
        if s.haystack == "essay":
            words = essay_words(self.haystack_file)
            text = " ".join(words[i % len(words)] for i in range(n))
            context = " ".join(_insert(split_sentences(text), needles, fractions))
        else:
            units = [NOISE] * n if s.haystack == "noise" else self._distractors(plan, n)
            context = "\n".join(_insert(units, needles, fractions))
        queried_keys = [plan["keys"][i] for i in plan["queried"]]
        expected = [v for i in plan["queried"] for v in plan["values"][i]]
        query = _join_query(queried_keys)
        kind = s.value
        if s.num_queries * s.num_values == 1:
            one = kind[:-1]
            text = (f"A special magic {one} is hidden within the following text. Make sure to memorize it. "
                    f"I will quiz you about the {one} afterwards.\n{context}\n"
                    f"What is the special magic {one} for {query} mentioned in the provided text?")
            prefix = f" The special magic {one} for {query} mentioned in the provided text is"
        else:
            text = (f"Some special magic {kind} are hidden within the following text. Make sure to memorize it. "
                    f"I will quiz you about the {kind} afterwards.\n{context}\n"
                    f"What are all the special magic {kind} for {query} mentioned in the provided text?")
            prefix = f" The special magic {kind} for {query} mentioned in the provided text are"
        answer_needles = [NEEDLE.format(kind=kind, key=plan["keys"][i], value=v)
                          for i in plan["queried"] for v in plan["values"][i]]
        return Rendered(text, prefix, expected, answer_needles, context)


class VariableTracking:
    """Multi-hop tracing: ``VAR B = VAR A`` chains in noise; name every variable that holds the value.

    As RULER, one in-context example (3-letter names, fitted to 500 tokens) comes first."""

    TEMPLATE = ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
                "{context}\nQuestion: Find all variables that are assigned the value {query} in the text above.")
    PREFIX = (" Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables "
              "are assigned the value {query}, they are: ")
    EXAMPLE_LENGTH = 500

    def __init__(self, spec: TaskSpec, haystack_file: str | None = None):
        self.spec = spec

    def _chains(self, rng: random.Random, letters: int) -> tuple[list[list[str]], list[list[str]]]:
        s = self.spec
        names: list[str] = []
        while len(names) < s.num_chains * (s.num_hops + 1):
            name = "".join(rng.choices(string.ascii_uppercase, k=letters))
            if name not in names:
                names.append(name)
        chains, var_lists = [], []
        for c in range(s.num_chains):
            vs = names[c * (s.num_hops + 1):(c + 1) * (s.num_hops + 1)]
            value = rng.randint(10000, 99998)
            chains.append([f"VAR {vs[0]} = {value}"] + [f"VAR {vs[j + 1]} = VAR {vs[j]}" for j in range(s.num_hops)])
            var_lists.append(vs)
        return chains, var_lists

    def _one(self, chains, var_lists, fractions, n: int) -> tuple[str, str, list[str], str]:
        units = [NOISE + "\n"] * n
        for chain, fr in zip(chains, fractions):
            units = _insert(units, [c + " " for c in chain], fr)
        context = " ".join(units).replace(". \n", ".\n")
        value = chains[0][0].split("=")[-1].strip()
        text = self.TEMPLATE.format(context=context, query=value)
        prefix = self.PREFIX.format(num_v=self.spec.num_hops + 1, query=value)
        return text, prefix, var_lists[0], context

    def plan(self, rng: random.Random, depth: float | None = None) -> dict[str, Any]:
        chains, var_lists = self._chains(rng, 5)
        fractions = [sorted(rng.random() for _ in chain) for chain in chains]
        ex_chains, ex_vars = self._chains(rng, 3)
        ex_fractions = [sorted(rng.random() for _ in chain) for chain in ex_chains]
        return {"chains": chains, "vars": var_lists, "fractions": fractions, "example": (ex_chains, ex_vars,
                                                                                          ex_fractions)}

    def example(self, plan: dict, n: int) -> str:
        text, prefix, answer, _ = self._one(*plan["example"], n)
        return text + prefix + " ".join(answer) + "\n\n"

    def render(self, plan: dict, n: int, example: str = "") -> Rendered:
        text, prefix, answer, context = self._one(plan["chains"], plan["vars"], plan["fractions"], n)
        return Rendered(example + text, prefix, list(answer), [c for chain in plan["chains"] for c in chain], context)


class CommonWords:
    """Aggregation: a numbered list where 10 words appear ``freq_cw`` times and the others ``freq_ucw``."""

    TEMPLATE = ("Below is a numbered list of words. In these words, some appear more often than others. "
                "Memorize the ones that appear most often.\n{context}\n"
                "Question: What are the {num_cw} most common words in the above list?")
    PREFIX = " Answer: The top {num_cw} words that appear most often in the list are:"

    def __init__(self, spec: TaskSpec, haystack_file: str | None = None):
        self.spec = spec
        lists = word_lists()
        self.words = tuple(sorted(set(lists["nouns"]) | set(lists["adjectives"]) | set(lists["verbs"])))

    def plan(self, rng: random.Random, depth: float | None = None) -> dict[str, Any]:
        order = list(self.words)
        rng.shuffle(order)
        example = rng.sample(self.words, 40)
        return {"order": order, "example": example, "seed": rng.getrandbits(63)}

    def _list(self, words: list[str], freq: int, ufreq: int, seed: int) -> tuple[str, list[str]]:
        common, uncommon = words[:self.spec.num_cw], words[self.spec.num_cw:]
        items = common * freq + uncommon * ufreq
        random.Random(seed).shuffle(items)
        return " ".join(f"{i + 1}. {w}" for i, w in enumerate(items)), common

    def render(self, plan: dict, n: int, length: int = 4096) -> Rendered:
        s = self.spec
        if n > len(plan["order"]):
            raise ValueError(f"cwe needs {n} distinct words at this length; the word lists hold "
                             f"{len(plan['order'])}")
        short = length < 4096  # RULER: fewer repeats below 4k tokens (its examples too)
        ex_n, ex_f, ex_u = (20, 3, 1) if short else (40, 10, 3)
        ex_context, ex_answer = self._list(plan["example"][:ex_n], ex_f, ex_u, plan["seed"] + 1)
        example = (self.TEMPLATE.format(context=ex_context, num_cw=s.num_cw) + self.PREFIX.format(num_cw=s.num_cw)
                   + " " + " ".join(f"{i + 1}. {w}" for i, w in enumerate(ex_answer)))
        freq, ufreq = (6, 1) if short else (s.freq_cw, s.freq_ucw)
        context, common = self._list(plan["order"][:n], freq, ufreq, plan["seed"])
        text = example + "\n" + self.TEMPLATE.format(context=context, num_cw=s.num_cw)
        return Rendered(text, self.PREFIX.format(num_cw=s.num_cw), list(common))


def zeta(alpha: float) -> float:
    """Riemann zeta ζ(alpha), alpha > 1 (direct sum + Euler–Maclaurin tail; error < 1e-12)."""
    if alpha <= 1:
        raise ValueError(f"fwe alpha={alpha} must be > 1")
    m = 1000
    return sum(k ** -alpha for k in range(1, m)) + m ** (1 - alpha) / (alpha - 1) + 0.5 * m ** -alpha \
        + alpha * m ** (-alpha - 1) / 12


class FrequentWords:
    """Aggregation: coded words with Zipf counts; name the 3 most frequent (the top one, '...', is noise)."""

    TEMPLATE = ("Read the following coded text and track the frequency of each coded word. Find the three most "
                "frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please "
                "ignore the dots '....'. What are the three most frequently appeared words in the above coded text?")
    PREFIX = " Answer: According to the coded text above, the three most frequently appeared words are:"

    def __init__(self, spec: TaskSpec, haystack_file: str | None = None):
        self.spec = spec

    def plan(self, rng: random.Random, depth: float | None = None, length: int = 4096) -> dict[str, Any]:
        size = max(8, length // 50)
        vocab: list[str] = []
        seen = set()
        while len(vocab) < size:
            w = "".join(rng.choices(string.ascii_lowercase, k=self.spec.coded_wordlen))
            if w not in seen:
                seen.add(w)
                vocab.append(w)
        vocab.sort()
        rng.shuffle(vocab)
        vocab[0] = "..."
        return {"vocab": vocab, "seed": rng.getrandbits(63)}

    def render(self, plan: dict, n: int) -> Rendered:
        vocab, a = plan["vocab"], self.spec.alpha
        z = zeta(a)
        items = [w for k, w in enumerate(vocab, start=1) for _ in range(int(n * k ** -a / z))]
        random.Random(plan["seed"]).shuffle(items)
        return Rendered(self.TEMPLATE.format(context=" ".join(items)), self.PREFIX, list(vocab[1:4]))


GENERATORS = {"niah": Niah, "vt": VariableTracking, "cwe": CommonWords, "fwe": FrequentWords}


def resolve_tasks(names: list[str] | None) -> list[TaskSpec]:
    """Task specs by name (``all`` or None: every task), in the suite's order."""
    if not names or names == ["all"]:
        return list(TASKS.values())
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise ValueError(f"unknown tasks {unknown}; choose from {', '.join(TASKS)} (or all)")
    return [TASKS[n] for n in names]

