"""Multi-host execution proven with 2 processes over loopback (2 CPU devices each, gloo
collectives): a data=2,model=2 mesh over both processes scores what one device scores.
Also: `distributed.initialize` settings errors, checked without joining anything."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from multiprocess_worker import MESH, tiny_config, tiny_params, tokens

from jaxopt_llm import distributed
from jaxopt_llm.evaluate import window_nll

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("multiprocess_worker.py")
NUM_PROCESSES = 2
TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if "proxy" not in k.lower()  # gRPC would send loopback traffic to a proxy
           and not k.startswith(("JAXOPT_", "JAX_COORDINATOR", "JAX_LOCAL_DEVICE"))}
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
               OPENBLAS_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])))
    return env


def _tail(path: Path, chars: int = 4000) -> str:
    text = path.read_text(errors="replace") if path.exists() else "<no output>"
    return text[-chars:]


def _run_job(tmp_path: Path) -> dict:
    """Run the workers to completion; on a failure or a hang, kill them all and fail with
    every worker's return code and output."""
    out = tmp_path / "result.json"
    coordinator = f"127.0.0.1:{_free_port()}"
    procs, logs = [], []
    try:
        for i in range(NUM_PROCESSES):
            log = tmp_path / f"worker{i}.log"
            logs.append(log)
            with log.open("w") as handle:  # a file, not a pipe: a full pipe can block it
                procs.append(subprocess.Popen(
                    [sys.executable, str(WORKER), "--coordinator", coordinator,
                     "--num-processes", str(NUM_PROCESSES), "--process-id", str(i),
                     "--out", str(out)],
                    stdout=handle, stderr=subprocess.STDOUT, env=_worker_env(), cwd=ROOT))
        deadline = time.monotonic() + TIMEOUT_S
        problem = None
        while problem is None and any(p.poll() is None for p in procs):
            failed = [i for i, p in enumerate(procs) if p.poll() not in (None, 0)]
            if failed:
                problem = f"worker(s) {failed} failed"
            elif time.monotonic() > deadline:
                problem = f"timed out after {TIMEOUT_S} s"
            else:
                time.sleep(0.2)
        if problem is None and any(p.returncode for p in procs):
            problem = "worker(s) failed"
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for p in procs:
            p.wait()
    if problem is None and not out.exists():
        problem = f"process 0 wrote no {out.name}"
    if problem is not None:
        report = "\n".join(f"--- worker {i} (rc={p.returncode}) ---\n{_tail(log)}"
                           for i, (p, log) in enumerate(zip(procs, logs, strict=True)))
        pytest.fail(f"2-process job {problem}\n{report}", pytrace=False)
    return json.loads(out.read_text())


def test_two_processes_over_loopback_equal_one_device(tmp_path):
    result = _run_job(tmp_path)
    assert result["joined"] is True
    assert result["cpu_collectives"] == "gloo"
    for index, seen in enumerate(result["processes"]):
        assert seen == {"process_index": index, "process_count": 2, "local_device_count": 2,
                        "device_count": 4, "addressable_shards": 2}
    # tensor parallel inside a process, data parallel across processes
    assert MESH == "data=2,model=2"
    assert result["mesh_process_indices"] == [[0, 0], [1, 1]]

    config = tiny_config()
    device = jax.devices()[0]
    params = jax.device_put(tiny_params(config), device)
    expected = np.asarray(window_nll(params, jax.device_put(tokens(config), device),
                                     config=config))
    got = np.asarray(result["nll"], np.float32)
    assert got.shape == expected.shape == (4,)
    np.testing.assert_allclose(got, expected, rtol=1e-5)


@pytest.fixture
def clean_env(monkeypatch):
    for name in (distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES,
                 distributed.ENV_PROCESS_ID):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_initialize_without_settings_is_single_process(clean_env):
    assert distributed.resolve_settings() is None
    assert distributed.initialize() is False
    assert not jax.distributed.is_initialized()


def test_settings_from_env_and_arguments(clean_env):
    clean_env.setenv(distributed.ENV_COORDINATOR, "10.0.0.1:1234")
    clean_env.setenv(distributed.ENV_NUM_PROCESSES, "4")
    clean_env.setenv(distributed.ENV_PROCESS_ID, "3")
    assert distributed.resolve_settings() == ("10.0.0.1:1234", 4, 3)
    assert distributed.resolve_settings(process_id=1) == ("10.0.0.1:1234", 4, 1)


@pytest.mark.parametrize("env, kwargs, missing, present", [
    ({"JAXOPT_COORDINATOR": "127.0.0.1:1234"}, {},
     ["JAXOPT_NUM_PROCESSES", "JAXOPT_PROCESS_ID"], ["JAXOPT_COORDINATOR"]),
    ({"JAXOPT_COORDINATOR": "127.0.0.1:1234", "JAXOPT_NUM_PROCESSES": "2"}, {},
     ["JAXOPT_PROCESS_ID", "--process-id"], ["JAXOPT_COORDINATOR", "JAXOPT_NUM_PROCESSES"]),
    ({}, {"process_id": 1}, ["JAXOPT_COORDINATOR", "JAXOPT_NUM_PROCESSES", "--coordinator"],
     ["JAXOPT_PROCESS_ID"]),
    ({"JAXOPT_PROCESS_ID": "0"}, {"coordinator": "h:1"}, ["JAXOPT_NUM_PROCESSES"],
     ["JAXOPT_COORDINATOR", "JAXOPT_PROCESS_ID"]),
])
def test_partial_settings_name_what_is_missing(clean_env, env, kwargs, missing, present):
    for name, value in env.items():
        clean_env.setenv(name, value)
    with pytest.raises(ValueError, match="partial") as err:
        distributed.initialize(**kwargs)
    for name in missing:
        assert name in str(err.value)
    for name in present:
        assert name not in str(err.value)
    assert not jax.distributed.is_initialized()


@pytest.mark.parametrize("kwargs, env, match", [
    ({"coordinator": "localhost", "num_processes": 2, "process_id": 0}, {}, "host:port"),
    ({"coordinator": "h:1", "num_processes": 2, "process_id": 2}, {}, r"0\.\.1"),
    ({"coordinator": "h:1", "num_processes": 0, "process_id": 0}, {}, "positive"),
    ({}, {"JAXOPT_COORDINATOR": "h:1", "JAXOPT_NUM_PROCESSES": "two",
          "JAXOPT_PROCESS_ID": "0"}, "JAXOPT_NUM_PROCESSES='two' must be an integer"),
    ({"local_device_count": 0}, {}, "local_device_count"),
])
def test_bad_settings_are_value_errors(clean_env, kwargs, env, match):
    for name, value in env.items():
        clean_env.setenv(name, value)
    with pytest.raises(ValueError, match=match):
        distributed.initialize(**kwargs)
    assert not jax.distributed.is_initialized()
