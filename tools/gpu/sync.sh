#!/usr/bin/env bash
# Copy this worktree (tracked and untracked-not-ignored files: no .git, .venv, work/, .snakemake/) and the
# wheels into DEST, a folder of the checkout the device tool sends, ignored there and named in `carry`.
#   bash tools/gpu/sync.sh /work/main/.gpu_gdrive      (then: echo /.gpu_gdrive/ >> /work/main/.git/info/exclude)
# Writes DEST/.source-commit (this HEAD, "+dirty" if uncommitted changes): the records name it.
set -euo pipefail
dest=${1:?DEST}
root=$(git rev-parse --show-toplevel)
cd "$root"
rm -rf "$dest" && mkdir -p "$dest"  # a fresh copy: nothing stale travels
git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf - | tar -xf - -C "$dest"
cp -r .whl "$dest"/.whl
commit=$(git rev-parse HEAD)
git diff --quiet HEAD || commit="$commit+dirty"
echo "$commit" > "$dest"/.source-commit
du -sh "$dest"
