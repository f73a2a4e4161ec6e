"""`genseg sample` over several processes: each process samples whole batches into a shard, and the main process
merges the shards into the single-process output (see genseg.distributed for the launch and the reasons)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..distributed import TEST_EXIT_RANK, batch_share, main_decides
from ..errors import DataError
from ..io import _create_temporary, _remove, atomic_path, remove_stale_temporaries
from ..pipeline.diffusion import SliceDiffusionOutput


def sample_shared(state, pipe, num: int, out: str | Path, sampling, save_intermediates: bool = False,
                  given: dict[str, np.ndarray] | None = None):
    """Sample `num` images over the processes of `state`; the merged SliceDiffusionOutput on the main process (the
    single-process output; genseg.distributed says how exactly), None on the others. Nothing is written under `out`
    itself. `given`: the pipeline's per-image inputs, num of each (masks of a mask-conditioned model; slices, masks
    and regions of an inpaint model), each process passing its share's."""
    out = Path(out)

    def shard_folder() -> str:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out)  # the shard folders of killed runs
        return str(_create_temporary(out, is_dir=True))

    folder = Path(main_decides(state, shard_folder))  # an error creating it stops every process alike
    try:
        mine = batch_share(state, num, sampling.batch_size)
        call = {"save_intermediates": save_intermediates,
                **{key: values[mine.start:mine.stop] for key, values in (given or {}).items()}}
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
