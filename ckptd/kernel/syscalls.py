"""Thin ctypes wrappers over the raw syscalls ckptd needs. Each raises OSError with errno."""

from __future__ import annotations

import ctypes
import os
import threading
from typing import Any

from . import abi

_libc = ctypes.CDLL(None, use_errno=True)

_syscall = _libc.syscall
_syscall.restype = ctypes.c_long

_ioctl = _libc.ioctl
_ioctl.restype = ctypes.c_int
_ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]

_ptrace = _libc.ptrace
_ptrace.restype = ctypes.c_long
_ptrace.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]


def _raise(what: str) -> None:
    err = ctypes.get_errno()
    raise OSError(err, f"{what}: {os.strerror(err)}")


def ioctl(fd: int, request: int, arg: Any) -> int:
    """ioctl(fd, request, &arg); arg is a ctypes object (passed by reference)."""
    ret = _ioctl(fd, request, ctypes.byref(arg))
    if ret < 0:
        _raise(f"ioctl(0x{request:x})")
    return int(ret)


def syscall(number: int, *args: int) -> int:
    ret = _syscall(ctypes.c_long(number), *(ctypes.c_long(a) for a in args))
    if ret < 0:
        _raise(f"syscall {number}")
    return int(ret)


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """sync_file_range(SYNC_FILE_RANGE_WRITE): start writing these bytes to disk now, so
    that a later fsync has little left to wait for. Advisory: errors are ignored."""
    _syscall(ctypes.c_long(abi.SYS_sync_file_range), ctypes.c_long(fd),
             ctypes.c_long(offset), ctypes.c_long(nbytes),
             ctypes.c_long(abi.SYNC_FILE_RANGE_WRITE))


def syncfs(fd: int) -> None:
    """Make everything written to the filesystem holding `fd` durable: one flush for
    many files (the service's group commit). Raises the filesystem's writeback errors
    since `fd` was opened, ours or not."""
    if _libc.syncfs(ctypes.c_int(fd)) != 0:
        _raise("syncfs")


def name_os_thread() -> None:
    """Give the calling thread its Python name in the kernel too (first 15 bytes), so
    that `top -H` and /proc/PID/task/TID/comm tell the pools apart. Cosmetic: errors
    are ignored."""
    name = threading.current_thread().name.encode()[:15]
    _libc.prctl(ctypes.c_int(abi.PR_SET_NAME), ctypes.c_char_p(name), ctypes.c_ulong(0),
                ctypes.c_ulong(0), ctypes.c_ulong(0))


def pidfd_open(pid: int) -> int:
    return syscall(abi.SYS_pidfd_open, pid, 0)


def pidfd_getfd(pidfd: int, target_fd: int) -> int:
    """Duplicate fd `target_fd` of the process behind `pidfd` into ours (O_CLOEXEC set)."""
    return syscall(abi.SYS_pidfd_getfd, pidfd, target_fd, 0)


def kcmp_file(pid1: int, pid2: int, fd1: int, fd2: int) -> bool:
    """True when fd1 in pid1 and fd2 in pid2 refer to the same open file description."""
    return syscall(abi.SYS_kcmp, pid1, pid2, abi.KCMP_FILE, fd1, fd2) == 0


def ptrace(request: int, pid: int, addr: int = 0, data: int | Any = 0) -> int:
    ctypes.set_errno(0)  # PEEK requests may legitimately return -1
    if isinstance(data, int):
        ret = _ptrace(request, pid, ctypes.c_void_p(addr), ctypes.c_void_p(data))
    else:
        ret = _ptrace(request, pid, ctypes.c_void_p(addr), ctypes.byref(data))
    if ret < 0 and ctypes.get_errno() != 0:
        _raise(f"ptrace({request:#x}, {pid})")
    return int(ret)


_process_vm_readv = _libc.process_vm_readv
_process_vm_readv.restype = ctypes.c_ssize_t
_process_vm_readv.argtypes = [
    ctypes.c_int,
    ctypes.c_void_p,
    ctypes.c_ulong,
    ctypes.c_void_p,
    ctypes.c_ulong,
    ctypes.c_ulong,
]


def process_vm_readv(pid: int, local_iov: int, n_local: int, remote_iov: int, n_remote: int) -> int:
    """Raw process_vm_readv over iovec arrays given by address. Returns bytes read."""
    ret = _process_vm_readv(pid, local_iov, n_local, remote_iov, n_remote, 0)
    if ret < 0:
        _raise("process_vm_readv")
    return int(ret)
