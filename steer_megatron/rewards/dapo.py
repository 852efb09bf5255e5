"""The DAPO `math_dapo` scorer, as the STEER release trains with it: +1 correct, -1 wrong.

Two extractions (verl's verl/utils/reward_score/math_dapo.py, after the Minerva / lm-eval
hendrycks_math normalisation):

  dapo_strict_box  the STEER release's default (its math_dapo.compute_score has
                   strict_box_verify=True; its DAPO-Math-17k prompts ask for `\\boxed{}`): the last
                   `\\boxed{...}` within the final 100 characters of the completion's last 300,
                   compared with the ground truth as a string, unnormalised
  dapo_answer      DAPO's original Minerva rule: the last `Answer: ...` line of the final 300
                   characters, normalised (units, `\\text{}`, `$`, `\\frac12`...) and compared as a string

Both are string scans of at most 300 characters, so they run inline (no sandbox).
"""
from __future__ import annotations

import re

from steer_megatron.rewards.registry import register_reward

_TAIL = 300  # the scorer looks at the completion's last 300 characters
_BOX_TAIL = 100  # strict box: the last 100 of those
_ANSWER = re.compile(r"(?i)Answer\s*:\s*([^\n]+)")

# Minerva's answer normalisation (Lewkowycz et al. 2022, as in lm-eval's hendrycks_math and verl)
_SUBS = (("an ", ""), ("a ", ""), (".$", "$"), ("\\$", ""), ("\\ ", ""), (" ", ""), ("mbox", "text"),
         (",\\text{and}", ","), ("\\text{and}", ","), ("\\text{m}", "\\text{}"))
_DROP = ("square", "ways", "integers", "dollars", "mph", "inches", "hours", "km", "units", "\\ldots", "sue", "points",
         "feet", "minutes", "digits", "cents", "degrees", "cm", "gm", "pounds", "meters", "meals", "edges", "students",
         "childrentickets", "multiples", "\\text{s}", "\\text{.}", "\\text{\ns}", "\\text{}^2", "\\text{}^3",
         "\\text{\n}", "\\text{}", "\\mathrm{th}", "^\\circ", "^{\\circ}", "\\;", ",\\!", "{,}", '"', "\\dots")


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` with balanced braces, or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth = 0
    for j in range(start + len("\\boxed"), len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[start + len("\\boxed{"): j]
    return None


def normalize_final_answer(ans: str) -> str:
    ans = ans.split("=")[-1]
    for before, after in _SUBS:
        ans = ans.replace(before, after)
    for word in _DROP:
        ans = ans.replace(word, "")
    ans = re.sub(r"(.*?)(\$)(.*?)(\$)(.*)", "$\\3$", ans)
    for macro in ("text", "textbf", "overline"):
        ans = re.sub(r"(\\" + macro + r"\{)(.*?)(\})", "\\2", ans)
    ans = re.sub(r"(\\boxed\{)(.*)(\})", "\\2", ans)
    ans = re.sub(r"(frac)([^{])(.)", "frac{\\2}{\\3}", ans)
    ans = re.sub(r"(sqrt)([^{])", "sqrt{\\2}", ans)
    ans = ans.replace("$", "")
    if ans.replace(",", "").isdigit():
        ans = ans.replace(",", "")
    return ans.strip()


@register_reward("dapo_strict_box", sandboxed=False)
def dapo_strict_box(completion: str, ground_truth: str) -> float:
    boxed = last_boxed(completion[-_TAIL:][-_BOX_TAIL:])
    return 1.0 if boxed is not None and boxed == ground_truth else -1.0


@register_reward("dapo_answer", sandboxed=False)
def dapo_answer(completion: str, ground_truth: str) -> float:
    found = _ANSWER.findall(completion[-_TAIL:])
    if not found:
        return -1.0
    return 1.0 if normalize_final_answer(found[-1]) == normalize_final_answer(ground_truth) else -1.0
