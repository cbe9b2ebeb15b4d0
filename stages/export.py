"""export@run: one trained run as a Hugging Face checkpoint (transformers, no custom code) + tokenizer.

`python -m stages.export --run NAME` is the DAG stage (work/runs/<run>/hf/; a one-line record unless
params.yaml `export.enabled`); `--out DIR` exports there whatever the flag. The families, what is
refused and why: moe_study/hf.py.
"""

from __future__ import annotations

import argparse

from moe_study.cli import fail, run_from_dvc_stage, setup_logging
from moe_study.hf import ExportError, run_export


def main(argv: list[str] | None = None) -> int:
    from moe_study.config.load import load_params
    from moe_study.config.schema import ParamsError
    from moe_study.model.layers import ModelConfigError

    ap = argparse.ArgumentParser(prog="python -m stages.export", description=__doc__.splitlines()[0])
    ap.add_argument("--run", default=None, help="a run name from params.yaml runs (under DVC: from DVC_STAGE)")
    ap.add_argument("--out", help="export here (always); default work/runs/<run>/hf/ (if export.enabled)")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--work", default="work")
    a = ap.parse_args(argv)
    a.run = a.run or run_from_dvc_stage()  # DVC puts no params value on a command line (moe_study.cli)
    if a.run is None:
        ap.error("--run NAME is required (outside DVC)")
    log = setup_logging("export")
    try:
        record = run_export(load_params(a.params), a.run, a.work, a.out)
    except (ParamsError, KeyError, FileNotFoundError, ValueError, ExportError, ModelConfigError) as err:
        fail(str(err).strip("'\""))
    if record.get("enabled"):
        log.info("%s: %s checkpoint (max |logit diff| %.3g)", a.run, record["architecture"],
                 record.get("max_abs_logit_diff", float("nan")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
