#!/usr/bin/env python
"""Rebuild the demo's base model: ``python scripts/pretrain_base.py [OUT_DIR]``.

This is the script that made ``src/loraforge/demo/assets/base`` (the tiny Llama the demo ships):
it generates the bundled corpus (``loraforge.demo.data``), trains the tokenizer, pretrains the
model and writes a transformers directory. Deterministic on CPU: same torch version, same result
(the loop runs on one thread so that matmul reduction order does not depend on the machine).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path

from loraforge.demo.base import PretrainConfig, build_base

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "src" / "loraforge" / "demo" / "assets" / "base"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "out", nargs="?", default=str(DEFAULT_OUT), help="output directory (default: the shipped base)"
    )
    for f in fields(PretrainConfig):
        p.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    args = vars(p.parse_args(argv))
    out = Path(args.pop("out"))
    cfg = PretrainConfig(**args)
    path = build_base(out, cfg)
    print(json.dumps(json.loads((path / "pretrain.json").read_text()), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
