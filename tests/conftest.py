import pytest
import torch

# The test models are tiny: their steps are dominated by per-op overhead, and a second intra-op thread only
# adds spin contention with the server subprocesses some tests start (measured 10-80x slowdowns on 2 busy cores).
torch.set_num_threads(1)


@pytest.fixture
def tmp_ckpt(tmp_path):
    return tmp_path / "ckpt"
