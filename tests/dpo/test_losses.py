"""Each preference loss against its formula written out, and the fused path (paired_mse: the Triton
kernel, under the interpreter on a CPU) against the plain-torch twin in kernels/reference.py, gradients
included."""

import math

import pytest
import torch
from sail_fast.kernels import paired_mse, paired_mse_reference

from sail_fast.dpo import losses
from sail_fast.dpo.losses import LOSSES, NEEDS_PREDICTIONS, LossOptions, loss_from_mse, preference_loss

BETA = 50.0


@pytest.fixture
def reference_twin(monkeypatch):
    """preference_loss reduces through kernels/reference.py's plain-torch twin instead of paired_mse
    (which takes float64 rows too: the twin reduces them in fp32, as the kernel does)."""
    monkeypatch.setattr(losses, "paired_mse", paired_mse_reference)


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
        elif kind == "smpo":  # SmPO-Diffusion's train.py: -logsigmoid(-0.5 beta (2p - 1) 10 (delta_policy - delta_ref))
            v = math.log1p(math.exp(-(-0.5 * BETA * (2 * labels[i] - 1) * 10 * ((pw[i] - pl[i]) - (rw[i] - rl[i])))))
        elif kind == "dmpo":  # KL(Bern(p) || Bern(q)), p = sigmoid(u), q = 1 - alpha
            p, q = 1 / (1 + math.exp(-u)), 1 - 0.01
            v = p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))
        elif kind == "dro":  # RealAlign's Diffusion-DRO hinge, margin 0.001
            v = max(0.0, (pw[i] - rw[i]) - (pl[i] - rl[i]) + 0.001)
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


@pytest.mark.parametrize("kind", [k for k in LOSSES if k not in NEEDS_PREDICTIONS])
def test_matches_literal_formula(kind):
    pw, pl, rw, rl = _mse()
    labels = torch.tensor([1.0, 0.9, 0.5, 0.2, 0.7, 1.0], dtype=torch.float64)
    got = loss_from_mse(kind, pw, pl, rw, rl, beta=BETA, labels=labels, options=LossOptions(gamma=0.3))
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
def test_fused_matches_the_reference_twin_with_gradients(kind, dtype, monkeypatch):
    gen = torch.Generator().manual_seed(1)
    target = torch.randn(8, 4, 12, 12, generator=gen).to(dtype)
    target[4:] = target[:4]  # winner and loser share their noise
    base = target.float() + 0.3 * torch.randn(8, 4, 12, 12, generator=gen)
    ref = (target.float() + 0.3 * torch.randn(8, 4, 12, 12, generator=gen)).to(dtype)
    labels = torch.tensor([1.0, 0.8, 0.6, 0.9])
    grads, values = [], []
    for reduce in (losses.paired_mse, paired_mse_reference):
        monkeypatch.setattr(losses, "paired_mse", reduce)
        pred = base.to(dtype).requires_grad_()
        out = preference_loss(kind, target, pred, ref, beta=0.5, labels=labels)
        out.loss.backward()
        grads.append(pred.grad)
        values.append(out.loss)
    tol = {"rtol": 1e-5, "atol": 1e-7} if dtype == torch.float32 else {"rtol": 1.6e-2, "atol": 1e-6}
    torch.testing.assert_close(values[0], values[1], **tol)
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


def _predictions(seed=3, b=3, shape=(4, 5, 5)):
    gen = torch.Generator().manual_seed(seed)
    target = torch.randn(2 * b, *shape, generator=gen, dtype=torch.float64)
    target[b:] = target[:b]
    pred = target + 0.5 * torch.randn(target.shape, generator=gen, dtype=torch.float64)
    ref = target + 0.5 * torch.randn(target.shape, generator=gen, dtype=torch.float64)
    return target, pred, ref


def test_dspo_matches_its_literal_formula(reference_twin, monkeypatch):
    """DSPO as Diffusion-SDPO's train.py runs it for SD1.5: the winner's prediction regressed onto its
    noise shifted by beta (1 - sigmoid(u)) times the policy-reference gap, u the Diffusion-DPO logit."""
    target, pred, ref = _predictions()
    beta, b = 3.0, 3
    got = preference_loss("dspo", target, pred, ref, beta=beta).loss
    per = []
    for i in range(b):
        mse = [float(((x[j] - target[j]) ** 2).mean()) for x in (pred, ref) for j in (i, i + b)]
        u = -0.5 * beta * ((mse[0] - mse[1]) - (mse[2] - mse[3]))
        w = 1 - 1 / (1 + math.exp(-u))
        per.append(float((((pred[i] - target[i]) - beta * w * (pred[i] - ref[i])) ** 2).mean()))
    assert got.item() == pytest.approx(sum(per) / b, rel=1e-6)  # the loss computes in float32
    # the fused path agrees
    monkeypatch.setattr(losses, "paired_mse", paired_mse)
    assert preference_loss("dspo", target.float(), pred.float(), ref.float(), beta=beta).loss.item() == pytest.approx(
        got.item(), rel=1e-5
    )
    with pytest.raises(ValueError, match="preference_loss"):
        loss_from_mse("dspo", *_mse(), beta=BETA)


@pytest.mark.parametrize("gap_scale", [1.0, 0.1])  # the batch's mean squared gap above and below 0.1
def test_dspo_sdxl_form_matches_its_literal_formula(gap_scale, reference_twin):
    """Diffusion-SDPO's train.py for SDXL: ((1 - sigmoid(u)) d)^2 while mean d^2 >= 0.1, else (1 - sigmoid(u))^2."""
    target, pred, ref = _predictions(seed=7)
    ref = pred + gap_scale * (ref - pred)
    beta, b = 3.0, 3
    got = preference_loss("dspo", target, pred, ref, beta=beta, dspo_sdxl=True).loss
    per, gaps = [], []
    for i in range(b):
        mse = [float(((x[j] - target[j]) ** 2).mean()) for x in (pred, ref) for j in (i, i + b)]
        u = -0.5 * beta * ((mse[0] - mse[1]) - (mse[2] - mse[3]))
        w = 1 - 1 / (1 + math.exp(-u))
        per.append((float(((w * (pred[i] - ref[i])) ** 2).mean()), w**2))
        gaps.append(float(((pred[i] - ref[i]) ** 2).mean()))
    big = sum(gaps) / b >= 0.1
    assert big == (gap_scale == 1.0)
    assert got.item() == pytest.approx(sum(v[0] if big else v[1] for v in per) / b, rel=1e-6)


@pytest.mark.parametrize("mu", [0.0, 0.9])
def test_winner_preserving_scale_is_sdpos_lambda_on_the_loser_gradient_only(mu, reference_twin):
    """lambda = clamp((1 - mu) |g_w|^2 / (<g_l, g_w> + 1e-9), 0, 1), g the gradients of the half-batch
    mean MSEs with respect to the predictions; the loss value is unchanged and only the loser's
    gradient is multiplied by lambda."""
    target, pred, ref = _predictions(seed=5)
    b = 3
    # make the loser's residual point along the winner's, so <g_l, g_w> > 0 and lambda is not clipped to 1
    pred[b:] = target[b:] + 1.5 * (pred[:b] - target[:b]) + 0.1 * (pred[b:] - target[b:])
    n = pred[:b].numel()
    g_w, g_l = 2 * (pred[:b] - target[:b]) / n, 2 * (pred[b:] - target[b:]) / n
    lam = min(1.0, max(0.0, (1 - mu) * float((g_w * g_w).sum()) / (float((g_l * g_w).sum()) + 1e-9)))
    assert 0 < lam < 1
    plain_pred, scaled_pred = pred.clone().requires_grad_(), pred.clone().requires_grad_()
    plain = preference_loss("sigmoid", target, plain_pred, ref, beta=20.0)
    scaled = preference_loss("sigmoid", target, scaled_pred, ref, beta=20.0, winner_preserving_mu=mu)
    assert scaled.loss.item() == pytest.approx(plain.loss.item(), rel=1e-7)
    assert scaled.metrics["loser_grad_scale"].item() == pytest.approx(lam, rel=1e-5)
    plain.loss.backward()
    scaled.loss.backward()
    torch.testing.assert_close(scaled_pred.grad[:b], plain_pred.grad[:b])
    torch.testing.assert_close(scaled_pred.grad[b:], lam * plain_pred.grad[b:])
    # losers pulling away from the winners (<g_l, g_w> <= 0) keep their whole gradient
    away = pred.clone()
    away[b:] = target[b:] - (pred[:b] - target[:b])
    out = preference_loss("sigmoid", target, away, ref, beta=20.0, winner_preserving_mu=mu)
    assert out.metrics["loser_grad_scale"].item() == 1.0


@pytest.mark.parametrize("kind,beta,mu", [("dmpo", 2000, 0.9), ("dspo", 0.001, 0.2)])
def test_shipped_sdpo_configs_reproduce_the_published_hyperparameters(kind, beta, mu):
    """AIDC-AI/Diffusion-SDPO scripts/train/sd15_{dmpo,dspo}.sh: beta, mu, DMPO's alpha, lr 1e-8 x 2048."""
    from pathlib import Path

    from sail_fast.runs.config import load_config

    train = load_config(Path(__file__).resolve().parents[2] / f"configs/{kind}-sd15.yaml").train
    assert (train.loss, train.beta, train.winner_preserving_mu, train.dmpo_alpha) == (kind, beta, mu, 0.01)
    assert (train.learning_rate, train.steps, train.warmup_steps, train.pairs_per_step, train.micro_batch_pairs) == (
        2.048e-5,
        2000,
        500,
        2048,
        8,
    )
