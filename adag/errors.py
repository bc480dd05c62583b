"""One exception type for problems the user can fix; the CLI prints it as a single line."""

import errno
import os
from pathlib import Path


class AdagError(Exception):
    """A problem with the user's input or environment, with what to do about it in the message."""


def broken_link(path: Path) -> str | None:
    """What is wrong with a path that leads nowhere through a symbolic link (a loop or a missing target),
    itself or one of its folders, so that errors name it instead of calling the path unknown; None otherwise."""
    if path.exists():
        return None
    for link in (path, *path.parents):
        if not link.is_symlink() or link.exists():
            continue
        try:
            link.resolve(strict=True)
        except RuntimeError:  # Python < 3.13 reports a loop this way
            return f"{link} is a symbolic link loop"
        except OSError as error:
            if error.errno == errno.ELOOP:
                return f"{link} is a symbolic link loop"
        return f"{link} is a symbolic link to {os.readlink(link)}, which does not exist"
    return None
