"""Which host the script believes it runs in: decided by what imports (ldg_core/hosts.py)."""
import pytest

from ldg_core.hosts import HOW, describe_host, detect_host


def finder(*present):
    def find_spec(name):
        if name.split(".")[0] not in {p.split(".")[0] for p in present}:
            raise ModuleNotFoundError(name)  # a missing parent package raises, as importlib does
        return object() if name in present else None
    return find_spec


@pytest.mark.parametrize("present, version, host", [
    ((), "", "a1111"),
    (("backend.sampling.sampling_function",), "2.0.1v1.10.1", "forge"),
    # Forge Neo: the same backend; modules_forge/forge_version.py says "neo".
    (("backend.sampling.sampling_function",), "neo", "neo"),
    (("ldm_patched.modules.samplers",), "", "reforge"),
    # The same name in another package is not the host's.
    (("backend.other",), "neo", "a1111"),
])
def test_detect_host(present, version, host):
    assert detect_host(finder(*present), lambda: version) == host


def test_every_host_is_described_with_how_concepts_are_evaluated():
    assert set(HOW) == {"a1111", "forge", "neo", "reforge"}
    assert "join its model call" in describe_host("reforge")
    assert "call of their own" in describe_host("neo")
