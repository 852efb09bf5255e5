"""Assets of the embedded CPU demo: synthetic digit-sorting parquets, a char-level HF tokenizer,
and a tiny Qwen2 model briefly warmed up so RL starts from a policy that is partly right."""
from steer_megatron.demo_assets.assets import DemoAssets, apply_demo_assets, assets_key, build_demo_assets

__all__ = ["DemoAssets", "apply_demo_assets", "assets_key", "build_demo_assets"]
