import os

import pytest
from hypothesis import settings
from swarm import NodeProcess, TestPeer

from kvx.trust import Identity, Signer

# UCX over plain TCP, as on any machine without RDMA: CI tests the UCX transport for real.
os.environ.setdefault("UCX_TLS", "tcp")
os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")

# CI replays the same examples every run; a developer's run explores new ones.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("dev", deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")

# The files that take minutes, longest first. The test command hands whole files to its
# workers in collection order (pyproject turns off xdist's own reordering); started last,
# one of these runs alone on one worker while the others idle.
LONGEST_FIRST = (
    "test_vllm.py",
    "test_conformance.py",
    "test_floods.py",
    "test_model_cli.py",
    "test_fuzz_live.py",
    "test_demo.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the rest keep their order


@pytest.fixture
def node(tmp_path):
    made = []

    def start(**config) -> NodeProcess:
        n = NodeProcess(tmp_path / f"node{len(made)}", **config).start()
        n.wait_ready()
        made.append(n)
        return n

    yield start
    for n in made:
        n.stop()


@pytest.fixture
def peers():
    made = []

    def connect(node: NodeProcess, identity: Identity | None = None) -> tuple[TestPeer, Signer]:
        ident = identity or Identity.generate()
        made.append(TestPeer(node, ident))
        return made[-1], Signer(ident)

    yield connect
    for p in made:
        p.close()


@pytest.fixture
def hostiles():
    """Make hostile sellers (tests/sellers.py) of some data; each is closed at the end."""
    from sellers import Hostile

    made = []

    def make(data: bytes, **lie) -> Hostile:
        made.append(Hostile(data, **lie))
        return made[-1]

    yield make
    for seller in made:
        seller.close()
