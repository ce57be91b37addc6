"""Lab tests: skipped (with the reason) unless root and /dev/net/tun; fixtures that build labs.

Every test in tests/lab/ is marked `netns`. Labs are named by `lab_instance_names` (unique per
pytest run) and ALWAYS destroyed by the fixture that built them, whatever the test did.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bridge.lab.netlink import Lab
from bridge.lab.topology import load
from bridge.lab.topomodel import Topology

HERE = Path(__file__).parent


def skip_reason() -> str | None:
    """Why lab tests cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "lab tests need root (network namespaces); run ./netns-lab.sh test"
    if not os.path.exists("/dev/net/tun"):
        return "lab tests need /dev/net/tun (TUN devices)"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = skip_reason()
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.netns)
        if reason and item.get_closest_marker("netns") is not None:
            item.add_marker(pytest.mark.skip(reason=reason))


LabFactory = Callable[..., Lab]


@pytest.fixture
def lab_factory(lab_instance_names: Callable[[], str]) -> Iterator[LabFactory]:
    """Name: lab_factory / Scope: function / Depends: lab_instance_names.

    `make(topology="two-sites-plain", start=True)` brings a topology (name, path or
    Topology) up under a fresh instance name and returns the Lab. Every lab made is
    destroyed when the test ends, pass or fail.
    """
    labs: list[Lab] = []

    def make(topology: str | Path | Topology = "two-sites-plain", *, start: bool = True) -> Lab:
        topo = topology if isinstance(topology, Topology) else load(topology)
        lab = Lab.up(topo, instance=lab_instance_names(), start=start)
        labs.append(lab)
        return lab

    try:
        yield make
    finally:
        errors: list[BaseException] = []
        for lab in reversed(labs):
            try:
                lab.destroy()
            except Exception as e:  # noqa: BLE001 - destroy the others, then report
                errors.append(e)
        if errors:
            raise errors[0]


@pytest.fixture(scope="module")
def two_sites_plain(lab_instance_names: Callable[[], str]) -> Iterator[Lab]:
    """Name: two_sites_plain / Scope: module / Depends: lab_instance_names.

    The `two-sites-plain` topology (no tunnel), shared by the tests of one module.
    """
    lab = Lab.up(load("two-sites-plain"), instance=lab_instance_names())
    try:
        yield lab
    finally:
        lab.destroy()


@pytest.fixture(scope="module")
def two_sites(lab_instance_names: Callable[[], str]) -> Iterator[Lab]:
    """Name: two_sites / Scope: module / Depends: lab_instance_names.

    The `two-sites` topology: two-sites-plain plus the gateways' `run` lines (grebe).
    """
    lab = Lab.up(load("two-sites"), instance=lab_instance_names())
    try:
        yield lab
    finally:
        lab.destroy()
