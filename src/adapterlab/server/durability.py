"""Making the server's changes to the store survive a crash or a power cut before it answers: a file's bytes
and a folder's entries (a rename is a change of the folders that hold the old and the new name) reach the
disk only when fsync'd."""

import os
from pathlib import Path


def synced_folders(*folders: Path) -> None:
    """Each folder's entries (files created, renamed or removed in it) on disk."""
    for folder in folders:
        handle = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(handle)
        finally:
            os.close(handle)


def synced_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def synced_tree(folder: Path) -> None:
    """Every file below `folder`, then every folder's entries, `folder`'s own included."""
    folders = [folder]
    for path in folder.rglob("*"):
        if path.is_dir():
            folders.append(path)
        else:
            synced_file(path)
    synced_folders(*folders)
