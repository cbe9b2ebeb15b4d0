"""The wheels a lent GPU machine lacks for this project, downloaded into an ignored `.whl/` (cp312, manylinux x86_64).

Why: the GPU machine has no network and no snakemake, dvc, dvclive or pydantic (its image's packages:
tools/gpu/image-packages.txt, from the device tool's KINDS.md). Each call carries at most 64 MiB, so we
carry *exactly* what is missing: the dependency closure of the roots (snakemake, pydantic and dvclive at
requirements.txt's pins: the Snakefile, the params schema, the train stage's dvclive outputs), walked
through the Requires-Dist metadata of the distributions installed in this project's venv (the versions
the tests run), markers evaluated for CPython 3.12 on Linux x86_64, never descending into a package the
image already has. PuLP (36 MB installed) is left out: snakemake needs it only for its `ilp` scheduler,
and the driver (moe_study.remote) runs `--scheduler greedy`; dvc's experiment queue, ssh client and libgit2
backend are left out too (SKIP says why). A pure-Python dependency published only as an
sdist (connection_pool) is built here into a py3-none-any wheel.

    python tools/gpu/wheelhouse.py [--gpu-extras] [--dvc-queue] [--dest .whl]

`--dvc-queue` keeps dvc's experiment queue (celery, kombu and theirs, QUEUE): what `dvc exp run --queue`
and `--run-all -j N` need (bench/gpu_dvc_queue.py); such a call has less room for anything else.

`--gpu-extras` adds requirements-gpu.txt (nvidia-cutlass) and the DeepSpeed sdist with hjson, the one
DeepSpeed dependency the image lacks (tools/gpu/run_study.sh installs whatever .whl/ holds).
On the GPU machine: `python3 -m pip install --no-index --no-deps --target /tmp/site .whl/*.whl`.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
ROOTS = ("snakemake", "pydantic", "dvclive")
SKIP = {
    "pulp": "only snakemake's ilp scheduler imports it; the driver runs --scheduler greedy",
    # dvclive needs dvc (it imports dvc.exceptions, dvc.scm), but not these corners of dvc's closure, which the
    # GPU runs never reach (tests/test_wheelhouse.py trains a run through Snakemake, dvclive outputs included,
    # with every package they bring in made unimportable). Together ~12 MiB of the 64 MiB a call carries.
    "pygit2": "scmrepo's libgit2 backend: dvclive with save_dvc_exp=False only reads the repo through dulwich",
    "asyncssh": "scmrepo's git-over-ssh client (with cryptography, cffi): no remote is ever contacted",
    "celery": "dvc-task's experiment queue (with billiard, click-repl, prompt-toolkit, ...): `dvc exp` runs only",
    "kombu": "the message transport of that queue (with amqp, vine)",
}
QUEUE = ("celery", "kombu")  # SKIP's entries that --dvc-queue keeps
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux_2_12_x86_64", "manylinux2010_x86_64", "manylinux_2_5_x86_64",
             "manylinux1_x86_64")
TARGET_ENV = {**default_environment(), "python_version": "3.12", "python_full_version": "3.12.3",
              "implementation_name": "cpython", "platform_python_implementation": "CPython",
              "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix"}


def image_packages() -> set[str]:
    lines = (ROOT / "tools/gpu/image-packages.txt").read_text().splitlines()
    return {canonicalize_name(x.strip()) for x in lines if x.strip() and not x.startswith("#")}


def pins(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, ver = line.split("==", 1)
            out[canonicalize_name(name)] = ver.strip()
    return out


def roots(gpu_extras: bool = False) -> list[str]:
    """The packages the GPU machine lacks, pinned as requirements.txt (and requirements-gpu.txt) pin them."""
    req = pins(ROOT / "requirements.txt")
    out = [f"{r}=={req[r]}" for r in ROOTS]
    if gpu_extras:
        out += [f"{n}=={v}" for n, v in pins(ROOT / "requirements-gpu.txt").items()] + ["hjson"]
    return out


def skip_for(dvc_queue: bool) -> dict[str, str]:
    """SKIP, less the experiment queue's packages where the call runs `dvc exp` through the queue."""
    return {k: v for k, v in SKIP.items() if not (dvc_queue and k in QUEUE)}


def closure(roots: list[str], have: set[str], skip: dict[str, str] = SKIP) -> dict[str, tuple[str, str]]:
    """{name: (version, who needs it)}: the roots and every dependency the image lacks, from the
    metadata of the distributions installed here (their version must satisfy every requirement met);
    a package in `skip` is left out with everything only it needs."""
    need: dict[str, tuple[str, str]] = {}
    todo = [(Requirement(r), "root") for r in roots]
    while todo:
        req, parent = todo.pop()
        name = canonicalize_name(req.name)
        if req.marker is not None and not req.marker.evaluate({**TARGET_ENV, "extra": ""}):
            continue
        if name in have or name in skip:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            sys.exit(f"error: {name} ({req}, needed by {parent}) is not installed in this venv: "
                     f"pip install it here first, so its version is one the project runs with")
        if req.specifier and not req.specifier.contains(dist.version, prereleases=True):
            sys.exit(f"error: {parent} needs {req}, the venv has {name} {dist.version}")
        if name in need:
            continue
        need[name] = (dist.version, parent)
        todo += [(Requirement(r), name) for r in dist.requires or []]
    return need


def pip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)


def download(need: dict[str, tuple[str, str]], dest: Path) -> None:
    """One `pip download --no-deps` for all binary/pure wheels; what has no wheel is built here from its
    sdist, and must come out pure (py3-none-any), since nothing is compiled for the GPU machine here."""
    plat = [x for p in PLATFORMS for x in ("--platform", p)]
    specs = [f"{n}=={v}" for n, (v, _) in sorted(need.items())]
    base = ["download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
            "--implementation", "cp", *plat, "-d", str(dest)]
    while specs:
        r = pip(*base, *specs)
        if r.returncode == 0:
            return
        m = re.search(r"No matching distribution found for (\S+)", r.stderr)
        if not m:
            sys.exit(f"error: pip download failed:\n{r.stderr[-3000:]}")
        spec = m.group(1)
        with tempfile.TemporaryDirectory() as tmp:
            r2 = pip("download", "-q", "--no-deps", "--no-binary=:all:", "-d", tmp, spec)
            sdists = list(Path(tmp).iterdir())
            if r2.returncode or not sdists:
                sys.exit(f"error: no wheel and no sdist for {spec}:\n{r2.stderr[-2000:]}")
            r3 = pip("wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dest), str(sdists[0]))
            if r3.returncode:
                sys.exit(f"error: building {spec} from its sdist failed:\n{r3.stderr[-2000:]}")
        built = [w for w in dest.glob("*.whl") if canonicalize_name(w.name.split("-")[0]) == canonicalize_name(
            spec.split("==")[0])]
        if not built or not built[0].name.endswith("-py3-none-any.whl"):
            sys.exit(f"error: {spec} built into {built}, not a pure py3-none-any wheel")
        print(f"built {built[0].name} from its sdist")
        specs.remove(next(s for s in specs if canonicalize_name(s.split("==")[0]) == canonicalize_name(
            spec.split("==")[0])))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dest", type=Path, default=ROOT / ".whl")
    ap.add_argument("--gpu-extras", action="store_true", help="also nvidia-cutlass and the DeepSpeed sdist")
    ap.add_argument("--dvc-queue", action="store_true", help="keep dvc's experiment queue (QUEUE)")
    ap.add_argument("--dry-run", action="store_true", help="print the closure, download nothing")
    a = ap.parse_args(argv)
    req = pins(ROOT / "requirements.txt")
    need = closure(roots(a.gpu_extras), image_packages(), skip=skip_for(a.dvc_queue))
    for n, (v, parent) in sorted(need.items()):
        print(f"{n}=={v}  <- {parent}")
    if a.dry_run:
        return 0
    if a.dest.exists():
        shutil.rmtree(a.dest)  # generated and ignored: never a stale second version of a package
    a.dest.mkdir(parents=True)
    download(need, a.dest)
    if a.gpu_extras:
        r = pip("download", "-q", "--no-deps", "--no-binary=:all:", "-d", str(a.dest), f"deepspeed=={req['deepspeed']}")
        if r.returncode:
            sys.exit(f"error: deepspeed sdist:\n{r.stderr[-2000:]}")
    (a.dest / "closure.txt").write_text("".join(f"{n}=={v}  <- {p}\n" for n, (v, p) in sorted(need.items())))
    size = sum(f.stat().st_size for f in a.dest.iterdir())
    print(f"{len(list(a.dest.glob('*.whl')))} wheels, {size / 2**20:.1f} MiB in {a.dest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
