"""The training loop under torch.distributed (DDP, gloo on CPU) equals one process at the same
global batch (DESIGN.md §6)."""
import pytest
import torch
from _ddp_worker import rank_main, train


@pytest.mark.timeout(120)
def test_two_ranks_equal_one_process_at_the_same_global_batch(tmp_path):
    single, hist = train()
    out = tmp_path / "ddp.pt"
    torch.multiprocessing.spawn(rank_main, args=(2, str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    ddp = torch.load(out, weights_only=True)
    for k, v in single.state_dict().items():
        assert torch.allclose(ddp["model"][k], v, atol=1e-6), k
    assert torch.allclose(ddp["loss"], torch.tensor(hist["train/loss"].values), atol=1e-6)
    assert not torch.equal(single[0].weight, train.__globals__["nn"].Linear(6, 16).weight)  # it did train
