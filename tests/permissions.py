"""File permissions that hold for root too: root reads and writes every file through the capabilities
CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH, so a test of an unreadable or unwritable path drops both from
this thread's effective set (the permitted set keeps them, so they are raised again on exit). CI runs as
root, where without this the permission tests would never run."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import tempfile
from collections.abc import Iterator

_VERSION_3 = 0x20080522  # _LINUX_CAPABILITY_VERSION_3: two 32-bit words per set
_DAC = (1 << 1) | (1 << 2)  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH


class _Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _Data(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _capabilities(libc: ctypes.CDLL, change: int | None = None) -> int:
    """This thread's effective capabilities (first word); with `change`, set them to it first."""
    header, data = _Header(_VERSION_3, 0), (_Data * 2)()
    if libc.capget(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capget")
    if change is not None:
        data[0].effective = change
        if libc.capset(ctypes.byref(header), data) != 0:
            raise OSError(ctypes.get_errno(), "capset")
    return data[0].effective


@contextlib.contextmanager
def permissions_enforced() -> Iterator[None]:
    """File permissions apply to this thread, root included (a no-op for other users)."""
    if os.geteuid() != 0:
        yield
        return
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    effective = _capabilities(libc)
    _capabilities(libc, effective & ~_DAC)
    try:
        yield
    finally:
        _capabilities(libc, effective)


def permissions_can_be_enforced() -> bool:
    """Whether a file without read permission is refused inside `permissions_enforced`."""
    with tempfile.NamedTemporaryFile() as probe:
        os.chmod(probe.name, 0)
        try:
            with permissions_enforced():
                open(probe.name).close()
        except PermissionError:
            return True
        except OSError:
            return False  # no capability calls here (not Linux, or a sandbox without them)
    return False
