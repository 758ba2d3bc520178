"""What a new user meets: option types named at construction, clear errors, plain InfoNCE without a
policy, resume paths, and the end of a run."""


import lightning.pytorch as pl
import pytest
import torch
from helpers import PerSampleRegressor, regression_loader
from hydra.utils import instantiate
from test_hydra import _compose

from lightning_select import GuidedNegatives, LossHistory, PreemptionCheckpoint, SelectionEngine, SelectionError
from lightning_select.cli import resolve_ckpt_path, run
from lightning_select.data import DigitsPairsDataModule
from lightning_select.models import DigitsEmbeddingModule
from lightning_select.rules import contrastive


@pytest.mark.parametrize("kwargs, match", [
    ({"margin": "abc"}, r"GuidedNegatives: expected `margin` to be a real number, but got 'abc' \(str\)"),
    ({"temperature": "hot"}, r"`temperature` to be a real number or None"),
    ({"mask_self": "yes"}, r"`mask_self` to be true or false"),
    ({"negative_columns": "neg"}, r"`negative_columns` to be a list of column names"),
    ({"max_flagged_pairs": 1.5}, r"`max_flagged_pairs` to be an integer"),
])
def test_gist_option_types_are_named_at_construction(kwargs, match):
    with pytest.raises(TypeError, match=match):
        GuidedNegatives(torch.nn.Linear(64, 8), "image", "image", **kwargs)


def test_history_and_preemption_option_types():
    with pytest.raises(TypeError, match="LossHistory: expected `ema_decay` to be a real number"):
        LossHistory(ema_decay="0.9")
    with pytest.raises(TypeError, match="LossHistory: expected `num_samples` to be an integer or None"):
        LossHistory(num_samples=10.0)
    with pytest.raises(ValueError, match="signal names"):
        PreemptionCheckpoint(signals=("SIGKILL",))


def test_hydra_bad_margin_names_the_option(tmp_path):
    cfg = _compose(["+selector=gist", "selector.gist.margin=abc", f"hydra.run.dir={tmp_path}"])
    with pytest.raises(Exception, match="expected `margin` to be a real number"):
        instantiate(cfg.selector.gist)


def test_max_epochs_zero_is_refused(tmp_path):
    cfg = _compose(["trainer.max_epochs=0", f"hydra.run.dir={tmp_path}"])
    with pytest.raises(ValueError, match="trainer.max_epochs=0 trains nothing"):
        run(cfg)


def test_skip_with_every_sample_nonfinite_does_not_advise_skip(trainer_kwargs):
    class AllNaN(PerSampleRegressor):
        def training_step(self, batch, batch_idx):
            return super().training_step(batch, batch_idx) * float("nan")

    trainer = pl.Trainer(callbacks=[SelectionEngine(nan_policy="skip"), LossHistory()], max_steps=1, **trainer_kwargs)
    with pytest.raises(SelectionError, match="every sample of batch 0") as err:
        trainer.fit(AllNaN(), regression_loader())
    assert "nan_policy='skip'" not in str(err.value)


def test_flagged_pairs_without_recording_names_the_option():
    gist = GuidedNegatives(torch.nn.Linear(64, 8), "image", "image")
    with pytest.raises(SelectionError, match="record_flagged_pairs=True"):
        gist.flagged_pairs()


def test_embedding_output_without_any_callback_trains_as_plain_infonce(trainer_kwargs):
    """No lightning_select callback at all: Lightning reads the output's 'loss' (mean InfoNCE), with a warning."""
    contrastive._WARNED_NO_ENGINE = False
    torch.manual_seed(0)
    model = DigitsEmbeddingModule()
    reference = DigitsEmbeddingModule()
    reference.load_state_dict(model.state_dict())
    losses = []

    class Capture(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    dm = DigitsPairsDataModule(batch_size=64)
    with pytest.warns(UserWarning, match="no lightning_select engine is installed"):
        pl.Trainer(callbacks=[Capture()], max_steps=1, limit_val_batches=0, **trainer_kwargs).fit(model, dm)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    from lightning_select.data.digits import augment_digits

    v1, v2 = augment_digits(batch["image"], batch["index"], 0, 0), augment_digits(batch["image"], batch["index"], 0, 1)
    expected = contrastive.info_nce_per_row(contrastive.EmbeddingOutput(reference(v1), reference(v2), temperature=0.1))
    assert losses and abs(losses[0] - float(expected.mean())) < 1e-5


def test_resolve_ckpt_path(tmp_path):
    run_dir, task = tmp_path / "outputs" / "train" / "runs" / "b", tmp_path / "outputs" / "train"
    assert resolve_ckpt_path(None, run_dir, task) is None
    assert resolve_ckpt_path("auto", run_dir, task) is None  # a fresh run starts fresh
    with pytest.raises(FileNotFoundError, match="ckpt_path=last found no checkpoints/last.ckpt"):
        resolve_ckpt_path("last", run_dir, task)
    older = task / "runs" / "a" / "checkpoints" / "last.ckpt"
    older.parent.mkdir(parents=True)
    older.write_bytes(b"x")
    assert resolve_ckpt_path("last", run_dir, task) == str(older)  # newest of this task's runs
    own = run_dir / "checkpoints" / "last.ckpt"
    own.parent.mkdir(parents=True)
    own.write_bytes(b"x")
    assert resolve_ckpt_path("auto", run_dir, task) == str(own) == resolve_ckpt_path("last", run_dir, task)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_ckpt_path(str(tmp_path / "nope.ckpt"), run_dir, task)
