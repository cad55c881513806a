"""The one rule for names that become folders of the store (tasks, adapters): recipes, cards,
combine, the store and the server all ask `name_problem`, so no name can reach outside its folder.
And the digest that tells settings apart in names and records (`json_digest`)."""

import hashlib
import json
import re

from adapterlab.errors import AdapterlabError

# A word character first (no leading dot: hidden names are the store's own), then word characters
# and . + = @ - ; no separators, no spaces, no control characters.
_PLAIN = re.compile(r"\w[\w.+=@-]*")
# In bytes, as the file system counts: the store's hidden names add up to ~90 bytes to a name, and a
# folder name may have 255 (128 letters outside ASCII take up to 512).
MAX_BYTES = 128


def name_problem(value: object) -> str | None:
    """Why `value` is not a plain name, or None when it is one."""
    if not isinstance(value, str) or not _PLAIN.fullmatch(value) or len(value.encode()) > MAX_BYTES:
        return (f"must be a plain name: a letter, digit or '_' first, then those or . + = @ -, at most {MAX_BYTES} "
                "bytes in UTF-8 (no path separators, no leading dot)")
    return None


def check_name(value: str, what: str) -> str:
    """`value` when it is a plain name; else an AdapterlabError naming `what` and the rule."""
    problem = name_problem(value)
    if problem:
        raise AdapterlabError(f"{what} {value!r} {problem}")
    return value


def json_digest(value: dict, chars: int) -> str:
    """The first `chars` hex digits of the SHA-256 of `value` as canonical JSON (keys sorted): the same in
    every process and on every machine, unlike Python's hash()."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:chars]
