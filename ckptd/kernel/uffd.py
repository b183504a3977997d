"""userfaultfd ioctls on an fd we hold (taken from the target with pidfd_getfd)."""

from __future__ import annotations

import errno

from . import abi
from .syscalls import ioctl

WP_FEATURES = abi.UFFD_FEATURE_WP_ASYNC | abi.UFFD_FEATURE_WP_UNPOPULATED


class UffdUnsupported(Exception):
    pass


def api_handshake(fd: int, features: int = WP_FEATURES) -> int:
    """UFFDIO_API with the async write-protect features. Returns the features granted.

    A fresh userfaultfd accepts exactly one UFFDIO_API; a second one fails with EINVAL.
    """
    arg = abi.UffdioApi(api=abi.UFFD_API, features=features, ioctls=0)
    try:
        ioctl(fd, abi.UFFDIO_API, arg)
    except OSError as e:
        if e.errno == errno.EINVAL:
            raise UffdUnsupported(
                "the kernel refused UFFDIO_API with WP_ASYNC|WP_UNPOPULATED "
                "(needs Linux 6.7+ with userfaultfd write-protect)"
            ) from e
        raise
    if arg.features & features != features:
        raise UffdUnsupported(f"kernel granted uffd features {arg.features:#x}, need {features:#x}")
    return int(arg.features)


def register_wp(fd: int, start: int, end: int) -> None:
    arg = abi.UffdioRegister(
        range=abi.UffdioRange(start=start, len=end - start), mode=abi.UFFDIO_REGISTER_MODE_WP
    )
    ioctl(fd, abi.UFFDIO_REGISTER, arg)


def unregister(fd: int, start: int, end: int) -> None:
    ioctl(fd, abi.UFFDIO_UNREGISTER, abi.UffdioRange(start=start, len=end - start))


def write_protect(fd: int, start: int, end: int) -> None:
    arg = abi.UffdioWriteprotect(
        range=abi.UffdioRange(start=start, len=end - start), mode=abi.UFFDIO_WRITEPROTECT_MODE_WP
    )
    ioctl(fd, abi.UFFDIO_WRITEPROTECT, arg)
