"""Sweep cells as Ray tasks: `adapterlab sweep SWEEP.yaml --ray`.

Each cell runs `sweep.run_cell` as a task asking for the sweep's `cpus_per_cell` and `gpus_per_cell`;
its adapter goes to the sweep's store, and its row reaches results.jsonl as soon as it finishes, so a
sweep stopped halfway resumes where it stopped, as a local one does. Ray retries a task whose worker
or node died, and one that failed on a file error (a shared filesystem's hiccup); a cell that still
fails is reported, and run again by the next run. The sweep's output folder, recipes and data must be
where every node sees them (a shared filesystem, at the same path).
"""

from collections.abc import Iterator
from pathlib import Path

import ray
from ray.exceptions import RayError, RayTaskError

from adapterlab.sweep import PROMPTING, CellFailure, Runner, Sweep, run_cell

RETRIES = 2


@ray.remote(max_retries=RETRIES, retry_exceptions=[OSError])
def _cell_task(sweep: Sweep, cell: dict, folder: Path) -> dict:
    return run_cell(sweep, cell, folder)


def on_ray(address: str | None = None) -> Runner:
    """A sweep runner on the Ray cluster at `address` (None: RAY_ADDRESS, else a cluster started here,
    or the one this process is already connected to)."""

    def run(sweep: Sweep, todo: list[dict], folder: Path) -> Iterator[dict | CellFailure]:
        if not ray.is_initialized():
            ray.init(address=address)
        task = _cell_task.options(num_cpus=sweep.cpus_per_cell, num_gpus=sweep.gpus_per_cell)
        sweep, folder = _absolute(sweep), folder.resolve()
        pending = {task.remote(sweep, cell, folder): cell for cell in todo}
        try:
            while pending:
                [finished], _ = ray.wait(list(pending))
                cell = pending.pop(finished)
                try:
                    yield ray.get(finished)
                except RayError as error:
                    yield CellFailure(cell, _reason(error))
        finally:  # stopped early (interrupted, or the caller failed): the cells still running are cancelled
            for reference in pending:
                ray.cancel(reference)

    return run


def _absolute(sweep: Sweep) -> Sweep:
    """The sweep with its recipe files as absolute paths: workers start elsewhere than this process."""
    methods = {method: recipe if recipe in PROMPTING else str(Path(recipe).resolve())
               for method, recipe in sweep.methods.items()}
    return sweep.model_copy(update={"methods": methods})


def _reason(error: RayError) -> str:
    """The cell's own error in one line (a task's), or what happened to its worker."""
    cause = error.cause if isinstance(error, RayTaskError) else error
    return f"{type(cause).__name__}: {str(cause).strip().splitlines()[-1] if str(cause).strip() else ''}"
