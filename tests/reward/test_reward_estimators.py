"""The debiased implicit-reward estimators and the timestep band, each against its formula written
as a literal loop over plain diffusers calls, in the drop-in scorer and in the loop's config."""

import copy
import math
import statistics

import pytest
import torch
import torch.nn.functional as F

from sail_fast.diffusion.tiny import tiny_stack
from sail_fast.reward.estimators import ESTIMATORS, combine_draws
from sail_fast.reward.scorer import ImplicitRewardScorer
from sail_fast.runs.config import SailConfig, load_config

BETA, N, K = 5000.0, 5, 6
CONFIGS = __import__("pathlib").Path(__file__).resolve().parents[2] / "configs"


@pytest.fixture(scope="module")
def setup():
    stack = tiny_stack("sd15", seed=0)
    reference = stack.unet.eval()
    policy = copy.deepcopy(reference)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
    embeds = stack.encode_prompts(["a cat"]).prompt_embeds
    latents = torch.randn(N, 4, 16, 16, generator=gen)
    timesteps = torch.randint(0, 1000, (K,), generator=gen)
    noise = torch.randn(K, 4, 16, 16, generator=gen)
    return stack, policy, reference, embeds, latents, timesteps, noise


@torch.no_grad()
def _literal_mse(stack, policy, reference, x0, embeds, timesteps, noise):
    """mse_policy[n][k], mse_ref[n][k] as Python floats, one candidate and one draw at a time."""
    pol, ref = [], []
    for n in range(x0.shape[0]):
        pol.append([]), ref.append([])
        for k in range(len(timesteps)):
            t = timesteps[k : k + 1]
            x_t = stack.scheduler.add_noise(x0[n : n + 1], noise[k : k + 1], t)
            pol[n].append(float(F.mse_loss(policy(x_t, t, encoder_hidden_states=embeds).sample, noise[k : k + 1])))
            ref[n].append(float(F.mse_loss(reference(x_t, t, encoder_hidden_states=embeds).sample, noise[k : k + 1])))
    return pol, ref


def _literal(estimator, pol, ref):
    n_cands, k = len(pol), len(pol[0])
    gap = [[-BETA / 2 * (pol[n][d] - ref[n][d]) for d in range(k)] for n in range(n_cands)]
    if estimator == "mean":
        return [statistics.fmean(gap[n]) for n in range(n_cands)]
    if estimator == "ref_normalised":
        return [statistics.fmean((ref[n][d] - pol[n][d]) / ref[n][d] for d in range(k)) for n in range(n_cands)]
    if estimator == "standardised":
        z = [[0.0] * k for _ in range(n_cands)]
        for d in range(k):
            column = [gap[n][d] for n in range(n_cands)]
            mean, std = statistics.fmean(column), statistics.stdev(column)
            for n in range(n_cands):
                z[n][d] = (column[n] - mean) / std
        return [statistics.fmean(z[n]) for n in range(n_cands)]
    if estimator == "rank":  # 0 = the lowest gap of the draw
        return [
            statistics.fmean(sorted(gap[m][d] for m in range(n_cands)).index(gap[n][d]) for d in range(k))
            for n in range(n_cands)
        ]
    raise AssertionError(estimator)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_scorer_matches_the_estimators_formula(setup, estimator):
    stack, policy, reference, embeds, latents, timesteps, noise = setup
    scorer = ImplicitRewardScorer(
        policy, reference, stack.scheduler, beta=BETA, num_draws=K, estimator=estimator, channels_last=False
    )
    got = scorer.score(latents, embeds, timesteps=timesteps, noise=noise)
    expect = torch.tensor(
        _literal(estimator, *_literal_mse(stack, policy, reference, latents, embeds, timesteps, noise))
    )
    assert got.shape == (N,) and torch.isfinite(got).all()
    assert expect.std() > 0  # the candidates are told apart
    torch.testing.assert_close(got.double(), expect.double(), rtol=2e-4, atol=2e-4 * float(expect.abs().max()))


def test_estimators_differ_and_handle_ties_and_flat_draws():
    pol = torch.tensor([[[1.0, 2.0], [1.0, 3.0], [2.0, 2.5]]])  # [P=1, N=3, K=2]
    ref = torch.full_like(pol, 2.0)
    rank = combine_draws(pol, ref, BETA, "rank")[0]
    # draw 0: gaps (+, +, 0) -> ranks 1.5, 1.5, 0; draw 1: (0, -, -) -> 2, 0, 1
    torch.testing.assert_close(rank, torch.tensor([1.75, 0.75, 0.5]))
    flat = combine_draws(torch.ones(1, 3, 2), torch.ones(1, 3, 2), BETA, "standardised")
    assert torch.equal(flat, torch.zeros(1, 3))  # a draw that ties every candidate adds nothing
    with pytest.raises(ValueError, match="unknown reward estimator 'median'"):
        combine_draws(pol, ref, BETA, "median")


def test_timestep_band_draws_and_default_unchanged(setup):
    stack, policy, reference = setup[:3]
    banded = ImplicitRewardScorer(policy, reference, stack.scheduler, num_draws=400, timestep_range=(0, 250))
    t = banded.sample_draws(3, (4, 16, 16), generator=torch.Generator().manual_seed(0)).timesteps
    assert t.min() >= 0 and t.max() < 250 and t.max() > 200  # uniform over the band
    # The default band is every training step, drawn exactly as before the option existed.
    plain = ImplicitRewardScorer(policy, reference, stack.scheduler, num_draws=7)
    gen = torch.Generator().manual_seed(3)
    before = torch.randint(0, 1000, (2, 7), generator=gen)
    assert torch.equal(plain.sample_draws(2, (4, 16, 16), generator=torch.Generator().manual_seed(3)).timesteps, before)
    with pytest.raises(ValueError, match=r"0 <= lo < hi <= 1000, got \[0, 2000\]"):
        ImplicitRewardScorer(policy, reference, stack.scheduler, timestep_range=(0, 2000))
    with pytest.raises(ValueError, match="unknown reward estimator"):
        ImplicitRewardScorer(policy, reference, stack.scheduler, estimator="median")


def test_adaptive_race_refuses_a_debiased_estimator(setup):
    stack, policy, reference, embeds, latents, timesteps, noise = setup
    scorer = ImplicitRewardScorer(policy, reference, stack.scheduler, num_draws=K, estimator="rank")
    with pytest.raises(ValueError, match="mean estimator only"):
        scorer.best_worst(latents[None], embeds, timesteps=timesteps[None], noise=noise[None], adaptive=True)
    chosen = scorer.best_worst(latents[None], embeds, timesteps=timesteps[None], noise=noise[None])
    assert chosen.best != chosen.worst and math.isfinite(float(chosen.rewards.sum()))


def test_config_keys_reach_the_scorer_and_bad_values_are_named():
    config = load_config(CONFIGS / "toy.yaml", ["sail.reward_estimator=rank", "sail.reward_timesteps=[0, 250]"])
    assert config.sail.scorer_options() == {"estimator": "rank", "timestep_range": (0, 250)}
    # The toy configs carry the audit's choice; a config that says nothing gets the paper's mean.
    assert load_config(CONFIGS / "toy.yaml").sail.scorer_options() == {
        "estimator": "standardised",
        "timestep_range": None,
    }
    assert SailConfig().scorer_options() == {"estimator": "mean", "timestep_range": None}
    with pytest.raises(
        ValueError, match=r"sail.reward_timesteps must be \[lo, hi\) with 0 <= lo < hi, got \[300, 200\]"
    ):
        load_config(CONFIGS / "toy.yaml", ["sail.reward_timesteps=[300, 200]"])
    with pytest.raises(ValueError, match="sail.reward_estimator"):
        load_config(CONFIGS / "toy.yaml", ["sail.reward_estimator=median"])
    with pytest.raises(ValueError, match="sail.adaptive races with the mean estimator only"):
        load_config(CONFIGS / "toy.yaml", ["sail.reward_estimator=rank", "sail.adaptive=true"])
