"""The held-out documents of the split, with their tokens and byte counts.

Shared by evaluate@run (loss, bits per byte) and the tasks stage (zero-shot items), so both score
exactly the same documents: the rows of work/split/split.parquet with split == "heldout", their
tokens streamed from the token shards. `side="validation"` reads the validation split the same way
(evaluate@run scores it for the learning-rate choice; it is never the reported test figure).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from moe_study.data.artefacts import iter_shards
from moe_study.hashing import verify_listed


class HeldoutError(ValueError):
    """A split or token set whose held-out documents cannot be read (names the file)."""


@dataclass
class HeldoutDoc:
    doc: int
    n_bytes: int
    tokens: np.ndarray  # int64 token ids, without EOS


# ------------------------------------------------------------------------------------------- data
def heldout_ids(split_path: Path, side: str = "heldout") -> np.ndarray:
    if not split_path.exists():
        raise HeldoutError(f"{split_path}: missing (run the split stage first)")
    verify_listed(split_path)
    try:
        t = pq.read_table(split_path, columns=["doc", "split"])
    except Exception as err:  # pyarrow raises several types for a bad file
        raise HeldoutError(f"{split_path}: unreadable or lacks columns doc/split ({err})") from None
    mask = pc.equal(t.column("split"), side).to_numpy(zero_copy_only=False)
    ids = np.sort(t.column("doc").to_numpy().astype(np.int64)[mask])
    if len(ids) == 0:
        raise HeldoutError(f"{split_path}: no document has split == {side!r}")
    return ids


def load_heldout(tokens_dir: Path, split_path: Path, side: str = "heldout") -> list[HeldoutDoc]:
    """Held-out (or `side`) docs with their tokens and byte counts, sorted by doc id (streamed shard by shard)."""
    ids = heldout_ids(split_path, side)
    wanted = set(ids.tolist())
    docs: list[HeldoutDoc] = []
    for b in iter_shards(tokens_dir, columns=["doc", "n_bytes", "tokens"]):
        doc = b.column(0).to_numpy().astype(np.int64)
        hit = np.flatnonzero(np.isin(doc, ids))
        if len(hit) == 0:
            continue
        nb = b.column(1).to_numpy()
        toks = b.column(2)
        for i in hit.tolist():
            d = int(doc[i])
            wanted.discard(d)
            docs.append(HeldoutDoc(d, int(nb[i]), np.asarray(toks[i].values.to_numpy(), dtype=np.int64)))
    if wanted:
        raise HeldoutError(f"{split_path}: {len(wanted)} held-out doc(s) are not in the token shards "
                        f"{tokens_dir} (e.g. {sorted(wanted)[:5]}); split and tokens are out of date")
    docs.sort(key=lambda d: d.doc)
    return docs


