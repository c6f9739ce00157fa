"""Offline text for the task suite: the noise sentences, an essay-like haystack, word lists.

    noise   RULER's five sentences ("The grass is green. ..."), repeated
    essay   real English prose that every Python installation ships: the documentation topics of
            ``pydoc_data.topics`` (the text ``help()`` shows; ~65k words, ~100k tokens), in the
            sorted order of their names, whitespace collapsed; or any text file (``--haystack-file``,
            e.g. the Paul Graham essays RULER uses)
    words   English nouns, adjectives and verbs from the ``wonderwords`` package (RULER draws its
            needle keys "adjective-noun" and its common-words lists from the same lists)

RULER splits its essay into sentences with NLTK's punkt model, which needs a download; here a
rule splits after ``.``, ``!`` or ``?`` (and closing quotes/brackets) followed by a space and an
upper-case letter, digit, quote or bracket. A needle therefore lands between two sentences as in
RULER, but abbreviations such as "e.g. Python" may end a sentence early.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
"""RULER's noise haystack (niah_single_1) and the filler of variable tracking."""

_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[A-Z0-9\"'(\[])")


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text`` (whitespace already collapsed), in order; their join with spaces is ``text``
    up to the whitespace at the cuts."""
    out, start = [], 0
    for m in _SENTENCE_END.finditer(text):
        out.append(text[start:m.start()].strip() + text[m.start():m.end()].strip())
        start = m.end()
    tail = text[start:].strip()
    if tail:
        out.append(tail)
    return [s for s in out if s]


@functools.lru_cache(maxsize=4)
def essay_words(path: str | None = None) -> tuple[str, ...]:
    """The essay haystack as words (split on whitespace): ``path``'s text, or Python's documentation topics."""
    if path is None:
        from pydoc_data import topics

        text = " ".join(topics.topics[k] for k in sorted(topics.topics))
    else:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"--haystack-file {path} does not exist")
        text = p.read_text(encoding="utf-8", errors="replace")
    words = tuple(re.sub(r"\s+", " ", text).split(" "))
    words = tuple(w for w in words if w)
    if len(words) < 100:
        raise ValueError(f"the essay haystack {path or 'pydoc_data.topics'} has only {len(words)} words; "
                         "give a text of at least a few thousand words")
    return words


def essay_source(path: str | None) -> str:
    return path or "pydoc_data.topics (Python's documentation)"


@functools.lru_cache(maxsize=1)
def word_lists() -> dict[str, tuple[str, ...]]:
    """``{"nouns", "adjectives", "verbs"}``: sorted, unique, lower-case words of the wonderwords lists."""
    try:
        from importlib import resources

        import wonderwords  # noqa: F401
    except ImportError:
        raise ImportError("the task suite needs the `wonderwords` package (its English word lists): "
                          "pip install wonderwords") from None
    out = {}
    for kind, name in (("nouns", "nounlist.txt"), ("adjectives", "adjectivelist.txt"), ("verbs", "verblist.txt")):
        text = resources.files("wonderwords.assets").joinpath(name).read_text(encoding="utf-8")
        words = {w.strip().lower() for w in text.splitlines()}
        out[kind] = tuple(sorted(w for w in words if w and w.isascii() and re.fullmatch(r"[a-z]+", w)))
    return out
