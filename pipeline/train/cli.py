"""``python -m pipeline.train CONFIG [--set key=value ...]``: one fine-tuning run."""

from __future__ import annotations

import sys

from pipeline.config.cli import base_parser, fail, user_errors
from pipeline.config.run import load_run_config
from pipeline.train.driver import run_training


def main(argv=None) -> int:
    args = base_parser("python -m pipeline.train", __doc__, "run YAML (see configs/)", "train.steps=20").parse_args(argv)
    try:
        cfg = load_run_config(args.config, args.overrides)
        out = run_training(cfg, args.config)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except user_errors() as e:
        return fail(e)
    m = out["metrics"]
    accs = {k.split("/")[1]: v for k, v in m.items() if k.startswith("eval/") and k.endswith("/acc")}
    print(f"\nrun {out['run_id']} finished in {out['wall_s']:.0f}s; adapter: {out['adapter_dir']}")
    if accs:
        print("held-out accuracy: " + ", ".join(f"{k} {v:.3f}" for k, v in accs.items())
              + f" | mean {m.get('eval/mean_acc', float('nan')):.3f}")
    return 0
