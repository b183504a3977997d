"""Kernel ABI facts: ioctl numbers, struct layouts, syscall numbers (x86_64, Linux >= 6.7).

This is the only module that knows a struct layout or a magic number. Everything else
goes through the typed wrappers in this package.
"""

from __future__ import annotations

import ctypes
import platform

PAGE_SIZE = 4096
PAGE_SHIFT = 12

if platform.machine() != "x86_64":  # pragma: no cover - the only tested architecture
    raise ImportError("ckptd's kernel layer supports x86_64 only (syscall numbers, registers)")

# --- syscalls (x86_64) -------------------------------------------------------------------
SYS_process_vm_readv = 310
SYS_userfaultfd = 323
SYS_pidfd_open = 434
SYS_pidfd_getfd = 438
SYS_kcmp = 312
SYS_close = 3
SYS_fcntl = 72

KCMP_FILE = 0

# fcntl(2) (linux/fcntl.h): the lowest free fd >= arg, sharing the open file, with
# FD_CLOEXEC set on the new fd.
F_DUPFD_CLOEXEC = 1030

# --- PAGEMAP_SCAN (linux/fs.h, shipped in 6.7) ------------------------------------------
PAGEMAP_SCAN = 0xC0606610  # _IOWR('f', 16, struct pm_scan_arg)

PAGE_IS_WPALLOWED = 1 << 0
PAGE_IS_WRITTEN = 1 << 1
PAGE_IS_FILE = 1 << 2
PAGE_IS_PRESENT = 1 << 3
PAGE_IS_SWAPPED = 1 << 4
PAGE_IS_PFNZERO = 1 << 5
PAGE_IS_HUGE = 1 << 6
PAGE_IS_SOFT_DIRTY = 1 << 7
PAGE_IS_GUARD = 1 << 8

CATEGORY_NAMES = {
    PAGE_IS_WPALLOWED: "WPALLOWED",
    PAGE_IS_WRITTEN: "WRITTEN",
    PAGE_IS_FILE: "FILE",
    PAGE_IS_PRESENT: "PRESENT",
    PAGE_IS_SWAPPED: "SWAPPED",
    PAGE_IS_PFNZERO: "PFNZERO",
    PAGE_IS_HUGE: "HUGE",
    PAGE_IS_SOFT_DIRTY: "SOFT_DIRTY",
    PAGE_IS_GUARD: "GUARD",
}

PM_SCAN_WP_MATCHING = 1 << 0
PM_SCAN_CHECK_WPASYNC = 1 << 1

# The kernel's internal bounce buffer; calls returning more regions than this hit the
# stale walk_end quirk (see docs/kernel.md).
PAGEMAP_SCAN_BOUNCE_REGIONS = 512


class PmScanArg(ctypes.Structure):
    _fields_ = [
        ("size", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
        ("start", ctypes.c_uint64),
        ("end", ctypes.c_uint64),
        ("walk_end", ctypes.c_uint64),
        ("vec", ctypes.c_uint64),
        ("vec_len", ctypes.c_uint64),
        ("max_pages", ctypes.c_uint64),
        ("category_inverted", ctypes.c_uint64),
        ("category_mask", ctypes.c_uint64),
        ("category_anyof_mask", ctypes.c_uint64),
        ("return_mask", ctypes.c_uint64),
    ]


class PageRegion(ctypes.Structure):
    _fields_ = [
        ("start", ctypes.c_uint64),
        ("end", ctypes.c_uint64),
        ("categories", ctypes.c_uint64),
    ]


assert ctypes.sizeof(PmScanArg) == 96
assert ctypes.sizeof(PageRegion) == 24

# --- userfaultfd (linux/userfaultfd.h) ----------------------------------------------------
UFFD_API = 0xAA
UFFDIO_API = 0xC018AA3F
UFFDIO_REGISTER = 0xC020AA00
UFFDIO_UNREGISTER = 0x8010AA01
UFFDIO_WRITEPROTECT = 0xC018AA06

UFFD_FEATURE_WP_HUGETLBFS_SHMEM = 1 << 12
UFFD_FEATURE_WP_UNPOPULATED = 1 << 13
UFFD_FEATURE_WP_ASYNC = 1 << 15
# Not an API flag: the kernel sets this bit in a userfaultfd's features once UFFDIO_API
# succeeded, and /proc/PID/fdinfo/FD shows it ("API:\t<api>:<features>:<ioctls>").
UFFD_FEATURE_INITIALIZED = 1 << 31

UFFDIO_REGISTER_MODE_MISSING = 1 << 0
UFFDIO_REGISTER_MODE_WP = 1 << 1
UFFDIO_WRITEPROTECT_MODE_WP = 1 << 0

UFFD_USER_MODE_ONLY = 1
O_CLOEXEC = 0o2000000
O_NONBLOCK = 0o4000


class UffdioApi(ctypes.Structure):
    _fields_ = [
        ("api", ctypes.c_uint64),
        ("features", ctypes.c_uint64),
        ("ioctls", ctypes.c_uint64),
    ]


class UffdioRange(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class UffdioRegister(ctypes.Structure):
    _fields_ = [("range", UffdioRange), ("mode", ctypes.c_uint64), ("ioctls", ctypes.c_uint64)]


class UffdioWriteprotect(ctypes.Structure):
    _fields_ = [("range", UffdioRange), ("mode", ctypes.c_uint64)]


assert ctypes.sizeof(UffdioApi) == 24
assert ctypes.sizeof(UffdioRegister) == 32
assert ctypes.sizeof(UffdioWriteprotect) == 24

# --- ptrace (linux/ptrace.h) -------------------------------------------------------------
PTRACE_PEEKDATA = 2
PTRACE_GETREGS = 12
PTRACE_SETREGS = 13
PTRACE_CONT = 7
PTRACE_SINGLESTEP = 9
PTRACE_DETACH = 17
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_LISTEN = 0x4208

PTRACE_SYSCALL = 24
PTRACE_SETOPTIONS = 0x4200
PTRACE_GET_RSEQ_CONFIGURATION = 0x420F  # Linux 5.13+

PTRACE_O_TRACESYSGOOD = 1
PTRACE_O_SUSPEND_SECCOMP = 1 << 21
PTRACE_EVENT_STOP = 128
SYSCALL_STOP_SIG = 0x80 | 5  # WSTOPSIG of a syscall stop with TRACESYSGOOD (SIGTRAP|0x80)

NR_restart_syscall = 219  # x86_64

WAIT_ALL_THREADS = 0x40000000
WNOHANG = 1

ERESTARTSYS = 512
ERESTARTNOINTR = 513
ERESTARTNOHAND = 514
ERESTART_RESTARTBLOCK = 516


class UserRegs(ctypes.Structure):
    """x86_64 struct user_regs_struct (27 unsigned longs)."""

    _fields_ = [
        (name, ctypes.c_ulong)
        for name in (
            "r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8",
            "rax", "rcx", "rdx", "rsi", "rdi", "orig_rax", "rip", "cs", "eflags",
            "rsp", "ss", "fs_base", "gs_base", "ds", "es", "fs", "gs",
        )
    ]  # fmt: skip


assert ctypes.sizeof(UserRegs) == 27 * 8

SYSCALL_INSN = b"\x0f\x05"


class PtraceRseqConfiguration(ctypes.Structure):
    """struct ptrace_rseq_configuration (PTRACE_GET_RSEQ_CONFIGURATION)."""

    _fields_ = [
        ("rseq_abi_pointer", ctypes.c_uint64),
        ("rseq_abi_size", ctypes.c_uint32),
        ("signature", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
    ]


assert ctypes.sizeof(PtraceRseqConfiguration) == 24
RSEQ_CS_OFFSET = 8  # struct rseq: u32 cpu_id_start, u32 cpu_id, u64 rseq_cs
# struct rseq_cs: u32 version, u32 flags, u64 start_ip, u64 post_commit_offset, u64 abort_ip
RSEQ_CS_FORMAT = "<IIQQQ"

MADV_POPULATE_WRITE = 23  # Linux 5.14+
SYNC_FILE_RANGE_WRITE = 2
SYS_sync_file_range = 277
# prctl(2): set the calling thread's name (comm, at most 15 bytes plus NUL).
PR_SET_NAME = 15


class IoVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_uint64), ("iov_len", ctypes.c_uint64)]


IOV_MAX = 1024
