"""The HTTP server (`adapterlab serve`): one engine behind FastAPI, with dynamic batching and live
adapter changes.

Modules, one concept each:
- `settings`: `Settings`, the batching options and request limits.
- `errors`: `ApiError`, an answer for the client (a status and a message).
- `bodies`: the request bodies (pydantic models).
- `metrics`: the Prometheus histograms and counters.
- `disconnects`: cancelling the work of a client that left, as soon as its connection closes.
- `uploads`: unpacking an uploaded adapter archive, and its checks.
- `worker`: `Server`, the engine on its one worker thread (the threading and batching rules are
  described there): batching, registration and removal, generation; and `backbone_from_store`.
- `app`: the FastAPI application: routes, error answers, the `Gate` middleware, `create_app`, `serve`.
"""

from adapterlab.server.app import create_app, serve
from adapterlab.server.settings import Settings
from adapterlab.server.worker import backbone_from_store

__all__ = ["Settings", "backbone_from_store", "create_app", "serve"]
