from __future__ import annotations

import pytest
import torch

from models import ImageTransform, PostprocessConfig, PreprocessSpec, Target, build_head, list_heads
from models.heads.base import HeadOutputs
from models.registry import Registry
from models.types import Detections


def test_registry_rejects_duplicates_and_bad_names() -> None:
    registry: Registry = Registry("thing")
    registry.add("a", 1)
    with pytest.raises(ValueError, match="already registered"):
        registry.add("a", 2)
    with pytest.raises(ValueError, match="invalid"):
        registry.add("Bad-Name", 3)
    with pytest.raises(KeyError, match="unknown thing"):
        registry.get("b")


@pytest.mark.parametrize("name", list_heads())
def test_loss_finite_and_decreasing(name: str) -> None:
    torch.manual_seed(0)
    maps = [torch.randn(2, 16, 64 // s, 64 // s) for s in (8, 16, 32)]
    head = build_head(name, 3, [16, 16, 16], [8, 16, 32])
    targets = [
        Target(torch.tensor([[4.0, 6.0, 30.0, 40.0], [30.0, 20.0, 60.0, 62.0]]), torch.tensor([0, 2])),
        Target(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)),
    ]
    opt = torch.optim.Adam(head.parameters(), lr=1e-3)
    losses = []
    for _ in range(15):
        loss = sum(head.loss(head(maps), targets).values())
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert min(losses[-3:]) < losses[0]


def test_light_head_reads_a_vit_style_single_map() -> None:
    head = build_head("light", 2, [32], [16])
    out = head([torch.randn(1, 32, 4, 4)])
    assert out.level_shapes == [(8, 8), (4, 4), (2, 2)]
    assert out.tensors["cls_logits"].shape == (1, 84, 2)


def test_decode_and_map_back_through_resize_and_padding() -> None:
    """A known box on a 200x100 (H x W) image survives head decoding, the 0.32 resize and the padding."""
    transform = ImageTransform(PreprocessSpec(size=64))
    _, meta = transform.one(torch.zeros(3, 200, 100, dtype=torch.uint8))
    assert meta.scale == pytest.approx(0.32)
    head = build_head("light", 2, [8, 8, 8], [8, 16, 32])
    shapes = [(8, 8), (4, 4), (2, 2)]
    n = sum(h * w for h, w in shapes)
    cls = torch.full((1, n, 2), -20.0)
    reg, ctr = torch.zeros(1, n, 4), torch.full((1, n, 1), 20.0)
    index = 2 * 8 + 1  # P3 location (x=1, y=2): centre (12, 20) on the canvas
    cls[0, index, 1] = 20.0
    reg[0, index] = torch.tensor([1.0, 2.0, 1.0, 0.5])  # l, t, r, b in strides of 8
    outputs = HeadOutputs({"cls_logits": cls, "bbox_regression": reg, "bbox_ctrness": ctr}, shapes)
    det = head.predict(outputs, (64, 64), PostprocessConfig(score_thresh=0.5))[0]
    assert det.labels.tolist() == [1]
    torch.testing.assert_close(det.boxes, torch.tensor([[4.0, 4.0, 20.0, 24.0]]))
    original = ImageTransform.boxes_to_original(det.boxes.clone(), meta)
    torch.testing.assert_close(original, torch.tensor([[12.5, 12.5, 62.5, 75.0]]))
    clipped = ImageTransform.boxes_to_original(torch.tensor([[20.0, 50.0, 60.0, 70.0]]), meta)
    torch.testing.assert_close(clipped, torch.tensor([[62.5, 156.25, 100.0, 200.0]]))


def test_boxes_that_clipping_flattens_onto_the_image_edge_are_dropped() -> None:
    """A box in the canvas's padding, below a wide image, clips to zero height: no detection."""
    _, meta = ImageTransform(PreprocessSpec(size=64)).one(torch.zeros(3, 10, 1000, dtype=torch.uint8))
    boxes = torch.tensor([[8.0, 0.0, 16.0, 0.6], [8.0, 20.0, 16.0, 30.0], [30.0, 0.2, 40.0, 40.0]])
    det = Detections(boxes, torch.tensor([0.9, 0.8, 0.7]), torch.tensor([0, 1, 2]))
    found = ImageTransform.to_original(det, meta)
    assert found.labels.tolist() == [0, 2]  # the second lay wholly in the padding
    torch.testing.assert_close(found.boxes, torch.tensor([[125.0, 0.0, 250.0, 9.375], [468.75, 3.125, 625.0, 10.0]]))


def test_nms_keeps_best_of_overlapping_same_class() -> None:
    from models.postprocess import nms_and_clip

    boxes = torch.tensor([[0.0, 0, 10, 10], [1, 1, 10, 10], [0, 0, 10, 10]])
    det = nms_and_clip(boxes, torch.tensor([0.9, 0.8, 0.7]), torch.tensor([0, 0, 1]), (64, 64), PostprocessConfig())
    assert det.scores.tolist() == pytest.approx([0.9, 0.7])


def test_serving_points_are_built_once_per_shape_and_fresh_under_autograd() -> None:
    from models.heads.base import level_points, serving_points

    shapes, strides, cpu = [(5, 7), (3, 4), (2, 2)], (8, 16, 32), torch.device("cpu")
    points, point_strides = level_points(shapes, strides, cpu)
    with torch.inference_mode():
        first = serving_points(shapes, strides, cpu)
        again = serving_points([tuple(s) for s in shapes], strides, cpu)
        other = serving_points([(6, 7), (3, 4), (2, 2)], strides, cpu)
    assert torch.equal(first[0], points) and torch.equal(first[1], point_strides)
    assert again[0] is first[0] and other[0] is not first[0] and other[0].shape[0] == 42 + 12 + 4
    with torch.no_grad():
        assert serving_points(shapes, strides, cpu)[0] is first[0]
    fresh = serving_points(shapes, strides, cpu)  # gradients on: autograd must be able to save them
    assert fresh[0] is not first[0] and not fresh[0].is_inference()
    reg = torch.ones(points.shape[0], 4, requires_grad=True)
    (fresh[0].repeat(1, 2) + reg * fresh[1][:, None]).sum().backward()
    assert reg.grad is not None and torch.equal(reg.grad[:, 0], point_strides)


def test_detection_rows_round_float32_values_to_what_they_print_as() -> None:
    det = Detections(
        boxes=torch.tensor([[0.1, 12.344, 2.3456, 300.999], [0.0, 1.0, 2.0, 3.0]]),  # float32
        scores=torch.tensor([0.123456, 0.5]),
        labels=torch.tensor([1, 0]),
    )
    assert float(det.boxes[0, 0]) != 0.1  # float32's 0.1 is 0.10000000149...
    assert det.rows(["cat", "dog"]) == [
        {"box": [0.1, 12.34, 2.35, 301.0], "label": "dog", "class_id": 1, "score": 0.1235},
        {"box": [0.0, 1.0, 2.0, 3.0], "label": "cat", "class_id": 0, "score": 0.5},
    ]
    empty = Detections(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64))
    assert empty.rows(["cat"]) == []
