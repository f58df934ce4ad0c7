"""Each preference loss against its formula written out, and the fused path against the
unfused one, gradients included."""

import math

import pytest
import torch

from sail_fast.dpo.losses import LOSSES, loss_from_mse, preference_loss

BETA = 50.0


def _mse(seed=0, b=6):
    gen = torch.Generator().manual_seed(seed)
    return [0.05 + 0.1 * torch.rand(b, generator=gen, dtype=torch.float64) for _ in range(4)]


def _literal(kind, pw, pl, rw, rl, labels, gamma):
    """Per-pair loss with Python floats, then the mean."""
    out = []
    for i in range(len(pw)):
        u = -BETA / 2 * ((pw[i] - pl[i]) - (rw[i] - rl[i]))
        if kind == "sigmoid":
            v = math.log1p(math.exp(-u))
        elif kind == "smpo":
            v = math.log1p(math.exp(-(2 * labels[i] - 1) * u))
        elif kind == "hinge":
            v = max(0.0, 1 - u)
        elif kind == "ipo":
            v = (u / BETA - 1 / (2 * BETA)) ** 2
        elif kind == "sft":
            v = pw[i]
        else:
            sw, sl = -BETA * pw[i], -BETA * pl[i]
            odds = (sw - sl) - (math.log(1 - math.exp(sw)) - math.log(1 - math.exp(sl)))
            v = pw[i] + gamma * math.log1p(math.exp(-odds))
        out.append(v)
    return sum(out) / len(out)


@pytest.mark.parametrize("kind", LOSSES)
def test_matches_literal_formula(kind):
    pw, pl, rw, rl = _mse()
    labels = torch.tensor([1.0, 0.9, 0.5, 0.2, 0.7, 1.0], dtype=torch.float64)
    got = loss_from_mse(kind, pw, pl, rw, rl, beta=BETA, labels=labels, gamma=0.3)
    expect = _literal(kind, pw.tolist(), pl.tolist(), rw.tolist(), rl.tolist(), labels.tolist(), 0.3)
    assert got.loss.item() == pytest.approx(expect, rel=1e-9, abs=1e-12)


def test_metrics_implicit_accuracy_and_means():
    pw, pl, rw, rl = (torch.tensor(v) for v in ([0.1, 0.3], [0.2, 0.1], [0.15, 0.15], [0.15, 0.15]))
    out = loss_from_mse("sigmoid", pw, pl, rw, rl, beta=BETA)
    # Pair 0: the policy denoises the winner better than the reference does -> u > 0.
    assert out.metrics["implicit_acc"].item() == 0.5
    assert out.metrics["mse_policy_win"].item() == pytest.approx(0.2)
    assert out.metrics["loss"].item() == pytest.approx(out.loss.item())
    assert not out.metrics["loss"].requires_grad


def test_at_initialisation_sigmoid_is_log2_and_smpo_with_half_labels_ignores_the_pair():
    pw, pl, _, _ = _mse()
    out = loss_from_mse("sigmoid", pw, pl, pw, pl, beta=BETA)
    assert out.loss.item() == pytest.approx(math.log(2))
    pw2 = pw.clone().requires_grad_()
    out = loss_from_mse("smpo", pw2, pl, pw, pl + 0.1, beta=BETA, labels=torch.full((6,), 0.5, dtype=torch.float64))
    out.loss.backward()
    assert torch.count_nonzero(pw2.grad) == 0


@pytest.mark.parametrize("kind", LOSSES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_matches_unfused_with_gradients(kind, dtype):
    gen = torch.Generator().manual_seed(1)
    target = torch.randn(8, 4, 12, 12, generator=gen).to(dtype)
    target[4:] = target[:4]  # winner and loser share their noise
    base = target.float() + 0.3 * torch.randn(8, 4, 12, 12, generator=gen)
    ref = (target.float() + 0.3 * torch.randn(8, 4, 12, 12, generator=gen)).to(dtype)
    labels = torch.tensor([1.0, 0.8, 0.6, 0.9])
    grads, losses = [], []
    for fused in (True, False):
        pred = base.to(dtype).requires_grad_()
        out = preference_loss(kind, target, pred, ref, beta=0.5, labels=labels, fused=fused)
        out.loss.backward()
        grads.append(pred.grad)
        losses.append(out.loss)
    tol = {"rtol": 1e-5, "atol": 1e-7} if dtype == torch.float32 else {"rtol": 1.6e-2, "atol": 1e-6}
    torch.testing.assert_close(losses[0], losses[1], **tol)
    assert grads[0].dtype == dtype and grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0].float(), grads[1].float(), **tol)


def test_bad_calls():
    pw, pl, rw, rl = _mse()
    with pytest.raises(ValueError, match="unknown loss 'dpo'"):
        loss_from_mse("dpo", pw, pl, rw, rl, beta=BETA)
    with pytest.raises(ValueError, match="reference"):
        loss_from_mse("sigmoid", pw, pl, None, None, beta=BETA)
    with pytest.raises(ValueError, match="expected 2B rows"):
        preference_loss("sigmoid", torch.zeros(3, 2), torch.zeros(3, 2), torch.zeros(3, 2), beta=BETA)
    # Reference-free losses run without a reference prediction.
    out = preference_loss("sft", torch.zeros(4, 2), torch.ones(4, 2), None, beta=BETA)
    assert out.loss.item() == pytest.approx(1.0)
