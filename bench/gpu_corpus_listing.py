"""What the `python_package` corpus sources of studies/gpu_study.yaml would read on this machine (stdlib only).

Run it on the lent GPU machine with the Python the stages will use (there: `python3`, with the carried
wheels' PYTHONPATH set as for the stages, so that it sees what they see):

    python3 bench/gpu_corpus_listing.py [--json $OUT/corpus_listing.json] [PACKAGE ...]

For each candidate distribution (default: CANDIDATES) it prints the installed version, where it was found,
the RECORD entries that the default `include` globs match, how many of those the default `exclude` globs
drop (tests, vendored copies, metadata), the files and bytes kept, how many kept files RECORD does not hash
(the corpus would skip them), and the biggest kept file (a hint of generated data). Then the total, and
the `corpus.sources` lines to paste into studies/gpu_study.yaml with the versions read here. The globs are
moe_study.config.schema.PythonPackageSource's defaults (copied: this script must run without the project's
dependencies; tests/test_pypackage.py checks that the copies agree).
"""

from __future__ import annotations

import argparse
import fnmatch
import importlib.metadata as md
import json
import sys
from pathlib import Path

INCLUDE = ["*.py", "*.pyi", "*.md", "*.rst", "*.txt"]
EXCLUDE = ["*.dist-info/*", "*/tests/*", "*/test/*", "*/_vendor/*", "*/vendor/*", "*/_vendored/*", "*/third_party/*"]

# Large, prose- or docstring-rich packages of the GPU image ('Python packages already there' in the device
# notes), biggest first where known. Left out on purpose: pytorch-lightning (the same code as lightning's
# lightning/pytorch), packages whose text is mostly generated tables (chardet is not there; pygments'
# _mapping/_builtins files are small), binary-only ones (jaxlib, nvidia-*, cuda-*), and anything the
# carried wheelhouse installs (pydantic, msgpack, einops, py-cpuinfo, ...: its copy would shadow the image's).
CANDIDATES = [
    "transformers", "torch", "sympy", "scipy", "pandas", "jax", "scikit-learn", "statsmodels", "numpy",
    "matplotlib", "networkx", "torch-geometric", "numba", "scikit-image", "flax", "lightning", "xarray",
    "onnxscript", "onnx", "cupy-cuda13x", "pygments", "hypothesis", "huggingface-hub", "torchvision",
    "torchmetrics", "optax", "numpyro", "botorch", "gpytorch", "linear-operator", "accelerate", "peft",
    "timm", "sentence-transformers", "equinox", "diffrax", "orbax-checkpoint", "chex", "torchaudio",
    "triton", "tensorboard", "setuptools", "pip", "seaborn", "pytest", "rich", "fonttools", "mpmath",
    "werkzeug", "aiohttp", "jinja2", "markdown", "sacrebleu", "e3nn", "patsy", "formulaic", "cython",
]


def matches(path: str, globs: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(path, g) for g in globs)


def listing(name: str) -> dict:
    found = next(iter(md.distributions(name=name, path=sys.path)), None)
    if found is None:
        return {"package": name, "installed": False}
    row = {"package": name, "installed": True, "version": found.version,
           "location": str(found.locate_file("")), "record": found.files is not None,
           "matched": 0, "matched_bytes": 0, "excluded": 0, "excluded_bytes": 0, "files": 0, "bytes": 0,
           "unhashed": 0, "biggest": None}
    big = (0, "")
    for f in found.files or []:
        p = f.as_posix()
        if ".." in Path(p).parts or not matches(p, INCLUDE):
            continue
        size = f.size if f.size is not None else 0
        row["matched"] += 1
        row["matched_bytes"] += size
        if matches(p, EXCLUDE):
            row["excluded"] += 1
            row["excluded_bytes"] += size
            continue
        row["files"] += 1
        row["bytes"] += size
        row["unhashed"] += f.hash is None
        big = max(big, (size, p))
    row["biggest"] = {"path": big[1], "bytes": big[0]} if big[0] else None
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("packages", nargs="*", default=CANDIDATES)
    ap.add_argument("--json", default=None, help="also write the rows here")
    a = ap.parse_args(argv)
    rows = [listing(n) for n in a.packages]
    print(f"python {sys.version.split()[0]} at {sys.executable}")
    print(f"{'package':24s} {'version':16s} {'files':>6s} {'MB':>7s} {'excl':>5s} {'exclMB':>7s} {'nohash':>6s}"
          "  biggest")
    for r in rows:
        if not r["installed"]:
            print(f"{r['package']:24s} (not installed)")
            continue
        b = r["biggest"] or {"path": "", "bytes": 0}
        print(f"{r['package']:24s} {r['version']:16s} {r['files']:6d} {r['bytes'] / 1e6:7.2f} {r['excluded']:5d} "
              f"{r['excluded_bytes'] / 1e6:7.2f} {r['unhashed']:6d}  {b['path']} ({b['bytes'] / 1e6:.2f} MB)"
              + ("" if r["record"] else "  NO RECORD"))
    ok = [r for r in rows if r["installed"] and r["record"] and r["files"]]
    print(f"total kept: {sum(r['files'] for r in ok)} files, {sum(r['bytes'] for r in ok) / 1e6:.1f} MB "
          f"(excluded {sum(r['excluded_bytes'] for r in ok) / 1e6:.1f} MB)")
    print("\n# corpus.sources for studies/gpu_study.yaml (versions as installed here):")
    for r in ok:
        print(f'    - {{kind: python_package, package: {r["package"]}, version: "{r["version"]}"}}'
              f'  # {r["bytes"] / 1e6:.1f} MB')
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
