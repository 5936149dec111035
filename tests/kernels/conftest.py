"""Fixtures the kernel tests share."""

import pytest

from testutil.kernel_util import poisoned_empty


@pytest.fixture
def poisoned():
    """Outputs the kernels forget to write hold NaN (see kernel_util.poisoned_empty)."""
    with poisoned_empty():
        yield
