import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """In-process tests use one thread: two OpenMP threads on a shared 2-core machine spin against each
    other and run several times slower. Subprocesses (torchrun tests) set OMP_NUM_THREADS themselves."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
