"""Image and video feature extractors (course_lib.features). Tolerances are stated per check:
exact (0) for pure reshapes, 1e-5/1e-6 for float32 arithmetic done two ways."""

import os

import pytest
import torch
import torch.nn.functional as F

from course_lib.features.cnn import SmallCNN
from course_lib.features.grid import GridFeatures
from course_lib.features.kaleido import KaleidoEmbedding, kaleido_patches
from course_lib.features.patch import PatchEmbedding, patchify, unpatchify
from course_lib.features.pixel_sampling import PixelSampler
from course_lib.features.region import RegionFeatures, box_geometry
from course_lib.features.roi_align import roi_align
from course_lib.features.video import FrameFeatures, clip_features, hierarchical_kmeans, kmeans

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)


def rand(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- CNN and grid features
def test_small_cnn_stride_and_shape():
    cnn = SmallCNN(channels=(8, 16, 24))
    assert cnn.stride == 8 and cnn.out_channels == 24
    assert cnn(rand(2, 3, 32, 48)).shape == (2, 24, 4, 6)
    with pytest.raises(ValueError, match="images"):
        cnn(rand(2, 3, 30, 32))  # not a multiple of the stride
    with pytest.raises(ValueError, match="images"):
        cnn(rand(2, 1, 32, 32))  # wrong channels


def test_grid_features_add_row_and_column_embeddings():
    torch.manual_seed(0)
    grid = GridFeatures(SmallCNN(channels=(8, 16)), dim=12, max_grid=8)
    tokens = grid(rand(2, 3, 32, 32))
    assert tokens.shape == (2, 8 * 8, 12)
    # by hand for one cell (row 2, column 5 -> raster index 21): LN(W f + b + row[2] + col[5])
    fmap = rand(1, 16, 3, 6, seed=1)
    expected = grid.norm(grid.proj(fmap[0, :, 2, 5]) + grid.row_embedding.weight[2] + grid.col_embedding.weight[5])
    torch.testing.assert_close(grid.embed_map(fmap)[0, 2 * 6 + 5], expected, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="feature_map.*max_grid=8"):
        grid.embed_map(rand(1, 16, 9, 4))


# ---------------------------------------------------------------- patch features
def test_patchify_layout_and_inverse():
    images = rand(2, 3, 8, 12)
    patches = patchify(images, 4)  # grid 2 x 3
    assert patches.shape == (2, 6, 3 * 4 * 4)
    # patch 4 is row 1, column 1 -> pixels [4:8, 4:8], flattened (channel, row, column); exact
    torch.testing.assert_close(patches[:, 4], images[:, :, 4:8, 4:8].reshape(2, -1), atol=0, rtol=0)
    torch.testing.assert_close(unpatchify(patches, 4, (8, 12)), images, atol=0, rtol=0)


def test_linear_on_patchify_equals_strided_conv():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 16, kernel_size=4, stride=4)
    images = rand(2, 3, 16, 16)
    via_conv = conv(images).flatten(2).transpose(1, 2)  # (B, N, D)
    via_linear = F.linear(patchify(images, 4), conv.weight.reshape(16, -1), conv.bias)
    torch.testing.assert_close(via_linear, via_conv, atol=1e-5, rtol=0)


def test_patch_embedding_matches_hf_clip_vision_embeddings():
    from transformers import CLIPVisionConfig
    from transformers.models.clip.modeling_clip import CLIPVisionEmbeddings

    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=16, num_attention_heads=2, image_size=32, patch_size=8, num_channels=3)
    reference = CLIPVisionEmbeddings(config).eval()
    ours = PatchEmbedding(32, 8, 16, bias=False)
    ours.load_state_dict(reference.state_dict(), strict=True)  # same parameter names
    images = rand(2, 3, 32, 32)
    torch.testing.assert_close(ours(images), reference(images), atol=1e-6, rtol=0)
    assert ours(images).shape == (2, 1 + 16, 16)
    assert PatchEmbedding(32, 8, 16, cls_token=False)(images).shape == (2, 16, 16)


def test_patch_bad_sizes_name_images():
    with pytest.raises(ValueError, match="images"):
        patchify(rand(1, 3, 10, 8), 4)
    with pytest.raises(ValueError, match="images"):
        PatchEmbedding(32, 8, 16)(rand(1, 3, 16, 16))  # not the configured size
    with pytest.raises(ValueError, match="image_size"):
        PatchEmbedding(30, 8, 16)


# ---------------------------------------------------------------- region features
def test_box_geometry_hand_checked():
    boxes = torch.tensor([[10.0, 5.0, 60.0, 25.0]])  # in a 50 (H) x 100 (W) image
    x1, y1, x2, y2, w, h = 0.1, 0.1, 0.6, 0.5, 0.5, 0.4
    torch.testing.assert_close(box_geometry(boxes, (50, 100), "4d"), torch.tensor([[x1, y1, x2, y2]]))
    torch.testing.assert_close(box_geometry(boxes, (50, 100), "5d"), torch.tensor([[x1, y1, x2, y2, w * h]]))
    torch.testing.assert_close(box_geometry(boxes, (50, 100), "7d"), torch.tensor([[x1, y1, x2, y2, w, h, w * h]]))
    torch.testing.assert_close(box_geometry(boxes, (50, 100), "6d"), torch.tensor([[x1, y1, x2, y2, w, h]]))  # Oscar
    with pytest.raises(ValueError, match="kind"):
        box_geometry(boxes, 100, "3d")
    with pytest.raises(ValueError, match="boxes.*box 0"):
        box_geometry(torch.tensor([[60.0, 5.0, 10.0, 25.0]]), (50, 100))


def make_region_features(geometry, train_backbone=True):
    torch.manual_seed(0)
    return RegionFeatures(SmallCNN(channels=(8, 16)), dim=12, geometry=geometry, output_size=3,
                          train_backbone=train_backbone)


BOXES = [torch.tensor([[0.0, 0.0, 32.0, 32.0], [4.0, 8.0, 20.0, 14.0]]), torch.tensor([[10.0, 10.0, 30.0, 31.0]])]


@pytest.mark.parametrize("geometry", ["5d", "7d", "4d"])
def test_region_features_combine_as_each_paper(geometry):
    model = make_region_features(geometry)
    images = rand(2, 3, 32, 32)
    out = model(images, BOXES)
    assert out.tokens.shape == (2, 2, 12) and out.pooled.shape == (2, 2, 16)
    assert out.mask.tolist() == [[True, True], [True, False]]
    assert torch.all(out.tokens[1, 1] == 0)  # padding stays zero
    # pooled = mean of RoIAlign bins on the stride-4 map (1e-6)
    pooled = roi_align(model.backbone(images), BOXES, 3, spatial_scale=0.25).mean((2, 3))
    torch.testing.assert_close(out.pooled[out.mask], pooled, atol=1e-6, rtol=0)
    # the combination, written out by hand for the second image's box
    f = model.feature_proj(pooled[2])
    g = model.geometry_proj(box_geometry(BOXES[1], 32, geometry)[0])
    expected = {
        "5d": lambda: model.norm(f + g),  # ViLBERT: LN(W f + W g)
        "7d": lambda: model.norm(model.feature_norm(f) + model.geometry_norm(g)),  # UNITER
        "4d": lambda: (model.feature_norm(f) + model.geometry_norm(g)) / 2,  # LXMERT
    }[geometry]()
    torch.testing.assert_close(out.tokens[1, 0], expected, atol=1e-6, rtol=0)


def test_frozen_backbone_gets_no_gradient_trainable_does():
    images = rand(2, 3, 32, 32)
    for train_backbone in (False, True):
        model = make_region_features("5d", train_backbone).train()
        model(images, BOXES).tokens.sum().backward()
        grads = [p.grad for p in model.backbone.parameters()]
        assert all(g is None for g in grads) != train_backbone
        assert model.feature_proj.weight.grad is not None
        assert model.backbone.training == train_backbone


def test_region_features_without_any_box():
    out = make_region_features("7d")(rand(2, 3, 32, 32), [torch.zeros(0, 4), torch.zeros(0, 4)])
    assert out.tokens.shape == (2, 0, 12) and out.mask.shape == (2, 0)


def test_region_features_bad_boxes():
    model = make_region_features("5d")
    with pytest.raises(ValueError, match=r"boxes\[1\].*box 0.*outside"):
        model(rand(2, 3, 32, 32), [BOXES[0], torch.tensor([[0.0, 0.0, 33.0, 10.0]])])


# ---------------------------------------------------------------- Pixel-BERT sampling
def test_pixel_sampler_train_and_eval():
    tokens = rand(3, 64, 5)
    sampler = PixelSampler(num_samples=10).train()
    out = sampler(tokens, generator=torch.Generator().manual_seed(0))
    assert out.tokens.shape == (3, 10, 5) and out.indices.shape == (3, 10)
    for b in range(3):
        assert len(set(out.indices[b].tolist())) == 10  # without replacement
        assert out.indices[b].tolist() == sorted(out.indices[b].tolist())
        torch.testing.assert_close(out.tokens[b], tokens[b, out.indices[b]], atol=0, rtol=0)
    assert out.indices[0].tolist() != out.indices[1].tolist()  # drawn per image
    again = sampler(tokens, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.indices, out.indices)  # seeded -> repeatable
    other = sampler(tokens, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(other.indices, out.indices)
    full = sampler.eval()(tokens)
    assert full.tokens.shape == (3, 64, 5) and full.indices[2].tolist() == list(range(64))
    with pytest.raises(ValueError, match="num_samples"):
        PixelSampler(100).train()(tokens)


# ---------------------------------------------------------------- Kaleido patches
def test_kaleido_patches_tile_the_image_exactly():
    images = rand(2, 3, 60, 120)
    levels = kaleido_patches(images)
    for l, patches in zip(range(1, 6), levels):
        h, w = 60 // l, 120 // l
        assert patches.shape == (2, l * l, 3, h, w)
        tiled = patches.reshape(2, l, l, 3, h, w).permute(0, 3, 1, 4, 2, 5).reshape(2, 3, 60, 120)
        assert torch.equal(tiled, images)  # exact
        r, c = l - 1, l // 2  # one patch by hand
        assert torch.equal(patches[:, r * l + c], images[:, :, r * h : (r + 1) * h, c * w : (c + 1) * w])
    with pytest.raises(ValueError, match="images.*60"):
        kaleido_patches(rand(1, 3, 32, 32))


def test_kaleido_embedding_tokens():
    torch.manual_seed(0)
    model = KaleidoEmbedding(dim=16, levels=(1, 2, 3), patch_resolution=4)
    images = rand(2, 3, 24, 24)
    tokens = model(images)
    assert tokens.shape == (2, 1 + 4 + 9, 16)
    assert torch.bincount(model.level_ids).tolist() == [1, 4, 9]
    # token 0 is the whole image at level 1: LN(W pool(image) + level[0] + position[0]) (1e-6)
    pooled = F.adaptive_avg_pool2d(images, 4).reshape(2, -1)
    expected = model.norm(model.proj(pooled) + model.level_embedding.weight[0] + model.position_embedding.weight[0])
    torch.testing.assert_close(tokens[:, 0], expected, atol=1e-6, rtol=0)


# ---------------------------------------------------------------- video
def test_frame_features_temporal_embedding():
    torch.manual_seed(0)
    model = FrameFeatures(SmallCNN(channels=(8, 16)), dim=12, max_frames=4)
    frame = rand(1, 1, 3, 16, 16)
    videos = frame.expand(2, 3, 3, 16, 16)  # the same frame three times
    tokens = model(videos)
    assert tokens.shape == (2, 3, 12)
    pooled = model.image_encoder(frame[0]).mean((2, 3))[0]  # (F,)
    for t in range(3):  # identical frames differ only by their time embedding (1e-6)
        expected = model.norm(model.proj(pooled) + model.temporal_embedding.weight[t])
        torch.testing.assert_close(tokens[1, t], expected, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="videos.*max_frames=4"):
        model(rand(1, 5, 3, 16, 16))
    assert torch.equal(clip_features(torch.arange(8.0).reshape(1, 4, 2), 2), torch.tensor([[[1.0, 2.0], [5.0, 6.0]]]))


def nested_clusters(points_per_cluster=20):
    """3 far-apart groups (distance 100) of 3 sub-clusters (distance 10), spread 0.3: labels 0..8."""
    g = torch.Generator().manual_seed(0)
    big = torch.tensor([[0.0, 0.0], [100.0, 0.0], [0.0, 100.0]])
    small = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    centres = (big[:, None] + small[None]).reshape(9, 2)
    labels = torch.arange(9).repeat_interleave(points_per_cluster)
    return centres[labels] + 0.3 * torch.randn(len(labels), 2, generator=g), labels


def test_hierarchical_kmeans_recovers_nested_clusters():
    features, labels = nested_clusters()
    codebook = hierarchical_kmeans(features, branching=3, depth=2, generator=torch.Generator().manual_seed(0))
    assert codebook.num_words == 9 and codebook.leaf_centroids.shape == (9, 2)
    words = codebook.assign(features)
    # each true cluster maps to one word, and different clusters to different words
    word_of = {int(c): set(words[labels == c].tolist()) for c in range(9)}
    assert all(len(w) == 1 for w in word_of.values())
    assert len(set.union(*word_of.values())) == 9
    again = hierarchical_kmeans(features, branching=3, depth=2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.assign(features), words)  # seeded -> repeatable


def test_hierarchical_kmeans_with_fewer_points_than_branching():
    features = torch.tensor([[0.0, 0.0], [0.1, 0.0], [50.0, 0.0], [0.0, 50.0]])
    codebook = hierarchical_kmeans(features, branching=3, depth=2, generator=torch.Generator().manual_seed(0))
    assert codebook.num_words == 9
    assert len(set(codebook.assign(features).tolist())) == 4  # every point ends as its own word
    assert torch.isfinite(codebook.leaf_centroids).all()
    with pytest.raises(ValueError, match="features"):
        codebook.assign(torch.zeros(3, 5))
    with pytest.raises(ValueError, match="features"):
        hierarchical_kmeans(torch.tensor([[float("nan"), 0.0]]), branching=3, depth=1)


def test_kmeans_finds_two_blobs():
    points = torch.tensor([[0.0, 0.0], [0.0, 1.0], [10.0, 0.0], [10.0, 1.0]])
    centroids = kmeans(points, 2, generator=torch.Generator().manual_seed(0))
    assert sorted(centroids.tolist()) == [[0.0, 0.5], [10.0, 0.5]]  # exact: means of two points


# ---------------------------------------------------------------- ShapeWorld detector
def test_detector_short_training_lowers_the_loss_and_outputs_detector_format():
    from course_lib.data.shapeworld import ShapeWorld, WorldConfig
    from course_lib.features.detector import DetectorTraining, detection_loss, detection_targets, train_detector

    world = ShapeWorld(WorldConfig(image_size=32, seed=0))
    detector, losses = train_detector(world, config=DetectorTraining(steps=20, batch_size=16, seed=0))
    assert len(losses) == 20 and all(torch.isfinite(torch.tensor(losses)))
    # It learns from the pixels, not just the label statistics (how many objects, which classes,
    # what sizes), which lower the training loss too: on 64 held-out scenes, the loss against
    # their own images vs against the same images paired with other scenes. Measured 0.57;
    # untrained 1.00; trained on mismatched images (statistics only) 1.00; backbone frozen 0.75.
    val_scenes = world.scenes(range(64), "val")
    val_images = world.images(range(64), "val")
    with torch.no_grad():
        own = detection_loss(detector, val_images, val_scenes)
        others = detection_loss(detector, val_images, val_scenes[1:] + val_scenes[:1])
    assert own < 0.7 * others
    images = world.images(range(4), "val")
    detections = detector.detect(images, threshold=0.05)
    assert len(detections) == 4
    for boxes, probs in detections:
        assert boxes.shape[1] == 4 and probs.shape == (len(boxes), world.num_classes + 1)
        torch.testing.assert_close(probs.sum(1), torch.ones(len(probs)), atol=1e-5, rtol=0)
        assert ((boxes >= 0) & (boxes <= 32)).all() and (boxes[:, 2:] >= boxes[:, :2]).all()
    # the detector's boxes and frozen backbone feed region features (the "frozen detector" setup)
    regions = RegionFeatures(detector.backbone, dim=8, train_backbone=False)
    out = regions(images, [boxes for boxes, _ in detections])
    assert out.mask.sum(1).tolist() == [len(boxes) for boxes, _ in detections]
    # targets: the cell holding each object's centre is marked, with its class and pixel box
    scene = world.scene(0)
    has_object, classes, boxes = detection_targets([scene], 32, 4, (8, 8))
    assert has_object.sum() == len(scene)
    assert sorted(classes[has_object].tolist()) == sorted(scene.class_ids.tolist())
    with pytest.raises(ValueError, match="images"):
        detector.detect(images[:, :1])
    with pytest.raises(ValueError, match="steps"):
        train_detector(world, steps=0)
