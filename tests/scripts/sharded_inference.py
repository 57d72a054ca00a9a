"""Run under torchrun (tests/test_distributed.py): sampling and scoring with models sharded over the ranks
(`load_sharded`, `ShardedBackend`, `RewardScorer(sharded=True)`) against the same models whole in every process.

    torchrun --nproc-per-node 2 tests/scripts/sharded_inference.py POLICY_DIR RM_DIR OUT.json

Rank 0 writes OUT.json: the sharded and the whole-model outputs, and each rank's share of the parameters."""
from __future__ import annotations

import json
import sys

import torch

from pipeline.chat import stop_token_ids
from pipeline.distributed import gather, init, load_sharded, share, world
from pipeline.models import load_policy
from policies.generation import SamplingParams, ShardedBackend, generate
from reward_models.scoring import RewardScorer


def main(policy_dir: str, rm_dir: str, out: str) -> None:
    init("cpu")
    w = world()
    torch.manual_seed(1234 + w.rank)  # a rank that used its own random weights would be caught
    whole, tok = load_policy(policy_dir, "cpu")
    sharded = load_sharded(lambda where: load_policy(policy_dir, where)[0], "cpu")
    engine = ShardedBackend(sharded, tok.pad_token_id, max_batch_tokens=96)  # small batches: ranks get different counts
    # prompts of many lengths, an odd count: the ranks get different numbers of prompts, batches and decode steps
    prompts = [[tok.bos_token_id] + [5 + (i * 7 + j) % 200 for j in range(2 + (i * 5) % 23)] for i in range(11)]
    # the decoder blocks' weights held by this rank (the root's own, embeddings and head, stay gathered)
    result = {"local_params": sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel()
                                  for n, p in engine.model.named_parameters() if ".layers." in n),
              "whole_params": sum(p.numel() for n, p in whole.named_parameters() if ".layers." in n)}
    for name, params in {"sampled": SamplingParams(max_new_tokens=12, temperature=1.0, stop_token_ids=stop_token_ids(tok), seed=7),
                         "greedy": SamplingParams(max_new_tokens=9, temperature=0.0, seed=7)}.items():
        sharded = generate(engine, prompts, params, n=3)
        mine = generate(whole, share(prompts), SamplingParams(**{**vars(params), "seed": params.seed + 1_000_003 * w.rank}), n=3,
                        pad_token_id=tok.pad_token_id, max_batch_tokens=96)
        result[name] = {"sharded": sharded, "whole": gather(mine)}
    dialogues = [[{"role": "user", "content": f"question {i} " + "word " * (i % 6)}] for i in range(7)]
    answers = [f"answer {i}" * (1 + i % 3) for i in range(7)]
    flags = [i % 2 == 0 for i in range(7)]
    sharded_rm = RewardScorer(rm_dir, rm_dir, "cpu", max_length=64, sharded=True)
    whole_rm = RewardScorer(rm_dir, rm_dir, "cpu", max_length=64)
    result["scores"] = {"sharded": sharded_rm.score(dialogues, answers, flags).combined.tolist(),
                        "whole": whole_rm.score(dialogues, answers, flags).combined.tolist(),
                        "sharded_is_sharded": sharded_rm.sharded}
    if w.is_main:
        with open(out, "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    main(*sys.argv[1:4])
