"""LoRA adapters on the policy, through peft (``model.lora``).

With ``model.lora.enabled`` the loaded policy is wrapped by :func:`apply_lora` (a
``peft.PeftModel``): its weights are frozen and only the low-rank adapters train, in every stage
(SFT warm-up, self-labelled warm-up, RL). LoRA: ``W x + (alpha / r) * B A x`` with ``A`` ``[r, in]``
and ``B`` ``[out, r]``, ``B = 0`` at the start (Hu et al., "LoRA: Low-Rank Adaptation of Large
Language Models", arXiv:2106.09685).

What the rest of the run does with an adapter policy:

- **Reference model** (``algo.beta > 0``): :class:`AdapterReference`, the policy itself with its
  adapters switched off (``PeftModel.disable_adapter``): the base model, with no second copy in
  memory.
- **bf16 sampling copy** (``trainer.bf16_sampler``): a plain model holding the merged weights
  ``W + (alpha / r) * B A`` in bf16, refreshed each RL step from the adapters by
  :func:`merged_lora_weights` (:class:`calibrl.rl.rollout.SamplingCopy`). Without it, rollouts are
  sampled through the adapter model under autocast. ``benchmarks/lora.py`` times both.
- **Checkpoints**: the resumable ones hold the adapter weights only (:func:`adapter_state_dict`);
  the final ``checkpoint/`` is a peft adapter directory (``adapter_config.json``,
  ``adapter_model.safetensors``, the tokenizer), loadable with ``PeftModel.from_pretrained`` on
  the base model; ``model.lora.save_merged`` also writes the merged full model to
  ``checkpoint_merged/``.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from calibrl.config import LoraConfig

__all__ = [
    "ALL_LINEAR", "AdapterReference", "adapter_base", "adapter_state_dict", "apply_lora", "check_lora_settings",
    "is_adapter_dir", "is_peft", "linear_layer_names", "load_adapter", "load_adapter_state_dict", "merged_lora_weights",
    "merged_model", "parameter_counts",
]

ALL_LINEAR = "all-linear"


def is_peft(model: Any) -> bool:
    """Whether ``model`` (or the module a DeepSpeed engine wraps) is a ``peft.PeftModel``."""
    from peft import PeftModel

    return isinstance(getattr(model, "module", model), PeftModel)


def check_lora_settings(lora: LoraConfig) -> None:
    """Check the values of ``model.lora`` that need no model (start-up, before data or model).

    Raises:
        ValueError: ``r <= 0``, ``alpha <= 0``, ``dropout`` outside [0, 1), or no target module.
    """
    if lora.r <= 0:
        raise ValueError(f"model.lora.r must be > 0, got {lora.r}")
    if not lora.alpha > 0:
        raise ValueError(f"model.lora.alpha must be > 0, got {lora.alpha}")
    if not 0 <= lora.dropout < 1:
        raise ValueError(f"model.lora.dropout must be in [0, 1), got {lora.dropout}")
    if not lora.target_modules:
        raise ValueError(f"model.lora.target_modules is empty; name linear layers, or [{ALL_LINEAR}]")


def linear_layer_names(model: torch.nn.Module) -> list[str]:
    """The distinct last name parts of ``model``'s ``nn.Linear`` layers, the output head left
    out (what ``model.lora.target_modules`` may name), sorted; e.g. ``['down_proj', 'gate_proj',
    'k_proj', 'o_proj', 'q_proj', 'up_proj', 'v_proj']`` for a Llama."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and m is not head})


def apply_lora(model: torch.nn.Module, lora: LoraConfig) -> Any:
    """Wrap ``model`` (an HF causal LM) in LoRA adapters: a ``peft.PeftModel`` whose base weights
    are frozen and whose adapters (``lora.r``, ``lora.alpha``, ``lora.dropout``) sit on the linear
    layers ``lora.target_modules`` names (each name must match the last part, or a dotted tail,
    of at least one layer's name; ``[all-linear]``: all but the output head).

    Raises:
        ValueError: a bad value (:func:`check_lora_settings`) or a target module that matches no
            linear layer (the message lists the model's linear layer names).
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    check_lora_settings(lora)
    targets = list(lora.target_modules)
    if targets == [ALL_LINEAR]:
        target_modules: str | list[str] = ALL_LINEAR
    else:
        linear = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
        unknown = [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in linear)]
        if unknown:
            raise ValueError(
                f"model.lora.target_modules: {', '.join(map(repr, unknown))} match(es) no linear layer of the model; "
                f"its linear layers are {', '.join(linear_layer_names(model))} (or {ALL_LINEAR})"
            )
        target_modules = targets
    config = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                            target_modules=target_modules, bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def is_adapter_dir(path: str | Path) -> bool:
    """Whether ``path`` is a peft adapter directory (holds ``adapter_config.json``)."""
    return (Path(path).expanduser() / "adapter_config.json").is_file()


def adapter_base(path: str | Path) -> str:
    """The base model an adapter directory was trained on (its ``base_model_name_or_path``).

    Raises:
        ValueError: the adapter config names no base model.
    """
    base = json.loads((Path(path).expanduser() / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{path}: adapter_config.json names no base_model_name_or_path")
    return str(base)


def load_adapter(model: torch.nn.Module, path: str | Path, trainable: bool) -> Any:
    """``model`` (the base) with the peft adapter in ``path`` on top; its adapters train when
    ``trainable`` (a stored warm-up to go on from), else it is for inference."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(Path(path).expanduser()), is_trainable=trainable)


def parameter_counts(model: Any) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts of the policy: peft's
    ``get_nb_trainable_parameters`` for an adapter model, else the parameters that require
    gradients and all parameters (each tensor once, tied weights counted once)."""
    model = getattr(model, "module", model)
    if is_peft(model):
        trainable, total = model.get_nb_trainable_parameters()
        return int(trainable), int(total)
    params = list(model.parameters())  # parameters() yields a tied tensor once
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def _lora_layers(model: Any) -> Iterator[tuple[str, Any]]:
    """``(name in the base model, LoRA layer)`` for each adapted layer of a peft model."""
    from peft.tuners.lora import LoraLayer

    for name, module in getattr(model, "module", model).get_base_model().named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def merged_lora_weights(model: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """For each adapted layer of a peft ``model``: the name of its weight in the plain base model
    (e.g. ``model.layers.0.self_attn.q_proj.weight``) and the merged weight ``W + (alpha / r) B A``
    (``[out, in]``, the base weight's dtype; peft's ``get_delta_weight``), computed without
    touching ``W`` (an in-place merge and unmerge would drift ``W`` by float rounding)."""
    for name, layer in _lora_layers(model):
        (adapter,) = layer.active_adapters
        base = layer.get_base_layer().weight
        yield f"{name}.weight", base + layer.get_delta_weight(adapter).to(base.dtype)


def merged_model(model: Any) -> torch.nn.Module:
    """A plain HF model (a copy) with the adapters of the peft ``model`` merged into its weights;
    ``model`` is left as it is. Memory: one more full model."""
    return copy.deepcopy(getattr(model, "module", model)).merge_and_unload()


def adapter_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """The adapter weights of a peft ``model`` (peft's ``get_peft_model_state_dict``): what a
    resumable checkpoint of a LoRA run holds; the frozen base is reloaded from the model files."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(getattr(model, "module", model))


def load_adapter_state_dict(model: Any, state: dict[str, torch.Tensor]) -> None:
    """Load what :func:`adapter_state_dict` returned into the peft ``model``.

    Raises:
        KeyError: an adapter weight of ``model`` is missing from ``state``.
    """
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(getattr(model, "module", model), state)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing:
        raise KeyError(f"adapter weights missing from the checkpoint: {', '.join(missing[:5])}")


class AdapterReference:
    """The KL reference model of a LoRA run: the policy with its adapters switched off, i.e. the
    frozen base model, sharing its weights (no second copy in memory).

    Called like a model (``ref(input_ids=..., ...)``); every other attribute is the policy's.
    Under :func:`torch.no_grad` (as the trainer calls it) it builds no graph.

    Args:
        policy: the peft policy (``PeftModel``).
    """

    def __init__(self, policy: Any) -> None:
        self.policy = policy

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self.policy.disable_adapter():
            return self.policy(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.policy, name)
