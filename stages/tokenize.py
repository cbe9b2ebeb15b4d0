"""tokenize: train (or load) a byte-level BPE tokenizer and encode every document into token shards.

The tokenizer training and the parallel encoder live in moe_study.data.tokenizer.
"""

from __future__ import annotations

import argparse

from moe_study.cli import fail, setup_logging
from moe_study.config.load import load_params
from moe_study.config.schema import ParamsError
from moe_study.data.artefacts import ShardError
from moe_study.data.tokenizer import CORPUS_DIR, METRICS_PATH, TOKENS_DIR, TokenizerError, check_config, tokenize
from moe_study.io import check_output


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--corpus", default=str(CORPUS_DIR), help="document shards (stage input)")
    ap.add_argument("--out", default=str(TOKENS_DIR), help="token shards + tokenizer.json (stage output)")
    ap.add_argument("--metrics", default=str(METRICS_PATH))
    ap.add_argument("--force", action="store_true",
                    help="allow an --out/--metrics that is an existing directory not made by this stage, or an input")
    a = ap.parse_args(argv)
    setup_logging("tokenize")
    try:
        p = load_params(a.params)
        check_output(a.out, [a.corpus, p.tokenizer.path or a.corpus], a.force, marker="manifest.json")
        check_output(a.metrics, [a.corpus], a.force)
        check_config(p.tokenizer)
        tokenize(p, a.corpus, a.out, a.metrics)
    except (ParamsError, TokenizerError, ShardError, FileNotFoundError) as err:
        fail(str(err))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
