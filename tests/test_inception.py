"""The FID Inception port (evaluation/inception.py) without its weights file: what can be checked
is checked against the published Inception-v3 architecture, not against our own code.

- Size: torchvision publishes 27 161 264 parameters for its Inception3 (aux logits, 1000
  classes; Inception_V3_Weights.IMAGENET1K_V1's num_params). The FID network is that network
  without the auxiliary classifier (InceptionAux: 1x1 conv 768->128 + BN, 5x5 conv 128->768 + BN,
  Linear 768->1000) and with 1008 classes: the count follows, and ours must equal it.
- Wiring, block by block (the Inception-v3 paper's modules as torchvision orders them): every
  branch of every block gets a distinct constant output (its last BatchNorm's bias, all conv
  weights zero), so the concatenated output shows each branch's width and position.
- The TF variant's pools (what the 2015 TF graph does and torchvision's blocks do not): average
  pools ignore the zero padding, and Mixed_7c's pool branch max-pools.
What stays unverified without the weights file: that torch-fidelity's converted values, loaded
by these names, reproduce TF's features (tests/test_eval.py compares with torch-fidelity where
that package imports)."""
import pytest
import torch

from var_ssg.evaluation.inception import BlockA, BlockB, BlockC, BlockD, BlockE, FIDInception

TORCHVISION_INCEPTION3_PARAMS = 27_161_264
AUX = (768 * 128 + 2 * 128) + (128 * 768 * 25 + 2 * 768) + (768 * 1000 + 1000)


def test_parameter_count_is_the_published_network_without_aux_with_1008_classes():
    want = TORCHVISION_INCEPTION3_PARAMS - AUX + 8 * (2048 + 1)     # fc: 1008 classes instead of 1000
    assert sum(p.numel() for p in FIDInception().parameters()) == want == 23_850_960


def _branch_constants(block, finals, cin, hw=9, x_value=50.0):
    """Zero every conv, make each BatchNorm the identity, give branch i's last BatchNorm bias i+1:
    each branch then outputs its own constant; max-pool branches pass the input (x_value)."""
    for m in block.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.zeros_(m.weight)
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            torch.nn.init.ones_(m.weight)
            torch.nn.init.zeros_(m.bias)
    for i, name in enumerate(finals):
        torch.nn.init.constant_(getattr(block, name).bn.bias, float(i + 1))
    with torch.no_grad():
        y = block.eval()(torch.full((1, cin, hw, hw), x_value))
    return y[0, :, y.shape[2] // 2, y.shape[3] // 2].tolist()


@pytest.mark.parametrize("block,cin,finals,layout", [
    (BlockA(192, 32), 192, ["branch1x1", "branch5x5_2", "branch3x3dbl_3", "branch_pool"],
     [(1, 64), (2, 64), (3, 96), (4, 32)]),
    (BlockB(288), 288, ["branch3x3", "branch3x3dbl_3"], [(1, 384), (2, 96), (50.0, 288)]),
    (BlockC(768, 128), 768, ["branch1x1", "branch7x7_3", "branch7x7dbl_5", "branch_pool"],
     [(1, 192), (2, 192), (3, 192), (4, 192)]),
    (BlockD(768), 768, ["branch3x3_2", "branch7x7x3_4"], [(1, 320), (2, 192), (50.0, 768)]),
    (BlockE(1280, max_pool=False), 1280,
     ["branch1x1", "branch3x3_2a", "branch3x3_2b", "branch3x3dbl_3a", "branch3x3dbl_3b", "branch_pool"],
     [(1, 320), (2, 384), (3, 384), (4, 384), (5, 384), (6, 192)]),
], ids=["A", "B", "C", "D", "E"])
def test_each_block_concatenates_its_branches_in_order_and_width(block, cin, finals, layout):
    got = _branch_constants(block, finals, cin)
    assert got == [float(v) for v, n in layout for _ in range(n)]


def _pool_probe(block, cin, x):
    """The pool branch's output for input x: its 1x1 conv averages the input channels, every
    BatchNorm the identity; every other branch is zero."""
    for m in block.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.zeros_(m.weight)
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.running_var.fill_(1 - m.eps)            # (x - 0) / sqrt(var + eps) = x
            torch.nn.init.ones_(m.weight)
            torch.nn.init.zeros_(m.bias)
    torch.nn.init.constant_(block.branch_pool.conv.weight, 1.0 / cin)
    with torch.no_grad():
        y = block.eval()(x)
    return y[0, -block.branch_pool.conv.out_channels:].mean(0)       # H W


@pytest.mark.parametrize("block,cin", [(BlockA(192, 32), 192), (BlockC(768, 128), 768),
                                       (BlockE(1280, max_pool=False), 1280)], ids=["A", "C", "E_1"])
def test_average_pools_ignore_the_padding(block, cin):
    """TF's AvgPool (SAME padding) divides by the cells inside the image: a constant image stays
    constant at the border (counting the zero padding would give 4/9 in a corner)."""
    out = _pool_probe(block, cin, torch.ones(1, cin, 8, 8))
    assert torch.allclose(out, torch.ones_like(out), atol=1e-5)


def test_mixed_7c_max_pools_and_mixed_7b_averages():
    """A single hot pixel: a 3x3 max pool copies it to its 8 neighbours, the average spreads it."""
    net = FIDInception()
    for block, want in ((net.Mixed_7b, 1.0), (net.Mixed_7c, 9.0)):
        cin = block.branch1x1.conv.in_channels
        x = torch.zeros(1, cin, 8, 8)
        x[0, :, 4, 4] = 9.0
        out = _pool_probe(block, cin, x)
        assert out[3, 3].item() == pytest.approx(want, rel=1e-5) and out[4, 4].item() == pytest.approx(want, rel=1e-5)


def test_tf1_resize_is_the_legacy_bilinear():
    """TF1's ResizeBilinear (align_corners=False, no half-pixel centres): output i samples the
    input at i * in/out, clamped at the last pixel; worked by hand for 2 -> 4 and 4 -> 3."""
    from var_ssg.evaluation.inception import tf1_resize_matrix
    up = [[1, 0], [0.5, 0.5], [0, 1], [0, 1]]
    down = [[1, 0, 0, 0], [0, 2 / 3, 1 / 3, 0], [0, 0, 1 / 3, 2 / 3]]
    assert torch.allclose(tf1_resize_matrix(2, 4), torch.tensor(up, dtype=torch.float64))
    assert torch.allclose(tf1_resize_matrix(4, 3), torch.tensor(down, dtype=torch.float64))
