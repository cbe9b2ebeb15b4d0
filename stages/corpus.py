"""Stage `corpus`: the document table (id, source, text) from the sources in params.yaml.

The readers, checks and shard writing live in moe_study.data.corpus.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from moe_study.cli import Timer, fail, setup_logging
from moe_study.config.load import load_params
from moe_study.config.schema import ParamsError
from moe_study.data.corpus import METRICS, OUT, CorpusError, build_corpus, log


# ------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", default=str(OUT), help="output directory (default work/corpus)")
    ap.add_argument("--metrics", default=str(METRICS))
    ap.add_argument("--cache", default=None, help="where .debs are kept (default data/cache)")
    a = ap.parse_args(argv)
    setup_logging("corpus")
    try:
        params = load_params(a.params)
        timer = Timer()
        cache = None if a.cache is None else Path(a.cache)
        m = build_corpus(params.corpus, Path(a.out), Path(a.metrics), cache=cache)
    except (ParamsError, CorpusError) as err:
        fail(str(err))
        return 2
    for s in m["sources"]:
        log.info("  %-24s %8d docs %10d bytes  skipped %s", s["label"], s["docs"], s["bytes"], s["skipped"])
    mb, n_shards = m["bytes"] / 1e6, len(m["shards"])
    log.info("wrote %s: %d docs, %.1f MB, %d shard(s), %.1f s", a.out, m["docs"], mb, n_shards, timer.seconds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
