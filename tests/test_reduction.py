import torch

from lightning_select import effective_sample_size, weighted_global_mean


def test_gradient_of_weighted_reduction_matches_hand_computation():
    # L = Σ w_i ℓ_i / Σ w_i with ℓ_i = (θ x_i)^2  =>  dL/dθ = Σ w_i 2 θ x_i^2 / Σ w_i
    theta = torch.tensor(1.5, requires_grad=True)
    x = torch.tensor([1.0, -2.0, 0.5, 3.0])
    w = torch.tensor([1.0, 0.0, 2.0, 0.5])
    loss = weighted_global_mean((theta * x) ** 2, w)
    loss.backward()
    hand = float((w * 2 * 1.5 * x**2).sum() / w.sum())
    assert abs(theta.grad.item() - hand) < 1e-6
    assert abs(loss.item() - float((w * (1.5 * x) ** 2).sum() / w.sum())) < 1e-6


def test_global_normalisation_with_unequal_rank_subsets_equals_full_batch_mean():
    # Two simulated ranks keep 3 and 1 samples. DDP averages the per-rank gradients.
    torch.manual_seed(0)
    theta = torch.randn(4, requires_grad=True)
    xs = [torch.randn(3, 4), torch.randn(1, 4)]
    ws = [torch.tensor([1.0, 2.0, 0.5]), torch.tensor([3.0])]
    total_w = sum(w.sum() for w in ws)
    rank_grads = []
    for x, w in zip(xs, ws):
        loss = weighted_global_mean((x @ theta) ** 2, w, world_size=2, all_reduce_sum=lambda t: total_w.clone())
        rank_grads.append(torch.autograd.grad(loss, theta)[0])
    ddp_grad = (rank_grads[0] + rank_grads[1]) / 2
    full = weighted_global_mean((torch.cat(xs) @ theta) ** 2, torch.cat(ws))
    full_grad = torch.autograd.grad(full, theta)[0]
    assert torch.allclose(ddp_grad, full_grad, atol=1e-6)
    # a per-rank mean would be biased: measurably different
    naive = sum(torch.autograd.grad(((x @ theta) ** 2 * w).sum() / w.sum(), theta)[0] for x, w in zip(xs, ws)) / 2
    assert (naive - full_grad).abs().max() > 1e-3


def test_zero_weights_give_zero_not_nan():
    losses = torch.tensor([1.0, 2.0], requires_grad=True)
    out = weighted_global_mean(losses, torch.zeros(2), world_size=2, all_reduce_sum=lambda t: t * 0)
    assert out.item() == 0.0
    out.backward()
    assert torch.equal(losses.grad, torch.zeros(2))


def test_effective_sample_size():
    assert effective_sample_size(torch.ones(10)).item() == 10.0
    assert abs(effective_sample_size(torch.tensor([1.0, 0.0, 0.0])).item() - 1.0) < 1e-6
    assert effective_sample_size(torch.zeros(3)).item() == 0.0
