"""The host-read counter (tests/conftest.py: HostReads) counts what makes a GPU wait, and nothing else."""

import torch


def test_counts_value_reads_and_data_sized_outputs(host_reads):
    t = torch.arange(6.0)
    with host_reads() as reads:
        bool(t[0]), float(t[1]), int(t[2]), t[3].item(), t.tolist(), t.numpy(), t.cpu()
        t[t > 2], t.nonzero(), torch.bincount(t.long()), t.long().repeat_interleave(t.long())
    assert reads.calls == {"__bool__": 1, "__float__": 1, "__int__": 1, "item": 1, "tolist": 1, "numpy": 1, "cpu": 1,
                           "boolean-mask __getitem__": 1, "nonzero": 1, "bincount": 1,
                           "repeat_interleave without output_size": 1}


def test_device_only_work_is_not_counted(host_reads):
    t = torch.randn(8, 4)
    with host_reads() as reads:
        v, i = t.topk(2, dim=1)
        torch.zeros(4).index_add_(0, i[:, 0], v[:, 0])
        torch.arange(8).repeat_interleave(torch.full((8,), 2), output_size=16)
        torch.where(t > 0, t, 0.0).sum(0)
    assert reads.count == 0
