"""Past one machine: one process per host, joined by `jax.distributed.initialize`.

Launch. Run the same command on each of N hosts, one process per host, differing only in
the process id (0..N-1); process 0 also serves as the coordinator at host:port:

    # host 0 (10.0.0.1)                      # host 1
    JAXOPT_COORDINATOR=10.0.0.1:1234 \\       JAXOPT_COORDINATOR=10.0.0.1:1234 \\
    JAXOPT_NUM_PROCESSES=2 \\                 JAXOPT_NUM_PROCESSES=2 \\
    JAXOPT_PROCESS_ID=0 python run.py        JAXOPT_PROCESS_ID=1 python run.py

and call `initialize()` first thing in `run.py`, before anything touches JAX's backends
(any computation, `jax.devices()`, `jax.device_put`, ...); once they exist a process can
no longer join. Afterwards `jax.devices()` lists the devices of all hosts (process 0's
first, then process 1's, ...), `jax.local_devices()` this host's, and every process must
run the same jitted programs in the same order (SPMD: each drives its own devices).

Mesh layout: tensor parallel inside a host, data parallel across hosts.
`jaxopt_llm.parallel.make_mesh(spec)` takes devices in `jax.devices()` order with `model`
varying fastest, so when each host owns consecutive devices and `model` ≤ the local device
count (and divides it), every model group — whose all-reduces run after each row-parallel
layer — stays inside one host, and only the data axis (batch shards; parameters are
replicated across it) spans the network. E.g. 2 hosts × 4 GPUs with "data=2,model=4":
host 0 holds the model group of data index 0, host 1 that of data index 1.

Per-host loading. `jaxopt_llm.parallel.shard_params` builds each array with
`jax.make_array_from_callback` when given host (numpy) arrays, so each process only
transfers to its devices the slices they hold. Every process needs the same full parameter
tree in host memory (e.g. each loads the checkpoint from shared storage). Global inputs are
built the same way, e.g. a token batch sharded on `data`:

    tokens = jax.make_array_from_callback(batch.shape, parallel.batch_sharding(mesh),
                                          lambda index: batch[index])

and a sharded result is brought to every host with
`jax.experimental.multihost_utils.process_allgather(result, tiled=True)`.

On CPU, cross-process collectives need a CPU collectives implementation
(`jax_cpu_collectives_implementation`: "gloo" over TCP, or "mpi"); with it unset, a jitted
computation over devices of several processes fails with "INVALID_ARGUMENT: Multiprocess
computations aren't implemented on the CPU backend". JAX 0.10 defaults to "gloo";
`initialize` sets it if it was unset, so CPU-only hosts (and 2 processes over loopback, as
in tests/test_multiprocess.py) work.
"""

from __future__ import annotations

import os

import jax

ENV_COORDINATOR = "JAXOPT_COORDINATOR"
ENV_NUM_PROCESSES = "JAXOPT_NUM_PROCESSES"
ENV_PROCESS_ID = "JAXOPT_PROCESS_ID"

# (argument, CLI flag, env var) of each required setting, for error messages
_SETTINGS = (
    ("coordinator", "--coordinator", ENV_COORDINATOR),
    ("num_processes", "--num-processes", ENV_NUM_PROCESSES),
    ("process_id", "--process-id", ENV_PROCESS_ID),
)


def _env_int(name: str) -> int | None:
    text = os.environ.get(name, "").strip()
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{name}={text!r} must be an integer") from None


def resolve_settings(coordinator: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None) -> tuple[str, int, int] | None:
    """(coordinator, num_processes, process_id) from the arguments, else the env vars;
    None when none is set (single process).

    Args:
        coordinator: host:port of process 0 (else JAXOPT_COORDINATOR).
        num_processes: the number of processes (else JAXOPT_NUM_PROCESSES).
        process_id: this process, 0..N-1 (else JAXOPT_PROCESS_ID).

    Returns:
        The three settings, or None.

    Raises:
        ValueError: partial or bad settings, naming what is missing or wrong.

    Example:
        >>> resolve_settings("10.0.0.1:1234", 2, 1)
        ('10.0.0.1:1234', 2, 1)
    """
    if coordinator is None:
        coordinator = os.environ.get(ENV_COORDINATOR, "").strip() or None
    if num_processes is None:
        num_processes = _env_int(ENV_NUM_PROCESSES)
    if process_id is None:
        process_id = _env_int(ENV_PROCESS_ID)
    values = (coordinator, num_processes, process_id)
    if all(v is None for v in values):
        return None
    missing = [f"{arg}= ({flag} or {env})"
               for (arg, flag, env), v in zip(_SETTINGS, values, strict=True) if v is None]
    if missing:
        given = [arg for (arg, _, _), v in zip(_SETTINGS, values, strict=True) if v is not None]
        raise ValueError(f"multi-host setup is partial: {', '.join(given)} given but "
                         f"missing {'; '.join(missing)}. Set all three, or none for a "
                         f"single process")
    host, sep, port = str(coordinator).rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"coordinator {coordinator!r} ({ENV_COORDINATOR}) must be host:port, "
                         f"e.g. 10.0.0.1:1234")
    if isinstance(num_processes, bool) or not isinstance(num_processes, int) \
            or num_processes < 1:
        raise ValueError(f"num_processes ({ENV_NUM_PROCESSES}) must be a positive integer, "
                         f"got {num_processes!r}")
    if isinstance(process_id, bool) or not isinstance(process_id, int) \
            or not 0 <= process_id < num_processes:
        raise ValueError(f"process_id ({ENV_PROCESS_ID}) must be in 0..{num_processes - 1} "
                         f"for num_processes={num_processes}, got {process_id!r}")
    return str(coordinator), num_processes, process_id


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_count: int | None = None) -> bool:
    """Join this process to a multi-host JAX job; returns whether it did.

    Settings come from the arguments, else from JAXOPT_COORDINATOR (host:port of process
    0), JAXOPT_NUM_PROCESSES and JAXOPT_PROCESS_ID. With none of them set this is a single
    process: nothing happens and it returns False. Must run before any JAX computation
    (see the module docstring). Calling it again once initialized returns True and
    changes nothing.

    Args:
        coordinator / num_processes / process_id: see `resolve_settings`.
        local_device_count: the number of CPU devices of this process
            (`jax_num_cpu_devices`, like XLA_FLAGS=--xla_force_host_platform_device_count);
            accelerators use every visible device (restrict them with
            JAX_LOCAL_DEVICE_IDS or CUDA_VISIBLE_DEVICES).

    Returns:
        True when the process joined a multi-host job.

    Raises:
        ValueError: partial settings (naming what is missing) or a bad local_device_count.

    Example:
        >>> initialize("10.0.0.1:1234", num_processes=2, process_id=0)  # doctest: +SKIP
        True
    """
    settings = resolve_settings(coordinator, num_processes, process_id)
    if local_device_count is not None and (isinstance(local_device_count, bool) or not
                                           isinstance(local_device_count, int)
                                           or local_device_count < 1):
        raise ValueError(f"local_device_count must be a positive integer, "
                         f"got {local_device_count!r}")
    if settings is not None and jax.distributed.is_initialized():
        return True
    if local_device_count is not None:
        jax.config.update("jax_num_cpu_devices", local_device_count)
    if settings is None:
        return False
    if jax.config.jax_cpu_collectives_implementation is None:
        # without it the CPU client cannot run computations spanning processes
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    coordinator, num_processes, process_id = settings
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)
    return True


__all__ = ["ENV_COORDINATOR", "ENV_NUM_PROCESSES", "ENV_PROCESS_ID", "initialize",
           "resolve_settings"]
