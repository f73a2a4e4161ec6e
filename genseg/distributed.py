"""Process state for `genseg sample` and `genseg segment` over several processes (the shard merge of sample is
genseg.workflows.distributed_sampling): `accelerate launch -m genseg ...` or
`torchrun -m genseg ...` (one process per GPU, or several CPU processes); launched plainly, one process.

sample: the images are cut into the batches a single process would make (`--batch-size` from index 0), and each
process gets a contiguous run of whole batches (`split_between_processes`). An image depends on its seed and index,
and here also on the batch it is denoised in (the UNet's kernels round differently for other batch sizes), so with
the same batches every image is the single-process image, bit for bit where every process's kernels round alike (a
process's start-up, e.g. torchrun's OMP_NUM_THREADS=1, can move the last bits). Each process writes its share as a
shard (.npz, atomically) into a private temporary folder next to the output; after a barrier the main process
merges the shards in index order and writes the one prepared file through the same code as a single-process run
(atomically), then removes the folder. Shards rather than gathering through the process group: no process but the
main holds more than its own share, nothing large is pickled through NCCL or gloo, and the merge is the
single-process write. On several machines the output's folder must be shared by all.

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
from typing import Any, Callable, Sequence, TypeVar

import torch

from .errors import GensegError

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
