"""Unpacking an uploaded adapter archive (.zip or .tar; an ensemble with its members), checked in full before
anything is written."""

import shutil
import stat
import tarfile
import zipfile
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Callable, NamedTuple

from adapterlab.server.errors import ApiError
from adapterlab.store import MEMBERS

ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors", "head.safetensors", "card.json", "README.md"}
PICKLED = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
ONE_FOLDER = "the archive must hold one adapter folder (its files at the top or in one folder)"


class Entry(NamedTuple):
    name: str
    is_dir: bool
    is_plain_file: bool
    size: int
    open: Callable[[], BinaryIO]


def unpack(upload: BinaryIO, target: Path, max_bytes: int) -> None:
    """Write a .zip or .tar of one adapter folder into `target`: only the adapter's own files, no
    pickles, no links, nothing outside the folder; checked in full before anything is written."""
    if zipfile.is_zipfile(upload):
        upload.seek(0)
        with zipfile.ZipFile(upload) as archive:
            _write_entries([Entry(i.filename, i.is_dir(), not stat.S_ISLNK(i.external_attr >> 16), i.file_size,
                                  lambda i=i: archive.open(i)) for i in archive.infolist()], target, max_bytes)
        return
    upload.seek(0)
    try:
        archive = tarfile.open(fileobj=upload, mode="r:*")
    except tarfile.TarError:
        raise ApiError(400, "the upload is not a .zip or .tar archive") from None
    with archive:
        _write_entries([Entry(m.name, m.isdir(), m.isfile(), m.size, lambda m=m: archive.extractfile(m))
                        for m in archive.getmembers()], target, max_bytes)


def _write_entries(entries: list[Entry], target: Path, max_bytes: int) -> None:
    files = [entry for entry in entries if not entry.is_dir]
    for entry in entries:
        path = PurePosixPath(entry.name)
        if path.is_absolute() or ".." in path.parts or "\\" in entry.name:
            raise ApiError(400, f"archive entry {entry.name!r} points outside its folder")
        if not (entry.is_dir or entry.is_plain_file):
            raise ApiError(400, f"archive entry {entry.name!r} is a link or a device: plain files only")
        if not entry.is_dir and entry.name.lower().endswith(PICKLED):
            raise ApiError(415, f"archive entry {entry.name!r} holds pickled weights: adapterlab reads safetensors only")
    places = _places(files)
    if sum(entry.size for entry in files) > max_bytes:
        raise ApiError(413, f"the archive unpacks to more than {max_bytes:,} bytes")
    for entry, place in zip(files, places):
        (target / place).parent.mkdir(parents=True, exist_ok=True)
        with entry.open() as source, open(target / place, "xb") as destination:
            shutil.copyfileobj(source, destination)


def _places(files: list[Entry]) -> list[PurePosixPath]:
    """Where each file goes inside the adapter folder. The archive holds one adapter folder (its files at
    the top or in one folder: the one with the outermost card.json); an ensemble's members lie in it as
    members/<i>/, each a whole adapter folder."""
    paths = [PurePosixPath(entry.name) for entry in files]
    cards = sorted((path.parent for path in paths if path.name == "card.json"), key=lambda folder: len(folder.parts))
    folders = {path.parent for path in paths}
    root = cards[0] if cards else next(iter(folders)) if len(folders) == 1 else None
    places = []
    for entry, path in zip(files, paths):
        if root is None or not path.is_relative_to(root):
            raise ApiError(400, ONE_FOLDER)
        place = path.relative_to(root)
        member = len(place.parts) == 3 and place.parts[0] == MEMBERS and place.parts[1].isdigit()
        if place.name not in ADAPTER_FILES or not (len(place.parts) == 1 or member):
            raise ApiError(400, f"archive entry {entry.name!r}: an adapter folder holds only "
                                f"{', '.join(sorted(ADAPTER_FILES))} (an ensemble's members in {MEMBERS}/<i>/)")
        places.append(place)
    if len(set(places)) < len(places):
        raise ApiError(400, ONE_FOLDER)
    return places
