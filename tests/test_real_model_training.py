"""Two STEER training steps on a real pretrained LM (SmolLM2-135M-Instruct, 30 layers, fp32)
with configs/smollm2_135m_steer.yaml at a tiny batch: chat-templated prompts, the CPU rollout
server, the integer reward on the assistant's reply, the weight sync and its parity probe with
the derived tolerance (the old fixed 1e-5 stopped this model before step 1)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from steer_megatron.parallel import spawn_ranks
from tests.real_model_helpers import REPO, smollm2_or_skip


def train_worker(overrides):
    from steer_megatron.config import load_config
    from steer_megatron.train.loop import train

    return str(train(load_config(str(REPO / "configs" / "smollm2_135m_steer.yaml"), overrides)))


def test_two_steer_steps_on_smollm2(tmp_path):
    from steer_megatron.data.arith_task import make_rows, write_parquet
    from steer_megatron.rollout.weight_sync.base import parity_tolerance

    hf_dir = smollm2_or_skip()
    data = write_parquet(make_rows(4, seed=0, split="train", levels=(1,)), tmp_path / "train.parquet")
    over = [f"model.hf_path={hf_dir}", f"data.train_files=[{data}]", "eval.files=[]", "eval.every=0",
            "trainer.rollout_batch_size=2", "trainer.mini_batch_size=2", "trainer.micro_batch_size=4",
            "rollout.n=2", "data.max_response_len=8", "trainer.total_steps=2", "trainer.save_every=0",
            "algorithm.dynamic_sampling.enabled=false",  # 4 samples: all-equal groups are likely
            f"trainer.output_dir={tmp_path}", "trainer.run_name=r", "logging.tensorboard=false"]
    run_dir = Path(spawn_ranks(train_worker, 1, over, timeout=1200)[0])
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "actor/pg_loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert [r["rollout/weight_version"] for r in steps] == [0, 1]  # step 2 sampled the pushed weights
    atol = parity_tolerance(torch.float32, 30, 576)
    parity = [r["sync/parity_max_abs_diff"] for r in rows if "sync/parity_max_abs_diff" in r]
    assert parity and max(parity) <= atol
    for r in steps:
        assert all(v == v for k, v in r.items() if isinstance(v, float)), r  # no NaN
        print({k: r[k] for k in sorted(r) if k.startswith(("timing/", "actor/entropy", "reward/", "sync/"))})
