"""Multi-process training on JAX's own multi-controller runtime (`jax.distributed`): one process per host (or
per GPU), started by hand, by Slurm / Open MPI, or on a TPU pod slice.

The library runs the same code on one process and on many; this module holds what differs: starting the runtime,
the few decisions all processes must take together (stop for the time budget, save now), the process that writes
files and logs, and turning a lost peer into one clear error instead of a hang.
"""

from __future__ import annotations

import os
import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from sasrec_jax.errors import ConfigError, DistributedError

# Environment variables `sasrec-jax train` reads when the matching flag is not given.
ENV = {
    "coordinator": "SASREC_COORDINATOR",
    "num_processes": "SASREC_NUM_PROCESSES",
    "process_id": "SASREC_PROCESS_ID",
    "local_devices": "SASREC_LOCAL_DEVICES",
}
# A peer that stops sending heartbeats for this long is declared dead and every process ends (JAX's default is
# 100 s, which is what real clusters want; tests and the benchmark pass less).
HEARTBEAT_SECONDS = 100
INIT_TIMEOUT_SECONDS = 300


@dataclass(frozen=True)
class Settings:
    """How to join a multi-process run. `auto` lets `jax.distributed.initialize()` read the cluster (Slurm,
    Open MPI, TPU pod, Kubernetes); otherwise
    `coordinator` ("host:port" of process 0), `num_processes` and `process_id` say it. `local_devices` sets the
    number of CPU devices per process (a stand-in for accelerators when testing on one machine)."""

    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_devices: int | None = None
    auto: bool = False
    heartbeat_seconds: int = HEARTBEAT_SECONDS

    @property
    def enabled(self) -> bool:
        return self.auto or self.coordinator is not None or (self.num_processes or 1) > 1

    @classmethod
    def from_env(cls, environ=None, **given) -> Settings:
        """Flags win; unset ones come from the SASREC_* environment variables."""
        environ = os.environ if environ is None else environ
        values = {}
        for name, var in ENV.items():
            value = given.get(name)
            if value is None and environ.get(var, "") != "":
                raw = environ[var]
                try:
                    value = raw if name == "coordinator" else int(raw)
                except ValueError:
                    raise ConfigError(f"{var}={raw!r} is not an integer") from None
            values[name] = value
        heartbeat = given.get("heartbeat_seconds") or HEARTBEAT_SECONDS
        return cls(**values, auto=bool(given.get("auto")), heartbeat_seconds=heartbeat)

    def check(self) -> None:
        if self.auto and self.coordinator is not None:
            raise ConfigError("--distributed detects the cluster: do not also give --coordinator")
        if self.coordinator is not None:
            if not re.fullmatch(r"[^:\s]+:\d+", self.coordinator):
                raise ConfigError(f"--coordinator must be HOST:PORT (process 0's address), got {self.coordinator!r}")
            if self.num_processes is None or self.process_id is None:
                raise ConfigError("--coordinator needs --num-processes and --process-id (or SASREC_NUM_PROCESSES, "
                                  "SASREC_PROCESS_ID)")  # fmt: skip
        elif not self.auto and (self.num_processes or 1) > 1:
            raise ConfigError("--num-processes > 1 needs --coordinator HOST:PORT, or --distributed on a cluster")
        if self.num_processes is not None and self.num_processes < 1:
            raise ConfigError(f"--num-processes must be >= 1, got {self.num_processes}")
        if self.process_id is not None and self.num_processes is not None:
            if not 0 <= self.process_id < self.num_processes:
                raise ConfigError(f"--process-id must be in [0, {self.num_processes}), got {self.process_id}")
        if self.local_devices is not None and self.local_devices < 1:
            raise ConfigError(f"--local-devices must be >= 1, got {self.local_devices}")


def initialize(settings: Settings) -> None:
    """Joins the run (a no-op for a single process). Must come before anything else touches JAX."""
    settings.check()
    import jax

    if settings.local_devices is not None:
        try:
            jax.config.update("jax_num_cpu_devices", settings.local_devices)
        except RuntimeError:  # JAX refuses once its backends exist
            raise ConfigError("--local-devices must be set before JAX starts (a fresh process)") from None
    if not settings.enabled:
        return
    kwargs: dict[str, Any] = dict(
        initialization_timeout=INIT_TIMEOUT_SECONDS, heartbeat_timeout_seconds=settings.heartbeat_seconds
    )
    if not settings.auto:
        kwargs.update(
            coordinator_address=settings.coordinator,
            num_processes=settings.num_processes,
            process_id=settings.process_id,
        )
    try:
        jax.distributed.initialize(**kwargs)
    except (RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if settings.auto:
            fix = "--distributed found no cluster it knows (Slurm, Open MPI, TPU pod, Kubernetes): give --coordinator"
            fix += " HOST:PORT --num-processes N --process-id I instead"
        else:
            fix = "check the coordinator address, that every process uses the same --num-processes, and that each"
            fix += " --process-id is given once"
        raise DistributedError(f"could not join the distributed run ({first}); {fix}") from None


def process_count() -> int:
    import jax

    return jax.process_count()


def process_index() -> int:
    import jax

    return jax.process_index()


def is_main() -> bool:
    """Process 0: the one that writes run files and logs."""
    return process_index() == 0


def barrier(name: str) -> None:
    """Every process waits here until all have arrived (nothing to do for one process)."""
    if process_count() > 1:
        from jax.experimental import multihost_utils

        with lost_peers():
            multihost_utils.sync_global_devices(name)


def any_true(*flags: bool) -> tuple[bool, ...]:
    """For each flag, whether any process has it set: a decision all processes take together (one small
    all-gather; nothing to do for one process)."""
    if process_count() == 1:
        return tuple(bool(f) for f in flags)
    from jax.experimental import multihost_utils

    with lost_peers():
        gathered = multihost_utils.process_allgather(np.asarray(flags, np.int32))
    return tuple(bool(v) for v in np.any(np.asarray(gathered).reshape(-1, len(flags)), axis=0))


def from_main(value: float) -> float:
    """Process 0's value on every process (e.g. a timing that sizes work all processes share)."""
    if process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    with lost_peers():
        return float(multihost_utils.broadcast_one_to_all(np.float64(value)))


def allgather(x) -> np.ndarray:
    """The whole of `x` on every process, as numpy: a global jax.Array's value, or every process's local rows
    concatenated in process order (all of the same shape)."""
    if process_count() == 1:
        return np.asarray(x)
    import jax
    from jax.experimental import multihost_utils

    if not (isinstance(x, jax.Array) and not x.is_fully_addressable):
        x = np.asarray(x)  # this process's rows
    with lost_peers():
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))


# What XLA / gloo / the coordination service say when a peer process has gone away.
_LOST = re.compile(
    r"Gloo|gloo|Connection closed by peer|Connection reset|heartbeat|UNAVAILABLE|DEADLINE_EXCEEDED|"
    r"coordination service|Barrier failed|tasks are unhealthy|Socket closed",
)


@contextmanager
def lost_peers():
    """Turns the runtime error of a collective whose peer died into one DistributedError line."""
    try:
        yield
    except DistributedError:
        raise
    except Exception as e:
        text = f"{type(e).__name__}: {e}"
        if process_count_safe() <= 1 or not _LOST.search(text):
            raise
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise DistributedError(
            f"process {process_index_safe()} lost contact with the other processes ({first[:200]}): another "
            "process has probably died; see its log. Start all processes again with --resume to continue from "
            "the last checkpoint"
        ) from None


def process_count_safe() -> int:
    try:
        return process_count()
    except Exception:
        return 1


def process_index_safe() -> int:
    try:
        return process_index()
    except Exception:
        return 0


def exit_now(code: int) -> None:
    """Ends this process at once. After a peer died, a normal exit would wait in JAX's shutdown barrier for the
    dead peer (minutes) and then abort with a C++ stack trace; the error line has already been printed."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
