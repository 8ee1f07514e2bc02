"""Rollouts, completion log-probs, the GRPO update and the SFT batches, on the tiny random Llama.

The tiny model (conf/model/tiny.yaml: 2 layers, hidden 64, SmolLM2's tokenizer) is loaded once
per module; tests that train work on a deep copy so they cannot disturb each other.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from calibrl.models import load_policy
from calibrl.rewards import parse_completion
from calibrl.rl import rollout as rollout_module
from calibrl.rl.rollout import Rollout, _completion_mask, completion_logprobs, generate_rollout
from calibrl.config import ConfidencePolicyConfig, SFTConfig
from calibrl.objectives import COMBINERS, register_combiner, segment_ids
from calibrl.rl.sft import num_sft_steps, sft_batches
from helpers import EOS, EXAMPLES, STOP, hand_rollout, make_trainer, text_rollout, tiny_spec

# --------------------------------------------------------------------------- loading


def test_tiny_model_is_seeded_and_tokenizer_left_pads(tiny):
    model, tok = tiny
    assert tok.padding_side == "left" and tok.pad_token_id == tok.eos_token_id == EOS
    assert model.config.num_hidden_layers == 2 and model.config.vocab_size == len(tok)
    assert next(model.parameters()).dtype == torch.float32
    again, _ = load_policy(tiny_spec())  # same seed -> same random init
    w1 = model.get_input_embeddings().weight
    w2 = again.get_input_embeddings().weight
    assert torch.equal(w1, w2)


def test_tiny_model_is_loaded_in_eval_mode(tiny):
    assert tiny[0].training is False


# --------------------------------------------------------------------------- _completion_mask


def test_completion_mask_hand_cases():
    ids = torch.tensor(
        [
            [5, 7, EOS, 9, 9],  # EOS sampled in the middle: keep up to and including it
            [5, 7, 8, 9, 10],  # no EOS (hit max_new_tokens): keep all
            [5, 7, 8, EOS, EOS],  # ended on the stop string; the EOS is padding: drop it
            [EOS, EOS, EOS, EOS, EOS],  # EOS as the first sampled token: keep just it
            [5, 7, 8, 9, 10],  # ends on the stop string at the length cap, no EOS: keep all
        ]
    )
    texts = ["ab", "abcde", "x</confidence>", "", "y</confidence>"]
    got = _completion_mask(ids, texts, {EOS}, EOS, STOP)
    expected = torch.tensor(
        [
            [1, 1, 1, 0, 0],
            [1, 1, 1, 1, 1],
            [1, 1, 1, 0, 0],
            [1, 0, 0, 0, 0],
            [1, 1, 1, 1, 1],
        ]
    )
    assert torch.equal(got, expected)
    # Without a stop string the trailing EOS of row 2 counts as sampled.
    assert got.dtype == torch.long
    assert _completion_mask(ids[2:3], texts[2:3], {EOS}, EOS, None).tolist() == [[1, 1, 1, 1, 0]]
    # Trailing whitespace after the stop string is tolerated (text.rstrip()).
    assert _completion_mask(ids[2:3], ["x</confidence>\n"], {EOS}, EOS, STOP).tolist() == [[1, 1, 1, 0, 0]]


class FakeLM:
    """Stands in for a causal LM whose decode loop returns fixed completions, padded the way the
    loop pads rows that finished early (with ``pad_token_id``); ``fake_decode`` installs it."""

    def __init__(self, completions: torch.Tensor) -> None:
        self.completions = completions
        self.training = True
        self.device = torch.device("cpu")
        self.calls: list[dict] = []

    def eval(self):
        self.training = False
        return self

    def train(self, mode: bool = True):
        self.training = mode
        return self


@pytest.fixture
def fake_decode(monkeypatch):
    def decode_groups(model, input_ids, attention_mask, group_size, **kwargs):
        model.calls.append(kwargs | {"group_size": group_size})
        return model.completions

    monkeypatch.setattr(rollout_module, "decode_groups", decode_groups)


def _stopped_and_eos_rows(tok, pad_id: int) -> torch.Tensor:
    stop_ids = tok("<confidence>0.5</confidence>", add_special_tokens=False).input_ids  # 9 tokens
    abc = tok("abc", add_special_tokens=False).input_ids  # 1 token
    width = len(stop_ids) + 2
    row0 = stop_ids + [pad_id] * (width - len(stop_ids))  # stopped on the stop string, then padded
    row1 = abc + [tok.eos_token_id] + [pad_id] * (width - len(abc) - 1)  # sampled EOS, then padded
    return torch.tensor([row0, row1])


def test_generate_rollout_masks_stop_string_rows(tiny, builder, fake_decode):
    _, tok = tiny
    fake = FakeLM(_stopped_and_eos_rows(tok, tok.pad_token_id))
    r = generate_rollout(fake, tok, [builder.prompt(EXAMPLES[0])], 2, max_new_tokens=11)
    # row 0: the 9 stop-string tokens, not the padding EOS; row 1: 'abc' and the sampled EOS
    assert r.completion_mask.tolist() == [[1] * 9 + [0] * 2, [1, 1] + [0] * 9]
    assert r.texts == ["<confidence>0.5</confidence>", "abc"]
    assert fake.training is True  # train mode restored
    assert fake.calls[0]["stop_strings"] == [STOP] and fake.calls[0]["pad_token_id"] == tok.pad_token_id


def test_generate_rollout_masks_padding_when_pad_is_not_eos(tiny, builder, fake_decode):
    _, tok = tiny
    tok = copy.deepcopy(tok)
    tok.pad_token = "<|endoftext|>"  # id 0, distinct from EOS (2)
    assert tok.pad_token_id == 0 != tok.eos_token_id
    fake = FakeLM(_stopped_and_eos_rows(tok, tok.pad_token_id))
    r = generate_rollout(fake, tok, [builder.prompt(EXAMPLES[0])], 2, max_new_tokens=11)
    assert r.texts == ["<confidence>0.5</confidence>", "abc"]
    assert r.completion_mask.tolist() == [[1] * 9 + [0] * 2, [1, 1] + [0] * 9]


# --------------------------------------------------------------------------- generate_rollout


@pytest.fixture(scope="module")
def rollout(tiny, builder):
    model, tok = tiny
    torch.manual_seed(0)
    prompts = [builder.prompt(e) for e in EXAMPLES]  # B = 3 prompts of different lengths
    return generate_rollout(model, tok, prompts, 2, max_new_tokens=5)


def test_generate_rollout_layout(tiny, builder, rollout):
    model, tok = tiny
    b, g = 3, 2
    lengths = [len(tok(builder.prompt(e), add_special_tokens=False).input_ids) for e in EXAMPLES]
    p = max(lengths)
    assert len(set(lengths)) > 1  # the prompts really need left padding
    assert rollout.prompt_ids.shape == rollout.prompt_mask.shape == (b * g, p)
    n, length = rollout.completion_ids.shape
    assert n == b * g and 1 <= length <= 5
    assert rollout.completion_mask.shape == (b * g, length)
    assert rollout.group_index.tolist() == [0, 0, 1, 1, 2, 2]
    assert len(rollout.texts) == len(rollout) == b * g
    for m in (rollout.prompt_mask, rollout.completion_mask):
        assert set(m.unique().tolist()) <= {0, 1}
    # prompts: left-padded, the G rows of a group identical
    assert rollout.prompt_mask.sum(dim=1).tolist() == [lengths[i] for i in range(b) for _ in range(g)]
    for i in range(b * g):
        pad = p - lengths[i // g]
        assert rollout.prompt_mask[i, :pad].sum() == 0 and rollout.prompt_mask[i, pad:].all()
        assert torch.equal(rollout.prompt_ids[i], rollout.prompt_ids[g * (i // g)])
        # completion mask is a prefix of ones
        k = int(rollout.completion_mask[i].sum())
        assert k >= 1 and rollout.completion_mask[i, :k].all()
        assert rollout.texts[i] == tok.decode(rollout.completion_ids[i, :k].tolist(), skip_special_tokens=True)


def test_rollout_select_keeps_rows_consistent(rollout):
    sub = rollout.select(torch.tensor([4, 1]))
    assert sub.group_index.tolist() == [2, 0]
    assert sub.texts == [rollout.texts[4], rollout.texts[1]]
    assert torch.equal(sub.completion_ids[0], rollout.completion_ids[4])
    sl = rollout.select(slice(2, 4))
    assert sl.group_index.tolist() == [1, 1] and sl.texts == rollout.texts[2:4]


# --------------------------------------------------------------------------- completion_logprobs


def _mixed_subset(rollout: Rollout) -> Rollout:
    # rows 3, 0, 5, 2 -> groups 1, 0, 2, 1: rows 0 and 3 share a prompt and are not adjacent,
    # and the groups are out of order
    sub = rollout.select(torch.tensor([3, 0, 5, 2]))
    assert sub.group_index.tolist() == [1, 0, 2, 1]
    sub.completion_mask = sub.completion_mask.clone()
    if sub.completion_mask.shape[1] >= 3:
        sub.completion_mask[1, 2:] = 0  # as if row 1 had ended after 2 tokens
    return sub


def test_completion_logprobs_match_an_unpadded_forward(tiny, rollout):
    model, _ = tiny
    sub = _mixed_subset(rollout)
    with torch.no_grad():
        lp = completion_logprobs(model, sub, share_prefix=True)
        assert lp.dtype == torch.float32 and lp.shape == sub.completion_ids.shape
        for i in range(len(sub)):
            # Oracle: one row, no padding, default positions 0..T-1.
            prompt = sub.prompt_ids[i][sub.prompt_mask[i] == 1]
            k = int(sub.completion_mask[i].sum())
            comp = sub.completion_ids[i, :k]
            logits = model(input_ids=torch.cat([prompt, comp])[None]).logits[0]
            # logits at prompt position P-1+t predict completion token t
            ref = torch.log_softmax(logits[len(prompt) - 1 : len(prompt) - 1 + k], dim=-1)
            ref = ref.gather(-1, comp[:, None]).squeeze(-1)
            torch.testing.assert_close(lp[i, :k], ref, atol=1e-4, rtol=0)
            assert (lp[i, :k] <= 0).all()


def test_shared_prefix_equals_plain_forward_values_and_gradients(tiny, rollout):
    model = copy.deepcopy(tiny[0])
    sub = _mixed_subset(rollout)
    mask = sub.completion_mask.float()
    weights = torch.linspace(-1.0, 2.0, mask.numel()).reshape(mask.shape)  # any non-uniform weighting
    params = {
        "embed": model.get_input_embeddings().weight,  # tied with the LM head
        "q_proj0": model.model.layers[0].self_attn.q_proj.weight,  # grads reach the prompt's K/V
        "down_proj1": model.model.layers[1].mlp.down_proj.weight,
    }
    out = {}
    for share in (True, False):
        model.zero_grad(set_to_none=True)
        lp = completion_logprobs(model, sub, share_prefix=share)
        (lp * mask * weights).sum().backward()
        out[share] = (lp.detach() * mask, {k: p.grad.clone() for k, p in params.items()})
    torch.testing.assert_close(out[True][0], out[False][0], atol=1e-4, rtol=0)
    for k in params:
        g_shared, g_plain = out[True][1][k], out[False][1][k]
        assert g_plain.norm() > 0, k
        rel = float((g_shared - g_plain).norm() / g_plain.norm())
        assert rel < 1e-3, (k, rel)


# --------------------------------------------------------------------------- GRPOTrainer.update

def _snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_update_with_zero_advantages_changes_nothing(tiny, builder):
    model, tok = copy.deepcopy(tiny[0]), tiny[1]
    trainer = make_trainer(model, tok, builder)
    before = _snapshot(model)
    out = trainer.update(hand_rollout(tok, builder), torch.zeros(4))
    assert out["loss"] == 0.0 and out["clip_fraction"] == 0.0 and out["grad_norm"] == 0.0
    assert "kl" not in out  # beta == 0: no reference model, no KL logged
    # AdamW's default weight decay (0.01) would move every weight if a step had been taken
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not trainer.engine.optimizer.state


@pytest.mark.parametrize(
    "adv",
    [[1.0, -1.0, 0.5, -0.5], [1.0, 0.0, 0.0, -1.0]],
    ids=["all_nonzero", "some_zero"],
)
def test_update_with_advantages(tiny, builder, adv):
    model, tok = copy.deepcopy(tiny[0]), tiny[1]
    oracle = copy.deepcopy(model)
    rollout = hand_rollout(tok, builder)
    advantages = torch.tensor(adv)
    trainer = make_trainer(model, tok, builder)
    before = _snapshot(model)
    out = trainer.update(rollout, advantages)

    # ppo_epochs=1: ratio == 1, so per-token loss = -A and the token mean is
    #   all_nonzero: -(1*4 - 1*2 + 0.5*3 - 0.5*1) / 10 = -(4 - 2 + 1.5 - 0.5) / 10 = -0.3
    #   some_zero:   -(1*4 + 0*2 + 0*3 - 1*1) / 10     = -(4 - 1) / 10            = -0.3
    # (zero-advantage rows are skipped in the forward but still count in n_tokens = 10)
    assert out["loss"] == pytest.approx(-0.3, abs=1e-6)
    assert out["clip_fraction"] == 0.0
    assert math.isfinite(out["grad_norm"]) and out["grad_norm"] > 0

    # grad_norm is the pre-clip norm of d/dθ [-(1/10) Σ_i A_i Σ_t logp_it] (the gradient of the
    # ratio at 1 is the gradient of logp), computed here with one plain forward on a copy.
    logp = completion_logprobs(oracle, rollout, share_prefix=False)
    (-(advantages[:, None] * logp * rollout.completion_mask).sum() / 10).backward()
    ref_norm = torch.sqrt(sum((p.grad**2).sum() for p in oracle.parameters() if p.grad is not None))
    assert out["grad_norm"] == pytest.approx(float(ref_norm), rel=1e-3)

    changed = [k for k, v in model.state_dict().items() if not torch.equal(before[k], v)]
    assert "model.embed_tokens.weight" in changed and "model.layers.0.self_attn.q_proj.weight" in changed
    assert len(trainer.engine.optimizer.state) > 0


def test_update_with_token_advantages(tiny, builder):
    rollout = hand_rollout(tok := tiny[1], builder)
    per_row = torch.tensor([1.0, -1.0, 0.5, 0.0])
    # Per-token advantages equal to the per-row ones give the same update.
    a = make_trainer(copy.deepcopy(tiny[0]), tok, builder).update(rollout, per_row)
    b = make_trainer(copy.deepcopy(tiny[0]), tok, builder).update(rollout, per_row[:, None].expand(4, 5).clone())
    assert a["loss"] == pytest.approx(b["loss"], abs=1e-7) and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    # Credit on some tokens only. Row lengths are 4, 2, 3, 1 (n_tokens = 10); ratio 1, so the token
    # mean is -(sum of A over completion tokens) / 10 = -((1 + 1) + (-2) + 0 + 0) / 10 = 0.0 ...
    adv = torch.zeros(4, 5)
    adv[0, :2], adv[1, 1] = 1.0, -2.0
    out = make_trainer(copy.deepcopy(tiny[0]), tok, builder).update(rollout, adv)
    assert out["loss"] == pytest.approx(0.0, abs=1e-7) and out["grad_norm"] > 0
    # ... and advantages on padding (row 1 has 2 tokens; position 4 is padding) change nothing.
    adv[1, 4] = 100.0
    again = make_trainer(copy.deepcopy(tiny[0]), tok, builder).update(rollout, adv)
    assert again["loss"] == pytest.approx(out["loss"], abs=1e-7)
    assert again["grad_norm"] == pytest.approx(out["grad_norm"], rel=1e-5)


def test_segment_combiner_puts_calibration_credit_after_the_answer(tiny, builder):
    tok = tiny[1]
    texts = [
        "<think>a</think><answer>5</answer><confidence>0.9</confidence>",  # right, q 0.9
        "<think>a</think><answer>6</answer><confidence>0.0</confidence>",  # wrong, q 0.0
        "<think>a</think><answer>5</answer><confidence>0.5</confidence>",  # identical pair:
        "<think>a</think><answer>5</answer><confidence>0.5</confidence>",  # exact zeros
    ]
    rollout = text_rollout(tok, builder, texts, (EXAMPLES[0], EXAMPLES[2]))
    trainer = make_trainer(copy.deepcopy(tiny[0]), tok, builder, combine="segment")
    examples = [EXAMPLES[0], EXAMPLES[0], EXAMPLES[2], EXAMPLES[2]]
    from calibrl.rewards.scoring import score_completions

    parsed, rewards = score_completions(texts, examples, trainer.is_correct, trainer.reward_fn, builder.fmt)
    adv = trainer.advantages(rollout, parsed, rewards)
    # Group 0: accuracy [1, 0] -> mean 0.5, unbiased std sqrt(0.5) -> [+1/sqrt2, -1/sqrt2];
    # calibration (Brier) [-(0.9-1)^2, -(0.0-0)^2] = [-0.01, 0] -> [-1/sqrt2, +1/sqrt2]; format
    # constant -> 0. So row 0 gets +0.7071 up to </answer> and -0.7071 after it; row 1 the reverse.
    h = 2 ** -0.5
    for row, (before, after) in enumerate([(h, -h), (-h, h)]):
        n = int(rollout.completion_mask[row].sum())
        cut = len(tok(texts[row].split("<confidence>")[0], add_special_tokens=False).input_ids)
        values = adv[row, :n]
        # the token that straddles '</answer>' and '<confidence>' (SmolLM2 merges '><') is in segment 0
        assert torch.allclose(values[: cut - 1], torch.full((cut - 1,), before), atol=1e-6)
        assert torch.allclose(values[cut:], torch.full((n - cut,), after), atol=1e-6)
    assert torch.equal(adv[2:], torch.zeros_like(adv[2:]))
    # `sum` on the same batch: one advantage per completion, on every token:
    # totals [1 - 0.01 + 0.5, 0 + 0 + 0.5] = [1.49, 0.5] -> [+0.495, -0.495].
    trainer.objective.combine = "sum"
    adv_sum = trainer.advantages(rollout, parsed, rewards)
    assert torch.allclose(adv_sum[0, :3], torch.full((3,), 0.495), atol=1e-6)
    assert torch.allclose(adv_sum[1, :3], torch.full((3,), -0.495), atol=1e-6)


# Two groups whose rewards differ (RLCR weights: correctness 1, brier 1, format 0.5; both
# questions' answer is 5). Components (correctness, brier, format):
#   row 0: right, q 0.3 -> (1, -(0.3 - 1)^2 = -0.49, 1)   total 1 - 0.49 + 0.5 = 1.01
#   row 1: wrong, q 0.1 -> (0, -(0.1 - 0)^2 = -0.01, 1)   total 0 - 0.01 + 0.5 = 0.49
#   row 2: right, q 0.5 -> (1, -0.25, 1)                  total 1.25
#   row 3: no confidence: a format failure -> (0, -1, 0)  total -1
COMBINER_TEXTS = [
    "<think>a</think><answer>5</answer><confidence>0.3</confidence>",
    "<think>a</think><answer>6</answer><confidence>0.1</confidence>",
    "<think>a</think><answer>5</answer><confidence>0.5</confidence>",
    "<think>a</think><answer>5</answer>",
]


def _combiner_expected(combine: str, segments: torch.Tensor) -> torch.Tensor:
    """Advantages ``[4, L]`` of COMBINER_TEXTS worked out by hand (``segments``: 0 up to
    ``</answer>``, 1 after it, -1 on padding).

    A group of two values a > b group-normalises (mean, unbiased std) to [+h, -h], h = 1/sqrt(2):
    the deviations are +-(a-b)/2 and the std is sqrt(2 * ((a-b)/2)^2 / 1) = (a-b)/sqrt(2).
    - sum (no std scaling): group 0 totals [1.01, 0.49], mean 0.75 -> [+0.26, -0.26];
      group 1 [1.25, -1], mean 0.125 -> [+1.125, -1.125]; on every token.
    - normalize_then_sum: group 0: accuracy [1, 0] -> [+h, -h], calibration [-0.49, -0.01] ->
      [-h, +h], format constant -> 0; sum [0, 0]. Group 1: accuracy, calibration and format all
      favour row 2 -> [+3h, -3h]; on every token.
    - segment: group 0: row 0 gets accuracy +h up to </answer>, calibration -h after it; row 1
      the reverse (-h, then +h). Group 1: row 2 gets accuracy + format = 2h before and
      calibration + format = 2h after; row 3 has nothing after </answer>, so its whole sequence
      takes accuracy + calibration + format = -3h.
    """
    h = 2 ** -0.5
    per_row = {"sum": [0.26, -0.26, 1.125, -1.125], "normalize_then_sum": [0.0, 0.0, 3 * h, -3 * h]}
    tokens = segments >= 0
    if combine in per_row:
        return torch.where(tokens, torch.tensor(per_row[combine])[:, None], 0.0)
    before = torch.tensor([h, -h, 2 * h, -3 * h])[:, None]
    after = torch.tensor([-h, h, 2 * h, -3 * h])[:, None]
    return torch.where(segments == 0, before, torch.where(segments == 1, after, 0.0))


@pytest.mark.parametrize("combine", ["sum", "normalize_then_sum", "segment"])
def test_every_combiner_gives_the_hand_worked_advantages(tiny, builder, combine):
    tok = tiny[1]
    rollout = text_rollout(tok, builder, COMBINER_TEXTS, (EXAMPLES[0], EXAMPLES[2]))
    trainer = make_trainer(copy.deepcopy(tiny[0]), tok, builder, combine=combine)
    parsed, rewards = trainer.score(rollout, [EXAMPLES[0], EXAMPLES[2]])
    assert rewards.total.tolist() == pytest.approx([1.01, 0.49, 1.25, -1.0])
    adv = trainer.advantages(rollout, parsed, rewards)
    segments = segment_ids(tok, rollout.completion_ids, rollout.completion_mask, rollout.texts, parsed)
    assert (segments[:3] == 1).any(dim=1).all() and not (segments[3] == 1).any()  # the layout the comment assumes
    assert torch.allclose(adv, _combiner_expected(combine, segments), atol=1e-5)
    # ppo_epochs=1: ratio 1, so the token-mean loss is -(sum of A over completion tokens) / tokens.
    out = trainer.update(rollout, adv)
    mask = rollout.completion_mask
    assert out["loss"] == pytest.approx(float(-(adv * mask).sum() / mask.sum()), abs=1e-5)
    assert out["grad_norm"] > 0


def test_a_combiner_that_declares_segments_gets_them_without_a_trainer_edit(tiny, builder, monkeypatch):
    monkeypatch.setattr(COMBINERS, "_items", dict(COMBINERS._items))  # the registrations end with the test
    seen = {}

    def spy(name):
        def combine(rewards, names, weights, group_index, segments, *, scale=False, std_floor=1e-4):
            seen[name] = segments
            return torch.zeros(segments.shape)
        return combine

    register_combiner("spy_tokens", needs_segments=True)(spy("spy_tokens"))
    register_combiner("spy_rows")(spy("spy_rows"))
    tok = tiny[1]
    rollout = text_rollout(tok, builder, COMBINER_TEXTS, (EXAMPLES[0], EXAMPLES[2]))
    for name in ("spy_tokens", "spy_rows"):
        trainer = make_trainer(copy.deepcopy(tiny[0]), tok, builder, combine=name)
        parsed, rewards = trainer.score(rollout, [EXAMPLES[0], EXAMPLES[2]])
        trainer.advantages(rollout, parsed, rewards)
    real = segment_ids(tok, rollout.completion_ids, rollout.completion_mask, rollout.texts, parsed, builder.fmt.answer)
    assert torch.equal(seen["spy_tokens"], real) and (real == 1).any()
    assert torch.equal(seen["spy_rows"], rollout.completion_mask.long() - 1)  # one segment per row


def test_update_more_epochs_reports_clipping(tiny, builder):
    # With 2 epochs at lr 1e-3 the policy moves away from the sampling policy, the ratio leaves 1,
    # and the clip bookkeeping stays a fraction.
    model, tok = copy.deepcopy(tiny[0]), tiny[1]
    trainer = make_trainer(model, tok, builder, ppo_epochs=2, clip_low=0.0, clip_high=0.0)
    out = trainer.update(hand_rollout(tok, builder), torch.tensor([1.0, -1.0, 0.5, -0.5]))
    # eps = 0: any ratio != 1 in the direction the advantage favours is clipped
    assert 0.0 < out["clip_fraction"] <= 1.0
    assert math.isfinite(out["loss"]) and math.isfinite(out["grad_norm"])


def test_step_on_random_model_scores_format_failures(tiny, builder):
    model, tok = copy.deepcopy(tiny[0]), tiny[1]
    trainer = make_trainer(model, tok, builder)
    before = _snapshot(model)
    torch.manual_seed(0)
    m = trainer.step()
    # 6 random tokens never form '<answer>..</answer><confidence>..</confidence>': every completion
    # is a format failure, total = 1*0 (correctness) + 1*(-1) (brier) + 0.5*0 (format) = -1.
    assert m["rewards/total/mean"] == -1.0 and m["train/format_rate"] == 0.0
    assert m["train/zero_std_groups"] == 1.0 and m["train/advantage_abs_mean"] == 0.0
    assert m["train/loss"] == 0.0 and m["train/grad_norm"] == 0.0
    assert 1.0 <= m["train/completion_length"] <= 6.0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_trainer_rejects_bad_values(tiny, builder):
    model, tok = tiny
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        make_trainer(model, tok, builder, group_size=1)
    with pytest.raises(ValueError, match="beta > 0 needs a reference model"):
        make_trainer(model, tok, builder, beta=0.1)


# --------------------------------------------------------------------------- sft_batches


def test_sft_batches_label_only_the_demonstration(tiny, builder):
    _, tok = tiny
    sft = SFTConfig(num_examples=3, epochs=1, batch_size=3, confidence=ConfidencePolicyConfig(policy="constant", value=0.7))
    batches = list(sft_batches(tok, builder, EXAMPLES, sft, seed=0))
    assert len(batches) == 1 == num_sft_steps(len(EXAMPLES), sft)  # ceil(3 / 3) * 1 epoch
    batch = batches[0]
    ids, attn, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.shape == attn.shape == labels.shape and ids.shape[0] == 3
    prompt_ids = {tuple(tok(builder.prompt(e), add_special_tokens=False).input_ids): e for e in EXAMPLES}
    seen = set()
    for row_ids, row_attn, row_labels in zip(ids, attn, labels):
        end = int(row_attn.sum())
        assert row_attn[:end].all() and not row_attn[end:].any()  # right padding
        assert (row_labels[end:] == -100).all() and (row_ids[end:] == tok.pad_token_id).all()
        start = int((row_labels != -100).int().argmax())  # first labelled token
        assert (row_labels[:start] == -100).all()
        example = prompt_ids[tuple(row_ids[:start].tolist())]  # the unlabelled part is exactly the prompt
        seen.add(example.id)
        assert torch.equal(row_labels[start:end], row_ids[start:end])
        assert int(row_ids[end - 1]) == tok.eos_token_id  # the demonstration teaches stopping
        parsed = parse_completion(tok.decode(row_ids[start:end].tolist(), skip_special_tokens=True))
        assert parsed.format_ok and parsed.answer == example.answer and parsed.confidence == 0.7
    assert seen == {"e0", "e1", "e2"}
    assert len({int(a.sum()) for a in attn}) > 1  # rows of different lengths: padding was exercised


def test_sft_batches_epochs_and_errors(tiny, builder):
    _, tok = tiny
    sft = SFTConfig(num_examples=3, epochs=2, batch_size=2, confidence=ConfidencePolicyConfig(policy="uniform"))
    batches = list(sft_batches(tok, builder, EXAMPLES, sft, seed=1))
    # 2 epochs x ceil(3 / 2) = 4 batches of sizes 2, 1, 2, 1
    assert [b["input_ids"].shape[0] for b in batches] == [2, 1, 2, 1] and num_sft_steps(3, sft) == 4
    with pytest.raises(KeyError, match="valid choices: constant, mixed, uniform"):
        next(sft_batches(tok, builder, EXAMPLES, SFTConfig(confidence=ConfidencePolicyConfig(policy="nope"))))
    with pytest.raises(ValueError, match="no SFT examples"):
        next(sft_batches(tok, builder, [], SFTConfig()))


def test_dropping_zero_advantage_groups_changes_only_the_normaliser(tiny, builder):
    rollout = hand_rollout(tok := tiny[1], builder)  # groups [0, 0, 1, 1], lengths 4, 2, 3, 1
    adv = torch.tensor([1.0, -1.0, 0.0, 0.0])  # group 1 is all zero
    kept = make_trainer(copy.deepcopy(tiny[0]), tok, builder).update(rollout, adv)
    dropped = make_trainer(copy.deepcopy(tiny[0]), tok, builder, drop_zero_adv_groups=True).update(rollout, adv)
    # token mean: -(1*4 - 1*2) / 10 tokens = -0.2 with every group counted; -(4 - 2) / 6 tokens
    # (group 0 only) = -1/3 with the zero group dropped.
    assert kept["loss"] == pytest.approx(-0.2, abs=1e-6)
    assert dropped["loss"] == pytest.approx(-1 / 3, abs=1e-6)


def test_zero_adv_group_fraction():
    from calibrl.rl.grpo import _zero_adv_group_fraction

    adv = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 0.5], [0.0, 0.0]])
    # group 0 (rows 0, 1) all zero; group 1 (rows 2, 3) has 0.5 -> 1 of 2 groups
    assert _zero_adv_group_fraction(adv, torch.tensor([0, 0, 1, 1])) == 0.5
