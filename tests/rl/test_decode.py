"""The rollout decode loop (calibrl.rl.decode): sampler maths, and exactness of the shared
prefill, the row compaction and the positions against HF ``generate`` and a plain forward."""

from __future__ import annotations

import os

import pytest
import torch
from omegaconf import OmegaConf

from calibrl.data.prompts import PromptBuilder
from calibrl.data.sources import Example
from calibrl.models import ModelSpec, load_policy
from calibrl.rl import decode
from calibrl.rl.decode import decode_groups, sample_next_tokens
from calibrl.rl.rollout import Rollout, SamplingCopy, completion_logprobs
from calibrl.cli import CONF_DIR
from helpers import rl_groups

EXAMPLES = [
    Example("e0", "What is 2 + 3?", "5"),
    Example("e1", "Compute 12 + 30 - 7, then double-check the result carefully.", "35"),
    Example("e2", "What is 9 - 4, in words?", "5"),
]


@pytest.fixture(scope="module")
def tiny():
    fields = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "model" / "tiny.yaml"))
    spec = ModelSpec(**fields, cache_dir=os.environ.get("CALIBRL_CACHE", "~/.cache/calibrl") + "/models")
    model, tok = load_policy(spec)
    # The tiny model's own init writes one token forever; weight matrices redrawn with std 0.5
    # (seeded) give every prompt and step its own greedy token.
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.5, generator=g)
    return model, tok


@pytest.fixture(scope="module")
def batch(tiny):
    """Three chat prompts of different lengths, left-padded: input_ids, attention_mask ``[3, P]``."""
    _, tok = tiny
    builder = PromptBuilder(tok, "Answer in tags.")
    enc = tok([builder.prompt(e) for e in EXAMPLES], return_tensors="pt", padding=True, add_special_tokens=False)
    assert len(set(enc.attention_mask.sum(dim=1).tolist())) == 3  # three widths of left padding
    return enc.input_ids, enc.attention_mask


# --------------------------------------------------------------------------- sample_next_tokens


def test_greedy_is_argmax():
    logits = torch.tensor([[0.0, 3.0, 1.0], [5.0, -1.0, 4.9]])
    assert sample_next_tokens(logits, do_sample=False).tolist() == [1, 0]


def test_sampling_frequencies_match_the_softmax():
    # probabilities 0.5, 0.3, 0.2, 0 (log 0 = -inf): 40k draws, 3-sigma bound sqrt(p(1-p)/n) ~ 0.0025
    torch.manual_seed(0)
    logits = torch.log(torch.tensor([0.5, 0.3, 0.2, 0.0])).expand(40_000, 4)
    draws = sample_next_tokens(logits)
    freq = torch.bincount(draws, minlength=4).float() / len(draws)
    torch.testing.assert_close(freq[:3], torch.tensor([0.5, 0.3, 0.2]), atol=0.0075, rtol=0)
    assert freq[3] == 0  # a token of probability 0 is never drawn


def test_temperature_sharpens_as_the_softmax_of_scaled_logits():
    # T = 0.5 squares the odds: p proportional to 0.6^2, 0.4^2 = 0.36, 0.16 -> 0.6923, 0.3077
    torch.manual_seed(1)
    logits = torch.log(torch.tensor([0.6, 0.4])).expand(40_000, 2)
    freq = torch.bincount(sample_next_tokens(logits, temperature=0.5), minlength=2).float() / 40_000
    torch.testing.assert_close(freq, torch.tensor([0.36 / 0.52, 0.16 / 0.52]), atol=0.0075, rtol=0)


def test_top_p_keeps_the_smallest_set_reaching_p():
    # sorted 0.5, 0.3, 0.15, 0.05: mass before each = 0, 0.5, 0.8, 0.95.
    # top_p = 0.8 keeps 0.5 and 0.3 (0.8 reached), renormalised to 0.625, 0.375.
    torch.manual_seed(2)
    logits = torch.log(torch.tensor([0.15, 0.5, 0.05, 0.3])).expand(40_000, 4)
    freq = torch.bincount(sample_next_tokens(logits, top_p=0.8), minlength=4).float() / 40_000
    torch.testing.assert_close(freq, torch.tensor([0.0, 0.625, 0.0, 0.375]), atol=0.0075, rtol=0)
    # top_p below the largest probability keeps that one token only
    assert set(sample_next_tokens(logits[:100], top_p=0.1).tolist()) == {1}


@pytest.mark.parametrize("kwargs", [dict(temperature=0.0), dict(temperature=-1.0), dict(top_p=0.0), dict(top_p=1.5)])
def test_bad_sampling_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        sample_next_tokens(torch.zeros(1, 3), **kwargs)


# --------------------------------------------------------------------------- decode_groups


def test_greedy_decode_equals_hf_generate_with_eos_and_padding(tiny, batch):
    model, tok = tiny
    ids, mask = batch
    with torch.no_grad():
        free = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                              pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)[:, ids.shape[1]:]
    # An EOS that prompt 0 writes at its 3rd token, so rows end at different steps.
    eos = int(free[0, 2])
    assert eos not in free[1:, :3].flatten().tolist() and eos not in free[0, :2].tolist()
    with torch.no_grad():
        ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=eos)[:, ids.shape[1]:]
    ours = decode_groups(model, ids, mask, 1, max_new_tokens=6, eos_token_id=eos, pad_token_id=tok.pad_token_id,
                         do_sample=False)
    assert torch.equal(ours, ref)
    assert ours[0, 3:].tolist() == [tok.pad_token_id] * 3  # padded after its EOS


def test_groups_share_the_prefill_and_greedy_rows_of_a_group_agree(tiny, batch):
    model, tok = tiny
    ids, mask = batch
    one = decode_groups(model, ids, mask, 1, max_new_tokens=5, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id, do_sample=False)
    three = decode_groups(model, ids, mask, 3, max_new_tokens=5, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id, do_sample=False)
    assert three.shape == (9, one.shape[1])
    assert torch.equal(three, one.repeat_interleave(3, dim=0))  # row b*G + g is sample g of prompt b


def test_sampled_logprobs_equal_a_plain_forward_through_compaction(tiny, batch, monkeypatch):
    """Sampling, with rows finishing early (and leaving the batch): each sampled token's log-prob
    in the loop equals the plain [prompt | completion] forward's, so the shared prefill, the row
    compaction and the positions are exact."""
    model, tok = tiny
    ids, mask = batch
    monkeypatch.setattr(decode, "_COMPACT_SHARE", 0.1)  # compact at the first finished row
    # Low temperature makes the tiny model's samples near-greedy; the EOS is prompt 0's greedy
    # 2nd token, so its rows finish at step 2 and the others run on without them.
    greedy = decode_groups(model, ids, mask, 1, max_new_tokens=8, eos_token_id=-1, pad_token_id=tok.pad_token_id,
                           do_sample=False)
    eos = int(greedy[0, 1])
    torch.manual_seed(0)
    comp, lp = decode_groups(model, ids, mask, 2, max_new_tokens=8, eos_token_id=eos, pad_token_id=tok.pad_token_id,
                             temperature=0.05, return_logprobs=True)
    ended = (comp == eos).any(dim=1)
    assert ended.any() and not ended.all()  # some rows left the batch early, some ran on
    cmask = torch.ones_like(comp)
    for i in range(len(comp)):  # sampled tokens: up to and including the EOS
        hits = (comp[i] == eos).nonzero()
        if len(hits):
            cmask[i, int(hits[0]) + 1:] = 0
    rollout = Rollout(ids.repeat_interleave(2, dim=0), mask.repeat_interleave(2, dim=0), comp, cmask,
                      [""] * len(comp), torch.arange(3).repeat_interleave(2))
    with torch.no_grad():
        ref = completion_logprobs(model, rollout, share_prefix=False)
    torch.testing.assert_close(lp[cmask.bool()], ref[cmask.bool()], atol=1e-5, rtol=0)
    assert (lp[~cmask.bool()] == 0).all() and (comp[~cmask.bool()] == tok.pad_token_id).all()


def test_stop_string_ends_a_row_on_the_token_that_completes_it(tiny, batch):
    model, tok = tiny
    ids, mask = batch
    greedy = decode_groups(model, ids, mask, 1, max_new_tokens=4, eos_token_id=-1, pad_token_id=tok.pad_token_id,
                           do_sample=False)
    stop = tok.decode(greedy[1, :2])  # row 1 writes it with its first two tokens
    out = decode_groups(model, ids, mask, 1, max_new_tokens=4, eos_token_id=-1, pad_token_id=tok.pad_token_id,
                        do_sample=False, stop_strings=[stop], tokenizer=tok)
    assert out[1].tolist() == greedy[1, :2].tolist() + [tok.pad_token_id] * 2
    assert out[0].tolist() == greedy[0].tolist() or stop in tok.decode(out[0])


def test_bad_arguments_are_refused(tiny, batch):
    model, tok = tiny
    ids, mask = batch
    with pytest.raises(ValueError, match="max_new_tokens"):
        decode_groups(model, ids, mask, 2, max_new_tokens=0, eos_token_id=2, pad_token_id=2)
    with pytest.raises(ValueError, match="tokenizer"):
        decode_groups(model, ids, mask, 2, max_new_tokens=3, eos_token_id=2, pad_token_id=2, stop_strings=["x"])


# --------------------------------------------------------------------------- SamplingCopy


def test_sampling_copy_holds_the_policy_weights_in_bf16_and_follows_updates(tiny):
    import copy

    policy = copy.deepcopy(tiny[0])
    sampler = SamplingCopy(policy)
    model = sampler.refresh(policy)
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in model.parameters())
    assert all(b.dtype == torch.float32 for b in model.buffers() if b.is_floating_point())  # rotary stays fp32
    w = policy.get_input_embeddings().weight
    assert torch.equal(model.get_input_embeddings().weight, w.to(torch.bfloat16))
    with torch.no_grad():
        w.add_(1.0)  # an "update" of the policy
    assert not torch.equal(model.get_input_embeddings().weight, w.to(torch.bfloat16))
    assert sampler.refresh(policy) is model
    assert torch.equal(model.get_input_embeddings().weight, w.to(torch.bfloat16))
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tying kept


def test_sampling_copy_refreshes_through_a_wrapper_and_refuses_a_stranger(tiny):
    import copy

    policy = copy.deepcopy(tiny[0])
    sampler = SamplingCopy(policy)

    class Wrapper(torch.nn.Module):  # as DeepSpeed's engine holds the model: names "module.*"
        def __init__(self, module):
            super().__init__()
            self.module = module

    with torch.no_grad():
        policy.lm_head.weight.mul_(2.0)
    model = sampler.refresh(Wrapper(policy))
    assert torch.equal(model.lm_head.weight, policy.lm_head.weight.to(torch.bfloat16))
    with pytest.raises(KeyError, match="no counterpart"):
        SamplingCopy(policy).refresh(torch.nn.Linear(2, 2))


def test_the_trainer_samples_with_the_refreshed_copy(tiny, monkeypatch):
    import copy

    from calibrl.data.sources import exact_match
    from calibrl.rewards import RewardFunction
    from calibrl.rl import grpo
    from calibrl.rl.engine import TorchEngine

    policy, tok = copy.deepcopy(tiny[0]), tiny[1]
    sampler = SamplingCopy(policy)
    engine = TorchEngine(policy, torch.optim.SGD(policy.parameters(), lr=0.1))
    algo, trainer_cfg, objective = rl_groups(max_new_tokens=3, bf16=True)
    trainer = grpo.GRPOTrainer(engine, tok, PromptBuilder(tok, "Answer in tags."), EXAMPLES,
                               lambda a, e: exact_match(a, e) >= 1, RewardFunction({"correctness": 1.0, "format": 0.5}),
                               algo, trainer_cfg, objective, sampler=sampler)
    seen = {}

    def generate_rollout(model, *args, autocast_dtype, **kwargs):
        seen.update(model=model, dtype=autocast_dtype, emb=model.get_input_embeddings().weight.clone())

    monkeypatch.setattr(grpo, "generate_rollout", generate_rollout)
    with torch.no_grad():
        policy.get_input_embeddings().weight.add_(0.5)  # as an optimizer step would
    trainer.generate(EXAMPLES[:2])
    assert seen["model"] is sampler.model and seen["dtype"] is None  # bf16 weights, no autocast
    assert torch.equal(seen["emb"], policy.get_input_embeddings().weight.to(torch.bfloat16))
    trainer.sampler = None
    trainer.generate(EXAMPLES[:2])
    assert seen["model"] is policy and seen["dtype"] == torch.bfloat16  # the policy under autocast


def test_decode_through_a_deepspeed_like_wrapper(tiny, batch):
    """DeepSpeed's engine forwards to its ``module`` but has a ``config`` dict of its own (as
    the policy under ZeRO-3 is sampled): the loop takes the HF config from the module."""
    model, tok = tiny
    ids, mask = batch

    class Engine(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module, self.config = module, {"zero_optimization": {"stage": 3}}

        def forward(self, **kwargs):
            return self.module(**kwargs)

    kwargs = dict(max_new_tokens=4, eos_token_id=-1, pad_token_id=tok.pad_token_id, do_sample=False)
    assert torch.equal(decode_groups(Engine(model), ids, mask, 2, **kwargs), decode_groups(model, ids, mask, 2, **kwargs))


@pytest.mark.parametrize("override, match", [("algo.top_p=0", "algo.top_p must be in"), ("algo.top_p=1.5", "algo.top_p must be in"),
                                             ("algo.temperature=0", "algo.temperature must be > 0")])
def test_bad_sampling_config_fails_at_start_up(override, match):
    from helpers import compose_config

    from calibrl.config import ConfigError
    from calibrl.run.validate import validate

    with pytest.raises(ConfigError, match=match):
        validate(compose_config(["model=tiny", "debug=default", override]))
