"""`python -m steer_megatron.train CONFIG [key=value ...]` (or under torchrun for several ranks).

With no CONFIG, runs the embedded CPU default (configs/cpu_demo.yaml).
"""
from __future__ import annotations

import argparse
import sys

from steer_megatron.config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m steer_megatron.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", nargs="?", help="YAML config (default: configs/cpu_demo.yaml)")
    ap.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. trainer.total_steps=10 parallel.tp=2")
    args = ap.parse_args(argv)
    config, overrides = args.config, args.overrides
    if config is not None and "=" in config and not config.endswith((".yaml", ".yml")):
        config, overrides = None, [config, *overrides]  # only overrides were given
    try:
        cfg = load_config(config, overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    from steer_megatron.train.loop import train

    train(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
