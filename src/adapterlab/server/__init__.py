"""The HTTP server (`adapterlab serve`): one engine behind FastAPI, with dynamic batching and live
adapter changes. Every route is written once, against a `Backend`: the local one here, Ray replicas in
`adapterlab.ray_serve`.

Modules, one concept each:
- `settings`: `Settings`, the batching options and request limits (and the size check).
- `errors`: `ApiError`, an answer for the client (a status and a message).
- `bodies`: the request bodies (pydantic models).
- `metrics`: the Prometheus histograms and counters.
- `uploads`: unpacking an uploaded adapter archive, and its checks (links, names, entries, bytes, damage).
- `durability`: fsync of what the server changes in the store, before it answers.
- `drain`: `DrainingServer`, uvicorn's server with a drain on SIGTERM or Ctrl-C (503 for new requests while
  those in flight finish), and `Traffic`, the requests in flight.
- `disconnects`: cancelling the work of a client that left, as soon as its connection closes.
- `backend`: `Backend`, what the routes ask of whatever serves them, and `Update`, a generation's progress.
- `worker`: `Server`, the engine on its one worker thread (the threading and batching rules are
  described there): batching, registration and removal, generation; and `backbone_from_store`.
- `local`: `LocalBackend`, the backend of one process over a `Server`.
- `routes`: the API's own routes and the bearer-token checks.
- `openai`: the OpenAI-compatible routes.
- `app`: `api_app` (the routes over any backend, error answers and their OpenAPI entries, the `Gate`
  middleware), `create_app`, `serve`.

Only `Settings` is imported with the package: the command line reads its defaults without the `serve`
extra (FastAPI, uvicorn), which the rest needs.
"""

from adapterlab.server.settings import Settings

__all__ = ["Settings", "backbone_from_store", "create_app", "serve"]


def __getattr__(name: str):
    if name in ("create_app", "serve"):
        from adapterlab.server import app

        return getattr(app, name)
    if name == "backbone_from_store":
        from adapterlab.server import worker

        return worker.backbone_from_store
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
