"""CUDA checks (skipped without a GPU): the engine, GIST and LossHistory under 16-mixed on a real GPU,
gradient-cached GIST equal to the plain mode with CUDA RNG replay, and exact resume on the GPU.

Run on a GPU machine with ``python -m pytest -q tests/test_gpu.py`` (``CUBLAS_WORKSPACE_CONFIG=:4096:8``
for the deterministic resume check)."""

import copy

import lightning.pytorch as pl
import pytest
import torch
from helpers import GradCapture, RandomHalf
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_select import EmbeddingOutput, GuidedNegatives, LossHistory, SelectionEngine, build_logits
from lightning_select.data import DigitsLDAGuide, DigitsPairsDataModule
from lightning_select.models import DigitsEmbeddingModule
from lightning_select.rules.gist import apply_gist

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _trainer(callbacks, **kw):
    base = dict(accelerator="gpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                enable_checkpointing=False, limit_val_batches=0)
    base.update(kw)
    return pl.Trainer(callbacks=callbacks, **base)


class WhereTrained(pl.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.device, self.loss_dtype = pl_module.device.type, outputs["loss"].dtype


def test_gist_and_history_train_under_16_mixed_on_cuda():
    pl.seed_everything(0)
    where = WhereTrained()
    history = LossHistory(trace_epochs=2)
    gist = GuidedNegatives(DigitsLDAGuide.fit(seed=0), "image", "image", margin=0.6, record_flagged_pairs=True)
    model = DigitsEmbeddingModule()
    _trainer([SelectionEngine(), RandomHalf(1), gist, history, where], max_epochs=2, precision="16-mixed").fit(
        model, DigitsPairsDataModule(batch_size=128))
    store = history.store
    seen = store.count > 0
    assert bool(seen.any()) and torch.isfinite(store.ema_loss[seen]).all()
    assert int(store.count.sum()) == 2 * sum(max(1, n // 2) for n in [128] * 11 + [1437 - 11 * 128])
    assert store.stats["false_negatives"].sum() > 0 and len(gist.flagged_pairs()["anchor_index"]) > 0
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert where.device == "cuda" and where.loss_dtype == torch.float32  # per-sample losses stay fp32 under AMP


def test_gist_masks_on_cuda_under_autocast_equal_cpu_fp32():
    g = torch.Generator().manual_seed(0)
    a, p = torch.randn(64, 32, generator=g), torch.randn(64, 32, generator=g)
    guide = torch.randn(64, 16, generator=g)
    guide[1::2] = guide[::2] + 0.01 * torch.randn(32, 16, generator=g)  # near-duplicates: masks fire

    def masks(device, autocast):
        logits = build_logits(EmbeddingOutput(a.to(device), p.to(device), temperature=0.05))
        with torch.autocast(device_type=device, dtype=torch.float16, enabled=autocast):
            apply_gist(logits, guide.to(device), guide.to(device), margin=0.05)
        return {b.name: b.mask.cpu() for b in logits.blocks}, logits.per_row_loss().float().cpu()

    cpu_masks, cpu_loss = masks("cpu", False)
    gpu_masks, gpu_loss = masks("cuda", True)
    assert all(torch.equal(cpu_masks[k], gpu_masks[k]) for k in cpu_masks) and cpu_masks["ap"].sum() > 0
    assert torch.allclose(cpu_loss, gpu_loss, atol=1e-4)


class DropoutDigits(DigitsEmbeddingModule):
    """With dropout: the chunked mode must replay the CUDA RNG state of each chunk."""

    def __init__(self):
        super().__init__()
        self.drop = torch.nn.Dropout(0.2)

    def forward(self, x):
        return super().forward(self.drop(x))


@pytest.mark.parametrize("module, chunk", [(DigitsEmbeddingModule, 16), (DropoutDigits, 64)])
def test_gradient_cached_gist_equals_plain_on_cuda(module, chunk):
    """Chunks of 16 rows without dropout; with dropout one chunk of the whole batch, which draws the same
    masks as the plain mode only if the chunk's re-forward replays the CUDA RNG state exactly."""
    grads = []
    for size in (None, chunk):
        pl.seed_everything(0)
        model = module()
        capture = GradCapture()
        gist = GuidedNegatives(DigitsLDAGuide.fit(seed=0), "image", "image", margin=0.3, mini_batch_size=size)
        _trainer([SelectionEngine(), gist, capture], max_steps=1).fit(model, DigitsPairsDataModule(batch_size=64))
        grads.append(capture.grads[0])
    for plain, chunked in zip(*grads):
        assert torch.allclose(plain, chunked, atol=1e-5), (plain - chunked).abs().max()


def test_resume_is_exact_on_cuda(tmp_path):
    def run(max_epochs, name, ckpt_path=None):
        pl.seed_everything(0)
        history, selector = LossHistory(), RandomHalf(7)
        ckpt = ModelCheckpoint(dirpath=tmp_path / name, save_last=True, save_top_k=1)
        model = DigitsEmbeddingModule()
        _trainer([SelectionEngine(), selector, history, ckpt], max_epochs=max_epochs, enable_checkpointing=True,
                 deterministic=True).fit(model, DigitsPairsDataModule(batch_size=128), ckpt_path=ckpt_path)
        return model, history

    full_model, full_hist = run(3, "full")
    run(1, "part")
    res_model, res_hist = run(3, "resumed", tmp_path / "part" / "last.ckpt")
    for key, value in full_hist.store.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value.nan_to_num(-7), res_hist.store.state_dict()[key].nan_to_num(-7)), key
    for p, q in zip(full_model.parameters(), res_model.parameters()):
        assert torch.equal(p, q)
    assert copy.deepcopy(full_hist).store is not None


def test_importance_sampling_and_rho_loss_train_under_16_mixed_on_cuda(tmp_path):
    """The two policies that score a larger loaded batch, on the classification task, on the GPU."""
    from lightning_select import ImportanceSampling, ReducibleLossSelection
    from lightning_select.data.noisy_labels import NoisyDigitsDataModule
    from lightning_select.models.classifier import NoisyLabelClassifier

    for policy in (ImportanceSampling(keep=1 / 3, score="gradient_norm", always_on=True),
                   ReducibleLossSelection(str(tmp_path / "il.pt"), keep=0.1, il_epochs=3, progress=False)):
        pl.seed_everything(0)
        where, history = WhereTrained(), LossHistory()
        model = NoisyLabelClassifier(arch="mlp", hidden=32)
        _trainer([SelectionEngine(), policy, history, where], max_epochs=2, precision="16-mixed").fit(
            model, NoisyDigitsDataModule(batch_size=320))
        assert where.device == "cuda" and where.loss_dtype == torch.float32
        seen = history.store.count > 0
        assert bool(seen.any()) and torch.isfinite(history.store.ema_loss[seen]).all()
        assert all(torch.isfinite(p).all() for p in model.parameters())
    assert (tmp_path / "il.pt").exists()
