"""LoRA adapters through peft (calibrl.lora): bad settings, the trainable count, the reference
with adapters off, the merged sampling copy and the adapter-only engine state."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from calibrl.config import LoraConfig
from calibrl.lora import (
    AdapterReference, adapter_state_dict, apply_lora, check_lora_settings, linear_layer_names, merged_lora_weights,
    merged_model, parameter_counts,
)
from calibrl.rl.engine import TorchEngine
from calibrl.rl.rollout import SamplingCopy

LLAMA_LINEAR = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def _base(seed: int = 0) -> torch.nn.Module:
    # hidden 32, 4 heads of 8, 2 KV heads (k/v project 32 -> 16), MLP 32 -> 64 -> 32, 2 layers
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def _moved(policy: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """``policy`` with every LoRA B set to random values (B = 0 at init makes the adapters a no-op)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return policy


def _logprobs(model, ids: torch.Tensor) -> torch.Tensor:
    """log p(token t+1 | tokens <= t): ``[B, T-1]``."""
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    return torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])[..., 0]


IDS = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        (dict(r=0), "model.lora.r must be > 0, got 0"),
        (dict(r=-4), "model.lora.r must be > 0, got -4"),
        (dict(alpha=0.0), "model.lora.alpha must be > 0"),
        (dict(dropout=1.0), r"model.lora.dropout must be in \[0, 1\)"),
        (dict(target_modules=[]), "model.lora.target_modules is empty"),
    ],
)
def test_bad_lora_values_are_errors(settings, match):
    with pytest.raises(ValueError, match=match):
        check_lora_settings(LoraConfig(enabled=True, **settings))
    with pytest.raises(ValueError, match=match):
        apply_lora(_base(), LoraConfig(enabled=True, **settings))


def test_unknown_target_module_lists_the_models_linear_layers():
    assert linear_layer_names(_base()) == LLAMA_LINEAR  # lm_head (the output head) is not offered
    with pytest.raises(ValueError) as err:
        apply_lora(_base(), LoraConfig(enabled=True, target_modules=["q_proj", "qkv_proj"]))
    msg = str(err.value)
    assert "'qkv_proj' match(es) no linear layer" in msg and "q_proj" not in msg.split("match")[0]
    assert "down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj (or all-linear)" in msg


def test_trainable_count_is_peft_s_and_worked_out_by_hand():
    policy = apply_lora(_base(), LoraConfig(enabled=True, r=4, target_modules=["q_proj", "v_proj"]))
    # per layer: q_proj 32 -> 32: r*(32+32) = 256; v_proj 32 -> 16: r*(32+16) = 192; 2 layers: 896
    trainable, total = parameter_counts(policy)
    assert trainable == 896
    assert (trainable, total) == tuple(policy.get_nb_trainable_parameters())
    base = _base()
    n = sum(p.numel() for p in base.parameters())
    assert total == n + 896
    assert parameter_counts(base) == (n, n)  # full fine-tuning: every parameter trains
    all_linear = apply_lora(_base(), LoraConfig(enabled=True, r=2))
    # per layer: q 2*(32+32)=128, k 2*(32+16)=96, v 96, o 128, gate 2*(32+64)=192, up 192, down 192: 1024
    assert parameter_counts(all_linear)[0] == 2 * 1024
    assert all(("lora_" in name) == p.requires_grad for name, p in all_linear.named_parameters())


def test_reference_is_the_base_model_with_no_second_copy(tmp_path):
    _base().save_pretrained(tmp_path / "base")
    policy = _moved(apply_lora(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), LoraConfig(enabled=True, r=4)))
    separately_loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    reference = AdapterReference(policy)
    ref, base, pol = _logprobs(reference, IDS), _logprobs(separately_loaded, IDS), _logprobs(policy, IDS)
    torch.testing.assert_close(ref, base, rtol=0, atol=1e-6)
    assert (pol - base).abs().max() > 1e-2  # the adapters do change the policy
    torch.testing.assert_close(_logprobs(policy, IDS), pol, rtol=0, atol=0)  # adapters back on after the call
    ref_params = {id(p) for p in reference.parameters()}
    assert ref_params == {id(p) for p in policy.parameters()}  # shares the policy's tensors


def test_merged_weights_are_w_plus_scaled_ba_and_leave_w_alone():
    policy = _moved(apply_lora(_base(), LoraConfig(enabled=True, r=4, alpha=8.0, target_modules=["q_proj"])))
    q = policy.get_base_model().model.layers[0].self_attn.q_proj
    w_before = q.base_layer.weight.clone()
    merged = dict(merged_lora_weights(policy))
    assert sorted(merged) == ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight"]
    # W + (alpha / r) B A, with alpha / r = 8 / 4 = 2
    expected = w_before + 2.0 * q.lora_B["default"].weight @ q.lora_A["default"].weight
    torch.testing.assert_close(merged["model.layers.0.self_attn.q_proj.weight"], expected)
    assert torch.equal(q.base_layer.weight, w_before)
    plain = merged_model(policy)
    assert not hasattr(plain, "peft_config")
    torch.testing.assert_close(_logprobs(plain, IDS), _logprobs(policy, IDS), rtol=0, atol=1e-5)


def test_sampling_copy_follows_the_adapters_each_refresh():
    policy = apply_lora(_base(), LoraConfig(enabled=True, r=4))
    sampler = SamplingCopy(policy, dtype=torch.float32)  # fp32: the copy must equal the policy
    assert not hasattr(sampler.model, "peft_config")  # a plain model: no adapter matmuls to sample through
    _moved(policy)
    stale = _logprobs(sampler.model, IDS)
    assert (stale - _logprobs(policy, IDS)).abs().max() > 1e-2  # not refreshed yet
    model = sampler.refresh(policy)
    torch.testing.assert_close(_logprobs(model, IDS), _logprobs(policy, IDS), rtol=0, atol=1e-5)
    bf16 = SamplingCopy(policy).refresh(policy)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    assert (_logprobs(bf16, IDS) - _logprobs(policy, IDS)).abs().max() < 0.1


def test_engine_checkpoint_holds_the_adapters_only_and_restores_them(tmp_path):
    policy = _moved(apply_lora(_base(), LoraConfig(enabled=True, r=4)))
    engine = TorchEngine(policy, torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad]))
    engine.save(tmp_path)
    saved = torch.load(tmp_path / "model.pt", weights_only=True)
    assert saved.keys() == adapter_state_dict(policy).keys() and all("lora_" in k for k in saved)
    assert sum(v.numel() for v in saved.values()) == parameter_counts(policy)[0]
    fresh = apply_lora(_base(), LoraConfig(enabled=True, r=4))  # same base, adapters at init
    assert (_logprobs(fresh, IDS) - _logprobs(policy, IDS)).abs().max() > 1e-2
    TorchEngine(fresh, torch.optim.AdamW([p for p in fresh.parameters() if p.requires_grad])).load(tmp_path)
    torch.testing.assert_close(_logprobs(fresh, IDS), _logprobs(policy, IDS), rtol=0, atol=0)
    torch.save({k: v for k, v in saved.items() if "layers.1." not in k}, tmp_path / "model.pt")
    with pytest.raises(KeyError, match="adapter weights missing"):
        TorchEngine(copy.deepcopy(fresh), torch.optim.AdamW(fresh.parameters())).load(tmp_path)
