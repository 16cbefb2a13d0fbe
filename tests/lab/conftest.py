import pytest

from steadygrad import lab


@pytest.fixture(scope="session")
def quick_lab():
    """Every claim in quick mode, run once for the lab's tests and the report's."""
    return lab.run(quick=True)
