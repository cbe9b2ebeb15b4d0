"""Documents from freely redistributable English texts shipped as Debian packages.

Why Debian packages: they are versioned, checksummed, mirrored for decades and reachable with
the ordinary `apt-get` client, so "the default corpus" is a list of package names whose exact
bytes (version + sha256 of the `.deb`) go into the corpus provenance. Nothing is installed:
`apt-get download` fetches the `.deb` into `data/cache/debs/<package>/` and `dpkg -x` unpacks it
into `data/cache/extract/<package>/`, so no root is needed (only `apt-get update`, once, as root,
so that apt knows the packages).

Two on-disk formats cover the useful packages, one parser each:

- dictd databases (`/usr/share/dictd/NAME.index` + `NAME.dict.dz`): one document per dictionary
  entry. The index maps headwords to (offset, length) in dictd's base64; several headwords can
  share one entry, which is emitted once, in offset order. `00-database-*` (and the old
  `00database*`) metadata entries are skipped.
- fortune files (`/usr/share/games/fortunes/**`): one document per fortune, fortunes being
  separated by lines holding only `%`. `.dat` index files and the `.u8` symlinks are skipped.

`RECIPES` is the explicit package -> (parser, markup) table; any other package name is an error
naming the config field, because guessing a parser would silently produce junk documents.

Text hygiene: bytes are decoded as UTF-8; an entry (dictd) or file (fortunes) that is not valid
UTF-8 is decoded as cp1252, else latin-1 (old files), and counted in the per-source notes. Line
endings are normalised to `\\n`. Dictionary cross-reference braces (`{word}` -> `word`) are
removed for the dictd sources that use them; GCIDE gets a fuller clean-up, see `clean_gcide`.
"""

from __future__ import annotations

import gzip
import logging
import re
import shutil
import subprocess
import tempfile
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from moe_study.hashing import sha256_file
from moe_study.io import atomic_path

log = logging.getLogger("stages.corpus.recipes")

CACHE = Path("data/cache")  # relative to the repo root; git-ignored
APT_LISTS = Path("/var/lib/apt/lists")


class RecipeError(ValueError):
    """A Debian source that cannot be turned into documents (the message says what to fix)."""


# ------------------------------------------------------------------------------------ text tools
def normalise_newlines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def decode_legacy(data: bytes, notes: Counter) -> str:
    """UTF-8, else cp1252 (what "latin-1" files usually really are), else latin-1; counted."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    try:
        text = data.decode("cp1252")
        notes["decoded_cp1252"] += 1
        return text
    except UnicodeDecodeError:
        notes["decoded_latin1"] += 1
        return data.decode("latin-1")


_BLANK_RUNS = re.compile(r"\n{3,}")


def tidy(text: str) -> str:
    """Newlines normalised, trailing spaces dropped, at most one blank line in a row, no edges."""
    text = normalise_newlines(text)
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return _BLANK_RUNS.sub("\n\n", text).strip()


def strip_braces(text: str) -> str:
    """dictd cross-references `{target}` -> `target` (FOLDOC, Jargon File, WordNet, GCIDE ...)."""
    return text.replace("{", "").replace("}", "")


# GCIDE (Webster 1913 + WordNet) markup. Pronunciations are written twice per headword, as
# `\Ac*tin"i*an\` and as `(-t[~e]r)` with character entities: both are dropped (they are notation,
# not English). Entities left elsewhere (etymologies, foreign words) become Unicode. The source
# attribution lines (`[1913 Webster]`, `[WordNet 1.5 +PJC]`, ...) close ~90% of all senses; they
# are dropped. Usage labels such as `[Obs.]` or `[Colloq.]` are text and kept.
_GCIDE_PRON_BACKSLASH = re.compile(r"[ \t]?\\[^\\]{1,100}\\")  # may wrap onto the next line
_PAREN = re.compile(r"[ \t]?\(([^()]{1,100})\)")
_PRON_CHARS = re.compile(r"[-A-Za-z0-9 \t\n*\"'`\[\]=~.^,;/?]+")  # '?': a glyph lost upstream
_PRON_MARK = re.compile(  # stress/syllable marks inside a word, or a pronunciation-only entity
    r"[A-Za-z\]?][*\"`]|[*\"`][A-Za-z\[?]|[a-z]\?[a-z]"
    r"|\[(?:[=~.^-][a-z]{1,2}|[a-z]{1,2}\^|imac|aum|asl|add|udd)\]"
)
_NOT_PRON = re.compile(r"[A-Z][a-z]|\b[A-Z]{1,3}\.|[a-z]{4,}\s+[a-z]{4,}|(?:^|\s)\"")  # name, AS., prose, "


def _drop_pronunciation(m: re.Match) -> str:
    """`(k[aum]r"b[o^]n*[i^]d or -[imac]d)` -> "" but `(Sp. casta[~n]a)` or `(Act[ae]a)` stay."""
    body = m[1]
    if _PRON_CHARS.fullmatch(body) and _PRON_MARK.search(body) and not _NOT_PRON.search(body):
        return ""
    return m[0]


_GCIDE_SRC = (
    r"(?:1913 Webster|Webster 1913 Suppl\.|WordNet(?:\s+\d\.\d|\s+sense\s+\d+(?:\s*[+&,]\s*\d+)*)?"
    r"|PJC\.?|AS|RDH|RP|GG|JC|MW|Century Dict\.,? 1906|RHUD)"
)
_GCIDE_TAG = rf"\[\s*{_GCIDE_SRC}(?:\s*\+?\s*{_GCIDE_SRC})*\s*\]"
_GCIDE_ATTRIBUTION_LINE = re.compile(rf"^[ \t]*{_GCIDE_TAG}[ \t]*(?:\n|$)", re.M)
_GCIDE_ATTRIBUTION_END = re.compile(rf"[ \t]*{_GCIDE_TAG}[ \t]*$", re.M)
# upstream conversion glitch: the next entry's headword glued after the last tag ("[1913 Webster] Abime")
_GCIDE_STRAY_HEADWORD = re.compile(rf"[ \t]*{_GCIDE_TAG}[ \t]+[^\n.]{{1,60}}")  # on the last line
_GCIDE_TAG_BEFORE_TEXT = re.compile(rf"^([ \t]*){_GCIDE_TAG}[ \t]+", re.M)
# run-in derived forms keep their syllable and stress marks: A`ble-bod"ied*ness -> Able-bodiedness
_SYLLABIFIED = re.compile(r"(?<!\S)(?=\S*[^\W\d_][*\"`][^\W\d_])\S+")
_MARK_BEFORE = {
    "=": "\u0304", "-": "\u0304", "~": "\u0303", ".": "\u0323", "'": "\u0301", "`": "\u0300",
    '"': "\u0308", "^": "\u0302", ",": "\u0327", "*": "\u030a",
}
_GREEK = [
    "alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda", "mu",
    "nu", "xi", "omicron", "pi", "rho", "sigma", "tau", "upsilon", "phi", "chi", "psi", "omega",
]
_NAMED = {
    "ae": "æ", "AE": "Æ", "oe": "œ", "OE": "Œ", "eth": "ð", "thorn": "þ", "deg": "°", "sect": "§",
    "root": "√", "imac": "ī", "aum": "ä", "ng": "ŋ", "yogh": "ȝ", "pounds": "£", "th": "th",
    "cced": "ç", "prime": "′", "bprime": "″", "frac12": "½", "frac14": "¼", "frac34": "¾",
    "frac13": "⅓", "frac23": "⅔", "dagger": "†", "ddagger": "‡", "para": "¶", "middot": "·",
    "times": "×", "divide": "÷", "cent": "¢", "flat": "♭", "sharp": "♯", "natural": "♮",
    "male": "♂", "female": "♀", "hand": "☞", "asl": "a", "add": "‡", "udd": "ü",
    **{g: chr(0x3B1 + i + (1 if i >= 17 else 0)) for i, g in enumerate(_GREEK)},  # skip final sigma
    **{g.capitalize(): chr(0x391 + i + (1 if i >= 17 else 0)) for i, g in enumerate(_GREEK)},
}
_ENTITY_TOKEN = re.compile(
    r"\[(?:(?P<pre>[=~.'`\"^,*-])(?P<b1>[A-Za-z]{1,2})|(?P<b2>[A-Za-z]{1,2})\^|(?P<name>[A-Za-z]{2,7}\d{0,2}))\]"
)


def _entity(m: re.Match) -> str:
    if m["name"] is not None:
        return _NAMED.get(m["name"], m[0])  # unknown names (and words like [He]) stay as written
    base, mark = (m["b1"], _MARK_BEFORE[m["pre"]]) if m["pre"] else (m["b2"], "\u0306")  # x^ = breve
    if base == "oo":
        return "o" + {"\u0304": "\u035e", "\u0306": "\u035d"}.get(mark, mark) + "o"
    return _NAMED.get(base, base) + mark


_SYLLABLE_MARKS = str.maketrans("", "", "*\"`")


def clean_gcide(text: str) -> str:
    text = _GCIDE_PRON_BACKSLASH.sub("", text)
    text = _PAREN.sub(_drop_pronunciation, text)
    head, nl, last = text.rstrip().rpartition("\n")
    text = head + nl + _GCIDE_STRAY_HEADWORD.sub("", last)
    text = _GCIDE_ATTRIBUTION_LINE.sub("", text)
    text = _GCIDE_ATTRIBUTION_END.sub("", text)
    text = _GCIDE_TAG_BEFORE_TEXT.sub(r"\1", text)
    text = unicodedata.normalize("NFC", _ENTITY_TOKEN.sub(_entity, text))
    text = _SYLLABIFIED.sub(lambda m: m[0].translate(_SYLLABLE_MARKS), text)
    return strip_braces(text)


# --------------------------------------------------------------------------------------- recipes
@dataclass(frozen=True)
class Recipe:
    package: str
    parser: str  # "dictd" | "fortunes"
    markup: Callable[[str], str]
    licence: str
    about: str


def _plain(text: str) -> str:
    return text


RECIPES: dict[str, Recipe] = {
    r.package: r
    for r in (
        Recipe("dict-gcide", "dictd", clean_gcide, "GPL-2+", "Webster's 1913 dictionary + WordNet (GCIDE)"),
        Recipe("dict-foldoc", "dictd", strip_braces, "GFDL-1.1+", "Free On-line Dictionary of Computing"),
        Recipe("dict-jargon", "dictd", strip_braces, "public domain", "The Jargon File 4.4.7"),
        Recipe("dict-devil", "dictd", _plain, "public domain", "Ambrose Bierce, The Devil's Dictionary"),
        Recipe("dict-vera", "dictd", strip_braces, "GFDL-1.1+", "V.E.R.A. computing acronyms"),
        Recipe("dict-elements", "dictd", strip_braces, "public domain", "Chemical elements"),
        Recipe("dict-wn", "dictd", strip_braces, "WordNet 3.0 licence", "WordNet 3.0 glosses"),
        Recipe("fortunes", "fortunes", _plain, "BSD + per-file notes", "fortune-mod cookie files"),
        Recipe("fortunes-min", "fortunes", _plain, "BSD", "fortune-mod, minimal set"),
        Recipe("fortunes-bofh-excuses", "fortunes", _plain, "public domain", "BOFH excuses"),
        Recipe("fortunes-debian-hints", "fortunes", _plain, "BSD-3-clause", "Debian hints (many languages)"),
    )
}


def recipe_for(package: str, field: str = "corpus.sources[].package") -> Recipe:
    try:
        return RECIPES[package]
    except KeyError:
        raise RecipeError(
            f"{field}: Debian package {package!r} has no recipe; supported: {', '.join(sorted(RECIPES))} "
            "(add one to moe_study/data/recipes.py RECIPES, or use a parquet/jsonl/text source)"
        ) from None


# ------------------------------------------------------------------------------------------ dictd
DICTD_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_B64 = {c: i for i, c in enumerate(DICTD_B64)}


def dictd_b64(s: str) -> int:
    """dictd's big-endian base64 numbers (no padding): 'A' = 0, 'BA' = 64."""
    value = 0
    for c in s:
        value = value * 64 + _B64[c]  # KeyError for a bad digit, reported by the caller
    return value


def dictd_b64_encode(value: int) -> str:
    out = ""
    while True:
        out = DICTD_B64[value % 64] + out
        value //= 64
        if not value:
            return out


def _is_metadata(headword: str) -> bool:
    return headword.startswith(("00-", "00database"))


def read_dictd_index(index: Path, notes: Counter) -> list[tuple[int, int]]:
    """The distinct (offset, length) entries of a dictd index, sorted by offset, metadata removed."""
    entries: set[tuple[int, int]] = set()
    metadata: set[tuple[int, int]] = set()
    n_lines = 0
    with open(index, "rb") as f:
        for raw in f:
            line = raw.rstrip(b"\r\n")
            if not line:
                continue
            n_lines += 1
            fields = line.split(b"\t")
            if len(fields) < 3:
                notes["bad_index_lines"] += 1
                continue
            try:
                key = (dictd_b64(fields[1].decode("ascii")), dictd_b64(fields[2].decode("ascii")))
            except (KeyError, UnicodeDecodeError):
                notes["bad_index_lines"] += 1
                continue
            headword = fields[0].decode("utf-8", "replace")
            (metadata if _is_metadata(headword) else entries).add(key)
    if n_lines and notes["bad_index_lines"] == n_lines:
        raise RecipeError(f"{index}: no line has the dictd form 'headword<TAB>offset<TAB>length'")
    notes["index_headwords"] += n_lines
    notes["metadata_entries"] += len(metadata)
    entries -= metadata
    return sorted(entries)


def iter_dictd(root: Path, markup: Callable[[str], str], notes: Counter) -> Iterator[str]:
    """Entry texts of every dictd database under `root`/usr/share/dictd, database by database."""
    indexes = sorted((root / "usr/share/dictd").glob("*.index"))
    if not indexes:
        raise RecipeError(f"{root}: no usr/share/dictd/*.index (not a dictd package?)")
    for index in indexes:
        data = index.with_suffix(".dict.dz")
        if not data.exists():
            data = index.with_suffix(".dict")
        if not data.exists():
            raise RecipeError(f"{index}: no matching .dict.dz or .dict file beside it")
        entries = read_dictd_index(index, notes)
        opener = gzip.open if data.suffix == ".dz" else open
        with opener(data, "rb") as f:  # entries are sorted by offset: seeks only go forward
            for offset, length in entries:
                f.seek(offset)
                raw = f.read(length)
                if len(raw) != length:
                    notes["entries_out_of_range"] += 1
                    continue
                yield tidy(markup(decode_legacy(raw, notes)))


# --------------------------------------------------------------------------------------- fortunes
_FORTUNE_SEP = re.compile(r"^%[ \t]*$", re.M)


def fortune_files(root: Path) -> list[Path]:
    base = root / "usr/share/games/fortunes"
    if not base.is_dir():
        raise RecipeError(f"{root}: no usr/share/games/fortunes (not a fortunes package?)")
    return sorted(
        p
        for p in base.rglob("*")
        if p.is_file() and not p.is_symlink() and p.suffix not in (".dat", ".u8")
        and not p.name.startswith(".")
    )


def iter_fortunes(root: Path, markup: Callable[[str], str], notes: Counter) -> Iterator[str]:
    for path in fortune_files(root):
        text = normalise_newlines(decode_legacy(path.read_bytes(), notes))
        notes["files"] += 1
        for chunk in _FORTUNE_SEP.split(text):
            yield tidy(markup(chunk))


PARSERS: dict[str, Callable[[Path, Callable[[str], str], Counter], Iterator[str]]] = {
    "dictd": iter_dictd,
    "fortunes": iter_fortunes,
}


def iter_package_documents(package: str, root: Path, notes: Counter) -> Iterator[tuple[str, str]]:
    """(local id, text) of every document of an unpacked package; ids `<package>:<n>`, stable.

    `n` counts every entry in parser order (empty ones included), so filtering elsewhere (min_chars,
    max_docs) never renumbers the others.
    """
    recipe = recipe_for(package)
    for n, text in enumerate(PARSERS[recipe.parser](root, recipe.markup, notes)):
        yield f"{package}:{n}", text


# ------------------------------------------------------------------------------ fetch and unpack
@dataclass(frozen=True)
class DebianPackage:
    package: str
    version: str
    deb: Path
    deb_sha256: str
    root: Path  # where the .deb is unpacked

    def provenance(self) -> dict[str, str]:
        return {
            "package": self.package, "version": self.version, "deb": self.deb.name, "sha256": self.deb_sha256
        }


@dataclass(frozen=True)
class AptCandidate:
    version: str
    sha256: str


def _run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900)
    except FileNotFoundError:
        raise RecipeError(
            f"`{cmd[0]}` not found: Debian sources need a Debian/Ubuntu host with apt and dpkg"
        ) from None
    except subprocess.TimeoutExpired:
        raise RecipeError(f"`{' '.join(cmd)}` timed out after 900 s") from None


def apt_lists_present() -> bool:
    return APT_LISTS.is_dir() and any(APT_LISTS.glob("*_Packages*"))


NEED_UPDATE = "run `apt-get update` (as root) first, so that apt knows the Debian packages"


def apt_usable() -> bool:
    return shutil.which("apt-cache") is not None and apt_lists_present()


def apt_candidate(package: str) -> AptCandidate | None:
    """The version apt would download and its sha256, or None when apt has no package lists."""
    if not apt_usable():
        return None
    r = _run(["apt-cache", "show", "--no-all-versions", package])
    fields: dict[str, str] = {}
    for line in r.stdout.splitlines():
        key, sep, value = line.partition(":")
        if sep and not line.startswith(" ") and key not in fields:
            fields[key] = value.strip()
    if r.returncode != 0 or "Version" not in fields:
        raise RecipeError(
            f"apt does not know package {package!r} ({(r.stderr or r.stdout).strip()[:200]}); "
            f"check the name, or {NEED_UPDATE}"
        )
    if "SHA256" not in fields:
        raise RecipeError(f"apt-cache show {package}: no SHA256 field, cannot verify the download")
    return AptCandidate(fields["Version"], fields["SHA256"])


def _cached_debs(deb_dir: Path) -> list[Path]:
    return sorted(deb_dir.glob("*.deb")) if deb_dir.is_dir() else []


def _deb_field(deb: Path, field: str) -> str:
    r = _run(["dpkg-deb", "-f", str(deb), field])
    if r.returncode != 0:
        raise RecipeError(f"{deb}: not a readable .deb ({r.stderr.strip()[:200]}); delete it and rerun")
    return r.stdout.strip()


def download(package: str, cand: AptCandidate, deb_dir: Path) -> Path:
    """`apt-get download package=version` into `deb_dir`, verified against apt's sha256."""
    deb_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".dl-{package}-", dir=deb_dir.parent) as tmp:
        r = _run(["apt-get", "download", "-q", f"{package}={cand.version}"], cwd=Path(tmp))
        got = sorted(Path(tmp).glob("*.deb"))
        if r.returncode != 0 or len(got) != 1:
            msg = (r.stderr or r.stdout).strip()
            missing = "Unable to locate" in msg or "no installation candidate" in msg
            hint = f"; {NEED_UPDATE}" if missing else ""
            raise RecipeError(f"apt-get download {package}={cand.version} failed: {msg[-400:]}{hint}")
        digest = sha256_file(got[0])
        if digest != cand.sha256:
            raise RecipeError(f"{got[0].name}: sha256 {digest} differs from apt's {cand.sha256}")
        with atomic_path(deb_dir) as new:
            new.mkdir()
            shutil.move(str(got[0]), new / got[0].name)
    return deb_dir / got[0].name


def unpack(deb: Path, digest: str, dest: Path) -> Path:
    """`dpkg -x` into `dest` (atomically), reusing an earlier unpack of the same .deb."""
    stamp = dest / ".deb-sha256"
    if stamp.is_file() and stamp.read_text().strip() == digest:
        return dest
    with atomic_path(dest) as tmp:
        tmp.mkdir()
        r = _run(["dpkg-deb", "-x", str(deb.resolve()), str(tmp)])
        if r.returncode != 0:
            raise RecipeError(f"dpkg -x {deb} failed: {r.stderr.strip()[:400]}; delete it and rerun")
        (tmp / ".deb-sha256").write_text(digest + "\n")
    return dest


def check_fetchable(package: str, cache: Path = CACHE, field: str = "corpus.sources[].package") -> None:
    """Cheap pre-flight check (no download): a recipe exists, and apt or the cache can provide it."""
    recipe_for(package, field)
    if not apt_usable() and len(_cached_debs(cache / "debs" / package)) != 1:
        raise RecipeError(f"{field}: apt has no package lists and {package!r} is not cached; {NEED_UPDATE}")


def prepare_package(package: str, cache: Path = CACHE) -> DebianPackage:
    """The package's .deb (downloaded once, reused while apt's candidate is unchanged) unpacked.

    Without apt package lists, a .deb already in the cache is used as it is (offline reruns);
    with neither, the error says to run `apt-get update`.
    """
    recipe_for(package)
    deb_dir = cache / "debs" / package
    cand = apt_candidate(package)
    cached = _cached_debs(deb_dir)
    if cand is None:
        if len(cached) != 1:
            raise RecipeError(
                f"Debian package {package!r}: apt has no package lists and no cached .deb; {NEED_UPDATE}"
            )
        deb, digest = cached[0], sha256_file(cached[0])
        log.warning("%s: apt has no package lists; using the cached %s as it is", package, deb.name)
    else:
        match = [d for d in cached if sha256_file(d) == cand.sha256]
        deb = match[0] if match else download(package, cand, deb_dir)
        digest = cand.sha256
    version = _deb_field(deb, "Version")
    root = unpack(deb, digest, cache / "extract" / package)
    return DebianPackage(package, version, deb, digest, root)
