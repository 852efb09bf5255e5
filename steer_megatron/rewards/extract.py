"""Pull the final answer out of a completion: the last `\\boxed{...}` or the last `Answer: ...` line.

The datasets ask for one of the two forms (../shared/datasets/README.md); whichever appears
later in the text is the model's final word. Pure string scanning, linear time, so it is safe
to run on any input without a time limit.
"""
from __future__ import annotations

import re

# Answers longer than this are not answers; refusing them keeps sympy away from megabyte inputs.
MAX_ANSWER_CHARS = 1000

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*")
# "Answer:" at a line start (optionally bold/with markdown), anything up to the end of the line.
_ANSWER_LINE = re.compile(r"(?im)^[ \t*#>]*answer[ \t*]*:[ \t*]*(.+?)[ \t]*$")


def _last_boxed(text: str) -> tuple[int, str | None]:
    """Position and content of the last balanced `\\boxed{...}` (or `\\boxed x`); (-1, None) if none."""
    best: tuple[int, str | None] = (-1, None)
    for m in _BOXED.finditer(text):
        i = m.end()
        if i < len(text) and text[i] == "{":
            depth, j = 0, i
            while j < len(text):
                c = text[j]
                if c == "\\" and j + 1 < len(text):  # an escaped brace does not count
                    j += 2
                    continue
                if c == "{":
                    depth += 1
                elif c == "}":
                    depth -= 1
                    if depth == 0:
                        break
                j += 1
            if depth == 0 and j < len(text):
                best = (m.start(), text[i + 1 : j])
        else:  # `\boxed 5`: the argument is the next token
            tok = re.match(r"[^\s$]+", text[i:])
            if tok and m.end() > m.start() + len("\\boxed"):
                best = (m.start(), tok.group(0))
    return best


def _last_answer_line(text: str) -> tuple[int, str | None]:
    last = None
    for last in _ANSWER_LINE.finditer(text):
        pass
    if last is None:
        return -1, None
    ans = last.group(1).strip()
    # "Answer: $42$", "Answer: **42**.", "Answer: \(42\)": strip the wrapping, keep the maths.
    ans = ans.strip("*").strip().rstrip(".").strip()
    for lo, hi in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if ans.startswith(lo) and ans.endswith(hi) and len(ans) >= len(lo) + len(hi):
            ans = ans[len(lo) : len(ans) - len(hi)].strip()
            break
    ans = ans.rstrip(".").strip()
    boxed_pos, boxed = _last_boxed(ans)
    if boxed is not None:  # "Answer: \boxed{5}"
        ans = boxed
    return last.start(), ans


def extract_final_answer(text: str) -> str | None:
    """The completion's final answer string, or None when it gives none (or an absurdly long one)."""
    if not isinstance(text, str) or not text:
        return None
    b_pos, boxed = _last_boxed(text)
    a_pos, line = _last_answer_line(text)
    ans = boxed if b_pos >= a_pos else line
    if ans is None:
        return None
    ans = ans.strip()
    if not ans or len(ans) > MAX_ANSWER_CHARS:
        return None
    return ans
