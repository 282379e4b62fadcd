"""Does a text read as the demo's English? Words and word pairs of the demo corpus.

Random weights, a layer run out of order or a stale cache give fragments of
corpus tokens glued into non-words, or words in orders the corpus never has; a
working model trained on the corpus writes its words in its orders. Both shares
are measured over lower-case words (letters, digits, apostrophes).
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from functools import cache

from teeshard.model.demo import corpus_files

_WORD = re.compile(r"[a-z0-9']+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


@cache
def corpus_vocabulary() -> tuple[frozenset[str], frozenset[tuple[str, str]]]:
    vocabulary: set[str] = set()
    pairs: set[tuple[str, str]] = set()
    for path in corpus_files():
        for line in path.read_text().splitlines():
            found = words(line)
            vocabulary.update(found)
            pairs.update(itertools.pairwise(found))
    return frozenset(vocabulary), frozenset(pairs)


@dataclass(frozen=True)
class Sense:
    words: int
    word_share: float  # words of the corpus
    pair_share: float  # adjacent word pairs that occur in the corpus

    def readable(self) -> bool:
        return self.words >= 8 and self.word_share >= 0.95 and self.pair_share >= 0.8


def sense(text: str) -> Sense:
    vocabulary, pairs = corpus_vocabulary()
    found = words(text)
    adjacent = list(itertools.pairwise(found))
    return Sense(
        len(found),
        sum(w in vocabulary for w in found) / max(1, len(found)),
        sum(p in pairs for p in adjacent) / max(1, len(adjacent)),
    )
