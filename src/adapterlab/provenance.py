"""Which code measured a figure: the commit of the checkout adapterlab runs from (a figure also names its
date and its CPU, `precision.cpu_capability`)."""

import subprocess
from pathlib import Path

SOURCE_TREE = Path(__file__).resolve().parents[2]  # the checkout root, where adapterlab is installed editable


def git_commit(tree: Path = SOURCE_TREE) -> str:
    """The short commit `tree` is checked out at, with "+changes" when its tracked files differ from it;
    "unknown" where `tree` is not the root of a checkout (an installed wheel) or git is missing."""
    def git(*args) -> str:
        try:
            return subprocess.run(["git", "-C", str(tree), *args], capture_output=True, text=True).stdout.strip()
        except OSError:
            return ""

    root = git("rev-parse", "--show-toplevel")
    if not root or Path(root).resolve() != Path(tree).resolve():
        return "unknown"
    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + ("+changes" if git("status", "--porcelain", "--untracked-files=no") else "")
