"""Train an OpenMMLab config with mmengine's Runner (the pip packages of mmdet/mmseg ship no tools/train.py).

    python docs/mm/train.py <config.py> [--work-dir DIR] [--cfg-options key=value ...]

Run from the mambalab checkout (or with mambalab installed) so ``custom_imports=["backbones.mm"]`` resolves.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mmengine.config import Config, DictAction
from mmengine.runner import Runner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="mmdet/mmseg config file")
    parser.add_argument("--work-dir", help="where logs and checkpoints go (default: work_dirs/<config name>)")
    parser.add_argument("--cfg-options", nargs="+", action=DictAction, help="override config keys, key=value")
    args = parser.parse_args()
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    cfg.work_dir = args.work_dir or str(Path("work_dirs") / Path(args.config).stem)
    Runner.from_cfg(cfg).train()


if __name__ == "__main__":
    main()
