"""Rule-based "models" that check the suite itself: they answer from the prompt text by rule.

    OracleReader     returns the expected answer               -> 100 on every task
    RandomReader     returns random words and numbers          -> about 0
    WindowReader(K)  reads only the last K prompt tokens and answers by rule (find the queried
                     needles, follow the variable chain, count the list words) -> 100 while
                     everything it needs is inside the window, 0 for needles deeper than K

A window as long as the prompt scoring 100 shows every prompt holds its answer exactly (and no
distractor passes for it); a short window failing exactly the deep needles shows the suite
measures the use of context. A reader is called like a model generator: ``reader(samples)``
returns one :class:`Generation` per sample.
"""

from __future__ import annotations

import random
import re
from collections import Counter

from megalong.eval.ruler.prompts import Generation, Sample
from megalong.eval.ruler.tasks import TASKS
from megalong.eval.ruler.text import word_lists


class OracleReader:
    def __call__(self, samples: list[Sample]) -> list[Generation]:
        return [Generation(" " + ", ".join(s.expected)) for s in samples]


class RandomReader:
    def __init__(self, seed: int = 0):
        self.rng = random.Random(seed)
        lists = word_lists()
        self.words = lists["nouns"] + lists["adjectives"] + lists["verbs"]

    def __call__(self, samples: list[Sample]) -> list[Generation]:
        out = []
        for _ in samples:
            words = [self.rng.choice(self.words) for _ in range(10)]
            numbers = [str(self.rng.randint(10**6, 10**7 - 1)) for _ in range(3)]
            out.append(Generation(" " + " ".join(words + numbers)))
        return out


_NEEDLE = re.compile(r"One of the special magic \w+ for (\S+) is: (\S+?)\.(?:\s|$)")
_QUERY = re.compile(r"special magic \w+ for ([^?\n]+?) mentioned in the provided text (?:is|are)\s*$")
_VT_QUERY = re.compile(r"are assigned the value (\d+), they are:\s*$")
_VT_STATEMENT = re.compile(r"VAR ([A-Z]+) = (?:VAR ([A-Z]+)|(\d+))")


class WindowReader:
    """Answers from the decoded last ``window`` tokens of each prompt only."""

    def __init__(self, tokenizer, window: int):
        self.tokenizer, self.window = tokenizer, window

    def __call__(self, samples: list[Sample]) -> list[Generation]:
        out = []
        for s in samples:
            text = self.tokenizer.decode(s.input_ids[-self.window:], skip_special_tokens=True)
            kind = TASKS[s.task].kind if s.task in TASKS else s.task.split("_")[0]
            out.append(Generation(" " + getattr(self, f"_{kind}")(text)))
        return out

    @staticmethod
    def _niah(text: str) -> str:
        m = _QUERY.search(text.strip())
        if m is None:
            return ""
        keys = [k.strip() for k in re.split(r",\s*(?:and\s+)?", m.group(1)) if k.strip()]
        found: dict[str, list[str]] = {}
        for key, value in _NEEDLE.findall(text):
            found.setdefault(key, []).append(value)
        return ", ".join(v for k in keys for v in found.get(k, []))

    @staticmethod
    def _vt(text: str) -> str:
        m = _VT_QUERY.search(text.strip())
        if m is None:
            return ""
        holders: list[str] = []
        edges = _VT_STATEMENT.findall(text)
        holders += [name for name, _, value in edges if value == m.group(1)]
        grew = True
        while grew:
            grew = False
            for name, src, _ in edges:
                if src in holders and name not in holders:
                    holders.append(name)
                    grew = True
        return " ".join(holders)

    @staticmethod
    def _cwe(text: str) -> str:
        parts = text.split("Question: What are the")
        if len(parts) < 2:
            return ""
        main = parts[-2].split("Memorize the ones that appear most often.")[-1]
        counts = Counter(re.findall(r"\d+\. ([a-z]+)", main))
        return " ".join(f"{i + 1}. {w}" for i, (w, _) in enumerate(counts.most_common(10)))

    @staticmethod
    def _fwe(text: str) -> str:
        body = text.split("Find the three most frequently appeared coded words.")[-1].split("\nQuestion:")[0]
        counts = Counter(w for w in body.split() if w != "...")
        return " ".join(w for w, _ in counts.most_common(3))
