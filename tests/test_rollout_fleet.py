"""Two CPU SGLang-protocol servers behind the real sglang-router on 127.0.0.1: rollouts,
weight sync (disk and the NCCL code path over gloo) with parity probes, and failover."""
from __future__ import annotations

import signal
import threading
import time

import pytest
import torch

from steer_megatron.parallel import free_port_block
from steer_megatron.rollout import Fleet, FleetConfig, RolloutClient, RolloutConfig, RouterConfig, SamplingConfig
from steer_megatron.rollout import http
from steer_megatron.rollout.contract import validate_generate_response
from steer_megatron.rollout.weight_sync import DiskWeightSync, NcclWeightSync, ParityError, ParityProbe
from tests.fixtures_models import hf_logprob_scorer, perturbed_state
from tests.rollout_helpers import contract_or_skip, tiny_model_dir

PROMPTS = [[5 + i, 30 + 2 * i, 7] for i in range(6)]
PROBE = tuple(tuple(p) for p in PROMPTS[:3])




@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def fleet(model_dir, tmp_path_factory):
    base = free_port_block(4)
    cfg = FleetConfig(model_path=str(model_dir), num_workers=2, engine="cpu", base_port=base, port_stride=1,
                      router=RouterConfig(port=base + 2, prometheus_port=base + 3, policy="round_robin"), cpu_threads=1, cpu_max_batch_size=8,
                      log_dir=str(tmp_path_factory.mktemp("fleet_logs")), startup_timeout_s=120, health_timeout_s=2)
    f = Fleet(cfg)
    try:
        f.start()
        yield f
    finally:
        f.stop()


def hf_model(state=None, model_dir=None):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if state is not None:
        model.load_state_dict(state)
    return model


def greedy_reference(model, prompts, n_tokens):
    with torch.no_grad():
        return [model.generate(torch.tensor([p]), do_sample=False, max_new_tokens=n_tokens, min_new_tokens=n_tokens,
                               eos_token_id=None, pad_token_id=0)[0, len(p):].tolist() for p in prompts]


GREEDY = SamplingConfig(temperature=0.0, max_new_tokens=8, ignore_eos=True)


def rollout(fleet, prompts=PROMPTS, sampling=GREEDY, step=0, **kw):
    validate = kw.pop("validate_contract", False)
    return RolloutClient(fleet.endpoints, RolloutConfig(run_id="t", validate_contract=validate, **kw)).generate_sync(prompts, sampling, step=step)


def test_generate_through_router_matches_transformers(fleet, model_dir):
    contract_or_skip()
    assert sorted(w["url"] for w in fleet.router.workers()) == sorted(fleet.live_urls)
    result = rollout(fleet, validate_contract=True)
    ref = greedy_reference(hf_model(model_dir=model_dir), PROMPTS, 8)
    assert [[s.output_ids for s in group] for group in result.samples] == [[r] for r in ref]
    assert all(s.finish_reason == "length" and s.weight_version == "0" for s in result.flat())
    assert {s.prompt_index for s in result.flat()} == set(range(len(PROMPTS)))


def test_server_answers_validate_against_sglang_contract(fleet):
    api = contract_or_skip()
    url = fleet.live_urls[0]
    batch = {"input_ids": PROMPTS[:2], "rid": ["c0", "c1"], "return_logprob": True, "logprob_start_len": -1,
             "sampling_params": {"max_new_tokens": 4, "n": 2, "temperature": 1.0, "stop_token_ids": [3]}}
    answer = http.call("POST", f"{url}/generate", batch)
    decoded = validate_generate_response(answer, api)
    assert len(decoded) == 4 and all(len(d.meta_info.output_token_logprobs) == len(d.output_ids) for d in decoded)
    single = http.call("POST", f"{url}/generate", {"input_ids": [5, 6], "sampling_params": {"max_new_tokens": 2}})
    assert isinstance(single, dict) and validate_generate_response(single, api)[0].meta_info.completion_tokens == 2
    for path in ("/model_info", "/get_model_info"):
        assert api.GetModelInfoResponse.from_json_value(http.call("GET", url + path)).is_generation
    for path in ("/server_info", "/get_server_info"):
        assert api.GetServerInfoResponse.from_json_value(http.call("GET", url + path)).max_context_length == 256
    with pytest.raises(http.HttpError, match="HTTP 400.*unknown field `temprature`"):
        http.call("POST", f"{url}/generate", {"input_ids": [5], "sampling_params": {"temprature": 1.0}})
    # sglang-router 0.3.2 re-serialises the body and drops the unknown key instead of a 400:
    # why the client validates its own requests against the contract before sending.
    routed = http.call("POST", f"{fleet.cfg.router.url}/generate", {"input_ids": [5], "sampling_params": {"temprature": 1.0, "max_new_tokens": 1}})
    assert routed["meta_info"]["completion_tokens"] == 1


def test_nccl_transport_broadcast_over_gloo(fleet, model_dir):
    state = perturbed_state(model_dir, seed=11)
    trainer = hf_model(state, model_dir)
    probe = ParityProbe(PROBE, hf_logprob_scorer(trainer), max_new_tokens=6, atol=1e-5)
    sync = NcclWeightSync(fleet, master_address="127.0.0.1", master_port=free_port_block(2), backend="gloo",
                          bucket_bytes=64 << 10, probe=probe, timeout_s=120)
    report = sync.sync(state.items, version=1)  # a callable source: called once per sync
    assert report.parity.max_abs_diff <= 1e-5 and report.bytes_sent == sum(t.numel() * 4 for t in state.values())
    result = rollout(fleet, step=1)
    assert [[s.output_ids for s in g] for g in result.samples] == [[r] for r in greedy_reference(trainer, PROMPTS, 8)]
    assert {s.weight_version for s in result.flat()} == {"1"}


def test_disk_sync_changes_outputs_and_matches_trainer(fleet, model_dir, tmp_path_factory):
    before = rollout(fleet, step=2)
    state = perturbed_state(model_dir, seed=22)
    trainer = hf_model(state, model_dir)
    probe = ParityProbe(PROBE, hf_logprob_scorer(trainer), max_new_tokens=6, atol=1e-5)
    sync = DiskWeightSync(fleet, export_root=tmp_path_factory.mktemp("export"), source_dir=model_dir, probe=probe,
                          shard_bytes=100 << 10)
    report = sync.sync(iter(state.items()), version=2)
    assert report.parity.max_abs_diff <= 1e-5 and report.parity.tokens_checked == 2 * 3 * 6
    after = rollout(fleet, step=3)
    expected = greedy_reference(trainer, PROMPTS, 8)
    assert [[s.output_ids for s in g] for g in after.samples] == [[r] for r in expected]
    assert [g[0].output_ids for g in before.samples] != expected
    assert {s.weight_version for s in after.flat()} == {"2"} and fleet.weight_version == "2"

    # The trainer holding other weights than the servers is caught, naming worker and token.
    wrong = ParityProbe(PROBE, hf_logprob_scorer(hf_model(model_dir=model_dir)), max_new_tokens=6)
    with pytest.raises(ParityError, match=r"parity failed on http://127\.0\.0\.1:\d+ \(version 3\).*atol"):
        DiskWeightSync(fleet, export_root=sync.export_root, source_dir=model_dir, probe=wrong).sync(state.items(), version=3)


def test_client_fails_over_to_a_live_worker(fleet):
    dead = f"http://127.0.0.1:{free_port_block(1)}"
    client = RolloutClient([dead] + fleet.live_urls, RolloutConfig(run_id="fo", max_attempts=3, retry_backoff_s=0.01))
    result = client.generate_sync(PROMPTS, SamplingConfig(max_new_tokens=4, n=2))
    assert [len(g) for g in result.samples] == [2] * len(PROMPTS)
    assert all(s.worker != dead for s in result.flat())
    assert any(dead in line for line in result.failures)


def test_kill_worker_mid_rollout_every_sample_once(fleet, model_dir):
    prompts = [[5 + i % 200, 40 + i % 100] for i in range(40)]
    sampling = SamplingConfig(max_new_tokens=48, n=2, temperature=1.0, ignore_eos=True)
    client = RolloutClient(fleet.endpoints, RolloutConfig(run_id="kill", request_timeout_s=60))
    done, some_done = [], threading.Event()

    def progress(samples):
        done.append(samples)
        if len(done) >= 4:
            some_done.set()

    out: dict = {}
    thread = threading.Thread(target=lambda: out.setdefault("result", client.generate_sync(prompts, sampling, step=9, on_prompt_done=progress)))
    thread.start()
    victim = fleet.workers[1]
    fleet.start_monitor(interval_s=0.5)
    assert some_done.wait(60)
    victim.proc.send_signal(signal.SIGKILL)
    assert len(done) < len(prompts) - 8, "the rollout was nearly over at the kill: raise the load of this test"
    thread.join(120)
    result = out["result"]
    keys = [(s.prompt_index, s.sample_index) for s in result.flat()]
    assert sorted(keys) == [(i, j) for i in range(len(prompts)) for j in range(2)]  # each exactly once
    assert all(len(s.output_ids) == 48 and s.finish_reason == "length" for s in result.flat())

    deadline = time.monotonic() + 90  # the monitor notices, drops it from the router, restarts it
    while not any(e.kind == "restarted" for e in fleet.events) and time.monotonic() < deadline:
        time.sleep(0.2)
    fleet.stop_monitor()
    events = fleet.events
    assert [(e.url, e.kind) for e in events] == [(victim.url, "dead"), (victim.url, "restarted")]
    assert "exited" in events[0].detail and victim.restarts == 1
    # The replacement starts from the newest exported weights and is back behind the router.
    assert http.call("GET", victim.url + "/model_info")["weight_version"] == fleet.weight_version
    trainer = hf_model(model_dir=fleet.model_path)  # the exported dir is a complete HF model
    ParityProbe(PROBE, hf_logprob_scorer(trainer), max_new_tokens=6).run([victim.url], fleet.weight_version)
    assert victim.url in [w["url"] for w in fleet.router.workers()]


def test_pause_abort_and_continue(fleet):
    url = fleet.live_urls[0]
    body = {"input_ids": [5, 6], "rid": "long-1", "return_logprob": True,
            "sampling_params": {"max_new_tokens": 200, "temperature": 0.0, "ignore_eos": True}}
    answer: dict = {}
    http.call("POST", f"{url}/pause_generation", {"mode": "in_place"})
    try:
        t = threading.Thread(target=lambda: answer.setdefault("r", http.call("POST", f"{url}/generate", body)))
        t.start()
        time.sleep(0.5)
        assert t.is_alive()  # held by the pause
        http.call("POST", f"{url}/pause_generation", {"mode": "abort"})  # aborts what is in flight
    finally:
        http.call("POST", f"{url}/continue_generation", {})
    t.join(30)
    meta = answer["r"]["meta_info"]
    assert meta["finish_reason"]["type"] == "abort" and meta["completion_tokens"] < 200
    # The client treats an aborted answer as "ask again", not as a sample.
    http.call("POST", f"{url}/pause_generation", {"mode": "abort"})
    threading.Timer(0.3, lambda: http.call("POST", f"{url}/continue_generation", {})).start()
    result = RolloutClient([url], RolloutConfig(run_id="pa", retry_backoff_s=0.2)).generate_sync([[5, 6]], GREEDY)
    assert result.flat()[0].finish_reason == "length"


def test_direct_mode_kill_mid_rollout_client_retries(fleet):
    """No router: the client itself retries a dead worker's prompts on the other worker."""
    victim = fleet.workers[0]
    prompts = [[7 + i, 50 + i] for i in range(30)]
    client = RolloutClient(fleet.live_urls, RolloutConfig(run_id="direct", request_timeout_s=60, retry_backoff_s=0.05))
    done, some_done = [], threading.Event()

    def progress(samples):
        done.append(samples)
        if len(done) >= 4:
            some_done.set()

    out: dict = {}
    thread = threading.Thread(target=lambda: out.setdefault("r", client.generate_sync(
        prompts, SamplingConfig(max_new_tokens=48, n=2, ignore_eos=True), on_prompt_done=progress)))
    thread.start()
    assert some_done.wait(60)
    victim.proc.send_signal(signal.SIGKILL)
    assert len(done) < len(prompts) - 8
    thread.join(120)
    result = out["r"]
    assert sorted((s.prompt_index, s.sample_index) for s in result.flat()) == [(i, j) for i in range(30) for j in range(2)]
    assert result.failures and all(victim.url in line for line in result.failures)
    retried = {line.split()[0] for line in result.failures}  # lines start with the rid
    assert all(s.worker != victim.url for s in result.flat() if s.rid in retried)
    events = fleet.check_health()
    assert [(e.url, e.kind) for e in events] == [(victim.url, "dead"), (victim.url, "restarted")]


def test_nccl_replacement_stays_stale_until_next_sync(fleet, model_dir):
    """After NCCL syncs no checkpoint on disk is current: a replacement keeps out of the
    router until the next sync rebuilds the group with it and brings it up to date."""
    sync = NcclWeightSync(fleet, master_address="127.0.0.1", master_port=free_port_block(4), backend="gloo", timeout_s=120)

    def nccl_sync(seed, version):
        trainer = hf_model(perturbed_state(model_dir, seed=seed), model_dir)
        sync.probe = ParityProbe(PROBE, hf_logprob_scorer(trainer), max_new_tokens=6)
        return sync.sync(trainer.state_dict().items(), version), trainer

    nccl_sync(44, 4)
    disk_version = fleet.model_version
    victim = fleet.workers[1]
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait(10)
    events = fleet.check_health()
    assert [(e.url, e.kind) for e in events] == [(victim.url, "dead"), (victim.url, "restarted")] and "stale" in events[1].detail
    assert victim.state == "stale" and victim.url not in fleet.live_urls and victim.url in fleet.sync_urls
    assert victim.url not in [w["url"] for w in fleet.router.workers()]
    assert http.call("GET", victim.url + "/model_info")["weight_version"] == disk_version != fleet.weight_version

    report, trainer = nccl_sync(55, 5)  # rebuilds the group: the replacement is in it
    assert victim.url in report.workers and report.parity.max_abs_diff <= 1e-5
    assert victim.state == "healthy" and victim.url in [w["url"] for w in fleet.router.workers()]
    assert fleet.events[-1].kind == "current"
    result = rollout(fleet, step=10)
    assert [[s.output_ids for s in g] for g in result.samples] == [[r] for r in greedy_reference(trainer, PROMPTS, 8)]
    assert {s.weight_version for s in result.flat()} == {"5"}


def test_attached_workers_are_monitored_not_owned(fleet, model_dir):
    """fleet.worker_urls: servers launched elsewhere (srun) are waited for and monitored,
    and a dead one is dropped rather than restarted."""
    dead = f"http://127.0.0.1:{free_port_block(1)}"
    attached = Fleet(FleetConfig(model_path=str(model_dir), engine="cpu", use_router=False,
                                 worker_urls=tuple(fleet.live_urls), health_timeout_s=1, health_failures_to_dead=1))
    attached.start()
    assert attached.endpoints == fleet.live_urls and attached.check_health() == []
    attached.workers[0].url = dead  # as if that server went away
    events = attached.check_health()
    assert [(e.url, e.kind) for e in events] == [(dead, "dead"), (dead, "dropped")]
    attached.stop()  # stops nothing it did not start
    assert all(http.is_up(u) for u in fleet.live_urls)
