"""2-process CPU DDP (gloo): global normalisation, empty ranks, history sync and exact resume.

All scenarios run in one launch (tests/ddp_scenarios.py); this module checks what each rank saved.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from policy_registry import REGISTRY, assert_same_state
from torch.utils.data import DistributedSampler

pytestmark = pytest.mark.ddp
HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE)])}
    proc = subprocess.run([sys.executable, str(HERE / "ddp_scenarios.py"), str(out)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def _assert_tensors_equal(a, b):
    for key, value in a.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value.nan_to_num(-7), b[key].nan_to_num(-7)), key


RULES = {  # the policies each scenario used, re-applied independently: (keep rule, weight rule)
    "global_norm": (lambda i: i % 4 != 3, lambda i: 1.0 + (i % 3).float()),
    "global_norm_strategy": (lambda i: i % 4 != 3, lambda i: 1.0 + (i % 3).float()),
    "empty_rank": (lambda i: i % 2 == 0, lambda i: torch.ones(len(i))),
}


@pytest.mark.parametrize("scenario", sorted(RULES))
def test_ddp_gradient_equals_global_weighted_mean(ranks, scenario):
    from helpers import PerSampleRegressor, RegressionTable, expected_weighted_grad

    keep_rule, weight_rule = RULES[scenario]
    idx = torch.cat([ranks[r][scenario]["batch_indices"] for r in range(2)])
    keep = keep_rule(idx)
    counts = [int(keep_rule(ranks[r][scenario]["batch_indices"]).sum()) for r in range(2)]
    assert counts[0] != counts[1]  # the scenario really has unequal (or empty) per-rank subsets
    data = RegressionTable(64)
    expected = expected_weighted_grad(PerSampleRegressor(), data.x[idx[keep]], data.y[idx[keep]], weight_rule(idx[keep]))
    for r in range(2):
        for got, exp in zip(ranks[r][scenario]["got"], expected):
            assert torch.isfinite(got).all()
            assert torch.allclose(got, exp, atol=1e-6), (scenario, r, (got - exp).abs().max())


def test_history_identical_on_both_ranks_and_counts_match_sampler(ranks):
    from lightning_select.data import DigitsPairsDataModule

    h0, h1 = ranks[0]["history"], ranks[1]["history"]
    _assert_tensors_equal(h0, h1)
    # independent count: replay the DistributedSampler (Lightning seeds it with the global seed 0)
    dm = DigitsPairsDataModule(batch_size=100)
    dm.setup("fit")
    n = len(dm.train_set)
    expected = torch.zeros(n, dtype=torch.int32)
    for epoch in range(2):
        per_rank = []
        for r in range(2):
            sampler = DistributedSampler(dm.train_set, num_replicas=2, rank=r, shuffle=True, seed=0)
            sampler.set_epoch(epoch)
            per_rank.append(list(sampler))
        for start in range(0, len(per_rank[0]), 100):
            step = torch.tensor(per_rank[0][start:start + 100] + per_rank[1][start:start + 100])
            expected[step.unique()] += 1  # one observation per unique index per step
    assert torch.equal(h0["count"], expected)
    assert int(h0["count"].min()) >= 2 and int(h0["count"].sum()) > 2 * n  # padding duplicates seen


def test_ddp_resume_equals_uninterrupted_run(ranks):
    for r in range(2):
        res = ranks[r]["resume"]
        _assert_tensors_equal(res["full"], res["resumed"])
        assert res["full_selected"] == res["resumed_selected"] and res["resumed_selected"]
        for p, q in zip(res["full_params"], res["resumed_params"]):
            assert torch.equal(p, q)
    _assert_tensors_equal(ranks[0]["resume"]["resumed"], ranks[1]["resume"]["resumed"])


@pytest.mark.parametrize("scenario", ["gist_gather", "gist_gather_chunked"])
def test_gist_gather_across_devices_equals_full_batch_gradient(ranks, scenario):
    from lightning_select import gist_loss
    from lightning_select.data import DigitsLDAGuide
    from lightning_select.data.digits import augment_digits
    from lightning_select.models import DigitsEmbeddingModule

    res = [ranks[r][scenario] for r in range(2)]
    model = DigitsEmbeddingModule()
    model.load_state_dict(res[0]["initial"])
    batch = {k: torch.cat([res[0]["batch"][k], res[1]["batch"][k]]) for k in ("image", "index")}
    v1 = augment_digits(batch["image"], batch["index"], 0, 0)
    v2 = augment_digits(batch["image"], batch["index"], 0, 1)
    assert torch.equal(v1, torch.cat([res[0]["batch"]["view1"], res[1]["batch"]["view1"]]))
    guide = DigitsLDAGuide.fit(seed=0)
    g = guide(batch["image"])
    losses = gist_loss(model(v1), model(v2), guide_anchor=g, guide_positive=g, temperature=0.1, margin=0.3,
                       contrast_anchors=False)
    expected = torch.autograd.grad(losses.mean(), list(model.parameters()))
    for r in range(2):
        for got, exp in zip(res[r]["grads"], expected):
            assert torch.allclose(got, exp, atol=1e-6), (r, (got - exp).abs().max())
    assert torch.equal(res[0]["fn"], res[1]["fn"]) and res[0]["fn"].sum() > 0


def test_agreed_gather_capacity_lets_one_rank_take_a_larger_batch(ranks):
    """Rank 1's second batch (8 rows) is twice its first: the ranks agree on the gather size every step."""
    expected = torch.zeros(32, dtype=torch.int32)
    expected[:20] = 1  # rank 0 trained 0..7, rank 1 trained 8..19
    for r in range(2):
        assert torch.equal(ranks[r]["lone_rank_capacity"]["count"], expected)


def test_fixed_capacity_overflow_raises_the_same_error_on_every_rank(ranks):
    errors = [ranks[r]["lone_rank_capacity"]["error"] for r in range(2)]
    assert errors[0] == errors[1], errors
    assert "capacity=4" in errors[0] and "rank(s) [1] trained [8] rows" in errors[0], errors[0]


def test_all_nonfinite_rank_raises_the_same_error_on_every_rank(ranks):
    errors = [ranks[r]["lone_rank_nan"] for r in range(2)]
    assert errors[0] == errors[1], errors
    assert "every sample of batch 0 on rank(s) [1]" in errors[0] and "nan_policy='skip'" not in errors[0], errors[0]


@pytest.mark.parametrize("variant", ["disk", "memory"])
def test_shared_guide_cache_embeds_each_sample_once_and_trains_like_a_per_rank_cache(ranks, variant):
    """Sharded precompute: the ranks split the guide work, end with the same full cache, train identically."""
    from lightning_select.data import DigitsLDAGuide, DigitsPairsDataModule

    dm = DigitsPairsDataModule()
    dm.setup("fit")
    images = dm.train_set.dataset.images
    n = len(images)
    res = [ranks[r]["gist_shared_cache"][variant] for r in range(2)]
    rows = [set(res[r]["rows"]) for r in range(2)]
    assert all(len(res[r]["rows"]) == len(rows[r]) for r in range(2))  # no rank embedded a row twice
    assert not rows[0] & rows[1] and len(rows[0]) + len(rows[1]) == n  # each sample exactly once overall
    assert rows[0] | rows[1] == set(range(n))
    assert abs(len(rows[0]) - len(rows[1])) <= 1  # balanced shards
    expected = DigitsLDAGuide.fit(seed=0)(images)
    for r in range(2):
        assert res[r]["filled"].all()
        assert torch.allclose(res[r]["values"][:, 0], expected, atol=1e-5)
    assert torch.equal(res[0]["values"], res[1]["values"])
    reference = ranks[0]["gist_shared_cache"]["reference"]
    assert len(reference["rows"]) >= n // 2  # the reference embedded its rows live during training
    for r in range(2):
        for p, q in zip(res[r]["params"], reference["params"]):
            assert torch.equal(p, q), (variant, r, (p - q).abs().max())


def test_sigterm_to_one_rank_stops_every_rank_and_resumes_exactly(ranks):
    """Stock Lightning 2.6 deadlocks here (its SIGTERM handler broadcasts from one rank only)."""
    for r in range(2):
        res = ranks[r]["preemption"]
        assert res["code"] == 143, res["code"]  # 128 + SIGTERM on both ranks, although only rank 1 got it
        assert res["elapsed"] < 60
        _assert_tensors_equal(res["full"], res["resumed"])
        assert res["full_selected"] == res["resumed_selected"] and len(res["resumed_selected"]) == 24 - 10
        assert all(torch.equal(p, q) for p, q in res["params"])


def test_gist_gather_rejects_uneven_batches_on_every_rank(ranks):
    for r in range(2):
        assert "same number of rows on every rank" in ranks[r]["gist_uneven"], ranks[r]["gist_uneven"]


@pytest.mark.parametrize("case", REGISTRY, ids=lambda case: case.name)
def test_registry_policy_state_identical_on_both_ranks(ranks, case):
    """Every registry policy, 2 epochs under DDP: both ranks hold the same, non-trivial state."""
    states = [ranks[r]["registry"][case.name]["fit"] for r in range(2)]
    assert case.activity(states[0]) > 0
    assert_same_state(states[0], states[1])


@pytest.mark.parametrize("case", REGISTRY, ids=lambda case: case.name)
def test_registry_resume_is_exact_under_ddp(ranks, case):
    """Every registry policy under DDP: 2 epochs + resumed 2 equal 4 uninterrupted epochs, on each rank."""
    runs = [ranks[r]["registry"][case.name] for r in range(2)]
    for res in runs:
        full, resumed = res["full"], res["resumed"]
        assert len(resumed["steps"]) == len(full["steps"]) // 2 > 0
        for a, b in zip(full["steps"][-len(resumed["steps"]):], resumed["steps"]):
            for key in ("indices", "weights", "losses"):
                assert torch.equal(a[key], b[key]), key
        for p, q in zip(full["params"], resumed["params"]):
            assert torch.equal(p, q)
    assert_same_state(runs[0]["resumed"]["state"], runs[1]["resumed"]["state"])
    for res in runs:
        assert_same_state(res["full"]["state"], res["resumed"]["state"])


def test_rho_loss_per_rank_and_global_scope_keep_the_top_reducible_losses(ranks):
    """scope="rank": each rank keeps its own top ⌈0.1·B⌉; scope="global": the ranks together keep the global
    top ⌈0.1·W·B⌉ of the gathered reducible losses (ties by rank, then position), each rank its own share."""
    import math

    res = [ranks[r]["rho_scope"] for r in range(2)]
    il = res[0]["irreducible"]
    assert torch.equal(il, res[1]["irreducible"])

    def top(values, k):
        return sorted(sorted(range(len(values)), key=lambda i: (-values[i], i))[:k])

    for scope in ("rank", "global"):
        assert len(res[0][scope]) == len(res[1][scope]) > 0
        for step in zip(res[0][scope], res[1][scope]):
            reducible = [(scores - il[indices]).tolist() for scores, indices, _ in step]
            if scope == "rank":
                expected = [top(red, math.ceil(round(0.1 * len(red), 9))) for red in reducible]
            else:
                flat, width = reducible[0] + reducible[1], len(reducible[0])
                chosen = top(flat, math.ceil(round(0.1 * len(flat), 9)))
                expected = [[g - r * width for g in chosen if g // width == r] for r in range(2)]
            for (_, indices, kept), positions in zip(step, expected):
                assert kept.tolist() == indices[positions].tolist(), scope


def test_engine_runs_under_stock_ddp_spawn(tmp_path):
    """The callback path also installs itself in ddp_spawn workers (the module is pickled to them)."""
    import lightning.pytorch as pl
    from helpers import CloseProcessGroup, KeepWhere, PerSampleRegressor, regression_loader
    from lightning.pytorch.loggers import CSVLogger

    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=2, log_every_n_steps=1,
                         logger=CSVLogger(tmp_path), enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, callbacks=[KeepWhere(2, (0,)), CloseProcessGroup()])
    trainer.fit(PerSampleRegressor(), regression_loader(n=64, batch_size=8))
    assert "select/kept_fraction" in trainer.callback_metrics  # logged by the engine inside the workers
    assert 0.0 < float(trainer.callback_metrics["select/kept_fraction"]) < 1.0


def test_no_duplicates_sampler_under_ddp(ranks):
    res = [ranks[r]["no_duplicates"] for r in range(2)]
    if "missing" in res[0]:
        if os.environ.get("CI"):
            pytest.fail(f"shared data missing at {res[0]['missing']}")
        pytest.skip("shared data missing")
    assert len(res[0]["batches"]) == len(res[1]["batches"]) > 0  # same number of steps on both ranks
    seen = set()
    for r in range(2):
        for index, anchor_keys, positive_keys in res[r]["batches"]:
            per_sample = [{a, p} for a, p in zip(anchor_keys, positive_keys)]
            assert sum(map(len, per_sample)) == len(set().union(*per_sample))  # no key shared within a batch
            seen.update(index)
    assert seen == set(range(res[0]["num_samples"]))  # every sample trained in the epoch, on some rank


def test_adaptive_batch_size_evidence_uses_the_unsynchronised_micro_batches(ranks):
    """Each rank's row holds its first k − 1 = 2 micro-batch gradients (the 3rd is all-reduced by DDP); the
    rows summed over ranks equal the sums recomputed by hand, with ḡ the mean of all 6 micro-batches."""
    from helpers import ScalarRegression, noisy_regression_loader

    start = ranks[0]["adaptive_batch_size"]["start"]
    probe = ScalarRegression()
    with torch.no_grad():
        for p, q in zip(probe.parameters(), start):
            p.copy_(q)
    dataset = noisy_regression_loader(n=96, batch_size=8).dataset
    grads = {}
    for rank in range(2):  # Lightning shuffles every training loader under DDP: DistributedSampler(seed=0)
        local = [dataset[i] for i in DistributedSampler(dataset, num_replicas=2, rank=rank, shuffle=True, seed=0)]
        for j in range(3):
            x = torch.stack([local[8 * j + t][0] for t in range(8)])
            y = torch.stack([local[8 * j + t][1] for t in range(8)])
            probe.zero_grad()
            torch.nn.functional.mse_loss(probe.net(x).squeeze(-1), y).backward()
            grads[rank, j] = torch.cat([p.grad.reshape(-1) for p in probe.parameters()])
    g = torch.stack(list(grads.values())).mean(0)
    g2 = g.pow(2).sum()
    seen = torch.stack([grads[r, j] for r in range(2) for j in range(2)])
    a, c = seen.pow(2).sum(1), seen @ g
    expected = torch.stack([a.sum(), c.sum(), torch.tensor(4.0), (c - g2).pow(2).sum(),
                            (a - c.pow(2) / g2).sum(), g2, torch.tensor(6.0)])
    got = ranks[0]["adaptive_batch_size"]["row"] + ranks[1]["adaptive_batch_size"]["row"]
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-6), (got, expected)


def test_rs2_under_ddp_shards_each_epoch_subset(ranks):
    """Lightning keeps the RS2Sampler (no DistributedSampler of its own): the ranks split each epoch's subset."""
    from lightning_select.samplers import RS2Sampler

    res = [ranks[r]["epoch_samplers"]["rs2"] for r in range(2)]
    subsets = RS2Sampler(1149, 0.3, seed=0)  # the registry's rs2_task: m = 345 per epoch, 173 per rank
    for r in range(2):
        assert res[r]["sampler"] == "RS2Sampler"
        assert res[r]["global_step"] == res[r]["stepping"] == res[r]["estimate"] == 3 * 3  # ⌈173 / 64⌉ per epoch
    assert len(res[0]["steps"]) == len(res[1]["steps"]) == 9
    for epoch in range(3):
        shares = [[i for e, step in res[r]["steps"] if e == epoch for i in step] for r in range(2)]
        assert shares == [RS2Sampler(1149, 0.3, seed=0, num_replicas=2, rank=r).rank_indices(epoch) for r in range(2)]
        assert len(shares[0]) == len(shares[1]) == 173
        assert set(shares[0]) | set(shares[1]) == set(subsets.indices(epoch))


def test_hard_batches_under_ddp_train_each_global_batch_as_one_step_of_both_ranks(ranks):
    from lightning_select.samplers import HardBatchSampler
    from lightning_select.samplers.epoch import shard

    res = [ranks[r]["epoch_samplers"]["hard_batches"] for r in range(2)]
    global_batches = HardBatchSampler(1149, 64, fraction=0.8, seed=0, num_replicas=2)  # 9 batches of 128, k = 7
    b, k = global_batches.num_batches, global_batches.num_hard
    assert (b, k) == (9, 7)
    for r in range(2):
        assert res[r]["batch_sampler"] == "HardBatchSampler" and res[r]["sampler"] == "_EpochHook"
        assert res[r]["global_step"] == res[r]["stepping"] == b + 2 * k == 23  # the true step count
        assert res[r]["estimate"] == 3 * b  # Lightning's estimate sizes every epoch like epoch 0
    assert len(res[0]["steps"]) == len(res[1]["steps"]) == 23
    ids = []
    for (e0, rows0), (e1, rows1) in zip(res[0]["steps"], res[1]["steps"]):
        batch = {int(global_batches.batch_of_index[i]) for i in rows0 + rows1}
        assert e0 == e1 and len(batch) == 1  # both ranks train slices of the same global batch in a step
        members = global_batches.batches[batch.pop()]
        assert [rows0, rows1] == [shard(members, 2, r) for r in range(2)]
        ids.append(int(global_batches.batch_of_index[members[0]]))
    assert ids[:b] == global_batches.batch_ids(0)  # epoch 0: every global batch once, in the seeded order
    assert len(set(ids[b:b + k])) == len(set(ids[b + k:])) == k


def test_infobatch_ranks_share_each_epoch_plan_like_distributed_sampler(ranks):
    """Both ranks hold the same scores, so they draw the same plan each epoch; each trains its DistributedSampler
    share of it (equal lengths); the cosine schedule, re-sized at each epoch start, ends at 0 on the last step."""
    from lightning_select.samplers.epoch import shard

    res = [ranks[r]["infobatch"] for r in range(2)]
    plans = res[0]["plans"]
    assert plans == res[1]["plans"] and torch.equal(res[0]["scores"], res[1]["scores"])
    assert len(plans) == 4 and len(plans[0]) == len(plans[3]) == 1149 and all(len(p) < 1149 for p in plans[1:3])
    assert sorted(plans[3]) == list(range(1149))  # the anneal epoch: everything
    for r in range(2):
        assert res[r]["sampler"] == "InfoBatchSampler"
        for epoch, plan in enumerate(plans):
            share = [i for e, step in res[r]["steps"] if e == epoch for i in step]
            assert share == shard(plan, 2, r), (r, epoch)
        assert res[r]["global_step"] == res[r]["stepping"] == res[r]["T_max"] == len(res[r]["steps"])
        assert res[r]["lr"] == 0.0
    assert len(res[0]["steps"]) == len(res[1]["steps"])


def test_color_filter_ranks_share_the_kept_subset_like_distributed_sampler(ranks):
    """The CoLoR-Filter registry entry (4 epochs, 128 rows per rank and step): each epoch, each rank trains
    ⌈287 / 2⌉ = 144 kept samples and the ranks together train all 287 (one padded repeat); ColorFilter checked
    every step that no row outside the subset was trained, and both ranks count every rank's rows."""
    import math

    from policy_registry import COLOR_KEPT

    runs = [ranks[r]["registry"]["color_filter"]["full"] for r in range(2)]
    assert len(runs[0]["steps"]) == len(runs[1]["steps"]) == 4 * 2  # 144 rows: batches of 128 and 16
    for epoch in range(4):
        shares = [torch.cat([s["indices"] for s in runs[r]["steps"][2 * epoch: 2 * epoch + 2]]).tolist()
                  for r in range(2)]
        assert len(shares[0]) == len(shares[1]) == math.ceil(COLOR_KEPT / 2)
        assert len(set(shares[0]) | set(shares[1])) == COLOR_KEPT
    for r in range(2):
        assert int(runs[r]["state"]["trained_rows"]) == 4 * 2 * math.ceil(COLOR_KEPT / 2)


def test_ddp_loss_term_adds_its_own_gradient_to_the_global_weighted_mean(ranks):
    """Every rank adds the same penalty 0.3·Σθ² and DDP averages the gradients: the update is exactly
    ∇(global weighted mean) + ∇penalty, although the ranks trained different numbers of rows."""
    from helpers import PerSampleRegressor, RegressionTable, expected_weighted_grad

    idx = torch.cat([ranks[r]["penalty"]["batch_indices"] for r in range(2)])
    keep = idx % 4 != 3
    data = RegressionTable(64)
    expected = expected_weighted_grad(PerSampleRegressor(), data.x[idx[keep]], data.y[idx[keep]],
                                      1.0 + (idx[keep] % 3).float())
    penalty = [2 * 0.3 * p.detach() for p in PerSampleRegressor().net.parameters()]
    for r in range(2):
        for got, data_grad, penalty_grad in zip(ranks[r]["penalty"]["got"], expected, penalty):
            assert torch.allclose(got, data_grad + penalty_grad, atol=1e-6), (r, got - data_grad - penalty_grad)


def test_ddp_eata_fisher_is_the_mean_over_every_ranks_batches(ranks):
    """Rank 0 estimated on 3 batches and rank 1 on 4 others: both hold the mean over all 7 (recomputed here)."""
    import torch.nn.functional as F
    from policy_registry import noisy_digits_task

    res = [ranks[r]["eata_fisher"] for r in range(2)]
    for key in ("fisher", "anchors"):
        assert sorted(res[0][key]) == sorted(res[1][key])
        assert all(torch.equal(res[0][key][n], res[1][key][n]) for n in res[0][key]), key
    model, data = noisy_digits_task()
    model.load_state_dict({f"{n}": t for n, t in res[0]["anchors"].items()}, strict=False)
    data.setup("fit")
    params = dict(model.named_parameters())
    sums = {n: torch.zeros_like(p) for n, p in params.items()}
    for r in range(2):
        rows = res[r]["rows"]
        for start in range(0, len(rows), 32):
            images = torch.stack([data.train_set[i]["image"] for i in rows[start:start + 32]])
            logits = model(images)
            grads = torch.autograd.grad(F.cross_entropy(logits, logits.argmax(-1)), list(params.values()))
            for n, g in zip(params, grads):
                sums[n] += g**2
    for n, total in sums.items():
        assert torch.allclose(res[0]["fisher"][n], total / 7, rtol=1e-4, atol=1e-10), n


def test_ohem_per_rank_and_global_scope_keep_the_top_quarter(ranks):
    """OHEM(keep=0.25): scope="rank" keeps each rank's top ⌈0.25·B⌉; scope="global" keeps the top ⌈0.25·(B0 + B1)⌉ of
    both ranks' losses (ties: rank 0 first, then position), so the ranks keep different counts. Checked in both
    modes: the 0/1 weights on the training losses ("weight") and the kept rows of the scoring losses ("select")."""
    import math

    def top(values, k):
        return sorted(sorted(range(len(values)), key=lambda i: (-values[i], i))[:k])

    def kept_positions(values_per_rank, scope):
        if scope == "rank":
            return [top(v, math.ceil(round(0.25 * len(v), 9))) for v in values_per_rank]
        flat, width = values_per_rank[0] + values_per_rank[1], len(values_per_rank[0])
        chosen = top(flat, math.ceil(round(0.25 * len(flat), 9)))
        return [[g - r * width for g in chosen if (g >= width) == bool(r)] for r in range(2)]

    res = [ranks[r]["ohem_scope"] for r in range(2)]
    for scope in ("rank", "global"):
        counts = []
        weight_steps = list(zip(res[0]["weight", scope], res[1]["weight", scope]))
        assert len(weight_steps) == 5
        for step in weight_steps:
            expected = kept_positions([s["losses"].tolist() for s in step], scope)
            for s, positions in zip(step, expected):
                assert s["weights"].nonzero().flatten().tolist() == positions, scope
                assert set(s["weights"].unique().tolist()) <= {0.0, 1.0}
            counts.append([len(p) for p in expected])
        select_steps = list(zip(res[0]["select", scope], res[1]["select", scope]))
        assert len(select_steps) == 5
        for step in select_steps:
            expected = kept_positions([scores.tolist() for scores, _, _ in step], scope)
            for (_, indices, kept), positions in zip(step, expected):
                assert kept.tolist() == indices[positions].tolist(), scope
            if scope == "global":
                counts.append([len(p) for p in expected])
        if scope == "rank":
            assert all(c[0] == c[1] for c in counts)
        else:
            assert any(c[0] != c[1] for c in counts), counts  # the global top-k is shared unevenly
