"""Clients that send what they should not: schemathesis over the app's own OpenAPI schema (every route, with
the admin token, the client token and none), then bodies past the limits, JSON nested too deeply, a
request of 100,000 inputs, a client trickling its body, and uploads that try to leave their folder (links,
devices, absolute or ../ names), to unpack to more files or bytes than allowed (tar and zip bombs) or that
are damaged. Each is refused with a 4xx naming the problem (never a 5xx), nothing is written outside the
staging folder, and no upload is read whole into memory. The server is the app under uvicorn on loopback,
on a tiny random chat Llama with a classification adapter (generation and classification both served)."""

import gzip
import io
import random
import socket
import stat
import tarfile
import tempfile
import time
import tracemalloc
import zipfile
from pathlib import Path

import httpx
import pytest
import schemathesis
from schemathesis import GenerationMode
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (content_type_conformance, negative_data_rejection,
                                               response_schema_conformance, status_code_conformance)

from adapterlab.recipe import validate_recipe
from adapterlab.server import Settings, create_app, uploads
from adapterlab.server.errors import ApiError
from adapterlab.training import train
from conftest import tiny_recipe
from test_server import archive, folder_files, running

ADMIN, CLIENT = {"Authorization": "Bearer admin"}, {"Authorization": "Bearer client"}
LIMITS = Settings(dtype="float32", admin_token="admin", client_token="client", max_inputs=8, max_chars=400,
                  max_new_tokens=4, max_upload_bytes=2_000_000, max_body_bytes=1_000_000, body_seconds=2)
EXAMPLES = 20  # per operation and mode (sent three times each)
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          negative_data_rejection]


@pytest.fixture(scope="module")
def served(tiny_llama, tmp_path_factory):
    """(base URL, store, a trained adapter's folder outside the store) of the app under uvicorn."""
    root = tmp_path_factory.mktemp("hostile")
    train(validate_recipe(tiny_recipe(tiny_llama, root / "store", output={"name": "lora"},
                                      training={"max_steps": 1})), show_progress=False)
    with running(create_app(root / "store", tiny_llama, LIMITS)) as (url, _):
        yield url, root / "store", root / "store/sentiment/lora"


def test_every_route_answers_by_its_schema(served):
    """Cases of every operation, as the schema allows them and as it does not, each sent with the admin
    token, the client token and none: no 5xx, every status, content type and body as the schema
    declares, and what the schema does not allow refused with a 4xx."""
    schema = schemathesis.openapi.from_url(f"{served[0]}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]  # an error here: a schema it cannot read
    declared = httpx.get(f"{served[0]}/openapi.json").json()["paths"]
    assert len(operations) == sum(len(methods) for methods in declared.values()) > 10
    for operation in operations:
        _answers_by_its_schema(operation.as_strategy(GenerationMode.POSITIVE))
        if operation.body or operation.query:  # else nothing to get wrong (a path parameter is any string)
            _answers_by_its_schema(operation.as_strategy(GenerationMode.NEGATIVE))


def _answers_by_its_schema(cases) -> None:
    @given(case=cases)
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def check(case):
        for headers in (ADMIN, CLIENT, {}):
            case.call_and_validate(headers=headers, checks=CHECKS, timeout=60)

    check()


# --- bodies ---------------------------------------------------------------------------------------
def exchange(url: str, request: bytes, then: bytes = b"", pause: float = 0.0) -> tuple[bytes, float]:
    """Send raw bytes over one connection (`then` after `pause` seconds); everything the server sends
    back until it closes the connection, and the seconds that took."""
    host, port = url.removeprefix("http://").split(":")
    started = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=30) as connection:
        connection.sendall(request)
        if pause:
            time.sleep(pause)
            try:
                connection.sendall(then)
            except OSError:  # closed already
                pass
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
    return answer, time.monotonic() - started


def head(path: str, **fields: str) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Authorization: Bearer admin", "Connection: close",
             *(f"{name.replace('_', '-')}: {value}" for name, value in fields.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def test_a_body_over_the_limit_is_refused_before_it_is_read(served):
    url = served[0]
    # Declared too long: answered at once, none of it sent.
    answer, _ = exchange(url, head("/v1/classify", content_type="application/json", content_length="50000000"))
    assert answer.startswith(b"HTTP/1.1 413") and b"request body over 1,000,000 bytes" in answer
    # Chunked, never ending: answered once past the limit, the rest never read.
    chunk = b"%x\r\n%s\r\n" % (100_000, b" " * 100_000)
    answer, _ = exchange(url, head("/v1/classify", content_type="application/json", transfer_encoding="chunked")
                         + chunk * 11)
    assert answer.startswith(b"HTTP/1.1 413") and b"request body over 1,000,000 bytes" in answer
    upload = httpx.post(f"{url}/v1/adapters", headers=ADMIN, files={"file": ("a.zip", b"0" * 2_100_000)})
    assert upload.status_code == 413 and "2,000,000 bytes" in upload.json()["error"]


def test_json_nested_too_deeply_is_a_clear_4xx(served):
    url, deep = served[0], "[" * 100_000 + "]" * 100_000
    for path, body, status, shape in (
            ("/v1/classify", f'{{"inputs": {deep}}}', 400, "error"),
            ("/v1/completions", f'{{"model": "m", "prompt": {deep}}}', 400, "openai"),
            ("/v1/adapters", f'{{"path": {deep}}}', 422, "error")):
        response = httpx.post(f"{url}{path}", content=body, headers={**ADMIN, "content-type": "application/json"})
        message = response.json()["error"] if shape == "error" else response.json()["error"]["message"]
        assert response.status_code == status and "not valid JSON" in message and "\n" not in message, message


def test_a_hundred_thousand_inputs_are_refused_by_name(served):
    response = httpx.post(f"{served[0]}/v1/classify", headers=CLIENT,
                          json={"inputs": ["x"] * 100_000, "labels": ["a", "b"]})
    assert response.status_code == 413 and response.json()["error"] == "100000 inputs in one request; the limit is 8"


def test_a_client_trickling_its_body_is_cut_off(served):
    """A body that does not arrive within body_seconds (2 s here): 408, and the connection closed."""
    body = b'{"inputs": ["x"], "labels": ["a", "b"]}'
    request = head("/v1/classify", content_type="application/json", content_length=str(len(body))) + body[:5]
    answer, seconds = exchange(url=served[0], request=request, then=body[5:], pause=3)
    assert answer.startswith(b"HTTP/1.1 408") and b"did not arrive within 2 s" in answer
    assert 2 <= seconds < 10


# --- uploads --------------------------------------------------------------------------------------
def tar_of(members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as packed:
        for info, data in members:
            info.size = len(data)
            packed.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def tar_entry(name: str, kind: bytes = tarfile.REGTYPE, **fields) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    for key, value in fields.items():
        setattr(info, key, value)
    return info


def zip_of(files: dict[str, bytes], modes: dict[str, int] | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as packed:
        for name, data in files.items():
            info = zipfile.ZipInfo(name)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = (modes or {}).get(name, stat.S_IFREG | 0o644) << 16
            packed.writestr(info, data)
    return buffer.getvalue()


def hostile_uploads(adapter: Path) -> list[tuple[str, bytes, int, str]]:
    """(what, archive, status, words the refusal holds)."""
    good = folder_files(adapter)
    card = good["adapter/card.json"]
    members = [(tar_entry(name), data) for name, data in good.items()]
    zeros = b"\0" * 50_000_000  # deflates to about 50 KB
    return [
        ("symbolic link, tar", archive(good, "tar", links=("adapter/README.md",)), 400, "link or a device"),
        ("symbolic link, zip", archive(good, "zip", links=("adapter/link",)), 400, "link or a device"),
        ("hard link", tar_of(members + [(tar_entry("adapter/head2", tarfile.LNKTYPE, linkname="/etc/passwd"), b"")]),
         400, "link or a device"),
        ("character device, tar", tar_of(members + [(tar_entry("adapter/tty", tarfile.CHRTYPE, devmajor=5), b"")]),
         400, "link or a device"),
        ("character device, zip", zip_of({**good, "adapter/tty": b""}, {"adapter/tty": stat.S_IFCHR | 0o666}),
         400, "link or a device"),
        ("fifo", tar_of(members + [(tar_entry("adapter/pipe", tarfile.FIFOTYPE), b"")]), 400, "link or a device"),
        ("../ name", archive({**good, "adapter/../../evil.json": card}, "tar"), 400, "outside its folder"),
        ("absolute name", archive({**good, "/tmp/evil.json": card}, "zip"), 400, "outside its folder"),
        ("tar bomb: entries", tar_of([(tar_entry(f"adapter/{i}"), b"") for i in range(1100)]), 413,
         "more than 1,024 entries"),
        ("zip bomb: entries", zip_of({f"{i}": b"" for i in range(1100)}), 413, "more than 1,024 entries"),
        ("zip bomb: bytes", zip_of({**good, "adapter/README.md": zeros}), 413, "unpacks to more than 2,000,000"),
        ("damaged zip", _overwritten(zip_of(good)), 400, "the archive is damaged (zipfile.BadZipFile: Bad CRC-32"),
        ("compressed tar", gzip.compress(archive(good, "tar")), 400, "not a .zip or .tar"),
    ]


def _overwritten(data: bytes) -> bytes:
    """`data` with bytes in its middle (the compressed weights) replaced by zeros."""
    middle = len(data) // 2
    return data[:middle] + bytes(16) + data[middle + 16:]


def test_hostile_uploads_are_refused_by_name_and_write_nothing(served, tmp_path):
    url, store, adapter = served
    before = sorted(store.parent.rglob("*"))
    for what, data, status, words in hostile_uploads(adapter):
        response = httpx.post(f"{url}/v1/adapters", headers=ADMIN, files={"file": ("adapter", data)}, timeout=60)
        assert response.status_code == status and words in response.json()["error"], (what, response.text)
        assert sorted(store.parent.rglob("*")) == before, what  # nothing left, in the store or beside it


@pytest.mark.parametrize("bomb", ["understated zip", "declared zip", "zip directory", "tar entries"])
def test_bombs_are_refused_in_bounded_memory(bomb, tmp_path):
    """What unpacking holds in memory stays small, whatever the archive unpacks to: bytes are counted
    as they are written, entries as they are listed, a zip's directory measured before it is read."""
    archives = {"understated zip": lambda: _understated(zip_of({"card.json": b"\0" * 30_000_000})),
                "declared zip": lambda: zip_of({"card.json": b"\0" * 300_000_000}),
                "zip directory": lambda: zip_of({f"{i}": b"" for i in range(20_000)}),
                "tar entries": lambda: tar_of([(tar_entry(f"{i}"), b"") for i in range(20_000)])}
    upload = io.BytesIO(archives[bomb]())
    tracemalloc.start()
    try:
        with pytest.raises(ApiError) as refusal:
            uploads.unpack(upload, tmp_path, max_bytes=1_000_000, max_entries=100)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert refusal.value.status in (400, 413) and peak < 8_000_000, (str(refusal.value), peak)
    assert sum(path.stat().st_size for path in tmp_path.rglob("*") if path.is_file()) <= 1_000_000


def _understated(data: bytes) -> bytes:
    """A zip whose one entry declares 1,000 bytes unpacked (in both headers) and holds many more."""
    patched = bytearray(data)
    for signature, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        at = patched.find(signature)
        patched[at + offset:at + offset + 4] = (1000).to_bytes(4, "little")
    return bytes(patched)


def test_any_damage_is_a_400_naming_it(served):
    """Archives cut short or overwritten anywhere: unpacked, or refused with an ApiError (never the
    reader's own exception, which the server would answer 500)."""
    rng = random.Random(0)
    for kind in ("zip", "tar"):
        good = archive(folder_files(served[2]), kind)
        for trial in range(100):
            damaged = bytearray(good)
            at = rng.randrange(len(good))
            if trial % 3 == 0:
                damaged = damaged[:at]
            else:
                damaged[at:at + 4] = rng.randbytes(4)
            with tempfile.TemporaryDirectory() as target:
                try:
                    uploads.unpack(io.BytesIO(bytes(damaged)), Path(target), max_bytes=1 << 22)
                except ApiError as error:
                    assert 400 <= error.status < 500 and "\n" not in str(error)
