"""Run an experiment once per seed and write its metrics as mean ± standard deviation with the seeds listed.

    python -m tools.seeds run --seeds 1 2 3 --out logs/seeds/demo_det_trees -- experiment=demo_det_trees
    python -m tools.seeds collect logs/demo_det_trees/multiruns/<time>    # after run.py -m ... seed=1,2,3

``run`` starts ``python run.py <overrides> seed=<s> ++data.seed=<s> hydra.run.dir=<out>/seed_<s>`` for each seed
in turn (``--fixed-data-seed`` keeps the data config's own seed, which fixes the data order, split and
augmentation). A seed whose run finished is collected, not run again; an interrupted one resumes from its
``last.ckpt`` in its own folder, so a stopped sweep continues where it was. ``collect`` reads run
folders (or sweep folders holding them). Each run's metrics are the last value of each column of its Lightning
``metrics.csv`` (every ``test/`` column unless ``--metrics`` names others) and its seed is read from its
``config.yaml``. The summary is printed, and with ``--out`` written as ``summary.md`` (a table and a Markdown row
for the README) and ``summary.json`` (values per seed, plus the CPU and the kernel set torch chose: runs on
other CPUs can differ).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
MARKER = "tools.seeds summary"


@dataclass
class RunResult:
    """One run's seed, folder and final metric values."""

    seed: int
    path: Path
    metrics: dict[str, float]


def last_values(metrics_csv: Path) -> dict[str, float]:
    """The last non-empty value of every column of a Lightning ``metrics.csv`` except ``epoch`` and ``step``."""
    values: dict[str, float] = {}
    with open(metrics_csv, newline="") as handle:
        for row in csv.DictReader(handle):
            values.update({key: float(value) for key, value in row.items()
                           if value not in ("", None) and key not in ("epoch", "step")})
    return values


def run_seed(run_dir: Path) -> int:
    """The ``seed`` recorded in the run's ``config.yaml``."""
    from omegaconf import OmegaConf

    config = run_dir / "config.yaml"
    if not config.is_file():
        raise FileNotFoundError(f"{config} not found: not a run folder written by run.py")
    seed = OmegaConf.load(config).get("seed")
    if not isinstance(seed, int):
        raise ValueError(f"{config}: seed is {seed!r}, not an integer")
    return seed


def run_folders(paths: Sequence[Path]) -> list[Path]:
    """Run folders among ``paths``: a folder with ``metrics.csv`` is a run; otherwise its sub-folders that are runs
    (a Hydra sweep). A path that is neither is named."""
    runs: list[Path] = []
    for path in paths:
        if (path / "metrics.csv").is_file():
            runs.append(path)
            continue
        inner = sorted(child for child in path.iterdir() if (child / "metrics.csv").is_file()) if path.is_dir() else []
        if not inner:
            raise FileNotFoundError(f"{path}: no metrics.csv in it or in its sub-folders (runs need logger=csv; "
                                    f"debug configs and fast_dev_run turn the logger off)")
        runs += inner
    return runs


def collect(paths: Sequence[Path]) -> list[RunResult]:
    """Seed and final metrics of every run under ``paths``, ordered by seed; a seed seen twice is refused."""
    results = [RunResult(run_seed(path), path, last_values(path / "metrics.csv")) for path in run_folders(paths)]
    seen: dict[int, Path] = {}
    for result in results:
        if result.seed in seen:
            raise ValueError(f"seed {result.seed} appears twice: {seen[result.seed]} and {result.path}")
        seen[result.seed] = result.path
    return sorted(results, key=lambda result: result.seed)


def summarise(results: Sequence[RunResult], metrics: Optional[Sequence[str]] = None) -> dict[str, dict]:
    """Per metric: the values per seed, their mean and sample standard deviation (n - 1; NaN for one run).

    ``metrics`` defaults to every ``test/`` metric; a requested metric missing from a run is named."""
    if not results:
        raise ValueError("no runs to summarise")
    names = list(metrics) if metrics else sorted({key for result in results for key in result.metrics
                                                  if key.startswith("test/")})
    if not names:
        raise ValueError(f"no test/ metrics in {results[0].path / 'metrics.csv'}; name them with --metrics")
    summary = {}
    for name in names:
        missing = [str(result.path) for result in results if name not in result.metrics]
        if missing:
            raise KeyError(f"{name} is missing from {', '.join(missing)}")
        values = [result.metrics[name] for result in results]
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else math.nan
        summary[name] = {"mean": mean, "std": std, "n": len(values), "seeds": [r.seed for r in results],
                         "values": values}
    return summary


def is_fraction(entry: dict) -> bool:
    """Whether every value lies in [0, 1]: a fraction (accuracy, DSC, IoU, AP) that ``--percent`` shows x 100."""
    return all(0.0 <= value <= 1.0 for value in entry["values"])


def _format(entry: dict, percent: bool) -> tuple[float, int, str]:
    """(scale, decimals, unit) of a metric's figures: percent for fractions when asked, else as logged."""
    return (100.0, 1, " %") if percent and is_fraction(entry) else (1.0, 4, "")


def spread(entry: dict, percent: bool = False) -> str:
    """``mean ± std``; with ``percent``, fractions in percent (metrics with other units, e.g. HD95 in mm, as logged)."""
    scale, digits, unit = _format(entry, percent)
    std = "n/a" if math.isnan(entry["std"]) else f"{entry['std'] * scale:.{digits}f}"
    return f"{entry['mean'] * scale:.{digits}f} ± {std}{unit}"


def markdown(summary: dict[str, dict], label: str, percent: bool = False) -> str:
    """A table (one row per metric) and the one-line README row ``| label | metric m ± s, ... | seeds ... |``."""
    seeds = ", ".join(str(s) for s in next(iter(summary.values()))["seeds"])
    table = ["| metric | mean ± std | n | values (by seed) |", "|---|---|---|---|"]
    for name, entry in summary.items():
        scale, digits, _ = _format(entry, percent)
        values = ", ".join(f"{v * scale:.{digits}f}" for v in entry["values"])
        table.append(f"| {name} | {spread(entry, percent)} | {entry['n']} | {values} |")
    row = f"| {label} | " + ", ".join(f"{name.split('/', 1)[-1]} {spread(entry, percent)}"
                                        for name, entry in summary.items()) + f" | seeds {seeds} |"
    return "\n".join([f"<!-- {MARKER} -->", *table, "", "README row:", "", row, ""])


def machine() -> dict[str, str]:
    """The CPU and the kernel set torch dispatches to (both can change float results between machines)."""
    import torch

    model = ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        model = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                      if line.startswith("model name")), "")
    return {"cpu": model, "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": str(torch.get_num_threads())}


def write_new(path: Path, text: str, created_by_us: bool) -> None:
    """Write ``path`` unless a file not written by this tool is there (then refuse, naming it)."""
    if path.exists() and not created_by_us:
        raise FileExistsError(f"{path} exists and was not written by tools.seeds; choose another --out")
    path.write_text(text)


def write_summary(out: Path, summary: dict[str, dict], label: str, percent: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    md, js = out / "summary.md", out / "summary.json"
    ours_md = md.is_file() and md.read_text().startswith(f"<!-- {MARKER} -->")
    ours_js = js.is_file() and json.loads(js.read_text() or "{}").get("written_by") == MARKER
    write_new(md, markdown(summary, label, percent), ours_md)
    write_new(js, json.dumps({"written_by": MARKER, "label": label, "machine": machine(), "metrics": summary},
                             indent=2) + "\n", ours_js)


def finished(run_dir: Path) -> bool:
    """Whether the run in ``run_dir`` got as far as its test metrics."""
    metrics = run_dir / "metrics.csv"
    return metrics.is_file() and any(key.startswith("test/") for key in last_values(metrics))


def run_seeds(overrides: Sequence[str], seeds: Sequence[int], out: Path, vary_data: bool = True) -> list[Path]:
    """Run ``run.py <overrides>`` once per seed into ``<out>/seed_<s>``. A finished run's folder is collected as it
    is; an interrupted one (no test metrics yet) resumes from its ``checkpoints/last.ckpt`` in the same folder, its
    history kept; a folder with neither is named and left alone."""
    folders = []
    for seed in seeds:
        run_dir = out / f"seed_{seed}"
        folders.append(run_dir)
        resume = []
        if finished(run_dir):
            print(f"[seeds] {run_dir} exists: collecting it instead of running seed {seed} again", flush=True)
            continue
        if run_dir.exists():
            checkpoint = run_dir / "checkpoints" / "last.ckpt"
            if not checkpoint.is_file():
                raise RuntimeError(f"{run_dir} exists but holds neither a finished run (test metrics in metrics.csv) "
                                   f"nor checkpoints/last.ckpt to resume from; remove it or choose another --out")
            print(f"[seeds] {run_dir} was interrupted: resuming seed {seed} from {checkpoint}", flush=True)
            resume = [f"ckpt_path={checkpoint}"]
        command = [sys.executable, str(ROOT / "run.py"), *overrides, f"seed={seed}",
                   *([f"++data.seed={seed}"] if vary_data else []), f"hydra.run.dir={run_dir}", *resume]
        print(f"[seeds] seed {seed}: {' '.join(command[1:])}", flush=True)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        if subprocess.run(command, env=env).returncode != 0:
            raise RuntimeError(f"seed {seed} failed (run folder {run_dir}); fix the run, remove that folder, and "
                               f"start again: finished seeds are kept")
    return folders


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tools.seeds", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run", help="run an experiment once per seed, then summarise")
    run_parser.add_argument("--seeds", type=int, nargs="+", required=True)
    run_parser.add_argument("--out", type=Path, required=True, help="folder for the seed_<s> runs and the summary")
    run_parser.add_argument("--fixed-data-seed", action="store_true",
                            help="vary only the model seed; keep the data config's seed (data order, augmentation)")
    run_parser.add_argument("overrides", nargs="*", help="run.py overrides (after --)")
    collect_parser = commands.add_parser("collect", help="summarise finished run (or sweep) folders")
    collect_parser.add_argument("paths", type=Path, nargs="+")
    collect_parser.add_argument("--out", type=Path, help="write summary.md and summary.json here")
    for sub in (run_parser, collect_parser):
        sub.add_argument("--metrics", nargs="+", help="metric columns to summarise (default: every test/ metric)")
        sub.add_argument("--percent", action="store_true", help="fractions (values in [0, 1]) x 100")
        sub.add_argument("--label", help="first cell of the README row (default: the overrides or folders)")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.command == "run":
        paths = run_seeds(args.overrides, args.seeds, args.out, vary_data=not args.fixed_data_seed)
        label = args.label or f"`{' '.join(args.overrides)}`"
    else:
        paths, label = args.paths, args.label or ", ".join(str(p) for p in args.paths)
    summary = summarise(collect(paths), args.metrics)
    print(markdown(summary, label, args.percent))
    if args.out:
        write_summary(args.out, summary, label, args.percent)
        print(f"[seeds] wrote {args.out / 'summary.md'} and {args.out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
