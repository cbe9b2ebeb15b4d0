"""Deterministic English-like documents with planted exact and near duplicates.

Why: the dedupe stage, its benchmark and the tiny CI study need a corpus whose duplicates are
*known*, so recall and false removals are measured, not guessed. Real text has unknown duplicates.

The text is sentences drawn from a few-thousand-word vocabulary of pseudo-words with Zipfian
frequencies (a handful of real function words at the top ranks), documents of 30-400 words
(log-uniform), so word 5-gram shingles of two independent originals almost never overlap.

Planted copies always point at an *original* (never at another copy) and always come after it in
document order, so "survivor = lowest index" keeps the original:

- exact: the same text, byte-identical or changed only in ways that normalisation (lowercase,
  collapse whitespace) removes: surrounding whitespace, doubled spaces / line breaks, the case of a
  couple of words.
- near: 2-8% of the words substituted, inserted or deleted in 1-3 contiguous spans. The true
  Jaccard of normalised word n-gram shingles (`jaccard_words`) is computed for each copy and the
  edit is shrunk until it is >= `min_jaccard` (default 0.8), so every planted near duplicate lies
  clearly above the usual 0.7 threshold; `SyntheticCorpus.jaccard` records it.

Everything comes from one `numpy.random.Generator(PCG64(seed))`, so a seed names a corpus.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def _words(s: str) -> tuple[str, ...]:
    return tuple(s.split())


FUNCTION_WORDS = _words(
    "the of and to a in is that for it as was with be by on not he this are or his from at which but "
    "have an they you were her she there one all we their been has would when if so what no more"
)
ONSETS = _words("b c d f g h j k l m n p r s t v w z br ch cl cr dr fl fr gl gr pl pr sh sl sp st str th tr")
VOWELS = _words("a e i o u ai ea ee ia io oa ou y")
CODAS = ["", "", "", "n", "r", "s", "t", "l", "m", "nd", "ng", "rt", "st", "ck", "x"]

KINDS = ("original", "exact", "near")


@dataclass
class SyntheticCorpus:
    ids: list[str]
    texts: list[str]
    dup_of: list[int]  # -1 for originals, else the index of the original this copies
    kind: list[str]  # original | exact | near
    jaccard: list[float] = field(default_factory=list)  # true shingle Jaccard to dup_of (1.0 / nan)

    def __len__(self) -> int:
        return len(self.texts)


def make_vocab(rng: np.random.Generator, size: int = 4000) -> list[str]:
    """Function words first (most frequent ranks), then unique pronounceable pseudo-words."""
    words = list(FUNCTION_WORDS)
    seen = set(words)
    while len(words) < size:
        n_syl = int(rng.integers(1, 4))
        w = "".join(
            ONSETS[rng.integers(len(ONSETS))] + VOWELS[rng.integers(len(VOWELS))] for _ in range(n_syl)
        ) + CODAS[rng.integers(len(CODAS))]
        if w not in seen:
            seen.add(w)
            words.append(w)
    return words


def zipf_cdf(size: int, exponent: float = 1.05) -> np.ndarray:
    p = 1.0 / np.arange(1, size + 1) ** exponent
    c = np.cumsum(p / p.sum())
    c[-1] = 1.0
    return c


def _draw_words(rng: np.random.Generator, cdf: np.ndarray, n: int) -> np.ndarray:
    return np.searchsorted(cdf, rng.random(n), side="right")


def _render(rng: np.random.Generator, vocab: list[str], ids: np.ndarray) -> str:
    """Words -> sentences (capitalised, full stop, the odd comma) -> paragraphs."""
    out: list[str] = []
    i, n, sent_in_par = 0, len(ids), 0
    while i < n:
        m = min(n - i, int(rng.integers(5, 19)))
        words = [vocab[k] for k in ids[i : i + m]]
        words[0] = words[0].capitalize()
        if m > 8 and rng.random() < 0.4:
            c = int(rng.integers(2, m - 2))
            words[c] += ","
        words[-1] += "."
        sent_in_par += 1
        sep = ""
        if out:
            sep = "\n\n" if sent_in_par > 1 and rng.random() < 0.15 else " "
            if sep == "\n\n":
                sent_in_par = 0
        out.append(sep + " ".join(words))
        i += m
    return "".join(out)


def normalise_words(text: str) -> list[str]:
    """The normalisation of the standalone text dedupe: lowercase, split on any whitespace."""
    return text.lower().split()


def shingle_set(words: list[str], ngram: int) -> set[tuple[str, ...]]:
    """Word n-gram shingles; a document shorter than `ngram` is one shingle of all its words."""
    if not words:
        return set()
    if len(words) < ngram:
        return {tuple(words)}
    return {tuple(words[i : i + ngram]) for i in range(len(words) - ngram + 1)}


def jaccard_words(a: str, b: str, ngram: int = 5) -> float:
    sa, sb = shingle_set(normalise_words(a), ngram), shingle_set(normalise_words(b), ngram)
    if not sa and not sb:
        return 1.0
    return len(sa & sb) / len(sa | sb)


def _exact_variant(rng: np.random.Generator, text: str) -> str:
    """A copy that differs only in ways lowercase + whitespace collapsing removes."""
    mode = rng.random()
    if mode < 0.4:
        return text
    if mode < 0.7:
        return ["\n", "  ", "\t", "\n\n"][rng.integers(4)] + text + [" ", "\n", "  \n"][rng.integers(3)]
    words = text.split(" ")
    for _ in range(int(rng.integers(1, 3))):
        k = int(rng.integers(len(words)))
        if mode < 0.85:
            words[k] = words[k] + [" ", "\n"][rng.integers(2)]  # doubled space or a line break
        else:
            words[k] = words[k].upper() if rng.random() < 0.5 else words[k].capitalize()
    return " ".join(words)


def _near_variant(
    rng: np.random.Generator, text: str, vocab: list[str], cdf: np.ndarray, ngram: int, min_jaccard: float
) -> tuple[str, float]:
    """Substitute/insert/delete words in a few contiguous spans; shrink the edit until J >= min_jaccard."""
    words = text.split(" ")
    n = len(words)
    n_edit = max(1, round(float(rng.uniform(0.02, 0.08)) * n))
    n_spans = int(rng.integers(1, 4))
    while True:
        out = list(words)
        spans = min(n_spans, n_edit)
        sizes = np.full(spans, n_edit // spans) + (np.arange(spans) < n_edit % spans)
        # edit from the end backwards so earlier positions stay valid; a 1-word edit of a tiny
        # document lands at its end (the only place that keeps 5-gram Jaccard high)
        starts = np.sort(rng.integers(0, max(1, len(out) - int(sizes.max())) + 1, size=spans))[::-1]
        if n_edit == 1 and n < 4 * ngram:
            starts = np.array([len(out) - 1])
        for s, m in zip(starts, sizes, strict=True):
            s, m = int(s), int(m)
            op = rng.random()
            new = [vocab[k] for k in _draw_words(rng, cdf, m)]
            if op < 0.5:
                out[s : s + m] = new  # substitute
            elif op < 0.75:
                out[s:s] = new  # insert
            elif len(out) > m + 1:
                del out[s : s + m]  # delete
            else:
                out[s : s + m] = new
        cand = " ".join(out)
        j = jaccard_words(text, cand, ngram)
        if j >= min_jaccard and cand != text:
            return cand, j
        if n_edit == 1 and j < min_jaccard:
            # a 1-word substitution at the very end changes one shingle: always >= min_jaccard for
            # documents of >= 30 words; force it for whatever is shorter
            out = list(words)
            out[-1] = vocab[int(_draw_words(rng, cdf, 1)[0])] + "."
            cand = " ".join(out)
            if cand != text:
                return cand, jaccard_words(text, cand, ngram)
        n_edit = max(1, n_edit // 2)


def generate(
    docs: int,
    exact_dup_rate: float,
    near_dup_rate: float,
    seed: int,
    *,
    min_words: int = 30,
    max_words: int = 400,
    vocab_size: int = 4000,
    ngram: int = 5,
    min_jaccard: float = 0.8,
) -> SyntheticCorpus:
    """`docs` documents, of which round(docs*rate) are exact and near copies of earlier originals."""
    if docs <= 0:
        raise ValueError(f"docs must be positive, got {docs}")
    if not (0 <= exact_dup_rate < 1 and 0 <= near_dup_rate < 1):
        raise ValueError(f"duplicate rates must be in [0, 1): exact={exact_dup_rate}, near={near_dup_rate}")
    n_exact, n_near = round(docs * exact_dup_rate), round(docs * near_dup_rate)
    n_orig = docs - n_exact - n_near
    if n_orig < 1:
        raise ValueError(f"exact_dup_rate + near_dup_rate leave no originals among {docs} docs")
    if not 1 <= min_words <= max_words:
        raise ValueError(f"need 1 <= min_words <= max_words, got {min_words}, {max_words}")

    rng = np.random.Generator(np.random.PCG64(seed))
    vocab = make_vocab(rng, vocab_size)
    cdf = zipf_cdf(len(vocab))

    lengths = np.exp(rng.uniform(np.log(min_words), np.log(max_words + 1), size=n_orig)).astype(np.int64)
    lengths = np.clip(lengths, min_words, max_words)
    originals = [_render(rng, vocab, _draw_words(rng, cdf, int(n))) for n in lengths]

    src = rng.integers(0, n_orig, size=n_exact + n_near)  # which original each copy copies
    copy_kind = ["exact"] * n_exact + ["near"] * n_near
    items_text = list(originals)
    items_kind = ["original"] * n_orig
    items_src = list(range(n_orig))
    items_j = [float("nan")] * n_orig
    for s, k in zip(src, copy_kind, strict=True):
        if k == "exact":
            t, j = _exact_variant(rng, originals[s]), 1.0
        else:
            t, j = _near_variant(rng, originals[s], vocab, cdf, ngram, min_jaccard)
        items_text.append(t)
        items_kind.append(k)
        items_src.append(int(s))
        items_j.append(j)

    # positions: a random permutation, then within each group (original + its copies) the
    # original takes the group's smallest position so every copy comes after its original
    pos = rng.permutation(docs)
    first_copy_pos = np.full(n_orig, docs, dtype=np.int64)
    first_copy_item = np.full(n_orig, -1, dtype=np.int64)
    for item in range(n_orig, docs):
        o = items_src[item]
        if pos[item] < first_copy_pos[o]:
            first_copy_pos[o], first_copy_item[o] = pos[item], item
    for o in range(n_orig):
        c = first_copy_item[o]
        if c >= 0 and pos[c] < pos[o]:
            pos[o], pos[c] = pos[c], pos[o]

    order = np.argsort(pos)  # order[p] = item at position p
    where = np.empty(docs, dtype=np.int64)
    where[order] = np.arange(docs)
    texts = [items_text[i] for i in order]
    kinds = [items_kind[i] for i in order]
    dup_of = [-1 if items_kind[i] == "original" else int(where[items_src[i]]) for i in order]
    jac = [items_j[i] for i in order]
    ids = [f"synthetic-{seed}-{p:07d}" for p in range(docs)]
    return SyntheticCorpus(ids=ids, texts=texts, dup_of=dup_of, kind=kinds, jaccard=jac)


def score_dedupe(dup_of: list[int], kind: list[str], keep: np.ndarray, cluster: np.ndarray) -> dict:
    """Quality of a dedupe result on the planted duplicates.

    recall: planted copies that are removed *and* clustered with their original. precision:
    removals that are such copies. false_removal: originals that were removed (each original is
    distinct, so removing one loses data).
    """
    dup = np.asarray(dup_of)
    keep, cluster = np.asarray(keep, dtype=bool), np.asarray(cluster)
    planted = np.flatnonzero(dup >= 0)
    found = ~keep[planted] & (cluster[planted] == cluster[dup[planted]])
    removed = np.flatnonzero(~keep)
    correct = (dup[removed] >= 0) & (cluster[removed] == cluster[np.maximum(dup[removed], 0)])
    originals = np.asarray(kind) == "original"
    return {
        "planted": len(planted),
        "removed": len(removed),
        "recall": float(found.mean()) if len(planted) else 1.0,
        "precision": float(correct.mean()) if len(removed) else 1.0,
        "false_removal": float((~keep[originals]).mean()) if originals.any() else 0.0,
    }


# ------------------------------------------------------------------------------ planted token pairs
def shingle_jaccard(a: np.ndarray, b: np.ndarray, ngram: int) -> float:
    """Exact Jaccard of the n-gram sets of two integer sequences (a sequence shorter than ngram is one shingle)."""
    def grams(x: np.ndarray) -> set[tuple[int, ...]]:
        x = x.tolist()
        return {tuple(x)} if len(x) < ngram else {tuple(x[i:i + ngram]) for i in range(len(x) - ngram + 1)}

    ga, gb = grams(a), grams(b)
    return len(ga & gb) / len(ga | gb) if ga or gb else 1.0


def planted_token_pairs(pairs: int, seed: int, ngram: int = 5, length: tuple[int, int] = (100, 400),
                        vocab: int = 1 << 20, max_edit: float = 0.06) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Originals and near copies as token sequences, with the exact shingle Jaccard of each pair spread
    over about 0.5-1.0: copy = original with a random 0-`max_edit` fraction of its tokens substituted.

    Returns (values, offsets, jaccard): documents 2i (original) and 2i+1 (its copy), in the layout the
    dedupe core reads, and the pairs' exact Jaccard of token n-gram sets (what MinHash estimates).
    Originals draw from a large vocabulary, so two originals share no shingle.
    """
    rng = np.random.Generator(np.random.PCG64(seed))
    docs: list[np.ndarray] = []
    jac = np.empty(pairs)
    for i in range(pairs):
        n = int(rng.integers(length[0], length[1] + 1))
        a = rng.integers(1, vocab, size=n, dtype=np.int64)
        b = a.copy()
        k = int(rng.integers(1, max(2, round(max_edit * n)) + 1))
        pos = rng.choice(n, size=k, replace=False)
        b[pos] = rng.integers(1, vocab, size=k, dtype=np.int64)
        docs += [a, b]
        jac[i] = shingle_jaccard(a, b, ngram)
    offsets = np.zeros(len(docs) + 1, dtype=np.int64)
    np.cumsum([len(d) for d in docs], out=offsets[1:])
    return np.concatenate(docs), offsets, jac
