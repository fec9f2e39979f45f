import pytest
import torch

# Two CPU cores in CI: more threads only add contention.
torch.set_num_threads(2)


@pytest.fixture
def tmp_ckpt(tmp_path):
    return tmp_path / "ckpt"
