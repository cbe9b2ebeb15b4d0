"""The document table (used by stage `corpus`) (id, source, text) from the sources in params.yaml.

Reads `corpus.sources` in order (Debian packages via `moe_study.data.recipes`, installed Python packages
via `moe_study.data.pypackage`, the user's Parquet / JSONL / plain-text files, or `moe_study.data.synthetic`),
filters documents, and streams them into
`work/corpus/docs-NNNNN.parquet` shards (`moe_study.data.artefacts.DOC_SCHEMA`) plus a `manifest.json`,
and `work/metrics/corpus.json`. Only one shard's worth of documents is ever held in memory.

Rules (each one counted per source, in the manifest and the metrics, never silent):
- skipped: `not_text` (null / non-string text), `empty` (empty or whitespace only), `short`
  (fewer than `corpus.min_chars` characters); JSONL lines that are `blank_line`, `bad_json` or
  `not_an_object`; plain-text files that are `binary_file` (a NUL byte, or mostly undecodable
  bytes and control characters: not text, whatever the extension); `long_line` (a line of more than
  MAX_LINE_CHARS characters: the BPE trainer would treat it as one word and exhaust memory);
  `duplicate_path` (a file reached twice, e.g. through a symlink).
- paths: `**` globs and directories never follow symlinked directories (a link loop cannot
  multiply the corpus); a file that is unreadable (truncated .gz, corrupt Parquet page) or that
  vanishes while being read is an error naming it, with nothing written.
- `max_docs` caps the documents *kept* from a source; reading stops there (`truncated: true`).
- text is normalised: `\r\n`/`\r` -> `\n`, a leading BOM and surrounding whitespace removed.
  Invalid UTF-8 in user files is replaced by U+FFFD and counted (`replaced_invalid_utf8`);
  Debian texts fall back to cp1252/latin-1 per entry or file (counted, see moe_study/data/recipes.py).
- ids are `<source label>:<id within the source>`, so ids never collide across sources; the label
  (the `source` column) is the package name (Debian or Python), the path as written for file sources, `synthetic`
  for generated ones, with `#<i>` appended when two sources would share a label. Within a source,
  ids from an `id_field` must be unique (error otherwise).
- an empty corpus after filtering is an error.

Bad configuration (unknown package, missing file or field, wrong column type) fails before
anything is written, with a message naming the field `corpus.sources[i]...` or the file.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import logging
import os
import re
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from moe_study.cli import progress
from moe_study.config.schema import CorpusConfig, DebianSource, FileSource, PythonPackageSource, SyntheticSource
from moe_study.data.artefacts import DOC_SCHEMA, ShardWriter, iter_shards
from moe_study.data.pypackage import PackageError
from moe_study.data.recipes import CACHE, RecipeError
from moe_study.hashing import sha256_file, sha256_json
from moe_study.io import WORK, atomic_path, write_json
from moe_study.provenance import provenance

log = logging.getLogger("stages.corpus")

OUT = WORK / "corpus"
METRICS = WORK / "metrics" / "corpus.json"
DOCS_PER_SHARD = 50_000
GLOB_CHARS = set("*?[")
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")
_SURROGATE = re.compile("[\ud800-\udfff]")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".ndjson")
MAX_LINE_CHARS = 1_000_000
BINARY_FRACTION = 0.1  # more undecodable bytes / control characters than this: not a text file
_NOT_TEXT = re.compile("[\ufffd\x00-\x08\x0b\x0e-\x1f\x7f]")

Source = DebianSource | FileSource | SyntheticSource | PythonPackageSource


class CorpusError(ValueError):
    """Bad corpus input the user can fix; the message names the field or the file."""


# ------------------------------------------------------------------------------------ per source
@dataclass
class SourceStats:
    """What one source contributed: kept docs/bytes, skips by reason, notes, and its input hash."""

    label: str
    kind: str
    docs: int = 0
    bytes: int = 0
    chars: int = 0
    skipped: Counter = field(default_factory=Counter)
    notes: Counter = field(default_factory=Counter)
    truncated: bool = False
    origin: dict[str, Any] = field(default_factory=dict)  # package version / file list hash / params
    sha256: str = ""

    def summary(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "kind": self.kind,
            "docs": self.docs,
            "bytes": self.bytes,
            "chars": self.chars,
            "skipped": dict(sorted(self.skipped.items())),
            "notes": dict(sorted(self.notes.items())),
            "truncated": self.truncated,
            "origin": self.origin,
            "sha256": self.sha256,
        }


def source_labels(sources: list[Source]) -> list[str]:
    """The `source` column of each source: package name, path as written, or `synthetic`; unique."""
    base = [
        s.package if isinstance(s, DebianSource | PythonPackageSource)
        else s.path if isinstance(s, FileSource) else "synthetic"
        for s in sources
    ]
    counts = Counter(base)
    return [b if counts[b] == 1 else f"{b}#{i}" for i, b in enumerate(base)]


# ------------------------------------------------------------------------------------ file inputs
def resolve_files(src: FileSource, index: int, root: Path) -> list[Path]:
    """The files a file source names (a file, a directory searched recursively, or a glob), sorted."""
    where = f"corpus.sources[{index}].path"
    pattern = src.path if Path(src.path).is_absolute() else str(root / src.path)
    if GLOB_CHARS & set(src.path):
        files = sorted(p for p in _glob(pattern) if p.is_file())
    elif Path(pattern).is_dir():
        files = sorted(
            p for p in Path(pattern).rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(pattern).parts)
        )
        if src.kind == "parquet":
            files = [p for p in files if p.name.endswith(".parquet")]
        elif src.kind == "jsonl":
            files = [p for p in files if p.name.endswith(JSONL_SUFFIXES)]
    elif Path(pattern).is_file():
        files = [Path(pattern)]
    else:
        raise CorpusError(f"{where}: {src.path!r} does not exist (paths are relative to the repo root)")
    if not files:
        raise CorpusError(f"{where}: {src.path!r} matches no {src.kind} files")
    return files


def _glob(pattern: str) -> list[Path]:
    """pathlib's glob from the pattern's literal base: its `**` does not descend into symlinked
    directories (glob.glob's does, so a link to `..` multiplied the corpus)."""
    parts = Path(pattern).parts
    first = next(i for i, part in enumerate(parts) if GLOB_CHARS & set(part))
    base = Path(*parts[:first]) if first else Path(".")
    return list(base.glob(str(Path(*parts[first:]))))


def unique_files(files: list[Path]) -> tuple[list[Path], int]:
    """Each real file once (the first path that reaches it), and how many paths were dropped."""
    seen: set[str] = set()
    out = []
    for p in files:
        real = os.path.realpath(p)
        if real not in seen:
            seen.add(real)
            out.append(p)
    return out, len(files) - len(out)


def _rel(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return path.as_posix()


def files_digest(files: list[Path], root: Path) -> str:
    return sha256_json([[_rel(p, root), sha256_file(p)] for p in files])


def check_parquet(path: Path, src: FileSource, index: int) -> None:
    """Both fields present and the text column a string column, before any row is read."""
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise CorpusError(f"{path}: not a readable Parquet file ({err})") from None
    for name, what in ((src.text_field, "text_field"), (src.id_field, "id_field")):
        if name is not None and name not in schema.names:
            raise CorpusError(
                f"{path}: no column {name!r} (corpus.sources[{index}].{what}); columns: {schema.names}"
            )
    t = schema.field(src.text_field).type
    if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)):
        raise CorpusError(
            f"{path}: column {src.text_field!r} (corpus.sources[{index}].text_field) is {t}, "
            "not a string column"
        )


def iter_parquet(path: Path, src: FileSource, index: int, prefix: str) -> Iterator[tuple[str, Any]]:
    columns = [src.text_field] + ([src.id_field] if src.id_field else [])
    n = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=4096, columns=columns):
        texts = batch.column(src.text_field).to_pylist()
        ids = batch.column(src.id_field).to_pylist() if src.id_field else None
        for j, text in enumerate(texts):
            if ids is not None and ids[j] is None:
                raise CorpusError(
                    f"{path}: row {n}: {src.id_field!r} (corpus.sources[{index}].id_field) is null"
                )
            yield (str(ids[j]) if ids is not None else f"{prefix}{n}"), text
            n += 1


def _decode(raw: bytes, notes: Counter) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        notes["replaced_invalid_utf8"] += 1
        return raw.decode("utf-8", errors="replace")


def iter_jsonl(
    path: Path, src: FileSource, index: int, prefix: str, stats: SourceStats
) -> Iterator[tuple[str, Any]]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                stats.skipped["blank_line"] += 1
                continue
            try:
                rec = json.loads(_decode(raw, stats.notes))
            except json.JSONDecodeError:
                stats.skipped["bad_json"] += 1
                continue
            if not isinstance(rec, dict):
                stats.skipped["not_an_object"] += 1
                continue
            for name, what in ((src.text_field, "text_field"), (src.id_field, "id_field")):
                if name is not None and name not in rec:
                    raise CorpusError(
                        f"{path}:{lineno}: no field {name!r} (corpus.sources[{index}].{what}); "
                        f"fields: {sorted(rec)[:20]}"
                    )
            if src.id_field:
                if rec[src.id_field] is None:
                    raise CorpusError(
                        f"{path}:{lineno}: {src.id_field!r} (corpus.sources[{index}].id_field) is null"
                    )
                yield str(rec[src.id_field]), rec[src.text_field]
            else:
                yield f"{prefix}{lineno}", rec[src.text_field]


def looks_binary(raw: bytes) -> bool:
    """A NUL byte, or more than BINARY_FRACTION of the characters undecodable or control characters."""
    if b"\0" in raw:
        return True
    text = raw.decode("utf-8", errors="replace")
    return len(_NOT_TEXT.findall(text)) > BINARY_FRACTION * max(1, len(text))


def iter_text(path: Path, src: FileSource, name: str, stats: SourceStats) -> Iterator[tuple[str, Any]]:
    raw = path.read_bytes()
    if looks_binary(raw):
        log.warning("%s: skipped, not a text file (binary content)", path)
        stats.skipped["binary_file"] += 1
        return
    text = normalise(_decode(raw, stats.notes))
    if src.split == "file":
        yield name, text
    else:
        for n, para in enumerate(p for p in _PARAGRAPH_BREAK.split(text) if p.strip()):
            yield f"{name}:{n}", para


def iter_files(src: FileSource, index: int, root: Path, stats: SourceStats) -> Iterator[tuple[str, Any]]:
    files, dropped = unique_files(resolve_files(src, index, root))
    if dropped:
        log.warning("%s: %d path(s) reach a file already read (symlinks): counted, read once", src.path, dropped)
        stats.skipped["duplicate_path"] += dropped
    stats.sha256 = files_digest(files, root)
    stats.origin = {"path": src.path, "files": len(files)}
    single = len(files) == 1
    for path in files:
        rel = _rel(path, root)
        prefix = "" if single else f"{rel}:"
        with _named_errors(path):
            if src.kind == "parquet":
                check_parquet(path, src, index)
                yield from iter_parquet(path, src, index, prefix)
            elif src.kind == "jsonl":
                yield from iter_jsonl(path, src, index, prefix, stats)
            else:
                yield from iter_text(path, src, "0" if single and src.split == "file" else rel, stats)


@contextlib.contextmanager
def _named_errors(path: Path) -> Iterator[None]:
    """Any failure to read `path` (gone, truncated, corrupt) is one CorpusError naming it.

    Why one wrapper: gzip, zlib, pyarrow and the OS each raise their own types, and a traceback
    from inside them does not say which of thousands of files to fix.
    """
    try:
        yield
    except FileNotFoundError:
        raise CorpusError(f"{path}: vanished while the corpus was being read (moved or deleted?)") from None
    except (OSError, EOFError, zlib.error, pa.ArrowException) as err:
        raise CorpusError(f"{path}: unreadable ({type(err).__name__}: {err}); fix or remove the file") from None


# ---------------------------------------------------------------------------------- other inputs
def iter_debian(src: DebianSource, cache: Path, stats: SourceStats) -> Iterator[tuple[str, Any]]:
    from moe_study.data import recipes

    pkg = recipes.prepare_package(src.package, cache)
    stats.origin = pkg.provenance()
    stats.sha256 = pkg.deb_sha256
    for local_id, text in recipes.iter_package_documents(src.package, pkg.root, stats.notes):
        yield local_id.removeprefix(f"{src.package}:"), text


def iter_python_package(src: PythonPackageSource, index: int, stats: SourceStats) -> Iterator[tuple[str, Any]]:
    """One document per selected text file of the pinned distribution, each verified against its RECORD."""
    from moe_study.data import pypackage

    dist, files, stats.origin = pypackage.open_package(
        src.package, src.version, src.include, src.exclude, f"corpus.sources[{index}]", stats.skipped)
    stats.sha256 = stats.origin["files_sha256"]
    for f in files:
        raw = pypackage.read_verified(dist, f, src.package)
        if looks_binary(raw):
            log.warning("%s: skipped, not a text file (binary content)", f.path)
            stats.skipped["binary_file"] += 1
            continue
        yield f.path, _decode(raw, stats.notes)


def iter_synthetic(src: SyntheticSource, stats: SourceStats) -> Iterator[tuple[str, Any]]:
    from moe_study.data.synthetic import generate

    params = src.model_dump(mode="json")
    stats.origin = {"params": params}
    stats.sha256 = sha256_json(params)
    corpus = generate(
        docs=src.docs, exact_dup_rate=src.exact_dup_rate, near_dup_rate=src.near_dup_rate, seed=src.seed
    )
    yield from zip(corpus.ids, corpus.texts, strict=True)


def iter_raw(
    src: Source, index: int, root: Path, cache: Path, stats: SourceStats
) -> Iterator[tuple[str, Any]]:
    """(id within the source, text or junk) in the source's own order, unfiltered."""
    if isinstance(src, DebianSource):
        return iter_debian(src, cache, stats)
    if isinstance(src, SyntheticSource):
        return iter_synthetic(src, stats)
    if isinstance(src, PythonPackageSource):
        return iter_python_package(src, index, stats)
    return iter_files(src, index, root, stats)


# ------------------------------------------------------------------------------------ validation
def validate_sources(cfg: CorpusConfig, root: Path, cache: Path) -> None:
    """Everything that can be checked without reading documents, so bad config fails first."""
    from moe_study.data import recipes

    for i, src in enumerate(cfg.sources):
        if isinstance(src, DebianSource):
            try:
                recipes.check_fetchable(src.package, cache, f"corpus.sources[{i}].package")
            except RecipeError as err:
                raise CorpusError(str(err)) from None
        elif isinstance(src, PythonPackageSource):
            from moe_study.data import pypackage

            try:
                pypackage.find_distribution(src.package, src.version, f"corpus.sources[{i}]")
            except PackageError as err:
                raise CorpusError(str(err)) from None
        elif isinstance(src, FileSource):
            for path in resolve_files(src, i, root):
                if src.kind == "parquet":
                    check_parquet(path, src, i)


# ------------------------------------------------------------------------------------------ build
def normalise(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n").lstrip("\ufeff").strip()


def _utf8(text: str, notes: Counter) -> tuple[str, bytes]:
    try:
        return text, text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates, e.g. from JSON "\ud800" escapes
        notes["replaced_invalid_utf8"] += 1
        text = _SURROGATE.sub("\ufffd", text)
        return text, text.encode("utf-8")


class _Shards:
    """Buffers one shard of documents at a time and hands it to the ShardWriter."""

    def __init__(self, writer: ShardWriter, per_shard: int) -> None:
        self.writer, self.per_shard = writer, per_shard
        self.ids: list[str] = []
        self.sources: list[str] = []
        self.texts: list[str] = []
        self.bytes = 0

    def add(self, doc_id: str, source: str, text: str, n_bytes: int) -> None:
        self.ids.append(doc_id)
        self.sources.append(source)
        self.texts.append(text)
        self.bytes += n_bytes
        if len(self.ids) >= self.per_shard:
            self.flush()

    def flush(self) -> None:
        if not self.ids:
            return
        table = pa.table([self.ids, self.sources, self.texts], schema=DOC_SCHEMA)
        self.writer.write(table, bytes=self.bytes)
        self.ids, self.sources, self.texts, self.bytes = [], [], [], 0


def add_source(
    shards: _Shards, src: Source, index: int, label: str, cfg: CorpusConfig, root: Path, cache: Path
) -> SourceStats:
    stats = SourceStats(label=label, kind=src.kind)
    check_ids = isinstance(src, SyntheticSource) or (isinstance(src, FileSource) and src.id_field is not None)
    seen: set[str] = set()
    max_docs = getattr(src, "max_docs", None)  # synthetic sources size themselves with `docs`
    raw = iter_raw(src, index, root, cache, stats)
    try:
        for local_id, text in progress(raw, desc=label, unit="doc"):
            if not isinstance(text, str):
                stats.skipped["not_text"] += 1
                continue
            text = normalise(text)
            if not text:
                stats.skipped["empty"] += 1
                continue
            if len(text) < cfg.min_chars:
                stats.skipped["short"] += 1
                continue
            if len(text) > MAX_LINE_CHARS and max(map(len, text.split("\n"))) > MAX_LINE_CHARS:
                log.warning("%s: document %r skipped: a line longer than %d characters", label, local_id,
                            MAX_LINE_CHARS)
                stats.skipped["long_line"] += 1
                continue
            if check_ids:
                if local_id in seen:
                    where = f"corpus.sources[{index}]" + (".id_field" if isinstance(src, FileSource) else "")
                    raise CorpusError(
                        f"{where}: id {local_id!r} occurs twice in source {label!r}; ids must be unique"
                    )
                seen.add(local_id)
            text, data = _utf8(text, stats.notes)
            shards.add(f"{label}:{local_id}", label, text, len(data))
            stats.docs += 1
            stats.bytes += len(data)
            stats.chars += len(text)
            if max_docs is not None and stats.docs >= max_docs:
                stats.truncated = True
                break
    except (RecipeError, PackageError) as err:
        raise CorpusError(f"corpus.sources[{index}] ({label}): {err}") from None
    finally:
        close = getattr(raw, "close", None)
        if close is not None:
            close()
    if stats.docs == 0:
        log.warning("%s: no documents kept (skipped: %s)", label, dict(stats.skipped))
    log.info("%s: %d docs, %.1f MB, skipped %s", label, stats.docs, stats.bytes / 1e6, dict(stats.skipped))
    return stats


def build_corpus(
    cfg: CorpusConfig,
    out_dir: Path = OUT,
    metrics_path: Path | None = METRICS,
    root: Path | None = None,
    cache: Path | None = None,
    docs_per_shard: int = DOCS_PER_SHARD,
) -> dict[str, Any]:
    """Write the document shards + manifest (atomically) and the metrics; return the manifest."""
    root = Path.cwd() if root is None else Path(root)
    cache = (root / CACHE) if cache is None else Path(cache)
    validate_sources(cfg, root, cache)
    labels = source_labels(list(cfg.sources))
    with atomic_path(out_dir) as tmp:
        writer = ShardWriter(tmp, "docs", DOC_SCHEMA)
        shards = _Shards(writer, docs_per_shard)
        stats = [
            add_source(shards, src, i, label, cfg, root, cache)
            for i, (src, label) in enumerate(zip(cfg.sources, labels, strict=True))
        ]
        shards.flush()
        skipped = sum((s.skipped for s in stats), Counter())
        docs = sum(s.docs for s in stats)
        if docs == 0:
            raise CorpusError(
                f"corpus: no documents left after filtering (min_chars={cfg.min_chars}); "
                f"skipped: {dict(skipped)}"
            )
        params = cfg.model_dump(mode="json")
        manifest = writer.finish(
            docs=docs,
            bytes=sum(s.bytes for s in stats),
            chars=sum(s.chars for s in stats),
            sources=[s.summary() for s in stats],
            skipped=dict(sorted(skipped.items())),
            provenance=provenance("corpus", {s.label: s.sha256 for s in stats}, params),
        )
    if metrics_path is not None:
        write_json(metrics_path, corpus_metrics(manifest))
    return manifest


def corpus_metrics(manifest: dict[str, Any]) -> dict[str, Any]:
    return {
        "docs": manifest["docs"],
        "bytes": manifest["bytes"],
        "shards": len(manifest["shards"]),
        "corpus_sha256": manifest["sha256"],
        "skipped": manifest["skipped"],
        "sources": {
            s["label"]: {k: s[k] for k in ("kind", "docs", "bytes", "skipped", "truncated", "origin")}
            for s in manifest["sources"]
        },
    }


def iter_documents(
    directory: Path | str = OUT, columns: list[str] | None = None, batch_rows: int | None = None
) -> Iterator[pa.RecordBatch]:
    """Stream the corpus (id, source, text) in order, each shard verified against the manifest."""
    return iter_shards(directory, columns=columns, batch_rows=batch_rows)
