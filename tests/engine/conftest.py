"""Shared engine-test fixtures (generic only)."""
import pytest
import torch


@pytest.fixture(scope="module")
def torch_single_thread():
    """One intra-op thread for a module's tests, restored afterwards. Opt in with
    ``pytestmark = pytest.mark.usefixtures("torch_single_thread")``: on a shared, busy
    CPU, small tensor ops oversubscribed across threads ran ~5x slower than on one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
