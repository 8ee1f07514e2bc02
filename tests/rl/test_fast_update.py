"""The fast policy update: padding-free completion log-probs and length-bucketed micro-batches.

Every fast path is checked against the plain computation it replaces, in float32 on the tiny
random Llama (conf/model/tiny.yaml): ``log_softmax`` over the full ``[N, P+L, V]`` logits of a
``[prompt | completion]`` forward, and one micro-batch in the rollout's order.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from omegaconf import OmegaConf
from torch.utils._python_dispatch import TorchDispatchMode

import calibrl.rl.rollout as rollout_mod
from calibrl.models import ModelSpec, load_policy
from calibrl.rewards import RewardFunction
from calibrl.rl.engine import TorchEngine
from calibrl.rl.grpo import GRPOTrainer
from calibrl.rl.rollout import Rollout, _SelectedLogSoftmax, completion_logprobs
from calibrl.cli import CONF_DIR
from helpers import rl_groups

PAD = 2
# Rows of the test rollout: (group, prompt tokens, completion tokens). Groups of different prompt
# lengths, completions of different lengths, rows of a group not adjacent.
ROWS = [(0, 7, 5), (1, 4, 1), (0, 7, 2), (2, 6, 6), (1, 4, 4), (2, 6, 3)]


@pytest.fixture(scope="module")
def tiny():
    fields = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "model" / "tiny.yaml"))
    spec = ModelSpec(**fields, cache_dir=os.environ.get("CALIBRL_CACHE", "~/.cache/calibrl") + "/models")
    return load_policy(spec)[0]


def _rollout(vocab: int, rows=ROWS, prompt_pad: int = 2, completion_pad: int = 3) -> Rollout:
    """Random tokens laid out as generate_rollout lays them out, with ``prompt_pad`` padding
    columns left of the longest prompt and ``completion_pad`` right of the longest completion
    (padding in every row, which completion_logprobs may drop)."""
    gen = torch.Generator().manual_seed(0)
    p = max(r[1] for r in rows) + prompt_pad
    length = max(r[2] for r in rows) + completion_pad
    prompts = {g: torch.randint(3, vocab, (n,), generator=gen) for g, n, _ in rows}
    prompt_ids = torch.full((len(rows), p), PAD)
    prompt_mask = torch.zeros((len(rows), p), dtype=torch.long)
    completion_ids = torch.full((len(rows), length), PAD)
    completion_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, (g, n, k) in enumerate(rows):
        prompt_ids[i, p - n :], prompt_mask[i, p - n :] = prompts[g], 1
        completion_ids[i, :k], completion_mask[i, :k] = torch.randint(3, vocab, (k,), generator=gen), 1
    return Rollout(prompt_ids, prompt_mask, completion_ids, completion_mask, [""] * len(rows),
                   torch.tensor([r[0] for r in rows]))


def _reference_logprobs(model, r: Rollout) -> torch.Tensor:
    """float32 [N, L]: log_softmax of the full logits of one padded [prompt | completion] forward,
    read at the position before each completion token; 0 where the mask is 0."""
    p = r.prompt_ids.shape[1]
    attn = torch.cat([r.prompt_mask, r.completion_mask], dim=1)
    logits = model(input_ids=torch.cat([r.prompt_ids, r.completion_ids], dim=1), attention_mask=attn,
                   position_ids=(attn.cumsum(1) - 1).clamp_min(0)).logits  # [N, P+L, V]
    lp = torch.log_softmax(logits[:, p - 1 : -1].float(), dim=-1).gather(-1, r.completion_ids[..., None])[..., 0]
    return lp * r.completion_mask


@pytest.mark.parametrize("share_prefix", [True, False])
def test_completion_logprobs_equal_full_log_softmax_values_and_gradients(tiny, share_prefix):
    model = copy.deepcopy(tiny)
    r = _rollout(model.config.vocab_size)
    weights = torch.linspace(-1.0, 2.0, r.completion_mask.numel()).reshape(r.completion_mask.shape)
    out = {}
    for name, fn in [("fast", lambda: completion_logprobs(model, r, share_prefix=share_prefix)),
                     ("reference", lambda: _reference_logprobs(model, r))]:
        model.zero_grad(set_to_none=True)
        lp = fn()
        (lp * weights * r.completion_mask).sum().backward()
        out[name] = lp.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}
    lp, grads = out["fast"]
    assert lp.dtype == torch.float32 and lp.shape == r.completion_mask.shape  # full width, padding included
    assert torch.equal(lp[r.completion_mask == 0], torch.zeros(int((r.completion_mask == 0).sum())))
    torch.testing.assert_close(lp, out["reference"][0], atol=1e-5, rtol=0)
    for k, g in out["reference"][1].items():
        torch.testing.assert_close(grads[k], g, atol=1e-5, rtol=1e-4, msg=k)


def test_lm_head_runs_on_completion_positions_only(tiny):
    """The head sees one row per predicted token (plus each distinct prompt's last position) and
    no float32 [*, V] tensor has more rows than there are completion tokens."""
    model, r = tiny, _rollout(tiny.config.vocab_size)
    vocab, hidden, n_tokens = model.config.vocab_size, model.config.hidden_size, int(r.completion_mask.sum())
    head_rows = []
    hook = model.get_output_embeddings().register_forward_hook(
        lambda m, args, out: head_rows.append(args[0].shape[:-1].numel()))

    class WidestVocabTensor(TorchDispatchMode):
        rows = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                # [H, V]: the head weight's gradient, computed transposed
                if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.ndim and t.shape[-1] == vocab \
                        and t.shape[:-1] != (hidden,):
                    self.rows = max(self.rows, t.shape[:-1].numel())
            return out

    try:
        with WidestVocabTensor() as seen:
            completion_logprobs(model, r).sum().backward()
    finally:
        hook.remove()
    n_prompts = len(torch.unique(r.group_index))
    starts = int(r.completion_mask[:, 0].sum())  # tokens 0 come from the prompts' last positions
    assert head_rows == [n_prompts, n_tokens - starts]
    assert seen.rows <= n_tokens < r.completion_mask.numel()  # the old path made [N, L, V]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_selected_log_softmax_equals_autograd_of_the_plain_expression(monkeypatch, dtype):
    monkeypatch.setattr(rollout_mod, "_LOGSOFTMAX_BLOCK", 3 * 50)  # 3 rows per block: 7 rows = 3 blocks
    gen = torch.Generator().manual_seed(0)
    logits = (4 * torch.randn(7, 50, generator=gen)).to(dtype).requires_grad_()
    targets = torch.randint(0, 50, (7,), generator=gen)
    grad = torch.randn(7, generator=gen)
    fast = _SelectedLogSoftmax.apply(logits, targets)
    (g_fast,) = torch.autograd.grad(fast, logits, grad)
    plain = torch.log_softmax(logits.float(), dim=-1).gather(1, targets[:, None])[:, 0]
    (g_plain,) = torch.autograd.grad(plain, logits, grad)
    assert fast.dtype == torch.float32 and g_fast.dtype == dtype
    torch.testing.assert_close(fast, plain, atol=1e-6, rtol=0)
    torch.testing.assert_close(g_fast, g_plain, atol=1e-6, rtol=0)


def test_a_model_with_logit_soft_capping_keeps_it():
    """A boolean logits_to_keep runs the model's own head and post-processing (Gemma 2 caps its
    logits with tanh), so no model needs a slow path."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, final_logit_softcapping=0.01,
                          attn_implementation="eager")
    model = Gemma2ForCausalLM(config)
    r = _rollout(config.vocab_size)
    with torch.no_grad():
        ref = _reference_logprobs(model, r)
        config.final_logit_softcapping = None
        uncapped = _reference_logprobs(model, r)
        config.final_logit_softcapping = 0.01
        for share_prefix in (True, False):
            torch.testing.assert_close(completion_logprobs(model, r, share_prefix=share_prefix), ref, atol=1e-5, rtol=0)
    assert (ref - uncapped).abs().max() > 0.05  # the cap matters at this scale


# --------------------------------------------------------------------------- bucketing


def _hand(lengths: list[int], groups: list[int], prompt: int) -> Rollout:
    rows = [(g, prompt, k) for g, k in zip(groups, lengths)]
    return _rollout(100, rows, prompt_pad=0, completion_pad=0)


def test_bucket_order_picks_the_cheaper_cut():
    # lengths [5, 1, 5, 1], groups [0, 0, 1, 1], prompts of 3 tokens, 2 rows per micro-batch:
    #   as given:  (2*5 + 1 prompt*3) + (2*5 + 1*3)       = 13 + 13 = 26 tokens
    #   by length: rows 0, 2: (2*5 + 2*3); rows 1, 3: (2*1 + 2*3) = 16 + 8 = 24 -> by length
    assert GRPOTrainer._bucket_order(_hand([5, 1, 5, 1], [0, 0, 1, 1], 3), 2).tolist() == [0, 2, 1, 3]
    # prompts of 10 tokens: as given 2 * (10 + 10) = 40; by length (10 + 20) + (2 + 20) = 52 -> as given
    assert GRPOTrainer._bucket_order(_hand([5, 1, 5, 1], [0, 0, 1, 1], 10), 2).tolist() == [0, 1, 2, 3]
    # already sorted: a tie, the given order stays
    assert GRPOTrainer._bucket_order(_hand([5, 5, 1, 1], [0, 1, 0, 1], 3), 2).tolist() == [0, 1, 2, 3]


# 3 groups x 3 rows, lengths chosen so that micro-batches of 2 are cut by length.
BUCKET_ROWS = [(0, 5, 9), (0, 5, 1), (0, 5, 8), (1, 3, 2), (1, 3, 9), (1, 3, 1), (2, 4, 7), (2, 4, 2), (2, 4, 9)]


def _update_grads(tiny, rollout: Rollout, advantages: torch.Tensor, micro_batch_size: int, **settings):
    """(metrics, [per optimizer step {name: grad}]) of one GRPOTrainer.update on a copy of tiny."""
    model = copy.deepcopy(tiny)
    s = rl_groups(group_size=3, prompts_per_step=3, max_new_tokens=12, micro_batch_size=micro_batch_size,
                         **settings)
    engine = TorchEngine(model, torch.optim.AdamW(model.parameters(), lr=1e-3), max_grad_norm=1.0)
    reference = copy.deepcopy(tiny) if s[0].beta > 0 else None
    trainer = GRPOTrainer(engine, None, None, [None], lambda a, e: False, RewardFunction({"format": 1.0}), *s,
                          reference=reference)
    grads, step = [], engine.step

    def recording_step() -> float:
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
        return step()

    engine.step = recording_step
    return trainer.update(rollout, advantages), grads


@pytest.mark.parametrize(
    "settings, per_token",
    [
        (dict(loss_agg="token_mean"), False),
        (dict(loss_agg="seq_mean_token_mean"), True),
        (dict(loss_agg="constant", ppo_epochs=2), True),  # old log-probs cut the same way
        (dict(beta=0.1), False),  # reference log-probs cut the same way
    ],
    ids=["token_mean", "seq_mean_token_token_adv", "constant_2_epochs", "kl"],
)
def test_bucketed_update_equals_one_micro_batch(tiny, settings, per_token):
    r = _rollout(tiny.config.vocab_size, BUCKET_ROWS)
    assert GRPOTrainer._bucket_order(r, 2).tolist() != list(range(len(r)))  # bucketing is exercised
    gen = torch.Generator().manual_seed(1)
    adv = torch.randn(r.completion_mask.shape if per_token else (len(r),), generator=gen)
    if per_token:
        adv = adv * r.completion_mask
    one, one_grads = _update_grads(tiny, r, adv, micro_batch_size=len(r), **settings)
    cut, cut_grads = _update_grads(tiny, r, adv, micro_batch_size=2, **settings)
    assert cut["loss"] == pytest.approx(one["loss"], rel=1e-5, abs=1e-7)
    assert cut["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-5)
    assert len(cut_grads) == len(one_grads) == settings.get("ppo_epochs", 1)
    for a, b in zip(cut_grads, one_grads):
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-4, msg=k)



def test_gradient_checkpointing_gives_the_same_update(tiny, monkeypatch):
    """trainer.gradient_checkpointing: HF drops the KV cache in training mode, so the update takes
    the plain forward; loss and gradients equal those without checkpointing."""
    r = _rollout(tiny.config.vocab_size)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 0.25, 2.0])
    plain, plain_grads = _update_grads(tiny, r, adv, micro_batch_size=3)
    original = copy.deepcopy

    def checkpointed_copy(obj, *args):  # _update_grads trains a deepcopy of the model
        out = original(obj, *args)
        if obj is tiny:
            out.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            assert out.is_activation_checkpointing
        return out

    monkeypatch.setattr(copy, "deepcopy", checkpointed_copy)
    ckpt, ckpt_grads = _update_grads(tiny, r, adv, micro_batch_size=3)
    assert ckpt["loss"] == pytest.approx(plain["loss"], rel=1e-5)
    for k in plain_grads[0]:
        torch.testing.assert_close(ckpt_grads[0][k], plain_grads[0][k], atol=1e-6, rtol=1e-4, msg=k)
