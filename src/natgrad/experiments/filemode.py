"""The mode of the files natgrad writes: ``0o666 & ~umask``, what a plain ``open()`` gives.

Atomic writes fill a `tempfile.mkstemp` file, which is created 0600 (private while half
written); the finished file is given `default_file_mode()` before it is renamed into place, so
results, checkpoints, downloads and figures all follow the user's umask alike.

The umask can only be read portably by setting it (``os.umask`` returns the old value), which
briefly changes it for every thread of the process; on Linux (kernel >= 4.7) it is read from
``/proc/self/status`` instead, without changing it.
"""

from __future__ import annotations

import os
import threading

__all__ = ["current_umask", "default_file_mode"]

_STATUS = "/proc/self/status"
_SWAP = threading.Lock()


def current_umask() -> int:
    """The process's umask, read without changing it where the OS allows."""
    try:
        with open(_STATUS, encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _SWAP:  # set-and-restore: the value in between (0o077) errs on the private side
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def default_file_mode() -> int:
    """``0o666 & ~umask``: the mode `open(path, "w")` would create a file with."""
    return 0o666 & ~current_umask()
