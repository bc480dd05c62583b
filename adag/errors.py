"""One exception type for problems the user can fix; the CLI prints it as a single line. Also the checks
that every reader of outside text shares: JSON without unbounded nesting or repeated keys, and text that
is text (no lone surrogates) and has something visible in it."""

import errno
import json
import os
import unicodedata
from pathlib import Path
from typing import Any

MAX_JSON_DEPTH = 64  # levels of nested lists and objects in JSON that adag reads; deeper is refused
# Characters that draw nothing but are neither whitespace nor in an invisible category: Hangul fillers,
# the braille blank, the combining grapheme joiner and variation selectors.
BLANKS = set("\u115f\u1160\u3164\uffa0\u2800\u034f") | {chr(c) for c in range(0xFE00, 0xFE10)} | {
    chr(c) for c in range(0xE0100, 0xE01F0)}
INVISIBLE_CATEGORIES = {"Cc", "Cf", "Cs", "Co", "Cn", "Zs", "Zl", "Zp", "Mn", "Me"}


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


def unreadable(path: Path, error: OSError) -> AdagError:
    """An input file that cannot be read (no permission, a folder, an I/O error), as one line."""
    fix = "give yourself read permission (chmod u+r)" if error.errno == errno.EACCES else "check the file"
    return AdagError(f"cannot read {path} ({error.strerror or error}); {fix}")


def parse_json(text: str | bytes, unique_keys: bool = False) -> Any:
    """JSON that adag did not write itself (a dataset row, a manifest, a request): a ValueError, not a
    RecursionError, for nesting deeper than MAX_JSON_DEPTH, and with `unique_keys` for a key given twice
    in one object (which json would silently resolve to the last)."""
    try:
        value = json.loads(text, object_pairs_hook=_unique_object if unique_keys else None)
    except RecursionError:
        raise ValueError(f"nested more than {MAX_JSON_DEPTH} levels deep") from None
    except ValueError as error:
        if "int_max_str_digits" in str(error):  # Python's guard against huge integers, with a hint for programmers
            raise ValueError("an integer of more than 4300 digits; write it as text or as a float") from None
        raise
    if json_depth(value) > MAX_JSON_DEPTH:
        raise ValueError(f"nested more than {MAX_JSON_DEPTH} levels deep")
    return value


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"key '{key}' appears twice in one object; keep one of them")
        seen[key] = value
    return seen


def json_depth(value: Any) -> int:
    """Levels of nested lists and dicts in `value` (0 for a scalar), counted without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list | tuple):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def text_problem(text: str) -> str | None:
    """Why `text` cannot be used as text (a lone surrogate, which no tokenizer or UTF-8 file can hold), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        return (f"holds a lone surrogate (U+{ord(text[error.start]):04X} at character {error.start}), which is not "
                "text; write the character itself, or a surrogate pair")
    return None


def has_visible(text: str) -> bool:
    """Whether `text` shows anything: not only whitespace, zero-width characters, bidi controls or other
    invisible characters."""
    return any(char not in BLANKS and unicodedata.category(char) not in INVISIBLE_CATEGORIES for char in text)
