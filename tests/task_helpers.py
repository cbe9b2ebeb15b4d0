"""Small deterministic texts, a BPE tokenizer trained on them, and two stand-in models for the task tests.

`PrefixOracle` has memorised every document: given a row that starts with EOS and follows a
document, it predicts that document's next token with near certainty, and is uniform elsewhere.
Scored correctly, it gets every cloze and choice item right; any mix-up of labels, offsets or
normalisation shows as a lower accuracy.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from moe_study.accounting import Architecture
from moe_study.data.tokenizer import for_documents, new_tokenizer
from moe_study.model.lm import build_model, save_model

EOS = 0
WORDS = [
    "the", "cat", "dog", "sat", "ran", "over", "under", "quick", "lazy", "brown", "fox", "jumps", "house",
    "garden", "river", "stone", "bright", "dark", "morning", "evening", "silver", "window", "table",
    "candle", "winter", "summer",
]


def make_texts(n: int = 40, seed: int = 0) -> list[tuple[int, str]]:
    rng = np.random.default_rng(seed)
    out = []
    for d in range(n):
        sents = []
        for _ in range(int(rng.integers(2, 6))):
            ws = [WORDS[i] for i in rng.integers(len(WORDS), size=int(rng.integers(5, 12)))]
            sents.append(" ".join(ws).capitalize() + rng.choice([".", ".", "!", "?"]))
        out.append((d, " ".join(sents)))
    return out


def make_tokenizer(texts: list[tuple[int, str]], vocab: int = 300) -> Any:
    from tokenizers import pre_tokenizers, trainers

    tok = new_tokenizer()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([t for _, t in texts], trainer)
    return for_documents(tok)


def tiny_arch(seq_len: int = 48) -> Architecture:
    return Architecture(kind="dense", d_model=16, n_layers=1, n_heads=2, seq_len=seq_len, ffn_hidden=32)


def random_model(vocab: int, seq_len: int = 48, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(tiny_arch(seq_len), vocab).eval()


def save_random_model(directory: Path, vocab: int, seq_len: int = 48) -> Path:
    model = random_model(vocab, seq_len)
    save_model(model, directory, {"arch": tiny_arch(seq_len).to_dict(), "vocab_size": vocab, "eos_id": EOS})
    return directory


class PrefixOracle(torch.nn.Module):
    def __init__(self, docs: list[list[int]], vocab: int, seq_len: int = 4096) -> None:
        super().__init__()
        self.arch = SimpleNamespace(seq_len=seq_len)
        self.vocab = vocab
        self.next: dict[tuple[int, ...], int] = {}
        for ids in docs:
            seq = [EOS, *ids, EOS]
            for t in range(1, len(seq)):
                self.next[tuple(seq[:t])] = seq[t]

    def forward(self, idx: torch.Tensor) -> SimpleNamespace:
        logits = torch.zeros(*idx.shape, self.vocab)
        for b, row in enumerate(idx.tolist()):
            for t in range(len(row)):
                nxt = self.next.get(tuple(row[:t + 1]))
                if nxt is not None:
                    logits[b, t, nxt] = 30.0
        return SimpleNamespace(logits=logits)


class Uniform(torch.nn.Module):
    def __init__(self, vocab: int, seq_len: int) -> None:
        super().__init__()
        self.arch = SimpleNamespace(seq_len=seq_len)
        self.vocab = vocab

    def forward(self, idx: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=torch.zeros(*idx.shape, self.vocab))
