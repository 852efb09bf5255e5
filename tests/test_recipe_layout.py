"""configs/qwen2.5-math-7b_steer.yaml at its own layout, shrunk: every parallel and memory setting
of the recipe unchanged, only what cannot run here overridden (listed in SHRINK), two steps on
gloo ranks; each setting is read back from the megatron-core objects the trainer built."""
import json
import shutil
from pathlib import Path

import pytest

from steer_megatron.config import load_config
from steer_megatron.parallel import spawn_ranks

RECIPE = "configs/qwen2.5-math-7b_steer.yaml"


def _shrink(tmp_path, model_dir, assets):
    """The only overrides: model and data, rollout engine, batch sizes, lengths, steps, transport."""
    return [
        f"model.hf_path={model_dir}", "model.dtype=float32",  # model (bf16 matmuls crawl on a CPU)
        f"data.train_files=[{assets.train_file}]", f"eval.files=[{assets.test_file}]", "eval.every=0",  # data
        "rollout.engine=cpu", "rollout.num_servers=1",  # rollout engine
        "trainer.rollout_batch_size=4", "trainer.mini_batch_size=2", "trainer.micro_batch_size=2",  # batch sizes
        "rollout.n=2", "data.max_prompt_len=32", "data.max_response_len=8",  # lengths
        "trainer.total_steps=2", "trainer.save_every=0", f"trainer.output_dir={tmp_path}",  # steps, output
        "rollout.weight_sync=nccl",  # the recipe's transport, over gloo to the CPU server
        "logging.tensorboard=false",
    ]


def _recipe_model(assets, out: Path) -> Path:
    """A tiny Qwen2 with Qwen2.5-Math-7B's head layout (28 heads, 4 KV heads, untied embeddings)
    and the demo's tokenizer."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    src = json.loads((assets.model_dir / "config.json").read_text())
    shutil.copytree(assets.model_dir, out)
    cfg = Qwen2Config(vocab_size=src["vocab_size"], hidden_size=224, intermediate_size=448, num_hidden_layers=2,
                      num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128,
                      tie_word_embeddings=False, bos_token_id=src.get("bos_token_id"), eos_token_id=src.get("eos_token_id"),
                      pad_token_id=src.get("pad_token_id"))
    torch.manual_seed(0)
    for f in out.glob("*.safetensors*"):
        f.unlink()
    Qwen2ForCausalLM(cfg).save_pretrained(out)
    return out


def recipe_worker(overrides):
    """Train, capturing what the trainer built; return the settings read back from megatron-core."""
    import steer_megatron.train.loop as loop
    from steer_megatron.train.loop import train

    built = {}
    wrap = loop.wrap_for_training

    def capture(model, settings):
        built["model"] = model
        built["ddp"], built["optimizer"], built["scheduler"] = out = wrap(model, settings)
        return out

    loop.wrap_for_training = capture
    run_dir = train(load_config(RECIPE, overrides))
    from megatron.core import parallel_state as ps

    c, ddp = built["model"].config, built["ddp"]
    norms = [m for n, m in built["model"].named_modules() if n.endswith("layernorm")]
    return {
        "run_dir": str(run_dir), "tp": ps.get_tensor_model_parallel_world_size(), "pp": ps.get_pipeline_model_parallel_world_size(),
        "sequence_parallel": c.sequence_parallel, "recompute_granularity": c.recompute_granularity,
        "recompute_method": c.recompute_method, "norms_marked": all(p.sequence_parallel for m in norms for p in m.parameters()),
        "distributed_optimizer": ddp.ddp_config.use_distributed_optimizer, "overlap_grad_reduce": ddp.ddp_config.overlap_grad_reduce,
        "optimizer": type(built["optimizer"]).__name__, "chained": [type(o).__name__ for o in getattr(built["optimizer"], "chained_optimizers", [])],
    }


@pytest.mark.slow
def test_7b_recipe_runs_at_its_own_layout(tmp_path, demo_cache_root):
    from steer_megatron.demo_assets.assets import build_demo_assets

    recipe = load_config(RECIPE, [])
    par, model = recipe.parallel, recipe.model
    assets = build_demo_assets(load_config(None, [f"demo.cache_dir={demo_cache_root}"]).demo)
    model_dir = _recipe_model(assets, tmp_path / "qwen7b_layout")
    world = par.tp * par.pp * par.cp  # one data-parallel rank: the recipe's model layout on this machine
    got = spawn_ranks(recipe_worker, world, _shrink(tmp_path, model_dir, assets), timeout=1500)
    for r in got:
        assert (r["tp"], r["pp"]) == (par.tp, par.pp)
        assert r["sequence_parallel"] is par.sequence_parallel is True and r["norms_marked"]
        assert r["recompute_granularity"] == model.recompute == "full" and r["recompute_method"] == "uniform"
        assert r["distributed_optimizer"] is par.distributed_optimizer is True
        assert r["overlap_grad_reduce"] is par.overlap_grad_reduce is True
        assert "DistributedOptimizer" in [r["optimizer"], *r["chained"]]
    rows = [json.loads(line) for line in (Path(got[0]["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "actor/pg_loss" in r]
    assert [r["step"] for r in steps] == [1, 2] and all(r["sync/parity_max_abs_diff"] <= 1e-4 for r in steps)
