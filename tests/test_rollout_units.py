"""Fast checks without servers: configs, command lines, request payloads against SGLang's
contract, response parsing, checkpoint export and NCCL bucket planning."""
from __future__ import annotations

import json
import sys
from dataclasses import replace

import pytest
import torch

from steer_megatron.rollout import FleetConfig, RolloutClient, RolloutConfig, RouterConfig, SamplingConfig
from steer_megatron.rollout.client import MalformedResponse, parse_generate_response
from steer_megatron.rollout.contract import ContractViolation, validate_generate_request, validate_generate_response
from steer_megatron.rollout.cpu_server import BadRequest, parse_sampling
from steer_megatron.rollout.fleet import server_command
from steer_megatron.rollout.router import router_command
from steer_megatron.rollout.weight_sync import ParamMeta, plan_buckets, write_hf_checkpoint
from steer_megatron.rollout.weight_sync.nccl import init_group_request, update_request
from tests.rollout_helpers import contract_or_skip, tiny_model_dir


@pytest.mark.parametrize("kwargs, field", [
    ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_k": 0}, "top_k"),
    ({"n": 0}, "n"), ({"max_new_tokens": 0}, "max_new_tokens"), ({"min_new_tokens": 9, "max_new_tokens": 4}, "min_new_tokens"),
])
def test_sampling_config_names_the_bad_field(kwargs, field):
    with pytest.raises(ValueError, match=f"sampling.{field}"):
        SamplingConfig(**kwargs)


def test_configs_validate():
    with pytest.raises(ValueError, match="rollout.concurrency"):
        RolloutConfig(concurrency=0)
    with pytest.raises(ValueError, match="run_id"):
        RolloutConfig(run_id="a b")
    with pytest.raises(ValueError, match="router.policy"):
        RouterConfig(policy="fastest")
    with pytest.raises(ValueError, match="fleet.engine"):
        FleetConfig(model_path="m", engine="vllm")
    with pytest.raises(ValueError, match="gpus_per_node"):
        FleetConfig(model_path="m", tp_size=3)


def test_sglang_and_router_command_lines():
    cfg = FleetConfig(model_path="/ckpt/hf", num_workers=4, tp_size=2, base_port=31000, mem_fraction_static=0.7,
                      weight_version="5", router=RouterConfig(port=29001, policy="round_robin"))
    argv, env = server_command(cfg, 3)
    assert argv[:3] == [sys.executable, "-m", "sglang.launch_server"]
    flags = dict(zip(argv[3::2], argv[4::2]))
    assert flags["--model-path"] == "/ckpt/hf" and flags["--port"] == "31030" and flags["--tp-size"] == "2"
    assert flags["--base-gpu-id"] == "6" and flags["--mem-fraction-static"] == "0.7" and flags["--weight-version"] == "5"
    # the trainer optimises softmax(logits / T): the servers must return log-probs of that (SGLang's default)
    assert argv[-1] == "--skip-tokenizer-init" and env == {"SGLANG_RETURN_ORIGINAL_LOGPROB": "0"}
    assert server_command(replace(cfg, return_original_logprob=True), 3)[1] == {"SGLANG_RETURN_ORIGINAL_LOGPROB": "1"}
    router = router_command(cfg.router)
    assert router[:3] == [sys.executable, "-m", "sglang_router.launch_router"]
    assert "--disable-health-check" in router and "--worker-urls" not in router
    assert router[router.index("--policy") + 1] == "round_robin" and router[router.index("--port") + 1] == "29001"
    cpu, _ = server_command(FleetConfig(model_path="/m", engine="cpu", base_port=40000), 0)
    assert cpu[2] == "steer_megatron.rollout.cpu_server" and "--return-original-logprob" not in cpu


def test_client_requests_satisfy_sglang_contract():
    api = contract_or_skip()
    client = RolloutClient(["http://127.0.0.1:1"], RolloutConfig(validate_contract=True))
    body = client.request_body([1, 2, 3], SamplingConfig(n=4, top_k=20, stop_token_ids=(1,), sampling_seed=3), "run-0-0")
    decoded = api.GenerateRequest.from_json_value(body)
    assert decoded.input_ids == [1, 2, 3] and decoded.rid == "run-0-0" and decoded.sampling_params.n == 4
    with pytest.raises(ContractViolation, match="unknown field `temprature`"):
        validate_generate_request({"input_ids": [1], "sampling_params": {"temprature": 1.0}}, api)


def _answer(ids, finish=None, lps=None):
    return {"output_ids": ids, "meta_info": {
        "id": "r", "finish_reason": finish or {"type": "length", "length": len(ids)}, "prompt_tokens": 2,
        "completion_tokens": len(ids), "weight_version": "3",
        "output_token_logprobs": lps if lps is not None else [[-0.5, t, None] for t in ids]}}


def test_parse_generate_response_checks_shape():
    samples = parse_generate_response([_answer([4, 5]), _answer([6], {"type": "stop", "matched": 6})], n=2,
                                      prompt_index=7, rid="r", worker="w")
    assert [s.output_ids for s in samples] == [[4, 5], [6]] and samples[1].matched_stop == 6
    assert samples[0].logprobs == [-0.5, -0.5] and samples[0].weight_version == "3" and samples[1].sample_index == 1
    with pytest.raises(MalformedResponse, match="expected 2 samples"):
        parse_generate_response([_answer([4])], n=2, prompt_index=0, rid="r", worker="w")
    with pytest.raises(MalformedResponse, match="output_token_logprobs"):
        parse_generate_response(_answer([4, 5], lps=[[-0.1, 4, None]]), n=1, prompt_index=0, rid="r", worker="w")
    with pytest.raises(MalformedResponse, match="finish_reason"):
        parse_generate_response(_answer([4], {"type": "done"}), n=1, prompt_index=0, rid="r", worker="w")
    api = contract_or_skip()
    validate_generate_response([_answer([4, 5])], api)
    with pytest.raises(ContractViolation):
        validate_generate_response({"output_ids": [1.5]}, api)


def test_server_rejects_bad_sampling_params():
    with pytest.raises(BadRequest, match="unknown field `temprature`"):
        parse_sampling({"temprature": 0.5}, vocab=10)
    with pytest.raises(BadRequest, match="stop_token_ids"):
        parse_sampling({"stop_token_ids": [99]}, vocab=10)
    with pytest.raises(BadRequest, match="sampling_params.stop is not supported.*stop_token_ids"):
        parse_sampling({"stop": ["\n"]}, vocab=10)
    assert parse_sampling({"top_k": 1 << 30}, vocab=10)["top_k"] == -1  # SGLang's "all" default


def test_bucket_planning():
    metas = [ParamMeta("a", "float32", (256,)), ParamMeta("b", "bfloat16", (1024,)), ParamMeta("c", "float32", (64,)),
             ParamMeta("big", "float32", (4096,)), ParamMeta("d", "float32", (8,))]
    assert [m.nbytes for m in metas] == [1024, 2048, 256, 16384, 32]
    buckets = plan_buckets(metas, bucket_bytes=3072)
    assert [[m.name for m in b] for b in buckets] == [["a", "b"], ["c"], ["big"], ["d"]]
    assert all(sum(m.nbytes for m in b) <= 3072 or len(b) == 1 for b in buckets)
    assert [m.name for b in plan_buckets(metas, 1 << 30) for m in b] == ["a", "b", "c", "big", "d"]
    with pytest.raises(ValueError):
        plan_buckets(metas, 0)


def test_nccl_request_payloads():
    assert init_group_request("10.0.0.1", 29600, 3, 9, "g", "nccl") == {
        "master_address": "10.0.0.1", "master_port": 29600, "rank_offset": 3, "world_size": 9,
        "group_name": "g", "backend": "nccl"}
    metas = [ParamMeta.of("model.embed_tokens.weight", torch.zeros(4, 2, dtype=torch.bfloat16))]
    mid = update_request(metas, "g", None)
    assert mid == {"names": ["model.embed_tokens.weight"], "dtypes": ["bfloat16"], "shapes": [[4, 2]],
                   "group_name": "g", "flush_cache": False}
    last = update_request(metas, "g", "7")
    assert last["weight_version"] == "7" and last["flush_cache"] is True


def test_write_hf_checkpoint_shards_and_index(tmp_path_factory, tmp_path):
    src = tiny_model_dir(tmp_path_factory)
    tensors = [(f"t{i}", torch.full((100,), float(i))) for i in range(5)]  # 400 bytes each
    out, total = write_hf_checkpoint(iter(tensors), tmp_path / "v1", src, shard_bytes=1000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert total == 2000 and index["metadata"]["total_size"] == 2000
    assert sorted(set(index["weight_map"].values())) == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert (out / "config.json").exists() and (out / "tokenizer.json").exists()
    assert not list(tmp_path.glob(".v1.tmp-*"))
    from safetensors.torch import load_file

    assert torch.equal(load_file(str(out / index["weight_map"]["t3"]))["t3"], torch.full((100,), 3.0))
    with pytest.raises(Exception, match="twice"):
        write_hf_checkpoint(iter(tensors + tensors[:1]), tmp_path / "v2", src)
    assert not (tmp_path / "v2").exists() and not list(tmp_path.glob(".v2.tmp-*"))


def test_contract_fetch_offline_is_a_clear_skip_reason(tmp_path, monkeypatch):
    from steer_megatron.rollout.contract import ContractUnavailable, fetch_contract

    monkeypatch.delenv("STEER_SGLANG_CONTRACT", raising=False)
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # as offline: pip cannot reach any index
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    with pytest.raises(ContractUnavailable, match="sglang==0.5.23.*without network"):
        fetch_contract(tmp_path)
    assert not list(tmp_path.rglob("*.py"))
