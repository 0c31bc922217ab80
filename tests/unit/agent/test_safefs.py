"""agent.safefs on real files: every way a job pod can plant a name (a symlink to a file or a directory, a
symlinked parent, a FIFO, an oversized or sparse file) is refused with a sentence naming the file, nothing is
read or chowned through a link, and plain files and directories work."""

from __future__ import annotations

import os
import time

import pytest

from kubeflash_node.agent import safefs


@pytest.fixture
def tree(tmp_path):
    base = tmp_path / "disk"
    job = base / "jobs" / "ns" / "job"
    job.mkdir(parents=True)
    secret = tmp_path / "token"
    secret.write_text("SECRET-TOKEN")
    outside = tmp_path / "outside"
    outside.mkdir()
    return base, job, secret, outside


def test_reads_a_regular_file(tree):
    base, job, _, _ = tree
    (job / "progress.json").write_text('{"promptsDone": 1}')
    assert safefs.read_under(base, ("jobs", "ns", "job", "progress.json"), 100) == b'{"promptsDone": 1}'


def test_missing_is_file_not_found(tree):
    base, _, _, _ = tree
    with pytest.raises(FileNotFoundError):
        safefs.read_under(base, "jobs/ns/job/results.jsonl", 100)


def test_symlinked_file_is_refused(tree):
    base, job, secret, _ = tree
    os.symlink(secret, job / "results.jsonl")
    with pytest.raises(safefs.Unsafe) as e:
        safefs.read_under(base, "jobs/ns/job/results.jsonl", 1 << 20)
    assert "results.jsonl: is a symlink; expected a regular file" in str(e.value)
    assert "SECRET" not in str(e.value)


def test_symlinked_parent_is_refused(tree):
    base, job, secret, outside = tree
    (outside / "results.jsonl").write_text("OTHER TENANT")
    os.symlink(outside, job / "sub")
    with pytest.raises(safefs.Unsafe, match="sub: is a symlink; expected a directory"):
        safefs.read_under(base, "jobs/ns/job/sub/results.jsonl", 1 << 20)


def test_fifo_is_refused_without_blocking(tree):
    base, job, _, _ = tree
    os.mkfifo(job / "progress.json")
    t = time.monotonic()
    with pytest.raises(safefs.Unsafe, match="is a FIFO; expected a regular file"):
        safefs.read_under(base, "jobs/ns/job/progress.json", 100)
    assert time.monotonic() - t < 2


def test_directory_where_a_file_is_expected(tree):
    base, job, _, _ = tree
    (job / "progress.json").mkdir()
    with pytest.raises(safefs.Unsafe, match="is a directory; expected a regular file"):
        safefs.read_under(base, "jobs/ns/job/progress.json", 100)


def test_cap_refuses_large_and_sparse_files_unread(tree):
    base, job, _, _ = tree
    (job / "ok").write_bytes(b"x" * 100)
    assert len(safefs.read_under(base, "jobs/ns/job/ok", 100)) == 100
    with pytest.raises(safefs.Unsafe) as e:
        safefs.read_under(base, "jobs/ns/job/ok", 99)
    assert e.value.size == 100
    with open(job / "results.jsonl", "wb") as f:
        f.truncate(10 << 30)  # 10 GiB sparse
    t = time.monotonic()
    with pytest.raises(safefs.Unsafe, match="is 10737418240 bytes, over the 1048576 bytes"):
        safefs.read_under(base, "jobs/ns/job/results.jsonl", 1 << 20)
    assert time.monotonic() - t < 1


def test_dotdot_is_not_a_path():
    with pytest.raises(ValueError):
        safefs.read_under("/", "etc/../etc/passwd", 100)


def test_make_dirs_and_ensure_dir_owned(tree):
    base, job, _, outside = tree
    fd = safefs.make_dirs(base, ("jobs", "other", "x"))
    try:
        safefs.ensure_dir_owned(fd, "kv", None, None)
    finally:
        os.close(fd)
    assert (base / "jobs" / "other" / "x" / "kv").is_dir()
    os.symlink(outside, job / "kv")
    with safefs.dir_fd(base, "jobs/ns/job") as jfd, pytest.raises(safefs.Unsafe, match="kv: is a symlink"):
        safefs.ensure_dir_owned(jfd, "kv", os.geteuid(), os.getegid())
    with pytest.raises(safefs.Unsafe, match="job: is a symlink"):
        os.rename(job, job.parent / "moved")
        os.symlink(outside, job)
        safefs.make_dirs(base, ("jobs", "ns", "job"))


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_chown_goes_only_to_the_real_directory(tree):
    base, job, secret, outside = tree
    before = os.stat(outside)
    os.symlink(outside, job / "kv")
    with safefs.dir_fd(base, "jobs/ns/job") as jfd:
        with pytest.raises(safefs.Unsafe):
            safefs.ensure_dir_owned(jfd, "kv", 4242, 4243)
        os.unlink(job / "kv")
        safefs.ensure_dir_owned(jfd, "kv", 4242, 4243)
    st = os.stat(job / "kv")
    assert (st.st_uid, st.st_gid) == (4242, 4243)
    assert (os.stat(outside).st_uid, os.stat(outside).st_gid) == (before.st_uid, before.st_gid)
    assert os.stat(secret).st_uid == before.st_uid
