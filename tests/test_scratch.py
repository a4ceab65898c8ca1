"""Scratch space of evaluate and mine (retromae.retrieval.scratch): on a filesystem too small for the vector shards,
a message with the sizes, not SIGBUS from a sparse memory-mapped file; fp16 shards; the folder beside the output."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from retromae.retrieval.encoder import EncodeConfig
from retromae.retrieval.evaluate import SearchConfig, evaluate_model


def in_tiny_filesystem(folder, command: list[str], size: str = "32k") -> subprocess.CompletedProcess:
    """Run `command` with a tmpfs of `size` mounted at `folder`, in a private mount namespace (no root needed where
    user namespaces are allowed)."""
    folder.mkdir(exist_ok=True)
    script = f'mount -t tmpfs -o size={size} none "{folder}" && exec "$@"'
    return subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, "sh", *command],
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def tiny_filesystems(tmp_path_factory):
    probe = tmp_path_factory.mktemp("probe")
    if shutil.which("unshare") is None or in_tiny_filesystem(probe / "fs", ["true"]).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (no unshare or no user namespaces)")
    return in_tiny_filesystem


def test_a_tiny_scratch_filesystem_gives_a_message(tiny_filesystems, tiny_model, beir_task, tmp_path):
    """Before: the shards were sparse memory-mapped files in the system's temporary folder, and the first write
    past the free space killed the process with SIGBUS (exit 135, no message)."""
    folder = tmp_path / "scratch"
    done = tiny_filesystems(folder, [sys.executable, "-m", "retromae", "evaluate", "--model", str(tiny_model),
                                     "--dataset", str(beir_task), "--precision", "no", "--work-dir", str(folder)])
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("retromae: error: ") and "of scratch space and its filesystem has" in last, last
    assert "--shard-dtype float16" in last
    # a disk that fills up after the check: the shard file is allocated for real, so the error comes at once
    code = ("from retromae.config import ConfigError\nfrom retromae.retrieval.scratch import allocate_array\n"
            f"try:\n    allocate_array('{folder}/x.npy', (100_000, 8))\nexcept ConfigError as err:\n    print(err)\n")
    done = tiny_filesystems(folder, [sys.executable, "-c", code])
    assert done.returncode == 0 and "no room for 3.1 MiB of vectors" in done.stdout, (done.returncode, done.stderr)


def test_fp16_shards_beside_the_output(st_model, beir_task, tmp_path, monkeypatch):
    """The scratch folder is made beside --output (and removed); fp16 shards give the fp32 ranking up to fp16's
    rounding of the vectors."""
    monkeypatch.delenv("RETROMAE_WORK", raising=False)
    seen = []
    import retromae.retrieval.evaluate as evaluate_module

    original = evaluate_module.make_scratch
    monkeypatch.setattr(evaluate_module, "make_scratch", lambda root, prefix: seen.append(root) or original(root, prefix))
    encode = EncodeConfig(precision="no")
    results = {}
    for dtype in ("float32", "float16"):
        output = tmp_path / dtype / "result.json"
        output.parent.mkdir()
        results[dtype] = evaluate_model(str(st_model), str(beir_task), None, encode,
                                        SearchConfig(metrics=["ndcg@10"], shard_dtype=dtype), output=str(output))
        assert json.loads(output.read_text())["settings"]["shard_dtype"] == dtype
        assert sorted(p.name for p in output.parent.iterdir()) == ["result.json"], "the scratch folder is removed"
    assert seen == [tmp_path / "float32", tmp_path / "float16"], "beside the output"
    assert abs(results["float16"]["ndcg@10"] - results["float32"]["ndcg@10"]) < 0.01
    assert np.isfinite(results["float16"]["ndcg@10"])
