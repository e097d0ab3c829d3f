import pytest
import torch

from saes import SAEConfig, build


@pytest.fixture
def make_sae():
    def _make(arch="topk", d_in=32, width=128, k=4, seed=0, scale=1.7, **kw):
        torch.manual_seed(seed)
        sae = build(SAEConfig(d_in=d_in, width=width, k=k, arch=arch, **kw))
        with torch.no_grad():  # non-trivial biases/scale so folding bugs show up
            sae.b_enc.normal_(0, 0.1)
            sae.b_dec.normal_(0, 0.3)
            sae.input_scale.fill_(scale)
        return sae

    return _make
