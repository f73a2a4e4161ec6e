"""Config loading, atomic writes, the prepared-file schema and the shared training loop's resume."""

import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from genseg.config import load_config, save_config
from genseg.data.prepared import PreparedDataset, PreparedWriter, assign_patient_folds, read_metadata
from genseg.errors import ConfigError, DataError
from genseg.io import atomic_path
from genseg.training.loop import Hooks, Trainer, make_accelerator


@dataclass
class _Cfg:
    size: int = 64
    lr: float = 1e-3
    loss: str = "bce"
    channels: tuple[int, ...] = (8, 16)
    note: str | None = None


def test_load_config_file_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("size: 128\nlr: 1\nchannels: [4, 8, 16]\n")
    cfg = load_config(_Cfg, path, {"loss": "dice", "size": None})
    assert cfg == _Cfg(size=128, lr=1.0, loss="dice", channels=(4, 8, 16))
    save_config(cfg, tmp_path / "out.yaml")
    assert load_config(_Cfg, tmp_path / "out.yaml") == cfg


@pytest.mark.parametrize("text, fragment", [("sise: 3\n", "unknown key"), ("size: big\n", "expected int"),
                                            ("- 1\n", "expected a mapping"), ("size: [\n", "not valid YAML")])
def test_bad_config_names_file_and_problem(tmp_path, text, fragment):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=fragment) as info:
        load_config(_Cfg, path)
    assert "bad.yaml" in str(info.value)


def test_atomic_path_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
    with atomic_path(target) as tmp:
        tmp.write_text("whole")
    assert target.read_text() == "whole" and len(list(tmp_path.iterdir())) == 1


def test_patient_folds_never_split_a_patient():
    patients = [f"p{i // 3}" for i in range(60)] + ["big"] * 20
    folds = assign_patient_folds(patients, num_folds=5, seed=1)
    for p in set(patients):
        assert len({f for q, f in zip(patients, folds) if q == p}) == 1
    assert set(folds) == {1, 2, 3, 4, 5}


def _write_prepared(path, n=12, size=16):
    rng = np.random.default_rng(0)
    with PreparedWriter(path, size=size, source_format="test") as writer:
        for i in range(n):
            mask = np.zeros((size, size), np.uint8)
            mask[2:6, 2:6] = i % 2
            writer.append(rng.random((size, size)), mask, label=i % 4, patient=f"p{i // 2}", source=f"s{i}")
        writer.close(seed=3)


def test_prepared_round_trip(tmp_path):
    path = tmp_path / "d.h5"
    _write_prepared(path)
    meta = read_metadata(path)
    assert meta["num_slices"] == 12 and meta["attrs"]["source_format"] == "test"
    assert set(meta["split"]) <= {"train", "val", "test"}
    ds = PreparedDataset(path)
    item = ds[3]
    assert item["image"].shape == (1, 16, 16) and item["image"].dtype == torch.float32
    assert item["mask"].shape == (1, 16, 16) and set(item["mask"].unique().tolist()) <= {0.0, 1.0}
    assert item["label"] == 3
    sizes = [len(PreparedDataset(path, split=s)) for s in ("train", "val", "test")]
    assert sum(sizes) == 12


def test_prepared_writer_error_leaves_no_file(tmp_path):
    path = tmp_path / "d.h5"
    with pytest.raises(ValueError):
        with PreparedWriter(path, size=8) as writer:
            writer.append(np.zeros((9, 9)), np.zeros((9, 9)), 0, "p", "s")
    assert not path.exists() and list(tmp_path.iterdir()) == []


def test_not_a_prepared_file(tmp_path):
    bad = tmp_path / "x.h5"
    bad.write_bytes(b"not hdf5 at all")
    with pytest.raises(DataError, match="x.h5"):
        PreparedDataset(bad)


def _fit(run_dir, epochs, resume=False, max_steps=None):
    torch.manual_seed(0)
    acc = make_accelerator(seed=0)
    x = torch.randn(64, 4)
    y = x @ torch.tensor([1.0, 2.0, 3.0, 4.0])
    model = torch.nn.Linear(4, 1)
    trainer = Trainer(acc, model, torch.optim.Adam(model.parameters(), 1e-2),
                      DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True), run_dir)
    if resume:
        trainer.resume()
    trainer.fit(lambda m, b: (((m(b[0]).squeeze(-1) - b[1]) ** 2).mean(), {}), max_epochs=epochs, max_steps=max_steps,
                hooks=Hooks())
    return model.weight.detach().clone(), trainer


def test_resume_continues_exactly(tmp_path):
    straight, _ = _fit(tmp_path / "a", 4)
    _fit(tmp_path / "b", 2)
    resumed, trainer = _fit(tmp_path / "b", 4, resume=True)
    assert torch.equal(straight, resumed)
    assert [int(r["epoch"]) for r in trainer.log.rows()] == [1, 2, 3, 4]
    assert len(trainer.checkpointer.all()) == 2  # keep_last


@pytest.mark.parametrize("written_by", ["this genseg", "a genseg before compute_loss's logs"])
def test_resume_from_mid_epoch_continues_exactly(tmp_path, written_by):
    """8 steps an epoch: stopped at step 12, halfway through epoch 2, the checkpoint holds that epoch's loss sum so
    far; resumed, its train_loss row is the uninterrupted one's. Checkpoints of a genseg before compute_loss
    returned logs held that sum as three numbers, and resume the same."""
    straight, whole = _fit(tmp_path / "a", 4)
    _fit(tmp_path / "b", 4, max_steps=12)
    if written_by != "this genseg":
        state_file = tmp_path / "b" / "checkpoints" / "step-00000012" / "trainer_state.json"
        state = json.loads(state_file.read_text())
        epoch_sums, row_sums = state.pop("epoch_sums"), state.pop("row_sums")
        state.update(loss_sum=epoch_sums["loss"], log_loss_sum=row_sums["loss"], log_batches=row_sums["batches"])
        state_file.write_text(json.dumps(state))
    resumed, trainer = _fit(tmp_path / "b", 4, resume=True)
    assert torch.equal(straight, resumed)
    without_seconds = [{k: v for k, v in r.items() if k != "seconds"} for r in whole.log.rows()]
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in trainer.log.rows()] == without_seconds


def test_resume_without_checkpoint_is_clear(tmp_path):
    from genseg.errors import CheckpointError

    with pytest.raises(CheckpointError, match="nothing to resume"):
        _fit(tmp_path / "empty", 1, resume=True)



@pytest.mark.parametrize("tamper", ["pickled code", "unusable state", "missing"])
def test_resume_refuses_a_checkpoint_whose_rng_state_cannot_be_restored(tmp_path, tamper):
    """accelerate skips an RNG file it cannot load or apply with an info log; resume must refuse the checkpoint,
    naming the file, instead of going on with other random draws."""
    from genseg.errors import CheckpointError

    _fit(tmp_path, 2)
    rng_file = tmp_path / "checkpoints" / "step-00000016" / "random_states_0.pkl"
    states = torch.load(rng_file, weights_only=False)
    if tamper == "missing":
        rng_file.unlink()
    else:
        states["random_state"] = _RunsCode(tmp_path / "ran") if tamper == "pickled code" else (3, (1, 2), None)
        torch.save(states, rng_file)
    reason = {"pickled code": r"cannot restore the random-number state \(UnpicklingError: .*GLOBAL posix.mkdir",
              "unusable state": "its random-number state was not restored",
              "missing": r"cannot restore the random-number state \(FileNotFoundError"}[tamper]
    with pytest.raises(CheckpointError, match=rf"step-00000016/random_states_0\.pkl: {reason}"):
        _fit(tmp_path, 3, resume=True)
    assert not (tmp_path / "ran").exists()  # the pickled call never ran
    assert [int(r["epoch"]) for r in _log_rows(tmp_path)] == [1, 2]  # nothing trained on after the refusal
    assert [p.name for p in sorted((tmp_path / "checkpoints").iterdir())][-1] == "step-00000016"


class _RunsCode:
    """Unpickling this calls os.mkdir(path): what a tampered pickle could do instead."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        import os

        return (os.mkdir, (self.path,))


def _log_rows(run_dir):
    import csv

    with (run_dir / "log.csv").open() as f:
        return list(csv.DictReader(f))
