"""Prompts from verl-layout RL parquets (../shared/datasets/README.md), tokenised and filtered.

Each row is checked on load; a malformed row raises naming the file, row and column (or,
with on_malformed="skip", is counted and reported). Prompts go through the tokenizer's chat
template with the generation prompt appended (apply_chat_template=False: the messages' contents
as plain text, for base models); prompts longer than max_prompt_len tokens are
dropped and the count is logged, since silently truncating a maths problem changes it.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import pyarrow.parquet as pq

log = logging.getLogger(__name__)

class MalformedRowError(ValueError):
    """A parquet row that does not follow the verl RL layout."""


@dataclass(frozen=True)
class PromptExample:
    prompt_ids: list[int]
    data_source: str
    ground_truth: str
    reward_style: str | None
    index: Any  # extra_info.index when present, else "<file>:<row>"
    source_file: str
    row: int


@dataclass
class LoadReport:
    rows: int = 0
    kept: int = 0
    malformed: int = 0  # skipped, with on_malformed="skip"
    too_long: int = 0

    def summary(self) -> str:
        return (f"{self.rows} rows: kept {self.kept}, dropped {self.too_long} with prompts over the limit, "
                f"skipped {self.malformed} malformed")


def _check_row(row: dict, prompt_key: str) -> str | None:
    """What is wrong with a row, as `column: problem`, or None if it is well formed."""
    ds = row.get("data_source")
    if not isinstance(ds, str) or not ds:
        return f"data_source: expected a non-empty string, got {ds!r}"
    msgs = row.get(prompt_key)
    if not isinstance(msgs, (list, tuple)) or not msgs:
        return f"{prompt_key}: expected a non-empty list of {{role, content}} messages, got {type(msgs).__name__}"
    for j, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            return f"{prompt_key}[{j}]: expected {{role: str, content: str}}, got {m!r:.200}"
    rm = row.get("reward_model")
    if isinstance(rm, dict) and isinstance(rm.get("ground_truth"), (dict, list)):
        rm["ground_truth"] = json.dumps(rm["ground_truth"])  # code tests stored as a struct: the rewards take JSON text
    if not isinstance(rm, dict) or not isinstance(rm.get("ground_truth"), str):
        return f"reward_model.ground_truth: expected a string, got {rm!r:.200}"
    if not rm["ground_truth"].strip():
        return "reward_model.ground_truth: empty string"
    return None


class MissingChatTemplateError(ValueError):
    """apply_chat_template is on but the tokenizer has no chat template."""


def encode_prompt(tokenizer, messages: list[dict], apply_chat_template: bool = True) -> list[int]:
    """Token ids of one prompt: the chat template with the assistant turn opened, or (for
    models without a template) the contents joined by blank lines, with the tokenizer's own
    special tokens (e.g. BOS)."""
    if not apply_chat_template:
        return list(tokenizer("\n\n".join(m["content"] for m in messages))["input_ids"])
    if not getattr(tokenizer, "chat_template", None):
        raise MissingChatTemplateError(
            f"the tokenizer ({getattr(tokenizer, 'name_or_path', '?')}) has no chat template: set "
            "data.apply_chat_template=false to send plain-text prompts, or add a template (chat_template.jinja "
            "in the model directory; python -m steer_megatron.prepare_model --chat-template FILE for a GGUF)"
        )
    return _encode_chat(tokenizer, messages)


def _encode_chat(tokenizer, messages: list[dict]) -> list[int]:
    out = tokenizer.apply_chat_template(
        [{"role": m["role"], "content": m["content"]} for m in messages], add_generation_prompt=True, tokenize=True
    )
    # transformers 5 returns a BatchEncoding here, 4.x a plain list.
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def load_rl_parquets(
    paths: Sequence[str | Path],
    tokenizer,
    *,
    max_prompt_len: int,
    prompt_key: str = "prompt",
    on_malformed: str = "error",
    max_rows: int | None = None,
    apply_chat_template: bool = True,
) -> tuple[list[PromptExample], LoadReport]:
    """Read, check, tokenise and length-filter every row of `paths` (in file order).

    `max_rows` reads only the first rows of each file (for quick checks)."""
    if on_malformed not in ("error", "skip"):
        raise ValueError(f"on_malformed={on_malformed!r}: must be 'error' or 'skip'")
    examples: list[PromptExample] = []
    report = LoadReport()
    for path in map(str, paths):
        if not Path(path).is_file():
            raise FileNotFoundError(f"RL parquet {path} does not exist")
        table = pq.read_table(path)
        missing = [c for c in ("data_source", prompt_key, "reward_model") if c not in table.column_names]
        if missing:
            raise MalformedRowError(
                f"{path}: missing column(s) {missing}; the verl RL layout needs data_source, {prompt_key}, "
                f"reward_model (see ../shared/datasets/README.md)"
            )
        if max_rows is not None:
            table = table.slice(0, max_rows)
        cols = [c for c in ("data_source", prompt_key, "reward_model", "extra_info") if c in table.column_names]
        for r, row in enumerate(table.select(cols).to_pylist()):
            report.rows += 1
            problem = _check_row(row, prompt_key)
            if problem is not None:
                if on_malformed == "error":
                    raise MalformedRowError(
                        f"{path} row {r}: column {problem}. Fix the row, or set data.on_malformed=skip to drop such rows"
                    )
                report.malformed += 1
                continue
            ids = encode_prompt(tokenizer, row[prompt_key], apply_chat_template)
            if len(ids) > max_prompt_len:
                report.too_long += 1
                continue
            extra = row.get("extra_info") or {}
            rm = row["reward_model"]
            examples.append(PromptExample(
                prompt_ids=ids, data_source=row["data_source"], ground_truth=rm["ground_truth"],
                reward_style=rm.get("style"), index=extra.get("index", f"{Path(path).name}:{r}"),
                source_file=path, row=r,
            ))
            report.kept += 1
    log.info("RL data %s: %s (max_prompt_len=%d)", [str(p) for p in paths], report.summary(), max_prompt_len)
    if report.too_long:
        log.warning("dropped %d of %d prompts longer than data.max_prompt_len=%d tokens",
                    report.too_long, report.rows, max_prompt_len)
    if not examples:
        raise ValueError(f"no usable prompts in {list(map(str, paths))}: {report.summary()}")
    return examples, report
