"""Fast, single-process checks of the HF config parser, layout maps, safetensors I/O and
checkpoint bookkeeping (no process groups)."""
from __future__ import annotations

import json
import os

import pytest
import torch

from steer_megatron.models.hf_config import (
    UnsupportedModelError, padded_vocab_size, parse_hf_config,
)
from steer_megatron.models.hf_export import bucketize
from steer_megatron.models.hf_import import CheckpointMismatchError, HFReader, check_hf_tensors
from steer_megatron.models.layout import interleave_qkv, merge_tp, plan, split_qkv, Kind
from steer_megatron.models.st_io import ShardWriter, read_header
from tests.models_helpers import make_hf_model

QWEN = {
    "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 200,
    "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": False, "hidden_act": "silu",
}


def test_padded_vocab_size():
    assert padded_vocab_size(200, 1) == 256
    assert padded_vocab_size(256, 2) == 256
    assert padded_vocab_size(300, 2) == 512
    assert padded_vocab_size(152064, 8) == 152576
    with pytest.raises(ValueError):
        padded_vocab_size(0, 1)


def test_parse_qwen_and_llama():
    a = parse_hf_config(QWEN)
    assert (a.qkv_bias, a.num_kv_heads, a.head_dim, a.rope_theta) == (True, 2, 16, 1e6)
    assert a.vocab(2).padded_size == 256 and a.vocab(2).num_padding == 56
    llama = dict(QWEN, model_type="llama", rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    b = parse_hf_config(llama)
    assert not b.qkv_bias and b.rope_scaling.kind == "llama3" and b.rope_scaling.factor == 32.0
    assert b.rope_theta == 500000.0


@pytest.mark.parametrize("change, match", [
    ({"model_type": "mistral"}, "model_type='mistral'"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"model_type": "llama", "attention_bias": True}, "attention_bias"),
    ({"model_type": "llama", "mlp_bias": True}, "mlp_bias"),
    ({"use_sliding_window": True}, "use_sliding_window"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.0}}, "low_freq_factor"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"hidden_size": None}, "hidden_size"),
])
def test_unsupported_configs_are_clear_errors(change, match):
    with pytest.raises(UnsupportedModelError, match=match):
        parse_hf_config({**QWEN, **change})


def test_tp_must_divide_heads_and_pp_layers():
    a = parse_hf_config(QWEN)
    with pytest.raises(ValueError, match="num_attention_heads=4"):
        a.check_layout(3, 1)
    with pytest.raises(ValueError, match="num_key_value_heads=2"):
        a.check_layout(4, 1)
    with pytest.raises(ValueError, match="num_hidden_layers=2"):
        a.check_layout(1, 4)
    a.check_layout(2, 2)


def test_qkv_interleave_roundtrip_and_tp_merge():
    arch = parse_hf_config(QWEN)  # 4 heads, 2 groups, head_dim 16
    q, k, v = torch.randn(64, 8), torch.randn(32, 8), torch.randn(32, 8)
    full = interleave_qkv(q, k, v, arch)
    # group 0 = [q heads 0,1 | k0 | v0]
    assert torch.equal(full[:32], q[:32]) and torch.equal(full[32:48], k[:16]) and torch.equal(full[48:64], v[:16])
    assert all(torch.equal(x, y) for x, y in zip(split_qkv(full, arch), (q, k, v)))
    # TP=2 shards are contiguous groups; merging gives back HF tensors
    shards = [interleave_qkv(q[:32], k[:16], v[:16], arch), interleave_qkv(q[32:], k[16:], v[16:], arch)]
    assert all(torch.equal(x, y) for x, y in zip(merge_tp(Kind.QKV, shards, arch, arch.vocab(2)), (q, k, v)))
    gate, up = torch.randn(128, 8), torch.randn(128, 8)
    fc1 = [torch.cat([gate[:64], up[:64]]), torch.cat([gate[64:], up[64:]])]
    g2, u2 = merge_tp(Kind.FC1, fc1, arch, arch.vocab(2))
    assert torch.equal(g2, gate) and torch.equal(u2, up)


def test_plan_covers_te_and_local_names():
    arch = parse_hf_config(dict(QWEN, tie_word_embeddings=True))
    local = {e.mcore_name for e in plan(arch, 1)}
    te = {e.mcore_name for e in plan(arch, 2, te_spec=True)}
    assert "decoder.layers.1.input_layernorm.weight" in local and "output_layer.weight" not in local
    assert "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in te
    assert "output_layer.weight" in te  # tied at PP>1: the last stage keeps a copy


def test_safetensors_writer_is_readable_by_safetensors(tmp_path):
    from safetensors import safe_open

    path = str(tmp_path / "x.safetensors")
    w = ShardWriter(path)
    tensors = {"a": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16), "c": torch.arange(4)}
    for n, t in tensors.items():
        w.add(n, t)
    w.close()
    with safe_open(path, framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        for n, t in tensors.items():
            assert torch.equal(f.get_tensor(n), t)
    infos, _ = read_header(path)
    assert infos["a"].shape == (3, 5)


def test_bucketize():
    items = [(str(i), torch.zeros(10)) for i in range(5)]  # 40 bytes each
    buckets = list(bucketize(items, 100))
    assert [len(b) for b in buckets] == [2, 2, 1]
    assert [len(b) for b in bucketize([("big", torch.zeros(100))] + items[:1], 100)] == [1, 1]


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    return make_hf_model(str(tmp_path_factory.mktemp("hf") / "qwen"), "qwen2", tie=False, max_shard_size="60KB")


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_hf_tensor_checks(tiny_hf, tmp_path):
    arch = parse_hf_config(tiny_hf)
    with HFReader(tiny_hf) as r:
        check_hf_tensors(r, arch)
        q = r.read("model.layers.0.self_attn.q_proj.weight")
        assert torch.equal(r.read("model.layers.0.self_attn.q_proj.weight", 1, 8, 24), q[:, 8:24])
        assert torch.equal(r.read("model.layers.0.self_attn.q_proj.weight", 0, 8, 24), q[8:24])
    # a config that disagrees with the weights: shape error naming the tensor
    bad = _copy(tiny_hf, str(tmp_path / "bad_shape"))
    with open(os.path.join(bad, "config.json")) as f:
        cfg = json.load(f)
    with pytest.raises(CheckpointMismatchError, match="intermediate_size|mlp.*shape"):
        cfg["intermediate_size"] = 96
        with HFReader(bad) as r:
            check_hf_tensors(r, parse_hf_config(cfg))
    # missing tensor (dropped from the index) and extra tensor (config has fewer layers)
    missing = _copy(tiny_hf, str(tmp_path / "missing"))
    idx_path = os.path.join(missing, "model.safetensors.index.json")
    with open(idx_path) as f:
        idx = json.load(f)
    del idx["weight_map"]["model.layers.1.mlp.up_proj.weight"]
    with open(idx_path, "w") as f:
        json.dump(idx, f)
    with pytest.raises(CheckpointMismatchError, match="missing.*model.layers.1.mlp.up_proj.weight"):
        with HFReader(missing) as r:
            check_hf_tensors(r, arch)
    with pytest.raises(CheckpointMismatchError, match="unexpected.*model.layers.1"):
        with HFReader(tiny_hf) as r:
            check_hf_tensors(r, parse_hf_config({**cfg, "intermediate_size": 128, "num_hidden_layers": 1}))


def test_checkpoint_latest_and_prune(tmp_path):
    from steer_megatron.models.checkpoint import CheckpointMeta, commit_checkpoint_dir, find_latest, prune

    root = str(tmp_path)
    for step in (1, 2, 3):
        tmp = os.path.join(root, f"iter_{step:07d}.tmp")
        os.makedirs(os.path.join(tmp, "dist"))
        commit_checkpoint_dir(root, tmp, os.path.join(root, f"iter_{step:07d}"), CheckpointMeta(step=step))
    assert find_latest(root).endswith("iter_0000003")
    # a crashed save (no meta.json, or still .tmp) is never picked
    os.makedirs(os.path.join(root, "iter_0000009", "dist"))
    os.makedirs(os.path.join(root, "iter_0000010.tmp", "dist"))
    with open(os.path.join(root, "latest"), "w") as f:
        f.write("iter_0000009\n")
    assert find_latest(root).endswith("iter_0000003")
    assert [os.path.basename(p) for p in prune(root, 2)] == ["iter_0000001"]
    assert find_latest(os.path.join(root, "iter_0000002")).endswith("iter_0000002")
    assert find_latest(str(tmp_path / "nothing")) is None
