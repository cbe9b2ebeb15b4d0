"""The synthetic corpus: deterministic, planted copies as documented, originals far apart."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from moe_study.data.synthetic import generate, jaccard_words, normalise_words, shingle_set


@pytest.fixture(scope="module")
def corpus():
    return generate(1500, 0.06, 0.08, seed=11)


def test_deterministic_and_seeded(corpus):
    again = generate(1500, 0.06, 0.08, seed=11)
    assert again.texts == corpus.texts and again.ids == corpus.ids and again.dup_of == corpus.dup_of
    other = generate(1500, 0.06, 0.08, seed=12)
    assert other.texts != corpus.texts


def test_counts_and_links(corpus):
    kinds = Counter(corpus.kind)
    assert kinds == {"original": 1500 - 90 - 120, "exact": 90, "near": 120}
    assert len(set(corpus.ids)) == len(corpus) == 1500
    for i, (d, k) in enumerate(zip(corpus.dup_of, corpus.kind, strict=True)):
        if k == "original":
            assert d == -1
        else:  # a copy points at an earlier original, never at another copy
            assert 0 <= d < i and corpus.kind[d] == "original"


def test_exact_copies_equal_after_normalisation(corpus):
    ex = [i for i, k in enumerate(corpus.kind) if k == "exact"]
    assert all(normalise_words(corpus.texts[i]) == normalise_words(corpus.texts[corpus.dup_of[i]]) for i in ex)
    # and some of them differ in raw bytes (whitespace / case), so normalisation is exercised
    assert sum(corpus.texts[i] != corpus.texts[corpus.dup_of[i]] for i in ex) > len(ex) // 4


def test_near_copies_are_close_but_not_equal(corpus):
    near = [i for i, k in enumerate(corpus.kind) if k == "near"]
    js = np.array([jaccard_words(corpus.texts[i], corpus.texts[corpus.dup_of[i]]) for i in near])
    assert js.min() >= 0.8, js.min()
    np.testing.assert_allclose(js, [corpus.jaccard[i] for i in near])
    assert (js < 1.0).mean() > 0.9  # they really are edited
    changed = [len(normalise_words(corpus.texts[i])) != len(normalise_words(corpus.texts[corpus.dup_of[i]]))
               or corpus.texts[i] != corpus.texts[corpus.dup_of[i]] for i in near]
    assert all(changed)


def test_lengths_and_originals_far_apart(corpus):
    orig = [i for i, k in enumerate(corpus.kind) if k == "original"]
    n_words = np.array([len(corpus.texts[i].split()) for i in orig])
    assert n_words.min() >= 30 and n_words.max() <= 400 and n_words.std() > 50
    # every pair of originals sharing any 5-gram shingle, via an inverted index: J stays tiny
    owner: dict[tuple, int] = {}
    shared: Counter = Counter()
    sets = {i: shingle_set(normalise_words(corpus.texts[i]), 5) for i in orig}
    for i in orig:
        for s in sets[i]:
            j = owner.setdefault(s, i)
            if j != i:
                shared[(j, i)] += 1
    worst = max((c / len(sets[a] | sets[b]) for (a, b), c in shared.items()), default=0.0)
    assert worst < 0.1, worst


def test_bad_arguments():
    with pytest.raises(ValueError, match="no originals"):
        generate(10, 0.5, 0.5, 0)
    with pytest.raises(ValueError, match="positive"):
        generate(0, 0.1, 0.1, 0)
    with pytest.raises(ValueError, match="rates"):
        generate(10, -0.1, 0.1, 0)
