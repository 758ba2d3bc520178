"""All 2-process CPU DDP scenarios in one launch (launch cost is paid once).

Run by tests/test_ddp.py as ``python tests/ddp_scenarios.py OUT_DIR``; Lightning re-executes this
script for rank 1. Each rank saves ``OUT_DIR/rank{r}.pt`` with what it observed; the test compares.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from helpers import (  # noqa: E402
    ScoreRecorder,
    RankBatches,
    GradCapture,
    IndexWeights,
    KeepWhere,
    PerSampleRegressor,
    QuadraticPenalty,
    RandomHalf,
    regression_loader,
)
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402

from lightning_select import GuidedNegatives, LossHistory, SelectionEngine, SelectionError  # noqa: E402
from lightning_select.data import DigitsLDAGuide, DigitsPairsDataModule  # noqa: E402
from lightning_select.models import DigitsEmbeddingModule  # noqa: E402

OUT = Path(".")  # set from argv in main(); importing this module has no side effects


def trainer(callbacks, strategy="ddp", **kw):
    base = dict(accelerator="cpu", devices=2, strategy=strategy, logger=False, enable_progress_bar=False,
                enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0)
    base.update(kw)
    return pl.Trainer(callbacks=callbacks, **base)


def grad_scenario(policies, strategy="ddp"):
    """One optimizer step; returns the synchronised gradients and this rank's full-batch indices."""
    model = PerSampleRegressor()
    grads = GradCapture()
    trainer(policies + [grads], strategy=strategy, max_steps=1).fit(model, regression_loader(n=64, batch_size=4))
    return {"got": grads.grads[0], "batch_indices": grads.batch_indices[0], "trained": model.seen_batches[0]}


def digits_run(max_epochs, name, ckpt_path=None):
    pl.seed_everything(0)
    history, selector = LossHistory(trace_epochs=4), RandomHalf(seed=11)
    ckpt = ModelCheckpoint(dirpath=OUT / name, save_last=True, save_top_k=0)
    t = trainer([SelectionEngine(), selector, history, ckpt], max_epochs=max_epochs, enable_checkpointing=True)
    model = DigitsEmbeddingModule()
    t.fit(model, DigitsPairsDataModule(batch_size=128), ckpt_path=ckpt_path)
    return model, history, selector


class FirstBatch(pl.Callback):
    def __init__(self):
        self.batch = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.batch is None:
            self.batch = {k: v.clone() for k, v in batch.items() if isinstance(v, torch.Tensor)}


def gist_gather_scenario(mini_batch_size=None):
    """GIST with cross-device candidates: DDP gradients vs a single-process full batch (checked in the test).

    With ``mini_batch_size`` the gradient-cached mode runs under DDP: same gradients expected."""
    pl.seed_everything(0)
    model = DigitsEmbeddingModule()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    grads, first, history = GradCapture(), FirstBatch(), LossHistory()
    gist = GuidedNegatives(DigitsLDAGuide.fit(seed=0), "image", "image", margin=0.3, contrast_anchors=False,
                           gather_across_devices=True, mini_batch_size=mini_batch_size)
    trainer([SelectionEngine(), gist, history, grads, first], max_steps=2).fit(model, DigitsPairsDataModule(batch_size=32))
    return {"initial": initial, "grads": grads.grads[0], "batch": first.batch,
            "fn": history.store.stats["false_negatives"].clone()}


def gist_uneven_scenario():
    """An earlier selector keeps different row counts per rank: gathering must refuse clearly on every rank."""
    pl.seed_everything(0)
    gist = GuidedNegatives(DigitsLDAGuide.fit(seed=0), "image", "image", gather_across_devices=True)
    try:
        trainer([KeepWhere(3, (0,)), gist], max_steps=1).fit(DigitsEmbeddingModule(), DigitsPairsDataModule(batch_size=32))
    except SelectionError as err:
        return str(err)
    return "no error"


class RowCountingGuide(torch.nn.Module):
    """The digits guide, recording which training rows it embedded (each training image is unique)."""

    def __init__(self, inner, images):
        super().__init__()
        self.inner = inner
        self.row_of = {img.numpy().tobytes(): i for i, img in enumerate(images)}
        self.rows = []

    def forward(self, x):
        self.rows += [self.row_of[img.cpu().numpy().tobytes()] for img in x]
        return self.inner(x)


def gist_shared_cache_scenario():
    """GIST with one guide cache for both ranks (sharded precompute, disk and memory) and a per-rank
    live-filled reference: rows embedded per rank, the final cache, the trained parameters."""
    out = {}
    variants = {"disk": dict(cache="disk", cache_dir=str(OUT / "guide_cache"), precompute=True),
                "memory": dict(cache="memory", precompute=True),
                "reference": dict(cache="memory", precompute=False)}
    for name, kw in variants.items():
        dm = DigitsPairsDataModule(batch_size=32)
        dm.setup("fit")
        guide = RowCountingGuide(DigitsLDAGuide.fit(seed=0), dm.train_set.dataset.images)
        gist = GuidedNegatives(guide, "image", "image", margin=0.6, **kw)
        pl.seed_everything(0)
        model = DigitsEmbeddingModule()
        trainer([SelectionEngine(), gist], max_epochs=1).fit(model, dm)
        out[name] = {"rows": list(guide.rows), "values": gist.cache.values.float().clone(),
                     "filled": gist.cache.filled.clone(), "params": [p.detach().clone() for p in model.parameters()]}
    return out


class BatchKeys(pl.Callback):
    def __init__(self):
        self.batches = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append((batch["index"].tolist(), batch["anchor_cluster"].tolist(),
                             batch["positive_cluster"].tolist()))


def no_duplicates_scenario():
    """The duplicate-free sampler shards its global batches across ranks (SICK, static student)."""
    data = Path(os.environ.get("LIGHTNING_SELECT_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    if not (data / "text_pairs" / "sick2014" / "SICK_train.txt").exists():
        return {"missing": str(data)}
    from lightning_select.data import SickDataModule
    from lightning_select.models import TextEmbeddingModule

    pl.seed_everything(0)
    keys = BatchKeys()
    dm = SickDataModule(data_dir=str(data), batch_size=32, no_duplicates=True)
    trainer([SelectionEngine(), LossHistory(), keys], max_epochs=1, use_distributed_sampler=False).fit(
        TextEmbeddingModule(student_path=str(data / "models" / "minilm-l6-m2v-128d")), dm)
    return {"batches": keys.batches, "num_samples": len(dm.train_set)}


def _raised(fn):
    try:
        fn()
    except SelectionError as err:
        return str(err)
    return "no error"


def lone_rank_capacity_scenario():
    """Rank 1's second batch is larger than its first. Agreed capacity: trains; fixed capacity: all ranks raise."""
    from torch.utils.data import DataLoader

    from lightning_select import IndexedDataset
    from helpers import RegressionTable

    rank = int(os.environ.get("LOCAL_RANK", "0"))
    batches = [[0, 1, 2, 3], [4, 5, 6, 7]] if rank == 0 else [[8, 9, 10, 11], list(range(12, 20))]
    loader = lambda: DataLoader(IndexedDataset(RegressionTable(32)), batch_sampler=RankBatches(batches))  # noqa: E731
    history = LossHistory(num_samples=32)
    trainer([history], max_steps=2, use_distributed_sampler=False).fit(PerSampleRegressor(), loader())
    fixed = lambda: trainer([LossHistory(num_samples=32, capacity=4)], max_steps=2,  # noqa: E731
                            use_distributed_sampler=False).fit(PerSampleRegressor(), loader())
    return {"count": history.store.count.clone(), "error": _raised(fixed)}


class NaNOnRank1(PerSampleRegressor):
    """Every sample of rank 1 has a NaN loss; rank 0 is fine."""

    def training_step(self, batch, batch_idx):
        losses = super().training_step(batch, batch_idx)
        return losses * float("nan") if self.trainer.global_rank == 1 else losses


def lone_rank_nan_scenario():
    """nan_policy='skip' with every local row non-finite on rank 1: every rank raises the same error."""
    return _raised(lambda: trainer([SelectionEngine(nan_policy="skip"), LossHistory()], max_steps=1).fit(
        NaNOnRank1(), regression_loader(n=64, batch_size=4)))


def registry_scenario():
    """Every entry of tests/policy_registry.py: a 2-epoch fit, and 4 epochs uninterrupted vs 2 + resumed 2."""
    from helpers import Recorder
    from policy_registry import REGISTRY

    def run(case, max_epochs, name, ckpt_path=None):
        pl.seed_everything(0)
        policies, recorder = case.make_policies(), Recorder()
        model, data = case.make_task(batch_size=128)
        ckpt = ModelCheckpoint(dirpath=OUT / "registry" / case.name / name, save_last=True, save_top_k=0)
        trainer([*policies, recorder, ckpt], max_epochs=max_epochs, enable_checkpointing=True).fit(
            model, data, ckpt_path=ckpt_path)
        steps = [{k: step[k] for k in ("indices", "weights", "losses")} for step in recorder.records]
        params = [p.detach().clone() for p in model.parameters()]
        return {"state": case.state(policies), "steps": steps, "params": params}

    out = {}
    for case in REGISTRY:
        part = run(case, 2, "part")
        full = run(case, 4, "full")
        resumed = run(case, 4, "resumed", ckpt_path=OUT / "registry" / case.name / "part" / "last.ckpt")
        out[case.name] = {"fit": part["state"], "full": full, "resumed": resumed}
    return out


def preemption_scenario():
    """A real SIGTERM to rank 1 only, mid-epoch: both ranks stop together with one checkpoint (no deadlock),
    and resuming from it reproduces the uninterrupted run."""
    import time

    from helpers import SignalAt

    from lightning_select import PreemptionCheckpoint, TrainingPreempted

    def run(name, ckpt_path=None, signal_at=None):
        pl.seed_everything(0)
        history, selector = LossHistory(), RandomHalf(seed=5)
        callbacks = [SelectionEngine(), selector, history, PreemptionCheckpoint(dirpath=str(OUT / name))]
        if signal_at is not None:
            callbacks.append(SignalAt(signal_at, rank=1))
        model = DigitsEmbeddingModule()
        trainer(callbacks, max_epochs=2).fit(model, DigitsPairsDataModule(batch_size=64), ckpt_path=ckpt_path)
        return model, history, selector

    full_model, full_hist, full_sel = run("pre_full")
    start = time.monotonic()
    try:
        run("pre_killed", signal_at=9)
        code = None
    except TrainingPreempted as stop:
        code = stop.code
    elapsed = time.monotonic() - start
    res_model, res_hist, res_sel = run("pre_resumed", ckpt_path=OUT / "pre_killed" / "last.ckpt")
    return {"code": code, "elapsed": elapsed, "full": full_hist.store.state_dict(),
            "resumed": res_hist.store.state_dict(),
            "full_selected": [s.tolist() for s in full_sel.selected[-len(res_sel.selected):]],
            "resumed_selected": [s.tolist() for s in res_sel.selected],
            "params": [(p.detach().clone(), q.detach().clone())
                       for p, q in zip(full_model.parameters(), res_model.parameters())]}


def eata_fisher_scenario():
    """EATA's Fisher from a different loader on each rank (rank 0: 3 batches of 32, rank 1: 4): every rank must
    hold the mean over all 7 batches; then 2 steps with the penalty."""
    from policy_registry import noisy_digits_task
    from torch.utils.data import DataLoader, Subset

    from lightning_select import EntropySelection

    rank = int(os.environ.get("LOCAL_RANK", "0"))
    pl.seed_everything(0)
    model, data = noisy_digits_task(batch_size=64)
    data.setup("fit")
    rows = list(range(96 * rank, 96 + 128 * rank))
    policy = EntropySelection(entropy_fraction=1.0, epsilon=1.01, fisher_alpha=100.0, fisher_input_key="image",
                              progress=False, fisher_loader=DataLoader(Subset(data.train_set, rows), batch_size=32))
    trainer([policy], max_steps=2).fit(model, data)
    return {"fisher": policy.fisher, "anchors": policy.anchors, "rows": rows}


def rho_scope_scenario():
    """RHO-LOSS, keep=0.1, one epoch with scope="rank" and one with scope="global" (noisy digits, 128 per rank)."""
    from policy_registry import noisy_digits_task, rho_table_path

    from lightning_select import ReducibleLossSelection
    from lightning_select.policies.reducible_loss import load_irreducible_table

    out = {"irreducible": load_irreducible_table(rho_table_path())[0]}
    for scope in ("rank", "global"):
        pl.seed_everything(0)
        rec = ScoreRecorder()
        policy = ReducibleLossSelection(rho_table_path(), keep=0.1, scope=scope, build_if_missing=False, progress=False)
        trainer([policy, rec], max_epochs=1).fit(*noisy_digits_task(batch_size=128))
        out[scope] = rec.steps
    return out


def adaptive_batch_size_scenario():
    """AdaptiveBatchSize's first optimizer step (3 micro-batches per rank): each rank's evidence row, which
    holds only its 2 unsynchronised micro-batch gradients; the test recomputes it from the data."""
    from helpers import ScalarRegression, noisy_regression_loader

    from lightning_select import AdaptiveBatchSize

    pl.seed_everything(0)
    model = ScalarRegression()
    start = [p.detach().clone() for p in model.parameters()]
    policy = AdaptiveBatchSize(test="augmented_inner_product", initial_accumulation=3, check_every=1000)
    trainer([policy], max_steps=1).fit(model, noisy_regression_loader(n=96, batch_size=8))
    return {"row": policy.window[0].clone(), "start": start}


class StepIndices(pl.Callback):
    """Per training step: (epoch, this rank's sample indices)."""

    def __init__(self):
        self.steps = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.steps.append((trainer.current_epoch, batch["index"].tolist()))


def epoch_samplers_scenario():
    """RS2 and hard batches (registry tasks, 64 per rank, 3 epochs): what each rank trained, the loader's sampler
    after Lightning's set-up, and the step counts (true, Lightning's estimate, stepping_batches)."""
    from policy_registry import _hard_policies, _rs2_policies, hard_batches_task, rs2_task

    from lightning_select.core.schedule import stepping_batches

    out = {}
    for name, task, policies in (("rs2", rs2_task, _rs2_policies), ("hard_batches", hard_batches_task, _hard_policies)):
        pl.seed_everything(0)
        steps = StepIndices()
        t = trainer([*policies(), steps], max_epochs=3)
        t.fit(*task(batch_size=64))
        loader = t.train_dataloader
        out[name] = {"steps": steps.steps, "global_step": t.global_step, "stepping": stepping_batches(t),
                     "estimate": t.estimated_stepping_batches, "sampler": type(loader.sampler).__name__,
                     "batch_sampler": type(loader.batch_sampler).__name__}
    return out


class EpochPlans(pl.Callback):
    """The InfoBatch sampler's global plan of every epoch (read after InfoBatch handed it the epoch's scores)."""

    def __init__(self, policy):
        self.policy, self.plans = policy, []

    def on_train_epoch_start(self, trainer, pl_module):
        self.plans.append(list(self.policy.sampler.indices(trainer.current_epoch)))


def infobatch_scenario():
    """InfoBatch (registry task, 64 per rank, 4 epochs, δ = 0.75: epochs 1-2 pruned, 3 anneals) with the cosine
    schedule: each epoch's global plan, what each rank trained, the step counts and the final learning rate."""
    from policy_registry import infobatch_task

    from lightning_select import InfoBatch
    from lightning_select.core.schedule import stepping_batches
    from lightning_select.models.classifier import NoisyLabelClassifier

    pl.seed_everything(0)
    policy, steps = InfoBatch(), StepIndices()
    plans = EpochPlans(policy)
    t = trainer([policy, plans, steps], max_epochs=4)
    t.fit(NoisyLabelClassifier(arch="mlp", hidden=32, cosine_schedule=True), infobatch_task(batch_size=64)[1])
    scheduler = t.lr_scheduler_configs[0].scheduler
    return {"plans": plans.plans, "steps": steps.steps, "global_step": t.global_step, "stepping": stepping_batches(t),
            "T_max": scheduler.T_max, "lr": t.optimizers[0].param_groups[0]["lr"], "scores": policy.scores.clone(),
            "sampler": type(t.train_dataloader.sampler).__name__}


def ohem_scope_scenario():
    """OHEM, keep=0.25, one epoch each with scope="rank" and scope="global", in both modes (noisy digits, 128 per rank):
    "weight": this rank's losses and 0/1 weights per step; "select": its scoring losses, indices and kept indices."""
    from helpers import Recorder
    from policy_registry import noisy_digits_task

    from lightning_select import OHEM

    out = {}
    for mode in ("weight", "select"):
        for scope in ("rank", "global"):
            pl.seed_everything(0)
            rec = Recorder() if mode == "weight" else ScoreRecorder()
            trainer([OHEM(keep=0.25, scope=scope, mode=mode), rec], max_epochs=1).fit(*noisy_digits_task(batch_size=128))
            out[mode, scope] = rec.records if mode == "weight" else rec.steps
    return out


def main():
    global OUT
    OUT = Path(sys.argv[1])
    results = {}
    # unequal per-rank subsets (rank0 keeps 4, rank1 keeps 2) with weights: global normalisation
    results["global_norm"] = grad_scenario([KeepWhere(4, (0, 1, 2)), IndexWeights()])
    # the same through the registered strategy
    results["global_norm_strategy"] = grad_scenario([KeepWhere(4, (0, 1, 2)), IndexWeights()], strategy="ddp_select")
    # rank 1 (odd indices) selects nothing: no NaN, gradient not halved
    results["empty_rank"] = grad_scenario([KeepWhere(2, (0,))])

    # history synchronisation: plain history over 2 epochs
    pl.seed_everything(0)
    history = LossHistory()
    dm = DigitsPairsDataModule(batch_size=100)
    trainer([history], max_epochs=2).fit(DigitsEmbeddingModule(), dm)
    results["history"] = history.store.state_dict()

    # resume equality under DDP
    full_model, full_hist, full_sel = digits_run(4, "full")
    digits_run(2, "part")
    res_model, res_hist, res_sel = digits_run(4, "resumed", ckpt_path=OUT / "part" / "last.ckpt")
    results["resume"] = {
        "full": full_hist.store.state_dict(),
        "resumed": res_hist.store.state_dict(),
        "full_selected": [s.tolist() for s in full_sel.selected[-len(res_sel.selected):]],
        "resumed_selected": [s.tolist() for s in res_sel.selected],
        "full_params": [p.detach().clone() for p in full_model.parameters()],
        "resumed_params": [p.detach().clone() for p in res_model.parameters()],
    }
    results["gist_gather"] = gist_gather_scenario()
    results["gist_gather_chunked"] = gist_gather_scenario(mini_batch_size=10)
    results["no_duplicates"] = no_duplicates_scenario()
    results["lone_rank_capacity"] = lone_rank_capacity_scenario()
    results["lone_rank_nan"] = lone_rank_nan_scenario()
    results["gist_shared_cache"] = gist_shared_cache_scenario()
    results["registry"] = registry_scenario()
    results["preemption"] = preemption_scenario()
    results["rho_scope"] = rho_scope_scenario()
    # a loss term (the same on every rank) on top of unequal per-rank subsets with weights
    results["penalty"] = grad_scenario([KeepWhere(4, (0, 1, 2)), IndexWeights(), QuadraticPenalty(0.3)])
    results["eata_fisher"] = eata_fisher_scenario()
    results["adaptive_batch_size"] = adaptive_batch_size_scenario()
    results["epoch_samplers"] = epoch_samplers_scenario()
    results["infobatch"] = infobatch_scenario()
    results["ohem_scope"] = ohem_scope_scenario()
    results["gist_uneven"] = gist_uneven_scenario()  # last: it ends a fit with an exception
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.save(results, OUT / f"rank{rank}.pt")


if __name__ == "__main__":
    main()
