"""Generation under ZeRO-3 (one rank of 2): inside ``DeepSpeedEngine.generation()`` each rank
generates greedily with its *own* length (rank r: 3 + 10 r new tokens, so a per-token collective
would deadlock), before and after one update. Writes, per rank, whether the tokens equal those of
an unsharded copy of the same weights.

    torchrun --nproc_per_node 2 tests/workers/ds_generate.py OUT_PREFIX
"""

import copy
import json
import sys

import torch
from ds_step import MICRO, ROWS, SHARD_ALL, model_and_data, token_loss_sum

from calibrl.distributed import init_distributed
from calibrl.rl.deepspeed_engine import DeepSpeedEngine, deepspeed_config


def main(out: str) -> None:
    info = init_distributed("gloo")
    model, ids, mask = model_and_data()
    unsharded = copy.deepcopy(model)  # same initial weights, never sharded
    share = ROWS // info.world_size
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    cfg = deepspeed_config(stage=3, offload=False, micro_batch_size=MICRO, accumulation_steps=-(-share // MICRO),
                           max_grad_norm=1.0)
    cfg["zero_optimization"] |= SHARD_ALL
    engine = DeepSpeedEngine(model, opt, None, cfg)
    n_new = 3 + 10 * info.rank
    prompt = dict(input_ids=ids[:2, :3], attention_mask=mask[:2, :3], max_new_tokens=n_new, min_new_tokens=n_new,
                  do_sample=False, pad_token_id=0)
    result = {}
    for when in ("before", "after"):
        with engine.generation():
            tokens = engine.module.generate(**prompt)
            if when == "after":  # the updated weights, gathered: rebuild the unsharded copy from them
                unsharded.load_state_dict({k: v.detach().clone() for k, v in engine.module.module.state_dict().items()})
        expected = unsharded.generate(**prompt)
        result[when] = {"shape": list(tokens.shape), "equal": bool(torch.equal(tokens, expected))}
        if when == "before":  # one update from this rank's rows (collective forward/backward)
            rows = list(range(info.rank * share, (info.rank + 1) * share))
            for i in range(0, share, MICRO):
                r = rows[i : i + MICRO]
                engine.backward(token_loss_sum(engine.module, ids[r], mask[r]) / float(mask[:, 1:].sum()) * 2)
            result["grad_norm"] = engine.step()
    with open(f"{out}.rank{info.rank}.json", "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1])
