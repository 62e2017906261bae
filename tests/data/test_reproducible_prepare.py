"""A prepared data set is the same bytes in every process: shards (protobuf map order), tokenizer, info."""
import hashlib
import os
import subprocess
import sys

from tests import helpers

_PREPARE = ("import sys; from medvlp_jax.data.sources import synthetic; "
            "synthetic.prepare_synthetic(sys.argv[1], num_train=12, num_test=6, num_shards=2)")


def _digests(root):
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            path = os.path.join(d, f)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def test_two_processes_with_different_hash_seeds_write_identical_files(tmp_path):
    roots = []
    for seed in ("1", "2"):
        root = str(tmp_path / f"prep{seed}")
        env = dict(os.environ, PYTHONHASHSEED=seed)
        subprocess.run([sys.executable, "-c", _PREPARE, root], check=True, cwd=helpers.ROOT, env=env,
                       capture_output=True, timeout=300)
        roots.append(root)
    a, b = _digests(roots[0]), _digests(roots[1])
    assert any(name.endswith(".tfrecord") for name in a) and "tokenizer/vocab.txt" in a
    assert a == b, sorted(k for k in a if a[k] != b.get(k))
