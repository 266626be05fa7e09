"""Run timm's own model tests against every registered backbone.

    python -m tools.timm_suite [pytest arguments]        (``make test-timm``)

timm's ``tests/test_models.py`` is the file every model merged into timm must pass. It ships in timm's
source distribution, not in the wheel, so this runner fetches the sdist of the installed (pinned) timm
with ``pip download``, keeps the test file and timm's pytest configuration under ``.cache/timm-suite/``
and runs it with this module as a pytest plugin:

- the ``test_<family>`` variants run every test, the full variants the cheap ones (``CHEAP_TESTS``: built
  on the meta device); timm's own models and model-specific tests are deselected;
- our models are listed where timm lists a family's kind, as merging them into timm would do: every
  family module in ``FEAT_INTER_FILTERS`` (models with ``forward_intermediates``), and the models whose
  features are tokens rather than maps (no ``pool_size``, Vim) in ``NON_STD_FILTERS``, the ViTs' list;
- the tests in ``tools/timm_suite_exclusions.txt`` are skipped, each with its reason.

The run fails if a registered backbone runs no test or an exclusion matches nothing.
"""

from __future__ import annotations

import fnmatch
import importlib.metadata
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence

import pytest
from timm.models import get_pretrained_cfg

import backbones  # registers our models, also before test_models.py lists timm's (as the plugin)

REPO = Path(__file__).resolve().parents[1]
EXCLUSIONS = Path(__file__).with_name("timm_suite_exclusions.txt")
CACHE = REPO / ".cache" / "timm-suite"
# Tests cheap enough for every variant: they build the model on the meta device.
CHEAP_TESTS = frozenset({"test_model_default_cfgs", "test_model_default_cfgs_non_std"})
# Where the registries are extended: test_models.py defines both lists above this line.
_REGISTRY_ANCHOR = "NUM_NON_STD = len(NON_STD_FILTERS)\n"
_SUITE_FILES = ("pyproject.toml", "tests/test_models.py")


class Exclusion(NamedTuple):
    test: str
    model_pattern: str
    reason: str


def read_exclusions(path: Path = EXCLUSIONS) -> List[Exclusion]:
    """The exclusion list: one ``<test function> <model name pattern> <reason>`` per line, ``#`` comments."""
    exclusions = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split(None, 2)
        if len(fields) < 3:
            raise ValueError(f"{path}:{number}: expected '<test function> <model pattern> <reason>', got {line!r}")
        exclusions.append(Exclusion(*fields))
    return exclusions


def fetch_suite(version: str, cache: Path = CACHE) -> Path:
    """timm ``version``'s ``pyproject.toml`` and ``tests/test_models.py`` from its sdist, under
    ``cache/timm-<version>`` (downloaded once); returns that folder."""
    root = cache / f"timm-{version}"
    if all((root / name).is_file() for name in _SUITE_FILES):
        return root
    with tempfile.TemporaryDirectory() as download:
        subprocess.run([sys.executable, "-m", "pip", "download", f"timm=={version}", "--no-deps",
                        "--no-binary", ":all:", "--quiet", "-d", download], check=True)
        sdist = Path(download) / f"timm-{version}.tar.gz"
        if not sdist.is_file():
            raise FileNotFoundError(f"pip download gave no {sdist.name} in {download}")
        with tarfile.open(sdist) as archive:
            for name in _SUITE_FILES:
                member = archive.extractfile(f"timm-{version}/{name}")
                if member is None:
                    raise FileNotFoundError(f"{sdist.name} has no timm-{version}/{name}")
                (root / name).parent.mkdir(parents=True, exist_ok=True)
                (root / name).write_bytes(member.read())
    return root


def registry_lines() -> str:
    """The lines that list our models in test_models.py's FEAT_INTER_FILTERS and NON_STD_FILTERS."""
    names = backbones.list_backbones()
    modules = sorted({backbones.family_of(name).__name__.rsplit(".", 1)[-1] for name in names})
    token_models = [name for name in names if not get_pretrained_cfg(name).pool_size]
    return (f"FEAT_INTER_FILTERS += {modules!r}  # mambalab: families with forward_intermediates\n"
            f"NON_STD_FILTERS += {token_models!r}  # mambalab: token features, as timm's ViTs\n")


def with_our_registries(suite: Path) -> Path:
    """test_models.py with our models in its registries, written next to the original."""
    source = (suite / "tests" / "test_models.py").read_text()
    if source.count(_REGISTRY_ANCHOR) != 1:
        raise ValueError(f"{suite / 'tests' / 'test_models.py'}: expected one line {_REGISTRY_ANCHOR.strip()!r} "
                         "after FEAT_INTER_FILTERS and NON_STD_FILTERS; update tools/timm_suite.py for this timm")
    patched = suite / "tests" / "test_models_mambalab.py"
    patched.write_text(source.replace(_REGISTRY_ANCHOR, registry_lines() + _REGISTRY_ANCHOR))
    return patched


def main(argv: Optional[Sequence[str]] = None) -> int:
    version = importlib.metadata.version("timm")
    suite = fetch_suite(version)
    test_file = with_our_registries(suite)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    command = [sys.executable, "-m", "pytest", str(test_file), "-c", str(suite / "pyproject.toml"),
               "--rootdir", str(suite), "-p", "tools.timm_suite", "-p", "no:cacheprovider", "-q", "-ra",
               *(argv if argv is not None else sys.argv[1:])]
    print(f"timm {version} suite: {' '.join(command)}", flush=True)
    return subprocess.run(command, env=env, cwd=REPO).returncode


# --- pytest plugin (``-p tools.timm_suite``) ---

def _model_of(item: pytest.Item) -> Optional[str]:
    """The item's model name without its pretrained tag, or None for tests of no model."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    name = params.get("model_name")
    return name.split(".", 1)[0] if isinstance(name, str) else None


def pytest_configure(config: pytest.Config) -> None:
    if not config.pluginmanager.hasplugin("timeout"):
        config.addinivalue_line("markers", "timeout(seconds): pytest-timeout's limit (not installed: ignored)")


def pytest_collection_modifyitems(config: pytest.Config, items: List[pytest.Item]) -> None:
    """Keep our models' tests (all for test variants, ``CHEAP_TESTS`` for the rest), skip the exclusions."""
    ours = set(backbones.list_backbones())
    exclusions = read_exclusions()
    used: Dict[Exclusion, int] = {exclusion: 0 for exclusion in exclusions}
    kept, dropped, tested = [], [], set()
    for item in items:
        model, test = _model_of(item), item.originalname
        if model not in ours:
            dropped.append(item)
            continue
        excluded = next((e for e in exclusions if e.test == test and fnmatch.fnmatchcase(model, e.model_pattern)),
                        None)
        if excluded is not None:
            used[excluded] += 1
            item.add_marker(pytest.mark.skip(reason=f"excluded in {EXCLUSIONS.name}: {excluded.reason}"))
            kept.append(item)
        elif model.startswith("test_") or test in CHEAP_TESTS:
            tested.add(model)
            kept.append(item)
        else:
            dropped.append(item)
    unused = [f"{e.test} {e.model_pattern}" for e, count in used.items() if count == 0]
    untested = sorted(ours - tested)
    if (unused or untested) and not config.getoption("keyword") and not config.getoption("markexpr"):
        raise pytest.UsageError(f"timm suite: exclusions that match no test: {unused}; "
                                f"registered backbones that run no test: {untested}")
    config.hook.pytest_deselected(items=dropped)
    items[:] = kept


if __name__ == "__main__":
    sys.exit(main())
