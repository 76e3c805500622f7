"""biomedap.io: atomic writes, locked appends, tolerant JSONL reading, hashing."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import multiprocessing
import os
import stat
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from biomedap import io as bio

# --------------------------------------------------------------------------- atomic writes


def test_atomic_write_json_roundtrip_keeps_order_nan_and_unicode(tmp_path):
    path = tmp_path / "deep" / "er" / "result.json"  # parents are created
    bio.atomic_write_json(path, {"z": 1, "a": float("nan"), "name": "Glioma – Grad IV"})
    text = path.read_text(encoding="utf-8")
    assert text.endswith("\n") and "NaN" in text and "Glioma – Grad IV" in text
    assert text.index('"z"') < text.index('"a"')  # insertion order, not sorted
    back = json.loads(text)
    assert back["z"] == 1 and math.isnan(back["a"])
    assert os.listdir(path.parent) == ["result.json"]


def test_failed_json_serialisation_leaves_old_file_and_no_temp(tmp_path):
    path = tmp_path / "result.json"
    bio.atomic_write_json(path, {"old": True})
    before = path.read_bytes()
    with pytest.raises(TypeError):
        bio.atomic_write_json(path, {"new": True, "bad": object()})
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["result.json"]


def test_failure_after_temp_file_written_cleans_up(tmp_path, monkeypatch):
    # Fail at the very last step, after the temp file exists and holds the full new content.
    path = tmp_path / "blob.bin"
    bio.atomic_write_bytes(path, b"old content")
    seen = []

    def failing_replace(src, dst):
        with open(src, "rb") as handle:
            seen.append(handle.read())
        raise OSError("disk went away")

    monkeypatch.setattr(bio.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk went away"):
        bio.atomic_write_bytes(path, b"new content")
    assert seen == [b"new content"]  # the temp file really was written before the failure
    assert path.read_bytes() == b"old content"
    assert os.listdir(tmp_path) == ["blob.bin"]


def test_failed_safetensors_save_leaves_old_file_and_no_temp(tmp_path):
    path = tmp_path / "state.safetensors"
    bio.atomic_save_safetensors(path, {"w": torch.ones(2)})
    before = path.read_bytes()
    base = torch.zeros(4)
    with pytest.raises(RuntimeError):  # safetensors refuses tensors that share storage
        bio.atomic_save_safetensors(path, {"a": base, "b": base[:2]})
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["state.safetensors"]


def test_atomic_save_safetensors_roundtrip(tmp_path):
    weight = torch.nn.Parameter(torch.arange(6.0).reshape(2, 3))
    tensors = {"weight_t": weight.t(), "ids": torch.tensor([3, 1, 2])}  # non-contiguous, requires grad
    path = tmp_path / "sub" / "state.safetensors"
    bio.atomic_save_safetensors(path, tensors, metadata={"method": "coop", "format_version": "1"})
    loaded = load_file(path)
    assert torch.equal(loaded["weight_t"], weight.detach().t()) and torch.equal(loaded["ids"], tensors["ids"])
    with safe_open(path, framework="pt") as handle:
        assert handle.metadata() == {"method": "coop", "format_version": "1"}
    with pytest.raises(TypeError, match="format_version"):
        bio.atomic_save_safetensors(path, tensors, metadata={"format_version": 1})


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_permissions_new_file_follows_umask_existing_file_kept(tmp_path):
    fresh = tmp_path / "fresh.txt"
    bio.atomic_write_text(fresh, "x")
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o666 & ~umask  # not the 0o600 of a bare temp file

    private = tmp_path / "private.txt"
    private.write_text("old")
    private.chmod(0o640)
    bio.atomic_write_text(private, "new")
    assert private.read_text() == "new"
    assert stat.S_IMODE(private.stat().st_mode) == 0o640


# --------------------------------------------------------------------------- locked appends and JSONL


def _append_worker(path: str, worker: int, count: int) -> None:
    for i in range(count):
        # Long lines (> a pipe/page buffer) make torn or interleaved writes visible if they happen.
        bio.locked_append_line(path, json.dumps({"w": worker, "i": i, "pad": "x" * 5000}))


def test_concurrent_appends_never_interleave(tmp_path):
    path = tmp_path / "results.jsonl"
    method = "fork" if sys.platform.startswith("linux") else "spawn"
    ctx = multiprocessing.get_context(method)
    procs = [ctx.Process(target=_append_worker, args=(str(path), w, 50)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert all(p.exitcode == 0 for p in procs)

    lines = path.read_text(encoding="utf-8").split("\n")
    assert lines[-1] == ""  # file ends with a newline
    records = [json.loads(line) for line in lines[:-1]]  # every line parses on its own
    assert len(records) == 200
    assert {(r["w"], r["i"]) for r in records} == {(w, i) for w in range(4) for i in range(50)}
    for w in range(4):  # each worker's lines stay in its own order
        assert [r["i"] for r in records if r["w"] == w] == list(range(50))
    assert bio.read_jsonl(path) == records


def test_locked_append_line_rejects_embedded_newline(tmp_path):
    with pytest.raises(ValueError, match="newline"):
        bio.locked_append_line(tmp_path / "x.jsonl", '{"a": 1}\n{"b": 2}')


def test_read_jsonl_skips_truncated_last_line(tmp_path, caplog):
    path = tmp_path / "results.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2}\n{"a": 3, "b": [1, 2', encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="biomedap.io"):
        records = bio.read_jsonl(path)
    assert records == [{"a": 1}, {"a": 2}]
    assert any("truncated" in r.getMessage() for r in caplog.records)


def test_read_jsonl_raises_on_corruption_before_the_end(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text('{"a": 1}\n{"a": \n{"a": 3}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="line 2"):
        bio.read_jsonl(path)


# --------------------------------------------------------------------------- hashing


def test_json_fingerprint_ignores_key_order_only():
    a = {"method": "coop", "cfg": {"lr": 0.002, "ctx": 4}, "seeds": [1, 2, 3]}
    b = {"seeds": [1, 2, 3], "cfg": {"ctx": 4, "lr": 0.002}, "method": "coop"}
    assert bio.json_fingerprint(a) == bio.json_fingerprint(b)
    assert bio.json_fingerprint(a) != bio.json_fingerprint({**a, "seeds": [3, 2, 1]})  # list order matters
    assert bio.json_fingerprint(a) != bio.json_fingerprint({**a, "cfg": {"lr": 0.002, "ctx": 8}})
    canonical = '{"cfg":{"ctx":4,"lr":0.002},"method":"coop","seeds":[1,2,3]}'
    assert bio.json_fingerprint(a) == hashlib.sha256(canonical.encode()).hexdigest()
    with pytest.raises(TypeError):
        bio.json_fingerprint({"path": object()})


def test_file_and_bytes_sha256_match_hashlib(tmp_path):
    data = os.urandom(100_003)
    path = tmp_path / "img.png"
    path.write_bytes(data)
    expected = hashlib.sha256(data).hexdigest()
    assert bio.file_sha256(path) == expected
    assert bio.file_sha256(path, chunk=4096) == expected  # many chunks, last one partial
    assert bio.bytes_sha256(data) == expected


def test_short_hash():
    assert bio.short_hash("abc") == hashlib.sha256(b"abc").hexdigest()[:12]
    assert bio.short_hash(b"abc", n=20) == hashlib.sha256(b"abc").hexdigest()[:20]
    with pytest.raises(ValueError):
        bio.short_hash("abc", n=0)
