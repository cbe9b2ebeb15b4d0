"""dedupe: exact and MinHash-LSH near-duplicate clusters, one survivor per cluster.

Pipeline mode reads params.yaml and work/tokens/; standalone mode (`--input docs.parquet --output
clusters.parquet`) dedupes any Parquet file of (id, text). The work: moe_study.data.dedupe and
moe_study.data.minhash.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pydantic import ValidationError

from moe_study.cli import Timer, fail, setup_logging
from moe_study.config.load import load_params
from moe_study.config.schema import DedupeConfig, ParamsError
from moe_study.data.artefacts import ShardError
from moe_study.data.dedupe import DedupeError, dedupe_file, run_pipeline
from moe_study.io import check_output

OPTION_FLAGS = ("ngram", "num_perm", "bands", "rows", "threshold", "seed")


# ------------------------------------------------------------------------------------------ main
def _config_from_args(a: argparse.Namespace) -> DedupeConfig:
    over = {k: getattr(a, k) for k in OPTION_FLAGS if getattr(a, k) is not None}
    try:
        return DedupeConfig(**over)
    except ValidationError as err:
        msgs = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'options'}: {e['msg'].removeprefix('Value error, ')}"
            for e in err.errors()
        )
        raise DedupeError(f"invalid dedupe options: {msgs}") from None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml", help="pipeline mode: the study's params.yaml")
    ap.add_argument("--input", type=Path, help="standalone mode: Parquet file with columns id, text")
    ap.add_argument("--output", type=Path, help="standalone mode: output Parquet (id, cluster, keep)")
    ap.add_argument("--ngram", type=int)
    ap.add_argument("--num-perm", dest="num_perm", type=int)
    ap.add_argument("--bands", type=int)
    ap.add_argument("--rows", type=int)
    ap.add_argument("--threshold", type=float)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--threads", type=int, default=0, help="0 = all cores (results do not depend on it)")
    ap.add_argument("--force", action="store_true",
                    help="standalone mode: allow an --output that is an existing directory or the input")
    a = ap.parse_args(argv)
    standalone = a.input is not None or a.output is not None
    try:
        if standalone:
            if a.input is None or a.output is None:
                raise DedupeError("standalone mode needs both --input and --output")
            log = setup_logging("dedupe")
            check_output(a.output, [a.input], a.force)
            timer = Timer()
            stats = dedupe_file(a.input, a.output, _config_from_args(a), a.threads)
            log.info(
                "%s: %d docs -> %d kept (%d exact, %d near removed, %d empty) in %.1fs (%.0f docs/s) -> %s",
                a.input, stats["docs"], stats["kept"], stats["removed_exact"], stats["removed_near"],
                stats["empty_docs"], timer.seconds, stats["docs"] / max(timer.seconds, 1e-9), a.output,
            )
        else:
            if any(getattr(a, k) is not None for k in OPTION_FLAGS):
                raise DedupeError("pipeline mode reads dedupe options from params.yaml; "
                                  "--ngram/--num-perm/... are for standalone mode (--input/--output)")
            run_pipeline(load_params(a.params), threads=a.threads)
    except (DedupeError, ParamsError, ShardError, FileNotFoundError) as err:
        fail(str(err))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
