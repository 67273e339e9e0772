"""Shared pytest fixtures."""
import pathlib

import lit_edit  # noqa: F401  (before any test imports torch: lit_edit sets OMP_WAIT_POLICY)
import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_world():
    """Path of the trained "tiny" fact world, cached under ``<repo>/data/cache`` (gitignored).

    ``LIT_EDIT_CACHE`` points there for the rest of the session, so code that resolves
    ``"world:tiny"`` by itself finds the same directory. The first run trains (~35 s); later
    runs reuse the cache.
    """
    from lit_edit.world import ensure_world

    mp = pytest.MonkeyPatch()
    mp.setenv("LIT_EDIT_CACHE", str(REPO_ROOT / "data" / "cache"))
    try:
        yield ensure_world("tiny", verbose=False)
    finally:
        mp.undo()
