"""Stage `corpus`: the document table (id, source, text) from the sources in params.yaml.

The readers, checks and shard writing live in moe_study.data.corpus.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from moe_study.cli import Timer, fail, setup_logging
from moe_study.config.load import load_params
from moe_study.config.schema import FileSource, ParamsError
from moe_study.data.corpus import METRICS, OUT, CorpusError, build_corpus, log
from moe_study.io import check_output


# ------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", default=str(OUT), help="output directory (default work/corpus)")
    ap.add_argument("--metrics", default=str(METRICS))
    ap.add_argument("--cache", default=None, help="where .debs are kept (default data/cache)")
    ap.add_argument("--force", action="store_true",
                    help="allow an --out/--metrics that is an existing directory not made by this stage, or an input")
    a = ap.parse_args(argv)
    setup_logging("corpus")
    try:
        params = load_params(a.params)
        inputs = [s.path for s in params.corpus.sources if isinstance(s, FileSource) and not set(s.path) & set("*?[")]
        check_output(a.out, inputs, a.force, marker="manifest.json")
        check_output(a.metrics, inputs, a.force)
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
