"""Every ablation sweep in experiments/ablations.sh composes into valid configs (each job)."""
import itertools
import re

import pytest

from icons.config import validate

from .conftest import REPO_ROOT, compose_config

SCRIPT = (REPO_ROOT / "experiments" / "ablations.sh").read_text()
SWEEPS = dict(re.findall(r"^\s+(\w+)\)\s+sweep=\(([^)]*)\)", SCRIPT, re.M))


def test_every_documented_ablation_is_in_the_script():
    readme = (REPO_ROOT / "experiments" / "README.md").read_text()
    assert set(SWEEPS) == set(re.findall(r"`ablations.sh (\w+)`", readme)) and len(SWEEPS) >= 5


@pytest.mark.parametrize("name", sorted(SWEEPS))
def test_ablation_jobs_compose(name):
    axes = []
    for arg in SWEEPS[name].split():
        key, values = arg.split("=", 1)
        axes.append([f"{key}={v}" for v in values.split(",")])
    jobs = list(itertools.product(*axes))
    assert len(jobs) >= 2
    seen = set()
    for job in jobs:
        cfg = compose_config([f"experiment_name=ablation_{name}", *job])
        validate(cfg)
        seen.add(str(sorted(job)))
    assert len(seen) == len(jobs)


def test_the_readme_select_only_command_composes_and_ends_at_the_subset():
    """The README's one command for selecting without training: the stages up to the subset."""
    readme = (REPO_ROOT / "README.md").read_text()
    block = readme[readme.index("python -m icons.run +experiment=llava_20pct stages=[check"):]
    argv = block[:block.index("```")].replace("\\\n", " ").split()[3:]
    cfg = validate(compose_config(argv))
    assert cfg.stages[-1] == "subset" and "train" not in cfg.stages and cfg.selectors == ["icons"]
    assert "selection/icons/subset/subset.json" in readme and "--data_path" in readme
