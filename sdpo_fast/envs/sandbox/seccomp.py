"""The seccomp filter of every sandboxed program, built with libseccomp (the system's libseccomp.so.2).

libseccomp knows each machine's syscall numbers and ABIs and compiles the rules to BPF. The filter is
built once in the evaluator and exported as BPF bytes, so the forked child installs it with a single
prctl() and allocates nothing. Everything is allowed except (errno EACCES unless noted):

- socket(): no new sockets (so no network or abstract unix sockets, even without a network namespace);
- io_uring_*: a second, unfiltered syscall path;
- add_key, request_key, keyctl: the kernel keyrings outlive the process (the uid's keyring would keep
  notes between evaluations);
- unshare, setns, clone() with a CLONE_NEW* flag, and clone3 (ENOSYS, so libc falls back to clone()):
  no new namespaces, the main kernel attack surface open to an unprivileged process;
- perf_event_open, bpf, userfaultfd: kernel attack surface and precise timers no program here needs;
- syscalls of another ABI (x32, i386 on x86-64): refused as a whole.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import struct

_ALLOW = 0x7FFF0000


def _errno(code: int) -> int:
    return 0x00050000 | code


_DENIED = ("socket", "io_uring_setup", "io_uring_enter", "io_uring_register", "add_key", "request_key",
           "keyctl", "unshare", "setns", "perf_event_open", "bpf", "userfaultfd")
# CLONE_NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET
_CLONE_NEW = (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000)
_ATTR_ACT_BADARCH, _CMP_MASKED_EQ = 2, 7


class _ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("datum_a", ctypes.c_uint64),
                ("datum_b", ctypes.c_uint64)]


@functools.lru_cache(maxsize=1)
def filter_program() -> tuple[ctypes.Array, ctypes.Array] | None:
    """(BPF code, struct sock_fprog pointing at it), or None where libseccomp is missing or fails."""
    try:
        lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
    except OSError:
        return None
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
                                           ctypes.POINTER(_ArgCmp)]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_attr_set.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32]
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    ctx = lib.seccomp_init(_ALLOW)
    if not ctx:
        return None
    try:
        deny = _errno(errno.EACCES)
        ok = lib.seccomp_attr_set(ctx, _ATTR_ACT_BADARCH, deny) == 0

        def rule(action: int, syscall: str, *cmps: _ArgCmp) -> bool:
            nr = lib.seccomp_syscall_resolve_name(syscall.encode())
            if nr == -1:  # a name libseccomp does not know: nothing to filter
                return True
            array = (_ArgCmp * len(cmps))(*cmps) if cmps else None
            return lib.seccomp_rule_add_array(ctx, action, nr, len(cmps), array) == 0

        ok &= all(rule(deny, name) for name in _DENIED)
        ok &= all(rule(_errno(errno.EPERM), "clone", _ArgCmp(0, _CMP_MASKED_EQ, flag, flag)) for flag in _CLONE_NEW)
        ok &= rule(_errno(errno.ENOSYS), "clone3")
        if not ok:
            return None
        read_fd, write_fd = os.pipe()
        try:
            if lib.seccomp_export_bpf(ctx, write_fd) != 0:
                return None
            os.close(write_fd)
            write_fd = -1
            code = b"".join(iter(lambda: os.read(read_fd, 65536), b""))
        finally:
            os.close(read_fd)
            if write_fd >= 0:
                os.close(write_fd)
    finally:
        lib.seccomp_release(ctx)
    if not code or len(code) % 8:
        return None
    program = ctypes.create_string_buffer(code, len(code))
    fprog = ctypes.create_string_buffer(struct.pack("HxxxxxxP", len(code) // 8, ctypes.addressof(program)))
    return program, fprog
