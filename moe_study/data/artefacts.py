"""On-disk formats shared between stages: document shards and token shards.

One writer and one reader per format, so producers and consumers cannot drift. Both are Parquet
shard sets with a `manifest.json` that lists every shard with its row count and sha256; the
corpus-level hash (`manifest["sha256"]`) is the hash of the shard list and names the artefact.
Readers stream shard by shard (never the whole corpus) and verify each shard's hash and row
count, so a corrupt or truncated shard is a clear error naming the file, not a wrong result.

Document shards (`work/corpus/docs-NNNNN.parquet`): id (string), source (string), text (string).
Token shards (`work/tokens/tokens-NNNNN.parquet`): doc (int64, position in the corpus), id, source,
n_bytes (int64, UTF-8 bytes of the text; for bits per byte), tokens (list<uint16 | uint32>).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from moe_study.hashing import sha256_file, sha256_json
from moe_study.io import read_json, write_json

DOC_SCHEMA = pa.schema([("id", pa.string()), ("source", pa.string()), ("text", pa.string())])


def token_schema(dtype: str) -> pa.Schema:
    return pa.schema(
        [
            ("doc", pa.int64()),
            ("id", pa.string()),
            ("source", pa.string()),
            ("n_bytes", pa.int64()),
            ("tokens", pa.list_(pa.uint16() if dtype == "uint16" else pa.uint32())),
        ]
    )


def token_dtype(vocab_size: int) -> str:
    """uint16 when every id fits, else uint32."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


class ShardError(ValueError):
    """A shard that is missing, corrupt or truncated (the message names the file)."""


class ShardWriter:
    """Writes `<prefix>-NNNNN.parquet` shards into `directory` and records them for the manifest.

    Shards are written with fixed options (no statistics timestamps, one row group per shard) so
    identical inputs give byte-identical files.
    """

    def __init__(self, directory: Path, prefix: str, schema: pa.Schema) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.schema = schema
        self.shards: list[dict[str, Any]] = []

    def write(self, table: pa.Table, **extra: Any) -> dict[str, Any]:
        table = table.cast(self.schema)
        name = f"{self.prefix}-{len(self.shards):05d}.parquet"
        path = self.dir / name
        pq.write_table(table, path, compression="zstd", row_group_size=max(1, table.num_rows))
        entry = {"file": name, "rows": table.num_rows, "sha256": sha256_file(path), **extra}
        self.shards.append(entry)
        return entry

    def manifest(self, **fields: Any) -> dict[str, Any]:
        """The manifest body: shard list, totals given by the caller, and the artefact hash."""
        return {"shards": self.shards, "sha256": sha256_json(self.shards), **fields}

    def finish(self, **fields: Any) -> dict[str, Any]:
        m = self.manifest(**fields)
        write_json(self.dir / "manifest.json", m)
        return m


def load_manifest(directory: Path | str) -> dict[str, Any]:
    directory = Path(directory)
    m = read_json(directory / "manifest.json")
    if not isinstance(m, dict) or "shards" not in m or "sha256" not in m:
        raise ShardError(f"{directory / 'manifest.json'}: not a shard manifest")
    if sha256_json(m["shards"]) != m["sha256"]:
        raise ShardError(f"{directory / 'manifest.json'}: shard list does not match its sha256")
    return m


def iter_shards(
    directory: Path | str,
    columns: list[str] | None = None,
    verify: bool = True,
    batch_rows: int | None = None,
) -> Iterator[pa.RecordBatch]:
    """Stream the record batches of a shard set in order, checking each shard against the manifest."""
    directory = Path(directory)
    m = load_manifest(directory)
    for s in m["shards"]:
        path = directory / s["file"]
        if not path.exists():
            raise ShardError(f"{path}: listed in manifest.json but missing")
        if verify and sha256_file(path) != s["sha256"]:
            raise ShardError(f"{path}: sha256 differs from manifest.json (corrupt or truncated shard)")
        try:
            pf = pq.ParquetFile(path)
            if pf.metadata.num_rows != s["rows"]:
                raise ShardError(f"{path}: {pf.metadata.num_rows} rows, manifest says {s['rows']}")
            yield from pf.iter_batches(batch_size=batch_rows or 65536, columns=columns)
        except (pa.ArrowInvalid, OSError) as err:
            raise ShardError(f"{path}: unreadable Parquet ({err})") from None
