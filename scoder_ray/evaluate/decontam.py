"""Decontamination by token n-gram overlap, shared by the seed stage and anything that writes data.

A text is contaminated by a benchmark text when at least `threshold` of the benchmark text's distinct
token n-grams also occur in it. Benchmark texts shorter than n tokens are skipped: a 5-token one-liner
like `return len(string)` is common code, not a leak.
"""
from __future__ import annotations

import functools
import re
from collections import defaultdict
from typing import Iterable, Optional

_TOKEN = re.compile(r"[A-Za-z_]\w*|\d+|\S")


def code_tokens(text: str) -> list[str]:
    """Identifiers, numbers and single punctuation characters; whitespace is ignored."""
    return _TOKEN.findall(text)


def ngrams(tokens: list[str], n: int) -> set[str]:
    # Joined strings, not tuples: str hashes are salted per process and this index crosses processes.
    return {"\x1f".join(tokens[i:i + n]) for i in range(len(tokens) - n + 1)}


def shingles(text: str, k: int = 5) -> set[bytes]:
    """Token k-shingles of a text, the MinHash input of every near-duplicate check (seeds, selection, quality)."""
    toks = code_tokens(text)
    return {" ".join(toks[i:i + k]).encode() for i in range(max(1, len(toks) - k + 1))}


@functools.lru_cache(maxsize=4)
def _permutations(num_perm: int):
    from datasketch import MinHash

    return MinHash(num_perm=num_perm, seed=1).permutations


def minhash(tokens: Iterable[bytes], num_perm: int = 128):
    """A seeded MinHash of `tokens` (e.g. `shingles`). Its permutations are drawn once per process: drawing
    them is 0.5 ms, more than hashing a short snippet's shingles."""
    from datasketch import MinHash

    m = MinHash(num_perm=num_perm, seed=1, permutations=_permutations(num_perm))
    m.update_batch(list(tokens))
    return m


class NgramIndex:
    """Inverted index from n-gram to the benchmark texts that contain it."""

    def __init__(self, texts: dict[str, str], n: int = 10, threshold: float = 0.5):
        self.n, self.threshold = n, threshold
        self.sizes: dict[str, int] = {}
        self.postings: dict[str, list[str]] = defaultdict(list)
        for doc_id, text in texts.items():
            grams = ngrams(code_tokens(text), n)
            if not grams:
                continue
            self.sizes[doc_id] = len(grams)
            for g in grams:
                self.postings[g].append(doc_id)
        self.postings = dict(self.postings)

    def best_overlap(self, text: str) -> tuple[Optional[str], float]:
        """The benchmark text with the largest overlap fraction, and that fraction."""
        hits: dict[str, int] = defaultdict(int)
        for g in ngrams(code_tokens(text), self.n):
            for doc_id in self.postings.get(g, ()):
                hits[doc_id] += 1
        if not hits:
            return None, 0.0
        doc_id = max(hits, key=lambda d: (hits[d] / self.sizes[d], d))
        return doc_id, hits[doc_id] / self.sizes[doc_id]

    def contaminated_by(self, text: str) -> Optional[str]:
        doc_id, frac = self.best_overlap(text)
        return doc_id if frac >= self.threshold else None
