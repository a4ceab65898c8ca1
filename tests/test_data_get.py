"""`retromae data get`: the real download code against a local HTTP server serving archives in the published
layouts (BEIR's zip of a dataset folder, MS MARCO's collectionandqueries.tar.gz); what it writes is what the recipes
and suites read under $RETROMAE_DATA. And `retromae data pairs`: a task from one's own pairs."""

import gzip
import hashlib
import http.server
import io
import json
import tarfile
import threading
import zipfile
from pathlib import Path

import pytest

from retromae.cli import main

ROOT = Path(__file__).resolve().parents[1]


class _Server:
    """http.server in a thread, serving a folder; counts the requests per path."""

    def __init__(self, folder: Path, broken: dict | None = None):
        self.requests: list[str] = []
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(folder), **kwargs)

            def do_GET(self):  # noqa: N802
                server.requests.append(self.path)
                if broken and self.path in broken:  # announce a length, send less, hang up
                    self.send_response(200)
                    self.send_header("Content-Length", str(broken[self.path]))
                    self.end_headers()
                    self.wfile.write(b"PK\x03\x04 truncated")
                    self.close_connection = True
                    return
                super().do_GET()

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def beir_zip(task: Path, name: str, out: Path) -> str:
    """A zip as BEIR publishes them: NAME/corpus.jsonl, NAME/queries.jsonl, NAME/qrels/<split>.tsv; its MD5."""
    with zipfile.ZipFile(out, "w") as z:
        for path in sorted(task.rglob("*")):
            if path.is_file():
                z.write(path, f"{name}/{path.relative_to(task)}")
    return hashlib.md5(out.read_bytes()).hexdigest()


def msmarco_tar(out: Path) -> str:
    """collectionandqueries.tar.gz's layout: the TSV files at the top; 4 passages, 2 training and 2 dev queries."""
    files = {
        "collection.tsv": "0\tthe cat sat on the mat\n1\tdogs chase cats\n2\tthe stock market fell\n3\train in spain\n",
        "queries.train.tsv": "10\twhere did the cat sit\n11\twhat do dogs chase\n",
        "qrels.train.tsv": "10\t0\t0\t1\n11\t0\t1\t1\n",
        "queries.dev.small.tsv": "20\tstock market\n21\tspain weather\n",
        "qrels.dev.small.tsv": "20\t0\t2\t1\n21\t0\t3\t1\n",
        "queries.eval.small.tsv": "30\tcats\n",
    }
    with tarfile.open(out, "w:gz") as t:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return hashlib.md5(out.read_bytes()).hexdigest()


def tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def served(tmp_path, beir_task):
    site = tmp_path / "site"
    site.mkdir()
    md5 = beir_zip(beir_task, "nfcorpus", site / "nfcorpus.zip")
    with _Server(site, broken={"/scifact.zip": 50_000}) as server:
        yield server, md5


def test_beir_dataset_lands_where_suites_and_recipes_read_it(served, beir_task, tmp_path, monkeypatch, capsys):
    server, md5 = served
    data = tmp_path / "data"
    assert main(["data", "get", "nfcorpus", "--root", str(data), "--mirror", server.url, "--md5", md5]) == 0
    assert "nfcorpus: downloaded into" in capsys.readouterr().out
    assert tree(data / "beir" / "nfcorpus") == tree(beir_task), "the dataset as published, file for file"
    assert sorted(p.name for p in data.rglob("*") if p.name.startswith(".") or p.suffix == ".zip") == [".downloads"]
    assert not list((data / ".downloads").iterdir()), "the archive is removed once unpacked"
    # a second get keeps it and asks the server nothing
    assert main(["data", "get", "nfcorpus", "--root", str(data), "--mirror", server.url, "--md5", md5]) == 0
    assert server.requests == ["/nfcorpus.zip"] and "already in" in capsys.readouterr().out
    # recipes and suites read it through RETROMAE_DATA, and evaluate --dataset finds it by its name
    monkeypatch.setenv("RETROMAE_DATA", str(data))
    from retromae.retrieval.data import load_dataset

    assert load_dataset("nfcorpus").sources["corpus"] == str(data / "beir" / "nfcorpus" / "corpus.jsonl")
    from retromae.pretrain import load_config

    recipe = load_config(str(ROOT / "pretrain" / "retromae_nfcorpus_small.yaml"))
    assert recipe.data.corpus[0] == str(data / "beir" / "nfcorpus" / "corpus.jsonl")
    out = tmp_path / "local.md"
    assert main(["evaluate", "--model", "bm25", "--suite", str(ROOT / "eval" / "local.yaml"), "--output", str(out)]) == 0
    table = out.read_text()
    assert "| nfcorpus |" in table and "average (1 of 5)" in table
    assert "skipped cranfield: not found at" in table


def test_checksum_mismatch_and_broken_downloads_leave_nothing(served, tmp_path, capsys):
    server, md5 = served
    data = tmp_path / "data"
    assert main(["data", "get", "nfcorpus", "--root", str(data), "--mirror", server.url]) == 2
    err = capsys.readouterr().err
    assert f"MD5 is {md5}, not the published a89dba18a62ef92f7d323ec890a0d38d" in err
    assert len([line for line in err.splitlines() if "retromae: error:" in line]) == 1
    # a connection that ends before the announced length; a file the server does not have
    assert main(["data", "get", "scifact", "--root", str(data), "--mirror", server.url]) == 2
    assert "scifact.zip: download failed (the connection ended after 14 of 50,000 bytes)" in capsys.readouterr().err
    assert main(["data", "get", "fiqa", "--root", str(data), "--mirror", server.url]) == 2
    assert "fiqa.zip: download failed (HTTP 404 File not found)" in capsys.readouterr().err
    assert [p for p in data.rglob("*") if p.is_file()] == [], "no partial archive, no half-unpacked dataset"
    assert not (data / "beir").exists() or not list((data / "beir").iterdir())
    # names are checked before anything is downloaded
    assert main(["data", "get", "nfcorpus", "nfcorpu", "--root", str(data), "--mirror", server.url]) == 2
    assert "nfcorpu: not a dataset `retromae data get` knows. Did you mean 'nfcorpus'?" in capsys.readouterr().err
    assert server.requests.count("/nfcorpus.zip") == 1


def test_msmarco_passage_tar_and_triples(tmp_path, monkeypatch, capsys):
    site = tmp_path / "site"
    site.mkdir()
    md5 = msmarco_tar(site / "collectionandqueries.tar.gz")
    (site / "qidpidtriples.train.full.2.tsv.gz").write_bytes(gzip.compress(b"10\t0\t2\n11\t1\t3\n"))
    data = tmp_path / "data"
    with _Server(site) as server:
        assert main(["data", "get", "msmarco-passage", "--root", str(data), "--mirror", server.url, "--md5", md5,
                     "--triples"]) == 0
    folder = data / "msmarco"
    assert sorted(p.name for p in folder.iterdir()) == [
        "collection.tsv", "qidpidtriples.train.full.2.tsv.gz", "qrels.dev.small.tsv", "qrels.train.tsv",
        "queries.dev.small.tsv", "queries.eval.small.tsv", "queries.train.tsv"]
    from retromae.retrieval.data import load_dataset

    dev = load_dataset(str(folder))
    assert dev.kind == "msmarco" and dev.qrels == {"20": {"2": 1}, "21": {"3": 1}}
    # the MS MARCO suite finds it under RETROMAE_DATA: BM25 ranks each dev query's passage first
    monkeypatch.setenv("RETROMAE_DATA", str(data))
    out = tmp_path / "dev.md"
    assert main(["evaluate", "--model", "bm25", "--suite", str(ROOT / "eval" / "msmarco_dev.yaml"), "--output",
                 str(out)]) == 0
    assert "| msmarco | 1.0000 | 1.0000 | 1.0000 |" in out.read_text()
    # fine-tuning reads its training queries and the gzipped triples
    from retromae.finetune.data import load_training_data

    train = load_training_data(str(folder), "msmarco", "train", None, str(folder / "qidpidtriples.train.full.2.tsv.gz"),
                               " ", 5, 0)
    assert len(train) == 2 and train.with_negatives() == 2


def test_a_suite_that_finds_nothing_fails_with_what_it_looked_for(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RETROMAE_DATA", str(tmp_path / "empty"))
    assert main(["evaluate", "--model", "bm25", "--suite", str(ROOT / "eval" / "local.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("retromae: error: suite 'local BEIR-layout collections': none of its datasets (nfcorpus, "
                          f"cranfield, cisi, medline, adi) is under {tmp_path / 'empty' / 'beir'};")
    assert "`retromae data get nfcorpus` downloads it" in err and "cranfield, cisi, medline, adi: not among" in err


def test_pairs_make_a_task_that_trains_and_evaluates(tmp_path, capsys):
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("query\tpassage\nwhat sat on the mat\tthe cat sat on the mat\nwhat do dogs chase\tdogs chase cats\n"
                     "what sat on the mat\ta cat, on a mat\nstocks\tthe stock market fell\nspain\train in spain\n")
    texts = tmp_path / "texts.txt"
    texts.write_text("dogs chase cats\nan unrelated line\n\n")
    out = tmp_path / "task"
    assert main(["data", "pairs", str(pairs), "--texts", str(texts), "--output", str(out), "--test-share", "0.25"]) == 0
    corpus = [json.loads(line) for line in (out / "corpus.jsonl").read_text().splitlines()]
    # the texts first (d0, d1), then the passages not among them; "dogs chase cats" is one document
    assert [(d["_id"], d["text"]) for d in corpus] == [
        ("d0", "dogs chase cats"), ("d1", "an unrelated line"), ("d2", "the cat sat on the mat"),
        ("d3", "a cat, on a mat"), ("d4", "the stock market fell"), ("d5", "rain in spain")]
    qrels = {split: (out / "qrels" / f"{split}.tsv").read_text().splitlines()[1:] for split in ("train", "test")}
    judged = sorted(qrels["train"] + qrels["test"])
    assert judged == ["q0\td2\t1", "q0\td3\t1", "q1\td0\t1", "q2\td4\t1", "q3\td5\t1"], "a repeated query: 2 positives"
    assert len({line.split()[0] for line in qrels["test"]}) == 1, "a quarter of the 4 queries is tested"
    assert "wrote" in capsys.readouterr().out
    from retromae.retrieval.data import load_dataset

    assert len(load_dataset(str(out), "test").queries) == 1
    # a bad line names its file and line; an existing folder is not overwritten
    pairs.write_text("a\tb\nno tab here\n")
    assert main(["data", "pairs", str(pairs), "--output", str(tmp_path / "other")]) == 2
    assert "pairs.tsv:2: expected 'query<TAB>passage', got 1 tab-separated column(s)" in capsys.readouterr().err
    assert main(["data", "pairs", str(pairs), "--output", str(out)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err and len(corpus) == 6
