"""The README stays true: its config example is valid and its commands exist."""

from __future__ import annotations

import re
from pathlib import Path

from bridge.config import check_config

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()


def test_first_lines_are_the_two_commands() -> None:
    head = README.splitlines()[:6]
    assert any("./netns-lab.sh demo" in line for line in head)
    assert any("./netns-lab.sh test" in line for line in head)


def test_config_example_passes_check_config(tmp_path: Path) -> None:
    blocks = re.findall(r"```toml\n(.*?)```", README, re.S)
    assert blocks, "README has no TOML example"
    cfg = tmp_path / "example.toml"
    cfg.write_text(blocks[0])
    assert check_config(cfg) == []


def test_named_topologies_exist() -> None:
    for name in re.findall(r"^\| `([a-z0-9-]+)` \|", README, re.M):
        assert (REPO / "topologies" / f"{name}.toml").is_file(), name


def test_ci_runs_the_readme_test_command() -> None:
    assert "./netns-lab.sh test" in (REPO / ".ci" / "run").read_text()
