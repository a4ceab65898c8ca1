"""`retromae data get NAME ...`: public retrieval collections, downloaded into the layout the recipes, suites and
studies read, under the data root (`$RETROMAE_DATA`, default `data/`):

    DATA/beir/<name>/   corpus.jsonl, queries.jsonl, qrels/<split>.tsv     a BEIR dataset (cqadupstack: a folder per forum)
    DATA/msmarco/       collection.tsv, queries.<split>.tsv, qrels.<split>.tsv   MS MARCO passage (`msmarco-passage`)

BEIR datasets come as the zip files the BEIR authors publish (checked against their published MD5), MS MARCO
passage as Microsoft's collectionandqueries.tar.gz (MD5 as Anserini documents it), optionally with the training
triples (qidpidtriples, kept gzipped: the fine-tuning reader streams .gz).

Written by hand rather than with `beir.util.download_and_unzip` because that helper writes the archive and the
extracted files in place: an interrupted download or extraction leaves a folder that looks complete. Here the
archive is written as `.NAME.part` and renamed once its checksum matches, and the dataset is extracted beside its
target and renamed into place once its layout is complete, so a folder under the data root is whole or absent.
"""

from __future__ import annotations

import difflib
import hashlib
import http.client
import logging
import os
import shutil
import tarfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from retromae.config import DATA_ENV, data_root
from retromae.data.corpus import CorpusError
from retromae.io import replace_directory, share_like_umask, temporary_sibling

logger = logging.getLogger(__name__)

BEIR_URL = "https://public.ukp.informatik.tu-darmstadt.de/thakur/BEIR/datasets"
MSMARCO_URL = "https://msmarco.z22.web.core.windows.net/msmarcoranking"

# The public BEIR datasets and the MD5 of their zip files, as the BEIR README publishes them.
BEIR_MD5 = {
    "msmarco": "444067daf65d982533ea17ebd59501e4",
    "trec-covid": "ce62140cb23feb9becf6270d0d1fe6d1",
    "nfcorpus": "a89dba18a62ef92f7d323ec890a0d38d",
    "nq": "d4d3d2e48787a744b6f6e691ff534307",
    "hotpotqa": "f412724f78b0d91183a0e86805e16114",
    "fiqa": "17918ed23cd04fb15047f73e6c3bd9d9",
    "arguana": "8ad3e3c2a5867cdced806d6503f29b99",
    "webis-touche2020": "46f650ba5a527fc69e0a6521c5a23563",
    "cqadupstack": "4e41456d7df8ee7760a7f866133bda78",
    "quora": "18fb154900ba42a600f84b839c173167",
    "dbpedia-entity": "c2a39eb420a3164af735795df012ac2c",
    "scidocs": "38121350fc3a4d2f48850f6aff52e4a9",
    "fever": "5a818580227bfb4b35bb6fa46d9b6c03",
    "climate-fever": "8b66f0a9126c521bae2bde127b4dc99d",
    "scifact": "5f7d1de60b170fc8027bb7898e2efca1",
}
# In BEIR's tables but not downloadable (licences): BEIR's examples/dataset explains how to build each.
BEIR_NOT_PUBLIC = ("bioasq", "signal1m", "trec-news", "robust04")

MSMARCO_PASSAGE = "msmarco-passage"
MSMARCO_ARCHIVE = "collectionandqueries.tar.gz"
MSMARCO_MD5 = "31644046b18952c1386cd4564ba2ae69"  # as Anserini's MS MARCO passage guide gives it
MSMARCO_TRIPLES = "qidpidtriples.train.full.2.tsv.gz"  # Microsoft publishes no checksum for it
MSMARCO_FILES = ("collection.tsv", "queries.train.tsv", "qrels.train.tsv", "queries.dev.small.tsv",
                 "qrels.dev.small.tsv")

CHUNK = 1 << 20  # bytes read and hashed at a time


@dataclass
class Fetched:
    name: str
    folder: Path
    downloaded: bool  # False: the dataset was already there


def names() -> list[str]:
    return sorted(BEIR_MD5) + [MSMARCO_PASSAGE]


def target_folder(name: str, root: Path | None = None) -> Path:
    """Where `retromae data get NAME` puts a dataset (the recipes' and suites' paths)."""
    root = Path(root) if root is not None else data_root()
    return root / "msmarco" if name == MSMARCO_PASSAGE else root / "beir" / name


def name_for(folder: Path) -> str | None:
    """The `retromae data get` name that makes `folder`, or None (a collection it cannot download)."""
    folder = Path(folder)
    if folder.name == "msmarco" and folder.parent.name != "beir":
        return MSMARCO_PASSAGE
    if folder.name in BEIR_MD5:
        return folder.name
    if folder.parent.name == "cqadupstack":
        return "cqadupstack"
    return None


def get_command(folders: list[Path]) -> str:
    """What to run to get these dataset folders: `retromae data get ...` for those it can download; the others
    named as collections to put there by hand."""
    known = list(dict.fromkeys(n for n in map(name_for, folders) if n))
    unknown = [Path(f).name for f in folders if name_for(f) is None]
    parts = []
    if known:
        parts.append(f"`retromae data get {' '.join(known)}` downloads {'it' if len(known) == 1 else 'them'} into "
                     f"{DATA_ENV} (now {data_root()})")
    if unknown:
        parts.append(f"{', '.join(unknown)}: not among the public datasets `retromae data get` knows; put "
                     f"{'it' if len(unknown) == 1 else 'them'} there in BEIR layout")
    return "; ".join(parts)


def check_name(name: str) -> None:
    if name in BEIR_MD5 or name == MSMARCO_PASSAGE:
        return
    if name in BEIR_NOT_PUBLIC:
        raise CorpusError(f"{name}: a BEIR dataset that is not public (licence); build it as BEIR's "
                          "examples/dataset/README.md explains, into " + str(target_folder(name)))
    close = difflib.get_close_matches(name, names(), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise CorpusError(f"{name}: not a dataset `retromae data get` knows.{hint} Known: {', '.join(names())}")


def fetch(name: str, root: Path | None = None, mirror: str | None = None, md5: str | None = None,
          force: bool = False, triples: bool = False, show_progress: bool = True) -> Fetched:
    """Download and unpack one dataset into its folder under `root` (default: the data root); a dataset already
    there is kept (`force` replaces it). `mirror`: a URL holding the same archives under the same names; `md5`:
    the archive's checksum when that mirror serves another build."""
    check_name(name)
    root = Path(root) if root is not None else data_root()
    target = target_folder(name, root)
    if name == MSMARCO_PASSAGE:
        return _fetch_msmarco(root, target, mirror, md5, force, triples, show_progress)
    if _beir_layout_problem(target, name) is None and not force:
        return Fetched(name, target, False)
    archive = download(f"{(mirror or BEIR_URL).rstrip('/')}/{name}.zip", root / ".downloads" / f"{name}.zip",
                       md5 or BEIR_MD5[name], show_progress)
    tmp = temporary_sibling(target)
    try:
        _unzip(archive, tmp)
        found = tmp / name if (tmp / name).is_dir() else tmp
        problem = _beir_layout_problem(found, name)
        if problem:
            raise CorpusError(f"{archive}: {problem}; not a BEIR archive? (delete it to download it again)")
        share_like_umask(found)
        replace_directory(found, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    archive.unlink()
    return Fetched(name, target, True)


def _fetch_msmarco(root: Path, target: Path, mirror: str | None, md5: str | None, force: bool, triples: bool,
                   show_progress: bool) -> Fetched:
    base = (mirror or MSMARCO_URL).rstrip("/")
    downloaded = False
    if force or any(not (target / f).is_file() for f in MSMARCO_FILES):
        archive = download(f"{base}/{MSMARCO_ARCHIVE}", root / ".downloads" / MSMARCO_ARCHIVE, md5 or MSMARCO_MD5,
                           show_progress)
        tmp = temporary_sibling(target)
        try:
            _untar(archive, tmp)
            files = {p.name: p for p in tmp.rglob("*.tsv")}
            missing = [f for f in MSMARCO_FILES if f not in files]
            if missing:
                raise CorpusError(f"{archive}: has no {', '.join(missing)}; not MS MARCO's {MSMARCO_ARCHIVE}? "
                                  "(delete it to download it again)")
            target.mkdir(parents=True, exist_ok=True)
            for path in files.values():  # each file renamed into place: whole or absent
                share_like_umask(path.parent)
                os.replace(path, target / path.name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        archive.unlink()
        downloaded = True
    if triples and (force or not (target / MSMARCO_TRIPLES).is_file()):
        download(f"{base}/{MSMARCO_TRIPLES}", target / MSMARCO_TRIPLES, None, show_progress)
        downloaded = True
    return Fetched(MSMARCO_PASSAGE, target, downloaded)


def download(url: str, path: Path, md5: str | None, show_progress: bool = True) -> Path:
    """`url` into `path` through `.NAME.part`, renamed once complete and (with `md5`) checked; a complete file
    already at `path` with the right checksum is not downloaded again."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file() and (md5 is None or file_md5(path) == md5):
        return path
    part = path.with_name(f".{path.name}.part")
    digest = hashlib.md5()  # noqa: S324 (the published checksums are MD5)
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(part, "wb") as out:  # noqa: S310
            total = int(response.headers.get("Content-Length") or 0) or None
            from tqdm.auto import tqdm

            received = 0
            with tqdm(total=total, unit="B", unit_scale=True, desc=path.name, disable=not show_progress) as bar:
                while block := response.read(CHUNK):
                    out.write(block)
                    digest.update(block)
                    received += len(block)
                    bar.update(len(block))
            if total is not None and received != total:  # read() just stops when the server hangs up
                raise ValueError(f"the connection ended after {received:,} of {total:,} bytes")
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as err:
        part.unlink(missing_ok=True)
        reason = f"HTTP {err.code} {err.reason}" if isinstance(err, urllib.error.HTTPError) else (
            getattr(err, "reason", None) or err)
        raise CorpusError(f"{url}: download failed ({reason}); check the connection, or give --mirror") from None
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    if md5 is not None and digest.hexdigest() != md5:
        part.unlink(missing_ok=True)
        raise CorpusError(f"{url}: the download's MD5 is {digest.hexdigest()}, not the published {md5}: a truncated "
                          "or altered file (removed); try again, or give --md5 for a mirror that serves another build")
    os.replace(part, path)
    return path


def file_md5(path: Path) -> str:
    digest = hashlib.md5()  # noqa: S324
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _unzip(archive: Path, folder: Path) -> None:
    try:
        with zipfile.ZipFile(archive) as z:
            z.extractall(folder)  # member names with / or .. are made safe by zipfile
    except zipfile.BadZipFile as err:
        raise CorpusError(f"{archive}: not a zip file ({err}); delete it to download it again") from None


def _untar(archive: Path, folder: Path) -> None:
    try:
        with tarfile.open(archive) as t:
            if hasattr(tarfile, "data_filter"):
                t.extractall(folder, filter="data")  # no absolute paths, links out of the folder or device files
            else:  # Python without extraction filters (before 3.10.12 / 3.11.4): plain files only, inside folder
                members = [m for m in t.getmembers() if (m.isfile() or m.isdir()) and not m.name.startswith("/")
                           and ".." not in Path(m.name).parts]
                t.extractall(folder, members=members)  # noqa: S202 (members checked above)
    except tarfile.TarError as err:
        raise CorpusError(f"{archive}: not a readable tar archive ({err}); delete it to download it again") from None


def _beir_layout_problem(folder: Path, name: str) -> str | None:
    """What keeps `folder` from being a BEIR dataset (for cqadupstack: a folder of forums), or None."""
    if not folder.is_dir():
        return f"{folder} is not there"
    if name == "cqadupstack":
        forums = [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith((".", "__"))]
        if not forums:
            return f"{folder} holds no forum folders"
        return next((problem for problem in (_beir_layout_problem(f, f.name) for f in forums) if problem), None)
    for needed in ("corpus.jsonl", "queries.jsonl"):
        if not (folder / needed).is_file():
            return f"{folder} has no {needed}"
    if not list((folder / "qrels").glob("*.tsv")):
        return f"{folder} has no qrels/<split>.tsv"
    return None


def describe(fetched: Fetched) -> str:
    """One line about a dataset that is now in place."""
    folder = fetched.folder
    state = "downloaded into" if fetched.downloaded else "already in"
    if fetched.name == MSMARCO_PASSAGE:
        files = sorted(p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
        return f"{fetched.name}: {state} {folder} ({', '.join(files)})"
    if fetched.name == "cqadupstack":
        forums = sorted(p.name for p in folder.iterdir() if p.is_dir())
        return f"{fetched.name}: {state} {folder} ({len(forums)} forums: {', '.join(forums)})"
    splits = sorted(p.stem for p in (folder / "qrels").glob("*.tsv"))
    return f"{fetched.name}: {state} {folder} (qrels splits: {', '.join(splits)})"
