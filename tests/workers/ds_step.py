"""One training step of a tiny Llama, as one process (TorchEngine, all rows) or as one rank of a
DeepSpeed data-parallel group (its share of the rows). Writes the updated parameters (rank 0).

    python tests/workers/ds_step.py single OUT
    torchrun --nproc_per_node 2 tests/workers/ds_step.py zero<stage> OUT
"""

import contextlib
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from calibrl.distributed import init_distributed
from calibrl.rl.engine import TorchEngine

ROWS, LENGTH, MICRO = 8, 6, int(__import__("os").environ.get("MICRO", 2))
# ZeRO-3 keeps parameters under 1e5 elements whole on every rank by default; this model's are all
# smaller, so without this setting stage 3 would shard nothing.
SHARD_ALL = {"stage3_param_persistence_threshold": 0}


def model_and_data():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=32)
    model = LlamaForCausalLM(cfg)
    ids = torch.randint(0, 64, (ROWS, LENGTH))
    mask = torch.ones(ROWS, LENGTH, dtype=torch.long)
    mask[::3, 4:] = 0  # rows of different lengths: the global token count matters
    return model, ids, mask


def token_loss_sum(model, ids, mask):
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, 64), ids[:, 1:].reshape(-1), reduction="none")
    return (ce * mask[:, 1:].reshape(-1)).sum()


def main(mode: str, out: str) -> None:
    model, ids, mask = model_and_data()
    n_tokens = float(mask[:, 1:].sum())  # global normaliser
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    if mode == "single":
        engine, rows, scale = TorchEngine(model, opt, None, max_grad_norm=1.0), range(ROWS), 1.0
    else:
        from calibrl.rl.deepspeed_engine import DeepSpeedEngine, deepspeed_config

        info = init_distributed("gloo")
        share = ROWS // info.world_size
        cfg = deepspeed_config(stage=int(mode.removeprefix("zero")), offload=False, micro_batch_size=MICRO,
                               accumulation_steps=-(-share // MICRO), max_grad_norm=1.0)
        cfg["zero_optimization"] |= SHARD_ALL
        engine = DeepSpeedEngine(model, opt, None, cfg)
        rows, scale = range(info.rank * share, (info.rank + 1) * share), float(info.world_size)
    rows = list(rows)
    for i in range(0, len(rows), MICRO):
        r = rows[i : i + MICRO]
        engine.backward(token_loss_sum(engine.module, ids[r], mask[r]) / n_tokens * scale)
    norm = engine.step()
    import torch.distributed as dist

    gathered = contextlib.nullcontext()
    if mode == "zero3":  # sharded parameters: gather them (collective) to read them
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters(list(engine.module.parameters()))
    inner = getattr(engine.module, "module", engine.module)  # the HF model inside DeepSpeed's engine
    with gathered:
        params = {k: v.detach().clone() for k, v in inner.named_parameters()}
    if not dist.is_initialized() or dist.get_rank() == 0:
        torch.save({"params": params, "grad_norm": norm}, out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
