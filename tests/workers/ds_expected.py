"""One update of the ``expected`` calibration path (its loss on the policy forward's KV cache), as
one process (every row) or as one rank of a DeepSpeed data-parallel group (its prompt's rows).
Writes the updated parameters, the gradient norm and the logged calibration loss (rank 0).

The rollout: the scripted completions of ``tests/helpers.py`` with prompt 1's confidence removed,
so under DeepSpeed rank 0 has a confidence context and rank 1 none (it runs the zero-weighted tree
that keeps the ranks' model calls equal). SGD with lr 1, so the parameter change is the clipped
gradient itself (Adam's first step, about lr * sign(g), would magnify float noise).

    python tests/workers/ds_expected.py single OUT
    torchrun --nproc_per_node 2 tests/workers/ds_expected.py zero<stage> OUT
"""

import contextlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: helpers

from calibrl.data.prompts import PromptBuilder  # noqa: E402
from calibrl.data.sources import exact_match  # noqa: E402
from calibrl.distributed import DistInfo, init_distributed  # noqa: E402
from calibrl.models import load_policy  # noqa: E402
from calibrl.rewards import RewardFunction  # noqa: E402
from calibrl.rl.engine import TorchEngine  # noqa: E402
from calibrl.rl.grpo import GRPOTrainer  # noqa: E402
from helpers import EXAMPLES, RLCR, SCRIPTED_TEXTS, format_warm_up, rl_groups, text_rollout, tiny_spec  # noqa: E402

TEXTS = SCRIPTED_TEXTS[:2] + ["<think>12+30-7</think><answer>36</answer>", SCRIPTED_TEXTS[3]]
SHARD_ALL = {"stage3_param_persistence_threshold": 0}  # ZeRO-3 shards every parameter of the tiny model


def main(mode: str, out: str) -> None:
    torch.manual_seed(0)
    model, tok = load_policy(tiny_spec())
    builder = PromptBuilder(tok, "Answer in tags.")
    model = format_warm_up(model, text_rollout(tok, builder))  # some mass on the confidence grid
    rollout = text_rollout(tok, builder, TEXTS)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    if mode == "single":
        engine, info, rows = TorchEngine(model, opt, None, max_grad_norm=1.0), DistInfo(), [0, 1, 2, 3]
    else:
        from calibrl.rl.deepspeed_engine import DeepSpeedEngine, deepspeed_config

        info = init_distributed("gloo")
        cfg = deepspeed_config(stage=int(mode.removeprefix("zero")), offload=False, micro_batch_size=1,
                               accumulation_steps=2, max_grad_norm=1.0)
        cfg["zero_optimization"] |= SHARD_ALL
        cfg["zero_allow_untested_optimizer"] = True  # SGD
        engine = DeepSpeedEngine(model, opt, None, cfg)
        rows = [2 * info.rank, 2 * info.rank + 1]
    trainer = GRPOTrainer(engine, tok, builder, EXAMPLES, lambda a, e: a is not None and exact_match(a, e) >= 1,
                          RewardFunction(RLCR), *rl_groups(calibration="expected", micro_batch_size=1), dist=info)
    share = rollout.select(torch.tensor(rows))
    examples = [EXAMPLES[r // 2] for r in rows[::2]]
    parsed, rewards = trainer.score(share, examples)
    cal = trainer.calibration.prepare(share, parsed, rewards, examples)
    res = trainer.update(share, trainer.advantages(share, parsed, rewards, cal), cal)

    import torch.distributed as dist

    gathered = contextlib.nullcontext()
    if mode == "zero3":
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters(list(engine.module.parameters()))
    inner = getattr(engine.module, "module", engine.module)
    with gathered:
        params = {k: v.detach().clone() for k, v in inner.named_parameters()}
    if not dist.is_initialized() or dist.get_rank() == 0:
        torch.save({"params": params, "grad_norm": res["grad_norm"], "calibration_loss": res["calibration_loss"],
                    "contexts": len(cal.rows)}, out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
