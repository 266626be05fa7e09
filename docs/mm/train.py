"""Train (or, with --test, evaluate) an OpenMMLab config with mmengine's Runner (the pip packages of mmdet/mmseg
ship no tools/train.py).

    python docs/mm/train.py <config.py> [--work-dir DIR] [--cfg-options key=value ...]
    python docs/mm/train.py <config.py> --test --cfg-options load_from=weights/upernet_vmamba_t/openmmlab.pth

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
    parser.add_argument("--test", action="store_true", help="evaluate the checkpoint in load_from instead of training")
    args = parser.parse_args()
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    cfg.work_dir = args.work_dir or str(Path("work_dirs") / Path(args.config).stem)
    runner = Runner.from_cfg(cfg)
    if args.test:
        runner.test()
    else:
        runner.train()


if __name__ == "__main__":
    main()
