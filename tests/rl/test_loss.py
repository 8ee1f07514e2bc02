"""Clipped policy loss on tiny tensors, values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from calibrl.rl.loss import LOSS_AGG, clipped_policy_loss

F64 = torch.float64


def _t(x) -> torch.Tensor:
    return torch.tensor(x, dtype=F64)


def _loss(logp, old, adv, mask, **kw):
    defaults = dict(clip_low=0.2, clip_high=0.2, n_tokens=float(mask.sum()), n_seqs=float(mask.shape[0]))
    defaults.update(kw)
    return clipped_policy_loss(logp, old, adv, mask, **defaults)


def test_ratio_one_is_minus_mean_advantage_over_tokens():
    logp = _t([[-1.0, -2.0, -0.5], [-0.1, -3.0, -1.0]])
    adv = _t([1.0, -2.0])
    mask = torch.ones(2, 3)
    out = _loss(logp, logp.clone(), adv, mask)
    # ratio 1 everywhere -> per token -A: -(3*1 + 3*(-2)) / 6 tokens = -(-3)/6 = 0.5
    assert out.loss.item() == pytest.approx(0.5, abs=1e-12)
    assert out.clipped_tokens.item() == 0
    assert out.kl_sum.item() == 0.0


def test_positive_advantage_clipped_above():
    old = _t([[0.0, 0.0, 0.0]])
    logp = torch.log(_t([[1.5, 1.1, 0.5]]))  # ratios 1.5, 1.1, 0.5
    adv = _t([2.0])
    out = _loss(logp, old, adv, torch.ones(1, 3))
    # eps 0.2, A = 2:
    #   rho 1.5: min(3.0, 1.2*2 = 2.4) = 2.4   (clipped)
    #   rho 1.1: min(2.2, 2.2)         = 2.2
    #   rho 0.5: min(1.0, 0.8*2 = 1.6) = 1.0   (clip does not bind below for A > 0)
    # loss = -(2.4 + 2.2 + 1.0) / 3 = -5.6/3
    assert out.loss.item() == pytest.approx(-5.6 / 3, abs=1e-12)
    assert out.clipped_tokens.item() == 1


def test_negative_advantage_clipped_below():
    old = _t([[0.0, 0.0, 0.0]])
    logp = torch.log(_t([[0.5, 0.9, 1.5]]))
    adv = _t([-1.0])
    out = _loss(logp, old, adv, torch.ones(1, 3))
    # eps 0.2, A = -1:
    #   rho 0.5: min(-0.5, 0.8*-1 = -0.8) = -0.8  (clipped)
    #   rho 0.9: min(-0.9, -0.9)          = -0.9
    #   rho 1.5: min(-1.5, 1.2*-1 = -1.2) = -1.5  (clip does not bind above for A < 0)
    # loss = -(-0.8 - 0.9 - 1.5) / 3 = 3.2/3
    assert out.loss.item() == pytest.approx(3.2 / 3, abs=1e-12)
    assert out.clipped_tokens.item() == 1


def test_asymmetric_clip_range():
    old = _t([[0.0, 0.0]])
    logp = torch.log(_t([[1.5, 0.5]]))
    out = _loss(logp, old, _t([1.0]), torch.ones(1, 2), clip_low=0.2, clip_high=0.28)
    # A = 1: rho 1.5 -> min(1.5, 1.28) = 1.28; rho 0.5 -> min(0.5, 0.8) = 0.5; -(1.28 + 0.5)/2 = -0.89
    assert out.loss.item() == pytest.approx(-0.89, abs=1e-12)
    out = _loss(logp, old, _t([-1.0]), torch.ones(1, 2), clip_low=0.2, clip_high=0.28)
    # A = -1: rho 1.5 -> min(-1.5, -1.28) = -1.5; rho 0.5 -> min(-0.5, -0.8) = -0.8; (1.5 + 0.8)/2 = 1.15
    assert out.loss.item() == pytest.approx(1.15, abs=1e-12)


def test_clipped_tokens_get_no_gradient():
    old = _t([[0.0, 0.0]])
    logp = torch.log(_t([[1.5, 1.1]])).requires_grad_(True)
    out = _loss(logp, old, _t([2.0]), torch.ones(1, 2))
    out.loss.backward()
    # token 0 clipped -> 0; token 1: d/dlogp of -(rho*A)/2 = -rho*A/2 = -1.1*2/2 = -1.1
    assert logp.grad[0, 0].item() == 0.0
    assert logp.grad[0, 1].item() == pytest.approx(-1.1, abs=1e-12)


def test_seq_mean_vs_token_mean_on_unequal_lengths():
    logp = torch.zeros(2, 3, dtype=F64)
    mask = _t([[1, 1, 1], [1, 0, 0]])
    adv = _t([1.0, 4.0])
    # ratio 1 -> per-token loss -A: row 0 [-1, -1, -1], row 1 [-4, (pad), (pad)]
    # token_mean: (-1*3 + -4*1) / 4 tokens = -7/4 = -1.75
    # seq_mean:   (mean(-1,-1,-1) + mean(-4)) / 2 seqs = (-1 - 4)/2 = -2.5
    tok = _loss(logp, logp, adv, mask, agg="token_mean", n_tokens=4.0, n_seqs=2.0)
    seq = _loss(logp, logp, adv, mask, agg="seq_mean_token_mean", n_tokens=4.0, n_seqs=2.0)
    assert tok.loss.item() == pytest.approx(-1.75, abs=1e-12)
    assert seq.loss.item() == pytest.approx(-2.5, abs=1e-12)


def test_constant_normaliser_is_sequences_times_max_len():
    logp = torch.zeros(2, 3, dtype=F64)
    mask = _t([[1, 1, 1], [1, 0, 0]])
    adv = _t([1.0, 4.0])
    # per-token loss -A: sum over completion tokens -1*3 - 4*1 = -7; / (2 seqs * max_len 8) = -0.4375
    out = _loss(logp, logp, adv, mask, agg="constant", max_len=8)
    assert out.loss.item() == pytest.approx(-7 / 16, abs=1e-12)
    with pytest.raises(ValueError, match="needs max_len >= 1"):
        _loss(logp, logp, adv, mask, agg="constant")


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean", "constant"])
def test_masked_positions_are_ignored(agg):
    mask = _t([[1, 1, 0], [1, 0, 0]])
    adv = _t([1.0, -1.0])
    logp = _t([[-1.0, -1.0, 0.0], [-1.0, 0.0, 0.0]])
    base = _loss(logp, logp, adv, mask, agg=agg, max_len=3)
    # Wild (finite) values at padding: ratio exp(10) there, which would be clipped if it counted.
    logp2 = logp.clone()
    logp2[0, 2] = 5.0
    logp2[1, 1:] = 5.0
    old2 = logp.clone()
    old2[0, 2] = -5.0
    old2[1, 1:] = -5.0
    ref2 = logp2.clone()
    ref2[0, 2] = -30.0
    noisy = _loss(logp2, old2, adv, mask, agg=agg, beta=0.5, ref_logp=ref2, max_len=3)
    assert noisy.loss.item() == pytest.approx(base.loss.item(), abs=1e-12)
    assert noisy.clipped_tokens.item() == 0
    assert noisy.kl_sum.item() == 0.0  # ref == logp on every unmasked token
    # token_mean: -(1 + 1 - 1)/3 = -1/3; seq_mean_token_mean: (-1 + 1)/2 = 0;
    # constant: -(1 + 1 - 1) / (2 seqs * 3) = -1/6
    expected = {"token_mean": -1 / 3, "seq_mean_token_mean": 0.0, "constant": -1 / 6}[agg]
    assert base.loss.item() == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean", "constant"])
def test_micro_batches_add_up_to_the_batch_loss(agg):
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(4, 5, generator=g, dtype=F64)
    old = logp + 0.3 * (torch.rand(4, 5, generator=g, dtype=F64) - 0.5)
    adv = _t([1.0, -0.5, 2.0, -1.5])
    mask = _t([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    kw = dict(agg=agg, n_tokens=float(mask.sum()), n_seqs=4.0, max_len=5)
    full = _loss(logp, old, adv, mask, **kw)
    parts = [_loss(logp[s], old[s], adv[s], mask[s], **kw) for s in (slice(0, 1), slice(1, 3), slice(3, 4))]
    assert sum(p.loss.item() for p in parts) == pytest.approx(full.loss.item(), abs=1e-12)
    assert sum(p.clipped_tokens.item() for p in parts) == full.clipped_tokens.item()


def test_k3_kl_value_with_beta():
    logp = _t([[-1.0, -1.0]])
    ref = _t([[-0.5, -1.5]])  # d = ref - logp = [0.5, -0.5]
    out = _loss(logp, logp, _t([0.0]), torch.ones(1, 2), beta=0.1, ref_logp=ref)
    # k3 = exp(d) - d - 1: exp(0.5) - 1.5 = 0.1487212707; exp(-0.5) - 0.5 = 0.1065306597
    k3 = (math.exp(0.5) - 0.5 - 1.0) + (math.exp(-0.5) + 0.5 - 1.0)
    assert out.kl_sum.item() == pytest.approx(k3, abs=1e-12)
    # A = 0, so the loss is the KL term alone: beta * sum / n_tokens = 0.1 * 0.2552519304 / 2
    assert out.loss.item() == pytest.approx(0.1 * k3 / 2, abs=1e-12)
    assert out.kl_sum.item() > 0


def test_kl_zero_when_policy_equals_reference():
    logp = _t([[-1.0, -2.0]])
    out = _loss(logp, logp, _t([1.0]), torch.ones(1, 2), beta=0.5, ref_logp=logp.clone())
    # k3(0) = exp(0) - 0 - 1 = 0 -> loss is the ratio-1 surrogate alone: -1
    assert out.kl_sum.item() == 0.0
    assert out.loss.item() == pytest.approx(-1.0, abs=1e-12)


def test_beta_without_reference_raises():
    logp = torch.zeros(1, 2, dtype=F64)
    with pytest.raises(ValueError, match="ref_logp"):
        _loss(logp, logp, _t([1.0]), torch.ones(1, 2), beta=0.1)


def test_unknown_agg_raises_key_error_listing_choices():
    logp = torch.zeros(1, 2, dtype=F64)
    with pytest.raises(KeyError) as err:
        _loss(logp, logp, _t([1.0]), torch.ones(1, 2), agg="sum")
    for name in LOSS_AGG.names():
        assert name in str(err.value)
    assert {"seq_mean_token_mean", "token_mean"} <= set(LOSS_AGG.names())


@pytest.mark.parametrize(
    ("logp", "old", "adv", "mask"),
    [
        (torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2), torch.ones(2, 3)),
        (torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3), torch.ones(2, 3)),
        (torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2), torch.ones(2, 2)),
        (torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 1), torch.ones(2, 3)),
    ],
    ids=["old", "advantages-len", "mask", "advantages-2d"],
)
def test_shape_mismatch_raises(logp, old, adv, mask):
    with pytest.raises(ValueError, match="shapes"):
        clipped_policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.2, n_tokens=6.0, n_seqs=2.0)


def test_negative_clip_raises():
    z = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="clip"):
        clipped_policy_loss(z, z, torch.zeros(1), torch.ones(1, 2), clip_low=-0.1, clip_high=0.2, n_tokens=2.0, n_seqs=1.0)


def test_extreme_values_at_masked_positions_do_not_poison_the_loss():
    # float32 (what completion_logprobs returns). Token 1 is padding: ref - logp = 0 - (-100) = 100,
    # exp(100) overflows float32 (max ~3.4e38 = exp(88.7)).
    logp = torch.tensor([[-1.0, -100.0]], requires_grad=True)
    ref = torch.tensor([[-1.0, 0.0]])
    mask = torch.tensor([[1, 0]])
    out = clipped_policy_loss(
        logp, logp.detach(), torch.tensor([1.0]), mask,
        clip_low=0.2, clip_high=0.2, n_tokens=1.0, n_seqs=1.0, beta=0.1, ref_logp=ref,
    )
    # Only token 0 counts: ratio 1, A = 1, k3(0) = 0 -> loss = -1, kl_sum = 0
    assert out.loss.item() == pytest.approx(-1.0, abs=1e-6)
    assert out.kl_sum.item() == 0.0
    out.loss.backward()
    assert torch.isfinite(logp.grad).all()
