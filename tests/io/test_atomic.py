"""Directory replacement: at every step a crash leaves the old or the new version at the
path, and the next save or load cleans up (fault injection: an exception at each step,
and a real child process killed mid-save)."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from jaxopt_llm.io import atomic
from jaxopt_llm.train.loop import load_checkpoint, save_checkpoint


def _version(directory: Path) -> int:
    return json.loads((directory / "meta.json").read_text())["step"]


def _save(directory: Path, step: int) -> None:
    save_checkpoint(directory, {"w": np.full(4, step, np.float32)}, {"step": step})


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.mark.parametrize("exchange_available", [True, False])
@pytest.mark.parametrize("fail_at", ["write", "fsync", "swap", "second_rename", "cleanup"])
def test_a_crash_at_each_step_keeps_a_complete_version(tmp_path, monkeypatch, fail_at,
                                                       exchange_available):
    target = tmp_path / "run.checkpoint"
    _save(target, 1)
    real_rename, real_exchange, real_fsync = os.rename, atomic.exchange, os.fsync
    renames = []

    def exchange(a, b):
        if not exchange_available:
            return False
        if fail_at == "swap":
            raise OSError("injected: crash at the swap")
        return real_exchange(a, b)

    def rename(src, dst):
        renames.append((src, dst))
        if fail_at == "swap" and len(renames) == 1 \
                or fail_at == "second_rename" and len(renames) == 2:
            raise OSError("injected: crash at a rename")
        return real_rename(src, dst)

    def fsync(fd):
        if fail_at == "fsync":
            raise OSError("injected: disk full")
        return real_fsync(fd)

    def write(*args, **kwargs):
        raise OSError("injected: crash while writing")

    if fail_at == "write":
        monkeypatch.setattr("jaxopt_llm.train.loop.write_safetensors", write)
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(atomic, "exchange", exchange)
    monkeypatch.setattr(os, "fsync", fsync)
    succeeds = fail_at == "cleanup" or (fail_at == "second_rename" and exchange_available)
    if fail_at == "cleanup":
        monkeypatch.setattr("shutil.rmtree", lambda *a, **k: None)  # old copy left behind
    if succeeds:
        _save(target, 2)
    else:
        with pytest.raises(OSError, match="injected"):
            _save(target, 2)
    monkeypatch.undo()
    assert _version(target) in (1, 2)  # the path names a complete version, always
    state = load_checkpoint(target, {"w": np.zeros(4, np.float32)}, {"step": _version(target)})
    np.testing.assert_array_equal(np.asarray(state["w"]), _version(target))
    _save(target, 3)  # the next save cleans every leftover of this process' crashed saves
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != target.name]
    assert _version(target) == 3
    # leftovers of a live process (this one) stay until their owner is gone
    assert all(f"-{os.getpid()}-" in name for name in leftovers)


def test_abandoned_temporaries_are_removed_and_an_interrupted_swap_restored(tmp_path):
    target = tmp_path / "model"
    pid = _dead_pid()
    (tmp_path / f".model.tmp-{pid}-0123abcd").mkdir()  # a killed save's half-written copy
    old = tmp_path / f".model.old-{pid}-89abcdef"  # killed between the two renames
    old.mkdir()
    (old / "meta.json").write_text('{"step": 7}')
    foreign = [tmp_path / ".model.tmp-notapid", tmp_path / f".other.tmp-{pid}-0123abcd",
               tmp_path / f".model.tmp-{os.getpid()}-0123abcd"]  # not ours, or alive
    for path in foreign:
        path.mkdir()
    touched = atomic.clean_stale(target)
    assert _version(target) == 7 and old in touched
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["model", *(p.name for p in foreign)])


def test_a_killed_save_leaves_the_previous_artifact_and_the_next_save_cleans(tmp_path):
    """A real child process, killed with SIGKILL while it writes a big checkpoint."""
    target = tmp_path / "run.checkpoint"
    _save(target, 1)
    script = textwrap.dedent(f"""
        import numpy as np, sys
        from jaxopt_llm.train.loop import save_checkpoint
        from jaxopt_llm.io import safetensors_file
        real = safetensors_file.write_safetensors
        import jaxopt_llm.train.loop as loop
        def slow(path, arrays, **kw):
            real(path, arrays, **kw)
            print("written", flush=True)
            import time; time.sleep(60)
        loop.write_safetensors = slow
        save_checkpoint(__import__("pathlib").Path({str(target)!r}),
                        {{"w": np.full(4, 2, np.float32)}}, {{"step": 2}})
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "written"
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".run.checkpoint.tmp-")]
    assert len(leftovers) == 1 and _version(target) == 1
    _save(target, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.checkpoint"]
    assert _version(target) == 3


def test_exchange_swaps_two_directories_where_the_system_can(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("a")
    (b / "x").write_text("b")
    if atomic.exchange(a, b):  # Linux 3.15+: renameat2(RENAME_EXCHANGE)
        assert (a / "x").read_text() == "b" and (b / "x").read_text() == "a"
    else:
        assert (a / "x").read_text() == "a" and (b / "x").read_text() == "b"
    if sys.platform == "linux":
        assert atomic._renameat2() is not None
