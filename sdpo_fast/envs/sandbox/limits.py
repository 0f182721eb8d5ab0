"""The limits of one sandboxed run, and the error raised where code cannot be run safely."""

from __future__ import annotations

from dataclasses import dataclass


class SandboxUnavailable(RuntimeError):
    """This machine cannot run untrusted code safely (or no interpreter is usable by the sandbox)."""


@dataclass(frozen=True)
class Limits:
    """Resource limits of one sandboxed run (per process where the kernel counts per process)."""

    cpu_s: float = 2.0          # CPU seconds per process (RLIMIT_CPU; SIGKILL one second later)
    wall_s: float = 4.0         # wall-clock seconds for the whole run
    memory_mb: int = 512        # address space per process (RLIMIT_AS) and, with "memcg", the whole run
    processes: int = 8          # processes and threads of the run (RLIMIT_NPROC)
    file_mb: int = 16           # largest file written (RLIMIT_FSIZE) and size of each private tmpfs
    output_bytes: int = 1 << 20  # stdout + stderr captured; more kills the run
    open_files: int = 64        # RLIMIT_NOFILE
    reply_bytes: int = 1 << 17  # largest reply (one encoded return value) in call mode, capped at output_bytes

    def __post_init__(self) -> None:
        for name, value in self.__dict__.items():
            if not value > 0:
                raise ValueError(f"Limits.{name} must be positive, got {value!r}")

    @property
    def reply_cap(self) -> int:
        """The reply size the judge reads before it kills the run."""
        return min(self.reply_bytes, self.output_bytes)
