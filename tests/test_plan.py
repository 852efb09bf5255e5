"""The memory planner (launch/plan.py): its activation model against the tensors a real megatron-core
forward saves for backward, its total against a measured H200 peak, and preflight's refusal."""
import json

import pytest
import torch

from steer_megatron.config import load_config
from steer_megatron.launch.plan import GIB, Shape, activation_bytes, load_arch, main, plan_memory
from steer_megatron.models.hf_config import parse_hf_config
from steer_megatron.parallel import ParallelLayout, init_parallel, spawn_ranks
from tests.models_helpers import make_hf_model

RECOMPUTE = {"none": {}, "selective": dict(recompute_granularity="selective"),
             "full": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)}


def _saved_bytes(hf_dir, mbs, seq, dtype, recompute):
    """Bytes of the distinct storages autograd saves for backward in one training forward,
    parameters left out (saved-tensor hooks: exactly what backward keeps alive)."""
    from steer_megatron.models.hf_config import build_gpt_model

    arch = parse_hf_config(hf_dir)
    model, _ = build_gpt_model(arch, params_dtype=dtype, **RECOMPUTE[recompute])
    model.train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
        return t

    ids = torch.randint(0, arch.vocab_size, (mbs, seq), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(seq)[None].expand(mbs, seq)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(ids, pos, None)
    out.float().sum().backward()  # the graph is real: backward runs through it
    return sum(seen.values())


def _per_layer_worker(dirs, cases):
    init_parallel(ParallelLayout(), seed=1)
    return [(_saved_bytes(dirs[1], *c) - _saved_bytes(dirs[0], *c)) / 2 for c in cases]


SHAPES = {  # two shapes: the structure, not one fit, must carry over
    "small": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2),
    "wide": dict(hidden_size=128, intermediate_size=352, num_attention_heads=8, num_key_value_heads=2),
}
CASES = [(1, 32, torch.float32, "none"), (2, 32, torch.float32, "none"), (1, 64, torch.float32, "none"),
         (2, 64, torch.float32, "none"), (2, 64, torch.bfloat16, "none"), (2, 64, torch.float32, "selective"),
         (2, 64, torch.float32, "full")]


@pytest.mark.parametrize("shape", SHAPES)
def test_activation_model_matches_saved_tensors_of_a_real_forward(tmp_path, shape):
    # one layer's share: models of 1 and 3 layers differ by two layers
    dirs = [make_hf_model(str(tmp_path / f"l{n}"), num_hidden_layers=n, **SHAPES[shape]) for n in (1, 3)]
    measured = spawn_ranks(_per_layer_worker, 1, dirs, CASES)[0]
    s = Shape.of(parse_hf_config(dirs[0]))
    s = Shape(**{**s.__dict__, "layers": 1})
    for (mbs, seq, dtype, rc), got in zip(CASES, measured):
        e = torch.finfo(dtype).bits // 8
        want = activation_bytes(s, mbs=mbs, seq=seq, tp=1, pp=1, sp=False, e=e, recompute=rc)
        if rc == "full":  # the plan adds the one layer backward re-creates; the saved part is the layer input
            want -= activation_bytes(s, mbs=mbs, seq=seq, tp=1, pp=1, sp=False, e=e, recompute="none")
        # small elementwise temporaries (RoPE tables, views) differ by model: 10%
        assert got == pytest.approx(want, rel=0.10), (mbs, seq, dtype, rc, got, want)


def test_plan_reproduces_the_measured_h200_peak():
    """DESIGN.md section 7: Qwen2.5-0.5B shape, megatron-core 0.16.1 local spec, bf16, 8 x 2,048
    tokens, forward + backward with no loss: 95.8 GiB peak on an H200. The plan's weights,
    fp32 gradient buffer, activations and one logits tensor (no loss, no optimizer) come within 10%."""
    cfg = load_config(None, ["model.dtype=bfloat16", "trainer.micro_batch_size=8", "data.max_prompt_len=1024",
                             "data.max_response_len=1024", "rollout.max_new_tokens=1024"])
    arch = load_arch(cfg, "configs/model_shapes/qwen2.5-0.5b.json")
    rows = plan_memory(cfg, arch, dp=1).rows
    logits = 8 * 2048 * arch.vocab(1).padded_size * 2
    total = rows["parameters"] + rows["gradients (fp32 reduce buffer)"] + rows["activations, recompute=none"] + logits
    assert total / GIB == pytest.approx(95.8, rel=0.10)


def test_plan_cli_refuses_a_plan_that_does_not_fit(capsys):
    args = ["configs/qwen2.5-math-7b_steer.yaml", "--model-config", "configs/model_shapes/qwen2.5-math-7b.json",
            "--world-size", "8", "--json"]
    assert main(args + ["--gpu-mem-gib", "80"]) == 0
    fits = json.loads(capsys.readouterr().out)
    assert fits["fits"] and fits["total_gib"] < 80
    # no recompute at a micro-batch of 8: the activations alone are several times an H200
    assert main(args + ["--gpu-mem-gib", "141", "model.recompute=none", "trainer.micro_batch_size=8"]) == 1
    assert not json.loads(capsys.readouterr().out)["fits"]
