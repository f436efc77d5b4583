"""Tiny SBM teachers and scenes shared by tests/test_sbm.py and tests/test_sbm_schedule.py."""
import torch
from torch import nn

from kaviz import models
from kaviz.data import scenes

W = (4, 8, 8)


def teachers(skips=False, seed=0, unpool="bilinear"):
    """A 3-class segmentation and a depth SegNetSmall (eval mode) with non-trivial batch-norm statistics,
    so that a tail that lost them would show."""
    torch.manual_seed(seed)
    seg = models.build("segnet_small", 3, widths=W, skips=skips, unpool=unpool).eval()
    depth = models.build("segnet_small", 1, widths=W, skips=skips, unpool=unpool).eval()
    for m in [*seg.modules(), *depth.modules()]:
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return {"seg": seg, "depth": depth}


def identity_adaptors(student):
    for per in student.branches.values():
        for br in per.values():
            br.adaptor = nn.Identity()
    return student


def tiny_scene_splits():
    ds = scenes(n=24, size=16, max_objects=2, seed=3)
    return ds.subset(range(16)), ds.subset(range(16, 24))


def with_stats(model, seed=0, size=16, passes=2):
    """``model`` with non-trivial batch-norm statistics and affine parameters (not the init values), in eval
    mode: random affine parameters, then ``passes`` training-mode forwards of random images."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(0.5 + torch.rand(m.num_features, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.num_features, generator=g))
        model.train()
        for _ in range(passes):
            model(torch.rand(4, 3, size, size, generator=g))
    return model.eval()


def assert_prune_consistent(net):
    """Every conv reads as many channels as its producer makes; every BN matches its conv."""
    for u in net.prune_units():
        conv = net.get_submodule(u.conv)
        if u.bn is not None:
            assert net.get_submodule(u.bn).num_features == conv.out_channels, u
        for c in u.consumers:
            assert net.get_submodule(c).in_channels == conv.out_channels, (u, c)
