"""Pin a study file's `python_package` corpus versions to what a machine has installed (stdlib only).

The GPU study's corpus is the text of the packages installed on the lent GPU machine, which this machine
cannot see. `bench/gpu_corpus_listing.py --json L` reads them there; this rewrites, in place, the
`version: "..."` of every `{kind: python_package, package: NAME, ...}` line of STUDY to L's installed
version, so that the versions are pinned in one place (the study file) and committed. A package of the
study that L lists as not installed is an error naming it (drop it from the study or install it); nothing
is written then.

    python3 tools/gpu/pin_corpus_versions.py studies/gpu_study.yaml corpus_listing.json
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

LINE = re.compile(r'(\{kind: python_package, package: )([A-Za-z0-9._-]+)(, version: ")([^"]*)(")')


def pin(study_text: str, installed: dict[str, str]) -> tuple[str, list[str]]:
    """STUDY's text with every python_package version set from `installed`; and the changes, in words."""
    changes: list[str] = []
    missing: list[str] = []

    def sub(m: re.Match[str]) -> str:
        name, old = m.group(2), m.group(4)
        if name not in installed:
            missing.append(name)
            return m.group(0)
        if old != installed[name]:
            changes.append(f"{name}: {old} -> {installed[name]}")
        return f"{m.group(1)}{name}{m.group(3)}{installed[name]}{m.group(5)}"

    out = LINE.sub(sub, study_text)
    if missing:
        raise SystemExit(f"pin_corpus_versions: not installed on the listed machine: {', '.join(missing)}")
    return out, changes


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        raise SystemExit(__doc__)
    study, listing = Path(argv[0]), Path(argv[1])
    rows = json.loads(listing.read_text())
    installed = {r["package"]: r["version"] for r in rows if r.get("installed")}
    text, changes = pin(study.read_text(), installed)
    tmp = study.with_suffix(".yaml.tmp")
    tmp.write_text(text)
    tmp.replace(study)
    print("\n".join(changes) if changes else "pin_corpus_versions: every version already pinned as installed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
