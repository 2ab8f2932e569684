"""RAFT's parts against plain loops (correlation, window lookup, convex upsampling), its parameter
layout (torchvision's names and counts) and loading by path with clear errors."""

import math

import pytest
import torch

from kvpo.rewards.raft import RAFT, correlation_pyramid, load_raft, lookup, upsample


def test_parameter_counts_are_torchvisions():
    # torchvision's Raft_Large_Weights / Raft_Small_Weights meta: num_params 5257536 / 990162
    for arch, count in (("large", 5257536), ("small", 990162)):
        assert sum(p.numel() for p in RAFT(arch).parameters()) == count
    keys = RAFT("large").state_dict()
    assert "update_block.recurrent_block.convgru2.convq.weight" in keys
    assert keys["context_encoder.layer2.0.downsample.1.running_var"].shape == (96,)
    assert "mask_predictor.conv.bias" in keys and "corr_block" not in "".join(keys)


def test_correlation_pyramid_is_scaled_dot_products_then_pooling():
    torch.manual_seed(0)
    f1, f2 = torch.randn(2, 1, 5, 4, 6).unbind(0)
    pyramid = correlation_pyramid(f1, f2, levels=2)
    assert [tuple(v.shape) for v in pyramid] == [(24, 1, 4, 6), (24, 1, 2, 3)]
    for p in range(24):
        py, px = divmod(p, 6)
        for qy in range(4):
            for qx in range(6):
                dot = sum(f1[0, c, py, px].item() * f2[0, c, qy, qx].item() for c in range(5))
                want = dot / math.sqrt(5)
                assert pyramid[0][p, 0, qy, qx].item() == pytest.approx(want, abs=1e-5)
        block = pyramid[0][p, 0, 0:2, 2:4].mean().item()
        assert pyramid[1][p, 0, 0, 1].item() == pytest.approx(block, abs=1e-6)


def bilinear(image, x, y):
    """Plain bilinear sample of ``image [h, w]`` at (x, y) with zeros outside."""
    h, w = image.shape
    x0, y0 = math.floor(x), math.floor(y)
    total = 0.0
    for yy, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
        for xx, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
            if 0 <= yy < h and 0 <= xx < w:
                total += wy * wx * image[yy, xx].item()
    return total


def test_lookup_samples_a_window_around_each_match():
    torch.manual_seed(1)
    n, h, w, r = 1, 2, 3, 1
    pyramid = [torch.randn(n * h * w, 1, 4, 6), torch.randn(n * h * w, 1, 2, 3)]
    coords = torch.tensor([[[[0.0, 1.5, 2.25], [3.0, 4.5, -0.5]],
                            [[0.0, 0.75, 1.0], [2.5, 3.0, 1.25]]]])  # fmt: skip
    out = lookup(pyramid, coords, r)
    assert out.shape == (1, 2 * 9, h, w)
    for y in range(h):
        for x in range(w):
            cx, cy = coords[0, 0, y, x].item(), coords[0, 1, y, x].item()
            for level, volume in enumerate(pyramid):
                for i, di in enumerate((-1, 0, 1)):
                    for j, dj in enumerate((-1, 0, 1)):
                        # RAFT's window order: the first axis (i) moves along x
                        at = (cx / 2**level + di, cy / 2**level + dj)
                        want = bilinear(volume[y * w + x, 0], *at)
                        got = out[0, level * 9 + i * 3 + j, y, x].item()
                        assert got == pytest.approx(want, abs=1e-5)


def test_convex_upsampling_takes_the_chosen_neighbour():
    torch.manual_seed(2)
    flow = torch.randn(1, 2, 3, 4)
    for neighbour, (dy, dx) in ((4, (0, 0)), (5, (0, 1)), (1, (-1, 0))):
        mask = torch.full((1, 9, 8, 8, 3, 4), -1e4)
        mask[:, neighbour] = 1e4  # all weight on one of the 3x3 neighbours (row-major)
        up = upsample(flow, mask.reshape(1, 9 * 64, 3, 4))
        assert up.shape == (1, 2, 24, 32)
        for i in range(3):
            for j in range(4):
                si, sj = i + dy, j + dx
                inside = 0 <= si < 3 and 0 <= sj < 4
                want = 8 * flow[0, :, si, sj] if inside else torch.zeros(2)
                block = up[0, :, 8 * i : 8 * i + 8, 8 * j : 8 * j + 8]
                torch.testing.assert_close(block, want[:, None, None].expand(2, 8, 8))
    plain = upsample(flow, None)  # raft_small: bilinear, corners aligned, times 8
    assert plain[0, :, 0, 0].tolist() == pytest.approx((8 * flow[0, :, 0, 0]).tolist())
    assert plain[0, :, -1, -1].tolist() == pytest.approx((8 * flow[0, :, -1, -1]).tolist())


def test_forward_shapes_and_input_checks():
    torch.manual_seed(3)
    model = RAFT("small", num_flow_updates=1).eval()
    with torch.no_grad():
        flow = model(torch.rand(2, 3, 128, 136), torch.rand(2, 3, 128, 136))
    assert flow.shape == (2, 2, 128, 136) and torch.isfinite(flow).all()
    with pytest.raises(ValueError, match="multiples of 8 and at least 128, got 120 x 136"):
        model(torch.rand(1, 3, 120, 136), torch.rand(1, 3, 120, 136))
    with pytest.raises(ValueError, match="RAFT arch must be one of"):
        RAFT("medium")


def test_load_by_path_and_clear_errors(tmp_path):
    torch.manual_seed(4)
    small = RAFT("small").state_dict()
    torch.save(small, tmp_path / "raft_small_C_T_V2-01064c6d.pth")
    loaded = load_raft(tmp_path / "raft_small_C_T_V2-01064c6d.pth", num_flow_updates=3)
    assert loaded.arch == "small" and loaded.num_flow_updates == 3 and not loaded.training
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, small[key])
    large = RAFT("large").state_dict()
    torch.save(large, tmp_path / "large.pth")
    assert load_raft(tmp_path / "large.pth").arch == "large"

    broken = dict(large)
    del broken["update_block.flow_head.conv2.bias"]
    broken["extra.weight"] = torch.zeros(1)
    broken["mask_predictor.conv.weight"] = torch.zeros(3, 3)
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(ValueError) as err:
        load_raft(tmp_path / "broken.pth")
    message = str(err.value)
    assert "missing: update_block.flow_head.conv2.bias" in message
    assert "unexpected: extra.weight" in message
    assert "mask_predictor.conv.weight: expected (576, 256, 1, 1), found (3, 3)" in message
    with pytest.raises(FileNotFoundError, match=r"found a directory .* holding \['broken.pth'"):
        load_raft(tmp_path)
    with pytest.raises(FileNotFoundError, match="found nothing at"):
        load_raft(tmp_path / "nope.pth")
