"""`genseg sample` and `genseg segment` over several processes: `accelerate launch -m genseg ...` or
`torchrun -m genseg ...` (one process per GPU, or several CPU processes); launched plainly, one process.

sample: the images are cut into the batches a single process would make (`--batch-size` from index 0), and each
process gets a contiguous run of whole batches (`split_between_processes`). An image depends on its seed and
index, and here also on the batch it is denoised in (the UNet's kernels round differently for other batch
sizes), so with the same batches every image is the single-process image bit for bit. Each process writes its
share as a shard (.npz, atomically) into a private temporary folder next to the output; after a barrier the main
process merges the shards in index order and writes the one prepared file through the same code as a
single-process run (atomically), then removes the folder. Shards rather than gathering through the process
group: no process but the main holds more than its own share, nothing large is pickled through NCCL or gloo,
and the merge is the single-process write. On several machines the output's folder must be shared by all.

segment: the main process plans every output name and refuses existing outputs (unless --force) on the whole
input list, once, and hands the plan to every process before any writes; each process segments its share of
the inputs (each output written atomically, as in one process); the small per-process reports are gathered and
every process gets the merged one, which only the main process prints.

A process that fails or dies takes the launcher down (torchrun / accelerate stop the others): the prepared file
appears only after every shard is in, and a killed run's shard folder is removed by the next write of the same
output (it is named like genseg.io's temporaries, after the main process's pid).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

import numpy as np
import torch

from .errors import DataError, GensegError
from .io import _create_temporary, _remove, atomic_path, remove_stale_temporaries

T = TypeVar("T")
TEST_EXIT_RANK = "GENSEG_TEST_EXIT_RANK"  # tests only: this rank os._exit()s after its first batch


class OneProcess:
    """The state of a plain (not distributed) run: what PartialState answers there, without initialising
    accelerate's process-wide state (which a later Accelerator(cpu=...) in the same process would inherit)."""

    num_processes, process_index, is_main_process, device = 1, 0, True, None

    def wait_for_everyone(self) -> None:
        pass


WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def process_state():
    """accelerate's PartialState under `accelerate launch`, `torchrun` (or MPI) with several processes; a
    OneProcess when started plainly. CPU processes talk over gloo when no CUDA device is visible (or with
    `accelerate launch --cpu`); with GPUs each process uses its own (`state.device`)."""
    sizes = [int(os.environ.get(name) or 1) for name in WORLD_SIZE_VARIABLES]
    if max(sizes) <= 1 and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return OneProcess()
    from accelerate import PartialState

    cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return PartialState(cpu=cpu)


def main_decides(state, decide: Callable[[], T]) -> T:
    """`decide()` run by the main process only and its result handed to every process; an error raised there is
    raised on every process (the main's own exception; a GensegError with its message elsewhere), so all stop."""
    if state.num_processes == 1:
        return decide()
    from accelerate.utils import broadcast_object_list

    outcome: list[Any] = [None]
    error = None
    if state.is_main_process:
        try:
            outcome = [("ok", decide())]
        except BaseException as exc:  # every process must leave the broadcast, and then stop the same way
            error = exc
            outcome = [("error", str(exc) if isinstance(exc, GensegError) else
                        f"the main process failed: {type(exc).__name__}: {exc}")]
    broadcast_object_list(outcome, from_process=0)
    kind, value = outcome[0]
    if error is not None:
        raise error
    if kind == "error":
        raise GensegError(value)
    return value


def share(state, items: Sequence[T]) -> list[T]:
    """This process's contiguous share of `items` (the first processes take one more when they do not divide)."""
    if state.num_processes == 1:
        return list(items)
    with state.split_between_processes(list(items)) as part:
        return list(part)


def batch_share(state, num: int, batch_size: int) -> range:
    """The images this process samples: whole batches of `batch_size` counted from image 0, the same batches a
    single process makes, split contiguously over the processes (an empty range when there are more processes
    than batches)."""
    batches = [range(start, min(start + batch_size, num)) for start in range(0, num, batch_size)]
    mine = share(state, batches)
    return range(mine[0].start, mine[-1].stop) if mine else range(0)


def merge_reports(state, report: dict[str, list]) -> dict[str, list]:
    """Every process's report (lists under the same keys) concatenated in process order, on every process."""
    if state.num_processes == 1:
        return report
    from accelerate.utils import gather_object

    reports = gather_object([report])
    return {key: [item for r in reports for item in r[key]] for key in report}


def sample_shared(state, pipe, num: int, out: str | Path, sampling, save_intermediates: bool = False):
    """Sample `num` images over the processes of `state`; the merged SliceDiffusionOutput on the main process
    (the single-process output bit for bit), None on the others. Nothing is written under `out` itself."""
    from .pipeline.diffusion import SliceDiffusionOutput

    out = Path(out)

    def shard_folder() -> str:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out)  # the shard folders of killed runs
        return str(_create_temporary(out, is_dir=True))

    folder = Path(main_decides(state, shard_folder))  # an error creating it stops every process alike
    try:
        mine = batch_share(state, num, sampling.batch_size)
        call = {"save_intermediates": save_intermediates}
        if os.environ.get(TEST_EXIT_RANK) == str(state.process_index):
            call["callback_on_step_end"] = _exit_after_first_batch
        result = sampling.sample(pipe, len(mine), start=mine.start, **call) if len(mine) else None
        with atomic_path(folder / f"rank-{state.process_index:05d}.npz") as tmp:
            with tmp.open("wb") as f:
                np.savez(f, **_shard_arrays(mine, result))
        state.wait_for_everyone()
        if not state.is_main_process:
            return None
        shards = [_read_shard(path) for path in sorted(folder.glob("rank-*.npz"))]
        shards = [s for s in shards if len(s["indices"])]
        indices = np.concatenate([s["indices"] for s in shards]) if shards else np.zeros(0, np.int64)
        if not np.array_equal(indices, np.arange(num)):
            raise DataError(folder, f"the shards hold images {_ranges(indices)} of 0..{num - 1}; with several "
                                    f"machines, --out must be on a folder that every machine shares")

        def joined(key):
            return np.concatenate([s[key] for s in shards]) if key in shards[0] else None

        intermediates = None
        if save_intermediates:
            intermediates = [(int(t), x) for t, x in zip(shards[0]["steps"], np.concatenate(
                [s["intermediates"] for s in shards], axis=1))]
        return SliceDiffusionOutput(images=joined("images"), masks=joined("masks"), labels=joined("labels"),
                                    intermediates=intermediates)
    finally:
        if state.is_main_process:
            _remove(folder)


def _shard_arrays(mine: range, result) -> dict[str, np.ndarray]:
    arrays = {"indices": np.arange(mine.start, mine.stop, dtype=np.int64)}
    if result is None:
        return arrays
    arrays["images"] = result.images
    for key in ("masks", "labels"):
        if getattr(result, key) is not None:
            arrays[key] = getattr(result, key)
    if result.intermediates:
        arrays["steps"] = np.array([t for t, _ in result.intermediates], dtype=np.int64)
        arrays["intermediates"] = np.stack([x for _, x in result.intermediates])
    return arrays


def _read_shard(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as shard:
        return {key: shard[key] for key in shard.files}


def _ranges(indices: np.ndarray) -> str:
    if not len(indices):
        return "none"
    breaks = np.flatnonzero(np.diff(indices) != 1)
    starts, stops = np.r_[indices[0], indices[breaks + 1]], np.r_[indices[breaks], indices[-1]]
    return ", ".join(f"{a}..{b}" if a != b else f"{a}" for a, b in zip(starts, stops))


def _exit_after_first_batch(pipe, step, timestep, kwargs):
    """A step callback that ends the process abruptly once its first batch is denoised (the tests' dying rank)."""
    if step == len(pipe.scheduler.timesteps) - 1:
        os._exit(17)
