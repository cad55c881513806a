"""Unpacking an uploaded adapter archive (.zip or uncompressed .tar; an ensemble with its members): every entry
checked before anything is written, and the entries counted and the bytes they unpack to counted as they are
written, so that no archive writes outside its folder or fills memory or the disk. A damaged archive is
refused with the problem named (400), whatever its reader raised."""

import os
import stat
import struct
import tarfile
import zipfile
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Callable, Iterator, NamedTuple

from adapterlab.server.durability import synced_folders
from adapterlab.server.errors import ApiError
from adapterlab.store import MEMBERS

ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors", "head.safetensors", "card.json", "README.md"}
PICKLED = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
ONE_FOLDER = "the archive must hold one adapter folder (its files at the top or in one folder)"
MAX_ENTRIES = 1024  # an ensemble of 200 members; more is a bomb (each entry costs memory before any is written)
CHUNK = 1 << 20
# A zip's central directory is read whole into memory (about 7 bytes of memory for each of its bytes): its
# size is checked first, at this much per allowed entry.
DIRECTORY_BYTES_PER_ENTRY = 1024
END_OF_DIRECTORY = b"PK\x05\x06"


class Entry(NamedTuple):
    name: str
    is_dir: bool
    is_plain_file: bool
    size: int
    open: Callable[[], BinaryIO]


def unpack(upload: BinaryIO, target: Path, max_bytes: int, max_entries: int = MAX_ENTRIES) -> None:
    """Write a .zip or .tar of one adapter folder into `target`: only the adapter's own files, no pickles,
    no links or devices, nothing outside the folder, at most `max_entries` entries and `max_bytes` unpacked;
    fsync'd."""
    with _entries(upload, max_entries) as entries:
        folders = _write_entries(entries, target, max_bytes)
    synced_folders(*folders)


@contextmanager
def _entries(upload: BinaryIO, max_entries: int) -> Iterator[list[Entry]]:
    """The archive's entries (at most `max_entries`), readable while the context lasts."""
    with _damage_named():
        is_zip = zipfile.is_zipfile(upload)
        upload.seek(0)
        if is_zip:
            _check_directory_size(upload, max_entries)
            archive = zipfile.ZipFile(upload)
        else:
            archive = _open_tar(upload)
    with archive:
        if is_zip:
            infos = archive.infolist()
            _check_count(len(infos), max_entries)
            yield [Entry(i.filename, i.is_dir(), stat.S_IFMT(i.external_attr >> 16) in (0, stat.S_IFREG),
                         i.file_size, lambda i=i: archive.open(i)) for i in infos]
        else:
            yield [Entry(m.name, m.isdir(), m.isfile(), m.size, lambda m=m: archive.extractfile(m))
                   for m in _tar_members(archive, max_entries)]


def _open_tar(upload: BinaryIO) -> tarfile.TarFile:
    try:  # uncompressed only: a compressed tar's headers could decompress to any size before one is refused
        return tarfile.open(fileobj=upload, mode="r:")
    except tarfile.TarError:
        raise ApiError(400, "the upload is not a .zip or .tar archive (a .tar is read uncompressed)") from None


def _tar_members(archive: tarfile.TarFile, max_entries: int) -> list[tarfile.TarInfo]:
    """The members one at a time, stopping past the limit (a tar of a million empty entries is small)."""
    members = []
    with _damage_named():
        while (member := archive.next()) is not None:
            members.append(member)
            _check_count(len(members), max_entries)
    return members


def _check_directory_size(upload: BinaryIO, max_entries: int) -> None:
    """413 for a zip whose central directory (read whole by zipfile) is too large for `max_entries` entries."""
    end = upload.seek(0, 2)
    upload.seek(max(0, end - (1 << 16) - 22))  # the end record: 22 bytes and a comment of up to 64 KiB
    tail = upload.read()
    at = tail.rfind(END_OF_DIRECTORY)
    if at < 0 or len(tail) - at < 22:
        raise ApiError(400, "the zip archive is damaged: its end record is missing")
    directory_bytes = struct.unpack_from("<L", tail, at + 12)[0]
    if directory_bytes > max_entries * DIRECTORY_BYTES_PER_ENTRY:
        raise ApiError(413, f"the archive lists {directory_bytes:,} bytes of entries: more than {max_entries:,} "
                            "entries allow")
    upload.seek(0)


def _check_count(count: int, max_entries: int) -> None:
    if count > max_entries:
        raise ApiError(413, f"the archive holds more than {max_entries:,} entries")


@contextmanager
def _damage_named() -> Iterator[None]:
    """Whatever an archive reader raises on damaged input (there are many kinds) as a 400 naming it; only
    reading is wrapped, so a failure to write the staging folder stays a server error."""
    try:
        yield
    except ApiError:
        raise
    except Exception as error:
        kind = type(error).__qualname__ if type(error).__module__ == "builtins" else \
            f"{type(error).__module__}.{type(error).__qualname__}"
        detail = " ".join(str(error).split())[:200]
        raise ApiError(400, f"the archive is damaged ({kind}{': ' + detail if detail else ''})") from None


def _write_entries(entries: list[Entry], target: Path, max_bytes: int) -> set[Path]:
    """Checks every entry, then writes the files (each fsync'd); the folders written into."""
    for entry in entries:
        path = PurePosixPath(entry.name)
        if path.is_absolute() or ".." in path.parts or "\\" in entry.name:
            raise ApiError(400, f"archive entry {entry.name!r} points outside its folder")
        if not (entry.is_dir or entry.is_plain_file):
            raise ApiError(400, f"archive entry {entry.name!r} is a link or a device: plain files only")
        if not entry.is_dir and entry.name.lower().endswith(PICKLED):
            raise ApiError(415, f"archive entry {entry.name!r} holds pickled weights: adapterlab reads safetensors only")
    files = [entry for entry in entries if not entry.is_dir]
    places = _places(files)
    if sum(entry.size for entry in files) > max_bytes:
        raise ApiError(413, f"the archive unpacks to more than {max_bytes:,} bytes")
    written, folders = 0, {target}
    for entry, place in zip(files, places):
        folders.add((target / place).parent)
        (target / place).parent.mkdir(parents=True, exist_ok=True)
        with _damage_named():
            source = entry.open()
        with source, open(target / place, "xb") as destination:
            while chunk := _read(source):  # counted as it comes: an entry may unpack to more than it declares
                written += len(chunk)
                if written > max_bytes:
                    raise ApiError(413, f"the archive unpacks to more than {max_bytes:,} bytes")
                destination.write(chunk)
            destination.flush()
            os.fsync(destination.fileno())
    return folders


def _read(source: BinaryIO) -> bytes:
    with _damage_named():
        return source.read(CHUNK)


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
