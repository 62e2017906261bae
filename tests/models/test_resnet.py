"""ResNet tower: shapes (ResNet-50 @ 299 -> 19x19 layer3), align-corners resize, torchvision-layout parity."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medvlp_jax.models import hf_import
from medvlp_jax.models.resnet import ResNet, resize_bilinear_align_corners


@pytest.fixture(autouse=True, scope="module")
def _fast_compile():
    """Tiny models: XLA compile time dominates, so skip most optimisations here (restored afterwards)."""
    old = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", old)

SMALL = dict(stage_sizes=(1, 1, 1, 1), base_width=8)


def test_resnet50_shapes_with_resize_to_299():
    model = ResNet(resize_to=299)
    out, variables = jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x),
                                    jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32))
    assert out["cls"].shape == (2, 2048) and out["patches"].shape == (2, 361, 1024)
    assert out["attn"] is None and model.feature_dims == (2048, 1024)
    shapes = [out["stages"][f"layer{i}"].shape[1:] for i in (2, 3, 4)]
    assert shapes == [(38, 38, 512), (19, 19, 1024), (10, 10, 2048)]
    n_params = sum(np.prod(p.shape) for p in jax.tree.leaves(variables["params"]))
    assert n_params == 23_508_032                       # torchvision resnet50 without fc (25,557,032 - 2,049,000)
    assert set(variables) == {"params", "batch_stats"}


def test_small_variant_shapes_and_batch_stats_update():
    model = ResNet(**SMALL)
    x = np.random.default_rng(0).standard_normal((2, 64, 64, 3)).astype(np.float32)
    variables = jax.jit(model.init)(jax.random.key(0), x)
    out, updates = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(variables, x)
    assert out["cls"].shape == (2, 256) and out["patches"].shape == (2, 16, 128) and model.feature_dims == (256, 128)
    # layer3 grid is row-major: patches[:, i * gw + j] == layer3[:, i, j]
    np.testing.assert_array_equal(out["patches"][:, 1 * 4 + 2], out["stages"]["layer3"][:, 1, 2])
    before = variables["batch_stats"]["bn1"]["mean"]
    assert not np.allclose(before, updates["batch_stats"]["bn1"]["mean"])


def _resize_reference(img, oh, ow):
    """Direct per-pixel bilinear interpolation with align_corners=True."""
    h, w = img.shape[:2]
    out = np.zeros((oh, ow) + img.shape[2:], np.float64)
    for i in range(oh):
        y = i * (h - 1) / (oh - 1)
        y0 = min(int(np.floor(y)), h - 1); y1 = min(y0 + 1, h - 1); fy = y - y0
        for j in range(ow):
            x = j * (w - 1) / (ow - 1)
            x0 = min(int(np.floor(x)), w - 1); x1 = min(x0 + 1, w - 1); fx = x - x0
            out[i, j] = ((1 - fy) * (1 - fx) * img[y0, x0] + (1 - fy) * fx * img[y0, x1]
                         + fy * (1 - fx) * img[y1, x0] + fy * fx * img[y1, x1])
    return out


def test_resize_align_corners_matches_direct_formula():
    img = np.random.default_rng(1).standard_normal((1, 7, 5, 2)).astype(np.float32)
    got = np.asarray(resize_bilinear_align_corners(jnp.asarray(img), (11, 13)))
    np.testing.assert_allclose(got[0], _resize_reference(img[0], 11, 13), atol=1e-5)
    # Corners are preserved exactly (the align_corners property).
    rows, cols = [0, 0, -1, -1], [0, -1, 0, -1]
    np.testing.assert_allclose(got[0, rows, cols], img[0, rows, cols], atol=1e-6)


def _torch_resnet(torch, stage_sizes, width):
    """Minimal torchvision-layout bottleneck ResNet (same module names, so the same state-dict keys)."""
    nn = torch.nn

    class Bottleneck(nn.Module):
        def __init__(self, cin, planes, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, planes, 1, bias=False); self.bn1 = nn.BatchNorm2d(planes)
            self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False); self.bn2 = nn.BatchNorm2d(planes)
            self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False); self.bn3 = nn.BatchNorm2d(planes * 4)
            self.downsample = None
            if stride != 1 or cin != planes * 4:
                self.downsample = nn.Sequential(nn.Conv2d(cin, planes * 4, 1, stride, bias=False),
                                                nn.BatchNorm2d(planes * 4))

        def forward(self, x):
            y = torch.relu(self.bn1(self.conv1(x)))
            y = torch.relu(self.bn2(self.conv2(y)))
            y = self.bn3(self.conv3(y))
            return torch.relu(y + (x if self.downsample is None else self.downsample(x)))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False); self.bn1 = nn.BatchNorm2d(width)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
            cin = width
            for s, n in enumerate(stage_sizes):
                blocks = []
                for j in range(n):
                    blocks.append(Bottleneck(cin, width * 2 ** s, 2 if (s and not j) else 1))
                    cin = width * 2 ** s * 4
                setattr(self, f"layer{s + 1}", nn.Sequential(*blocks))
            self.fc = nn.Linear(cin, 10)

        def forward(self, x):
            x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
            x = self.layer2(self.layer1(x))
            l3 = self.layer3(x)
            return l3, self.layer4(l3)

    return Net()


@pytest.mark.parity
def test_parity_with_torch_torchvision_layout():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    net = _torch_resnet(torch, (1, 2, 1, 1), 8)
    for m in net.modules():                             # non-trivial running statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5); m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5); m.bias.data.uniform_(-0.2, 0.2)
    net.eval()
    sd = {k: v.numpy() for k, v in net.state_dict().items()}
    variables, report = hf_import.convert_resnet_state_dict(sd, stage_sizes=(1, 2, 1, 1))
    assert not report.missing and not report.unexpected and "fc.weight" in report.ignored

    model = ResNet(stage_sizes=(1, 2, 1, 1), base_width=8, resize_to=45)
    x = np.random.default_rng(2).standard_normal((2, 3, 32, 32)).astype(np.float32)
    ref = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32))
    assert jax.tree.map(np.shape, variables) == jax.tree.map(lambda s: s.shape, ref)

    with torch.no_grad():
        up = torch.nn.functional.interpolate(torch.tensor(x), size=(45, 45), mode="bilinear", align_corners=True)
        l3, l4 = net(up)
    out = jax.jit(model.apply)(variables, x.transpose(0, 2, 3, 1))
    want_patches = l3.numpy().transpose(0, 2, 3, 1).reshape(2, -1, l3.shape[1])
    assert np.abs(np.asarray(out["patches"]) - want_patches).max() < 1e-4
    assert np.abs(np.asarray(out["cls"]) - l4.numpy().mean((2, 3))).max() < 1e-4


@pytest.mark.parity
def test_load_image_tower_from_torch_file(tmp_path):
    torch = pytest.importorskip("torch")
    import ml_collections
    from medvlp_jax.models import dual_encoder as de
    net = _torch_resnet(torch, (1, 1, 1, 1), 8)
    torch.save({"state_dict": net.state_dict()}, tmp_path / "r.pth")           # wrapped, as many releases are
    cfg = ml_collections.ConfigDict(dict(
        image=dict(name="resnet50", stage_sizes=(1, 1, 1, 1), width=8, image_size=32,
                   hf_checkpoint=str(tmp_path / "r.pth")),
        text=dict(vocab_size=20, width=8, depth=1, num_heads=2, mlp_dim=8, max_position=8), proj=dict(dim=4)))
    abstract = jax.eval_shape(lambda b: de.build_model(cfg).init(jax.random.key(0), b, train=False),
                              de.example_batch(cfg, 1))
    variables, report = hf_import.load_image_tower(abstract, cfg)
    assert report.ok and "fc.weight" in report.ignored
    np.testing.assert_array_equal(variables["batch_stats"]["image"]["layer2_0"]["bn1"]["var"],
                                  net.layer2[0].bn1.running_var.numpy())
    np.testing.assert_array_equal(variables["params"]["image"]["conv1"]["kernel"],
                                  net.conv1.weight.detach().numpy().transpose(2, 3, 1, 0))
    cfg.image.width = 16                                                       # wrong model: loud failure
    abstract = jax.eval_shape(lambda b: de.build_model(cfg).init(jax.random.key(0), b, train=False),
                              de.example_batch(cfg, 1))
    with pytest.raises(ValueError, match="does not fit"):
        hf_import.load_image_tower(abstract, cfg)


@pytest.mark.parametrize("stage,size,resize_to", [("layer3", 128, None), ("layer2", 64, None),
                                                  ("layer3", 96, 131)])
def test_grid_centres_are_the_receptive_field_centres(monkeypatch, stage, size, resize_to):
    """A cell's receptive-field centre, measured: with every kernel 1, identity BatchNorm and average pooling in
    place of max pooling, the net is linear and symmetric on positive inputs, so the centroid of the gradient of
    an interior cell w.r.t. the image is its centre; ``out["centres"]`` must name it (half a cell up-left of
    (i + 0.5) / g), with and without the align-corners upsampling to ``resize_to``."""
    import flax.linen as nn
    from medvlp_jax.models.resnet import STAGE_STRIDES
    monkeypatch.setattr(nn, "max_pool", lambda x, window, strides, padding: nn.avg_pool(
        x, window, strides, padding, count_include_pad=True))
    model = ResNet(stage_sizes=(1, 1, 1, 1), base_width=4, resize_to=resize_to, local_stage=stage)
    x = np.ones((1, size, size, 1), np.float32)
    variables = model.init(jax.random.key(0), x)
    ones = jax.tree_util.tree_map_with_path(
        lambda path, v: jnp.zeros_like(v) if path[-1].key in ("bias", "mean") else jnp.ones_like(v), variables)
    out = model.apply(ones, x)
    gh, gw = out["grid"]
    assert gh == gw and out["patches"].shape[1] == gh * gw
    i = gh // 2                                           # an interior cell: its field is not cut by padding
    grad = jax.grad(lambda im: model.apply(ones, im)["patches"][0, i * gw + i].sum())(x)[0, :, :, 0]
    g = np.asarray(grad, np.float64)
    centroid = [(g.sum(axis=1 - a) * (np.arange(size) + 0.5)).sum() / g.sum() / size for a in (0, 1)]
    (sy, oy), (sx, ox) = out["centres"]
    tol = 1e-3 if resize_to is None else 0.5 / size       # the resampling blurs, not shifts, the field
    assert centroid == pytest.approx([sy * i + oy, sx * i + ox], abs=tol)
    if resize_to is None:
        stride = STAGE_STRIDES[stage]
        assert (sy * i + oy) * size == pytest.approx(stride * i + 0.5)      # not stride * (i + 0.5)
