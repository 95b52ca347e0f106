"""torchfast.Trainer: resume after a crash gives the uninterrupted run's weights, atomic checkpoints,
TensorBoard scalars, NaN handling and bad input (one process; tests/train/test_distributed.py runs
the Trainer under torchrun)."""

from __future__ import annotations

import io
import re
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import torchfast
from tests.train.common import Crash, crashing_mse, dataset, make_model
from torchfast import _dcp
from torchfast import distributed as tfdist
from torchfast.hooks import NonFiniteError
from torchfast.trainer import CHECKPOINT_NAME, NonFiniteLossError, Trainer


@pytest.fixture(autouse=True)
def _one_thread_fresh_world():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    tfdist.cleanup()
    yield
    tfdist.cleanup()
    torch.set_num_threads(threads)


def run(tmp_path, *, crash_after: int | None = None, resume: bool = False, seed: int = 0, amp: str = "off",
        strategy: str = "ddp"):
    """3 epochs x 4 optimizer steps (8 batches of 8, accumulate 2) of a model with dropout (so the RNG
    state matters), AdamW + StepLR, a checkpoint every 3 steps. Returns (model, FitResult)."""
    model = make_model(seed=seed, dropout=0.2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
    trainer = Trainer(
        model,
        opt,
        crashing_mse(crash_after),
        amp=amp,
        accumulate=2,
        grad_clip=1.0,
        checkpoint_dir=tmp_path / "ckpt",
        checkpoint_every=3,
        scheduler=sched,
        progress=None,
        strategy=strategy,
    )
    loader = tfdist.data_loader(dataset(), 8, shuffle=True, num_workers=0)
    return model, trainer.fit(loader, 3, resume=resume)


def saved_state(tmp_path, strategy: str) -> dict:
    """The trainer state of the newest checkpoint under tmp_path/ckpt (for "fsdp" without the model)."""
    if strategy == "fsdp":
        return torch.load(_dcp.latest(tmp_path / "ckpt") / _dcp.META, weights_only=True)
    return torch.load(tmp_path / "ckpt" / CHECKPOINT_NAME, weights_only=True)


@pytest.mark.parametrize(
    "crash_after, amp, strategy",
    [(13, "off", "ddp"), (9, "fp16", "ddp"), (13, "off", "fsdp"), (9, "bf16", "fsdp")],
    ids=["mid-epoch-checkpoint", "epoch-end-checkpoint-fp16", "fsdp-mid-epoch", "fsdp-epoch-end-bf16"],
)
def test_resume_after_a_crash_gives_the_same_weights(tmp_path, crash_after, amp, strategy):
    """Crash in step 7 (last checkpoint: step 6, mid-epoch) or step 5 (last: step 4, an epoch end),
    then resume with a freshly initialised model: the final weights equal an uninterrupted run's, to
    the bit. strategy="fsdp" in one process trains the plain model but writes and reads its checkpoints
    through torch.distributed.checkpoint (tests/train/test_trainer_fsdp.py does it sharded, 2 ranks)."""
    torch.manual_seed(123)
    reference, ref_result = run(tmp_path / "ref", amp=amp, strategy=strategy)
    torch.manual_seed(7)  # a different global RNG state: the checkpoint must restore it
    with pytest.raises(Crash):
        run(tmp_path / "crash", crash_after=crash_after, amp=amp, strategy=strategy)
    assert saved_state(tmp_path / "crash", strategy)["step"] == (6 if crash_after == 13 else 4)
    resumed, result = run(tmp_path / "crash", resume=True, seed=99, amp=amp, strategy=strategy)
    assert result.resumed_from is not None and result.steps == ref_result.steps == 12
    assert result.losses == ref_result.losses
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), f"{name} differs after resume: max diff {(a - b).abs().max()}"
    # and training did something: the weights moved away from the initial ones
    assert not torch.equal(resumed.state_dict()["0.weight"], make_model()[0].weight)


def test_resume_without_a_checkpoint_starts_afresh(tmp_path):
    _, result = run(tmp_path, resume=True)
    assert result.resumed_from is None and result.steps == 12


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    """A crash in the middle of writing leaves the previous checkpoint loadable, and no temp file."""
    model, _ = run(tmp_path)
    path = tmp_path / "ckpt" / CHECKPOINT_NAME
    good = torch.load(path, weights_only=True)
    real_save = torch.save

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    trainer = Trainer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        nn.functional.mse_loss,
        amp="off",
        checkpoint_dir=tmp_path / "ckpt",
        progress=None,
    )
    with pytest.raises(OSError, match="disk full"):
        trainer.save_checkpoint(epoch=9, batch=0)
    monkeypatch.setattr(torch, "save", real_save)
    again = torch.load(path, weights_only=True)
    assert again["epoch"] == good["epoch"] == 3 and torch.equal(
        again["model"]["0.weight"], good["model"]["0.weight"]
    )
    assert sorted(p.name for p in path.parent.iterdir()) == [CHECKPOINT_NAME]


def test_tensorboard_scalars_and_progress(tmp_path):
    pytest.importorskip("tensorboard", reason="the train extra (tensorboard) is part of the test extra")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = make_model()
    progress = io.StringIO()
    trainer = Trainer(
        model,
        torch.optim.AdamW(model.parameters(), lr=1e-2),
        nn.functional.mse_loss,
        amp="bf16",
        log_dir=tmp_path / "tb",
        progress=progress,
    )
    result = trainer.fit(dataset(), 2, val_data=dataset(seed=5), batch_size=16)
    trainer.close()
    ev = EventAccumulator(str(tmp_path / "tb"))
    ev.Reload()
    tags = set(ev.Tags()["scalars"])
    assert {
        "train/loss",
        "train/lr",
        "train/grad_norm",
        "train/samples_per_s",
        "amp/scale",
        "train/skipped_steps",
        "val/loss",
    } <= tags
    losses = [e.value for e in ev.Scalars("train/loss")]
    assert [e.step for e in ev.Scalars("train/loss")] == list(range(1, 9))
    assert losses == pytest.approx(result.losses, rel=1e-6)
    assert [e.value for e in ev.Scalars("val/loss")] == pytest.approx(result.val_losses, rel=1e-6)
    assert all(e.value > 0 for e in ev.Scalars("train/samples_per_s"))
    assert result.val_losses[-1] < result.val_losses[0] * 1.5  # sane, finite
    last = progress.getvalue().splitlines()[-1]
    assert "train: 100%" in last and "8/8" in last and re.search(r"loss=[\d.]+, samples_s=[\d,]+", last), last


def test_missing_tensorboard_is_named(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # makes `import tensorboard` fail
    model = make_model()
    trainer = Trainer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        nn.functional.mse_loss,
        log_dir=tmp_path,
        progress=None,
    )
    with pytest.raises(ImportError, match=r"needs the 'tensorboard' package.*torchfast\[train\]"):
        trainer.fit(dataset(), 1, batch_size=16)


def test_nan_loss_stops_training(tmp_path):
    model = make_model()
    x, y = dataset().tensors
    x = x.clone()
    x[20, 0] = float("nan")  # in the second batch of 16 (no shuffle)
    data = tfdist.data_loader(TensorDataset(x, y), 16, shuffle=False, num_workers=0)
    trainer = Trainer(
        model, torch.optim.SGD(model.parameters(), lr=0.1), nn.functional.mse_loss, amp="off", progress=None
    )
    with pytest.raises(NonFiniteLossError, match="the loss is nan at step 2"):
        trainer.fit(data, 1)
    assert torch.isfinite(model[0].weight).all()  # the NaN never reached the weights
    tfdist.cleanup()
    model = make_model()
    trainer = Trainer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        nn.functional.mse_loss,
        amp="off",
        progress=None,
        detect_nonfinite=True,
    )
    with pytest.raises(NonFiniteError, match="forward output of module '0' at step 2"):
        trainer.fit(data, 1)
    assert torchfast.hooks.count_hooks(model) == 0


def test_compile(tmp_path):
    """compile= passes its options to torch.compile (aot_eager: traced through Dynamo and AOTAutograd
    without generating code, to stay fast); training matches eager."""
    eager = make_model()
    Trainer(
        eager, torch.optim.SGD(eager.parameters(), lr=0.1), nn.functional.mse_loss, amp="off", progress=None
    ).fit(dataset(), 1, batch_size=32)
    compiled = make_model()
    trainer = Trainer(
        compiled,
        torch.optim.SGD(compiled.parameters(), lr=0.1),
        nn.functional.mse_loss,
        amp="off",
        progress=None,
        compile={"backend": "aot_eager", "fullgraph": True},
    )
    trainer.fit(dataset(), 1, batch_size=32)
    assert trainer.model is not compiled
    torch.testing.assert_close(compiled.state_dict(), eager.state_dict(), rtol=1e-5, atol=1e-6)


def _trainer(model, **kwargs):
    return Trainer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1)
        if list(model.parameters())
        else torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1),
        nn.functional.mse_loss,
        progress=None,
        **kwargs,
    )


@pytest.mark.parametrize(
    "make, kwargs, error, match",
    [
        (lambda: nn.ReLU(), {}, ValueError, "the model has no trainable parameters"),
        (make_model, {"accumulate": 0}, ValueError, "accumulate must be an int >= 1"),
        (make_model, {"amp": "fp8"}, ValueError, r"unknown amp mode 'fp8'"),
        (make_model, {"profile": True}, ValueError, "profile=True writes its trace under log_dir"),
        (make_model, {"world_size": 4}, RuntimeError, "world_size=4 was expected"),
    ],
    ids=["no-parameters", "accumulate-0", "unknown-amp", "profile-without-log-dir", "world-size"],
)
def test_bad_trainer_arguments(make, kwargs, error, match):
    with pytest.raises(error, match=f"torchfast.(Trainer|distributed.init): .*{match}"):
        _trainer(make(), **kwargs)


def test_optimizer_of_another_model():
    with pytest.raises(ValueError, match="the optimizer holds .* parameters that are not the model's"):
        Trainer(make_model(), torch.optim.SGD(make_model().parameters(), lr=0.1), nn.functional.mse_loss)


@pytest.mark.parametrize(
    "data, kwargs, match",
    [
        (
            TensorDataset(torch.zeros(0, 8), torch.zeros(0, 4)),
            {"batch_size": 4},
            r"train_data is empty \(0 samples\)",
        ),
        (
            DataLoader(TensorDataset(torch.zeros(0, 8), torch.zeros(0, 4)), batch_size=4),
            {},
            r"train_data is empty \(0 batches\)",
        ),
        (dataset(), {}, "train_data is a Dataset; give batch_size="),
        ([1, 2, 3], {"batch_size": 2}, None),
    ],
    ids=["empty-dataset", "empty-loader", "no-batch-size", "list"],
)
def test_bad_fit_data(data, kwargs, match):
    trainer = _trainer(make_model())
    if match is None:  # a list has __getitem__/__len__, but its items are no (input, target) batches
        with pytest.raises(TypeError, match=r"a batch must be a tuple or list \(input, ..., target\)"):
            trainer.fit(data, 1, **kwargs)
        return
    with pytest.raises(ValueError, match=f"torchfast.Trainer.fit: {match}"):
        trainer.fit(data, 1, **kwargs)


def test_bad_fit_arguments(tmp_path):
    trainer = _trainer(make_model())
    with pytest.raises(ValueError, match="epochs must be an int >= 1"):
        trainer.fit(dataset(), 0, batch_size=8)
    with pytest.raises(ValueError, match=r"resume=True needs Trainer\(checkpoint_dir=...\)"):
        trainer.fit(dataset(), 1, batch_size=8, resume=True)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_resume_with_another_world_size_is_refused(tmp_path, strategy):
    run(tmp_path, strategy=strategy)
    path = tmp_path / "ckpt" / CHECKPOINT_NAME
    if strategy == "fsdp":
        path = _dcp.latest(tmp_path / "ckpt") / _dcp.META
    state = torch.load(path, weights_only=True)
    state["world_size"] = 2
    torch.save(state, path)
    with pytest.raises(RuntimeError, match="written by 2 processes but this run has world size 1"):
        run(tmp_path, resume=True, strategy=strategy)


def test_resume_with_the_other_strategy_is_refused(tmp_path):
    """A checkpoint_dir that holds only the other strategy's checkpoint is not silently started afresh."""
    run(tmp_path / "a", strategy="ddp")
    with pytest.raises(ValueError, match="written with strategy='ddp' but this Trainer has strategy='fsdp'"):
        run(tmp_path / "a", resume=True, strategy="fsdp")
    run(tmp_path / "b", strategy="fsdp")
    with pytest.raises(ValueError, match="written with strategy='fsdp' but this Trainer has strategy='ddp'"):
        run(tmp_path / "b", resume=True, strategy="ddp")


def test_sharded_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    """strategy="fsdp": a crash in the middle of torch.distributed.checkpoint's write leaves `latest`
    naming the previous complete checkpoint, which still loads; the next write replaces the debris."""
    import torch.distributed.checkpoint as dcp

    model, result = run(tmp_path, strategy="fsdp")
    good = _dcp.latest(tmp_path / "ckpt")
    assert good.name == "step-00000012" and result.checkpoint == str(good)
    trainer = Trainer(model, torch.optim.AdamW(model.parameters(), lr=1e-2), nn.functional.mse_loss,
                      amp="off", checkpoint_dir=tmp_path / "ckpt", progress=None, strategy="fsdp")
    trainer.step = 13

    def broken_save(state_dict, *, checkpoint_id, **kwargs):
        (Path(checkpoint_id) / "__0_0.distcp").write_bytes(b"half a shard")
        raise OSError("disk full")

    monkeypatch.setattr(dcp, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        trainer.save_checkpoint(epoch=4, batch=0)
    monkeypatch.undo()
    assert _dcp.latest(tmp_path / "ckpt") == good
    assert torch.load(good / _dcp.META, weights_only=True)["step"] == 12
    _, again = run(tmp_path, resume=True, seed=99, strategy="fsdp")  # the old one still loads
    assert again.resumed_from == str(good) and again.steps == 12
    assert trainer.save_checkpoint(epoch=4, batch=0).name == "step-00000013"
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["latest", "step-00000013"]


def test_strategy_bad_input():
    """Refused by name before torchfast.distributed.init (so before any collective)."""
    with pytest.raises(ValueError, match=r"strategy must be one of \('ddp', 'fsdp'\), got 'zero3'"):
        _trainer(make_model(), strategy="zero3")
    with pytest.raises(ValueError, match="blocks= applies to strategy='fsdp' only"):
        _trainer(make_model(), blocks=nn.Linear)
    with pytest.raises(ValueError, match=r"unknown fsdp_options \['reshard'\]"):
        _trainer(make_model(), strategy="fsdp", fsdp_options={"reshard": False})
    with pytest.raises(ValueError, match="amp='fp16' means float16 with a GradScaler .* strategy='fsdp'"):
        _trainer(make_model(), strategy="fsdp", amp="fp16")
    # what shard() refuses, by name, through the Trainer (in a world of one the same checks run)
    with pytest.raises(ValueError, match=r"shard: blocks=<class '.*Conv2d'> matched no submodule"):
        _trainer(make_model(), strategy="fsdp", blocks=nn.Conv2d)
    scalar = make_model()
    scalar[1].gain = nn.Parameter(torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"parameter '1.gain' is a scalar \(0 dimensions\)"):
        _trainer(scalar, strategy="fsdp")
    assert not torch.distributed.is_initialized()


def test_fsdp_in_a_world_of_one_keeps_the_optimizer_groups():
    """strategy="fsdp" without torchrun: the plain model trains, and every parameter group of the
    optimizer (with its own learning rate) still holds the model's parameters. An optimizer that has
    stepped is fine here (nothing is sharded; under torchrun it is refused: test_trainer_fsdp.py)."""
    model = make_model()
    opt = torch.optim.SGD([{"params": model[0].parameters(), "lr": 0.0},
                           {"params": list(model[1].parameters()) + list(model[2].parameters())}],
                          lr=0.1, momentum=0.9)
    first = model[0].weight.detach().clone()
    last = model[2].weight.detach().clone()
    Trainer(model, opt, nn.functional.mse_loss, amp="off", strategy="fsdp", blocks=nn.Linear,
            progress=None).fit(dataset(), 1, batch_size=16)
    assert torch.equal(model[0].weight, first)  # lr 0 in its group
    assert not torch.equal(model[2].weight, last)
    assert opt.state and all(p in opt.state for p in model[2].parameters())
    Trainer(model, opt, nn.functional.mse_loss, amp="off", strategy="fsdp", progress=None)
