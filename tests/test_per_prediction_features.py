"""Per-prediction pixel features ``pixel_embed [L,B,C,h,w]`` (EoMT: prediction l's mask logits are
``<mask_embed[l], pixel_embed[l]>``) in every op that takes ``pixel_embed``: each op on the 5-D
features equals the same op looped over the predictions with the shared-feature form
``[B,C,h,w]`` (the reference, ``impl="torch"``), for the plain-PyTorch references and for the
Triton kernels (interpreter on CPU), forward and backward where differentiable.

Tolerances: fp32 rtol 1e-4, atol 1e-5 (the same fp32 formulas, summed in another order; the
kernels run with ``precision="ieee"``). Shapes: odd low-res and full-res sizes, an image without
segments (M = 0), Q = 1, non-contiguous inputs (the 5-D features are a transposed view).
"""
import pytest
import torch

from fastmaskformer import Target, ops
from fastmaskformer.losses.criterion import PointSampledCriterion, SetCriterion
from fastmaskformer.losses.matcher import HungarianMatcher, PointMatcher, assignment_to_indices
from fastmaskformer.modeling.maskformer import MaskFormerOutput
from fastmaskformer.ops.matching_cost import pack_targets
from fastmaskformer.ops.point_loss import point_mask_loss, point_matching_cost

TOL = dict(rtol=1e-4, atol=1e-5)
IMPLS = ["torch", "triton"]


def make_problem(layers=3, batch=2, queries=5, channels=12, low=(7, 9), size=(26, 35), segments=(3, 0), classes=4,
                 seed=0):
    """class_logits [L,B,Q,K+1], mask_embed [L,B,Q,C], per-prediction pixel_embed [L,B,C,h,w] (a
    non-contiguous view), targets (image b has segments[b] segments, -1 regions), padded input
    size and an assignment [L,B,M] with unmatched slots."""
    g = torch.Generator().manual_seed(seed)
    class_logits = torch.randn(layers, batch, queries, classes + 1, generator=g)
    mask_embed = torch.randn(batch, layers, queries, channels, generator=g).transpose(0, 1)
    pixel_embed = torch.randn(batch, layers, channels, *low, generator=g).transpose(0, 1)
    targets = []
    for count in segments:
        seg = torch.full(size, -1, dtype=torch.int32)
        if count:
            coarse = torch.randint(-1, count, (size[0] // 3 + 1, size[1] // 3 + 1), generator=g, dtype=torch.int32)
            seg = coarse.repeat_interleave(3, 0).repeat_interleave(3, 1)[: size[0], : size[1]].contiguous()
            seg[0, :count] = torch.arange(count, dtype=torch.int32)  # every segment present
        targets.append(Target(torch.randint(0, classes, (count,), generator=g), seg))
    m = max(segments)
    assignment = torch.full((layers, batch, m), -1, dtype=torch.int64)
    for layer in range(layers):
        for b, count in enumerate(segments):
            matched = min(count, queries, 1 + (layer + b) % max(count, 1))
            assignment[layer, b, torch.randperm(count, generator=g)[:matched]] = \
                torch.randperm(queries, generator=g)[:matched]
    return class_logits, mask_embed, pixel_embed, targets, size, assignment


def with_grads(fn, mask_embed, pixel_embed):
    """fn(mask_embed, pixel_embed) -> tuple of tensors; returns (outputs, d/dmask_embed,
    d/dpixel_embed) of a weighted sum of the outputs (distinct weights per element)."""
    mask_embed = mask_embed.detach().clone().requires_grad_()
    pixel_embed = pixel_embed.detach().clone().requires_grad_()
    outputs = fn(mask_embed, pixel_embed)
    total = sum((o.float() * torch.linspace(0.5, 1.5, o.numel()).view(o.shape)).sum() for o in outputs)
    total.backward()
    return [o.detach() for o in outputs], mask_embed.grad, pixel_embed.grad


def assert_all_close(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **TOL)


def assert_grads_close(got, want):
    """Two ``with_grads`` results: outputs and both gradients."""
    assert_all_close(got[0] + [got[1], got[2]], want[0] + [want[1], want[2]])


def assert_same(got, want):
    """Nested results (lists, tuples, dicts, tensors, numbers) exactly equal."""
    assert type(got) is type(want)
    if isinstance(got, torch.Tensor):
        assert got.dtype == want.dtype and torch.equal(got, want)
    elif isinstance(got, dict):
        assert got.keys() == want.keys()
        for k in got:
            assert_same(got[k], want[k])
    elif isinstance(got, (list, tuple)):
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert_same(g, w)
    else:
        assert got == want


# ---------------------------------------------------------------------------- mask logits
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("out_size", [None, (30, 41)])
def test_mask_logits(impl, out_size):
    _, mask_embed, pixel_embed, _, _, _ = make_problem()

    def per_prediction(me, pe):
        return (ops.mask_logits(me, pe, out_size, impl=impl),)

    def looped(me, pe):
        return (torch.stack([ops.mask_logits(me[l], pe[l], out_size, impl="torch") for l in range(me.shape[0])]),)

    got = with_grads(per_prediction, mask_embed, pixel_embed)
    assert got[0][0].shape == (3, 2, 5, *(out_size or (7, 9)))
    assert_grads_close(got, with_grads(looped, mask_embed, pixel_embed))


@pytest.mark.parametrize("impl", IMPLS)
def test_mask_logits_shared_features_for_all_predictions(impl):
    """[L,B,Q,C] with shared [B,C,h,w]: every prediction reads the one map (layer stride 0)."""
    _, mask_embed, pixel_embed, _, _, _ = make_problem()
    got = ops.mask_logits(mask_embed, pixel_embed[0], impl=impl)
    want = torch.stack([ops.mask_logits(mask_embed[l], pixel_embed[0], impl="torch") for l in range(3)])
    torch.testing.assert_close(got, want, **TOL)


def test_pred_masks_reads_its_predictions_features():
    class_logits, mask_embed, pixel_embed, _, _, _ = make_problem()
    out = MaskFormerOutput(class_logits, mask_embed, pixel_embed)
    for layer in (0, 1, -1):
        torch.testing.assert_close(out.pred_masks(layer), ops.mask_logits(mask_embed[layer], pixel_embed[layer]))


# ---------------------------------------------------------------------------- matching cost
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("queries,segments", [(5, (3, 0)), (1, (2, 1))])
def test_matching_cost(impl, queries, segments):
    class_logits, mask_embed, pixel_embed, targets, size, _ = make_problem(queries=queries, segments=segments)
    got = ops.matching_cost(class_logits, mask_embed, pixel_embed, targets, input_size=size, precision="ieee",
                            impl=impl)
    want = [cost for l in range(3) for cost in ops.matching_cost(class_logits[l], mask_embed[l], pixel_embed[l],
                                                                 targets, input_size=size, impl="torch")]
    assert len(got) == len(want) == 6
    assert_all_close(got, want)


# ---------------------------------------------------------------------------- mask loss
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("loss,queries", [("focal", 5), ("bce", 5), ("bce", 1)])
def test_mask_loss_assigned(impl, loss, queries):
    _, mask_embed, pixel_embed, targets, size, assignment = make_problem(queries=queries)
    seg_maps, _, _ = pack_targets(targets, size, "cpu")

    def per_prediction(me, pe):
        return ops.mask_loss_assigned(me, pe, assignment, seg_maps, 2.5, "ieee", impl=impl, loss=loss)

    def looped(me, pe):
        terms = [ops.mask_loss_assigned(me[l:l + 1], pe[l], assignment[l:l + 1], seg_maps, 2.5, impl="torch",
                                        loss=loss) for l in range(me.shape[0])]
        return tuple(torch.cat(t) for t in zip(*terms))

    assert_grads_close(with_grads(per_prediction, mask_embed, pixel_embed), with_grads(looped, mask_embed, pixel_embed))


@pytest.mark.parametrize("impl", IMPLS)
def test_mask_loss_with_indices(impl):
    """The index-pair form: [L,B,Q,C] with per-layer indices and [L,B,C,h,w] features."""
    _, mask_embed, pixel_embed, targets, size, assignment = make_problem()
    indices = assignment_to_indices(assignment)
    got = ops.mask_loss(mask_embed, pixel_embed, indices, targets, 2.0, input_size=size, impl=impl)
    want = [ops.mask_loss(mask_embed[l], pixel_embed[l], indices[l], targets, 2.0, input_size=size, impl="torch")
            for l in range(3)]
    assert_all_close(got, [torch.stack(t) for t in zip(*want)])


def test_mask_loss_no_segments_anywhere():
    """M = 0 in every image: zero losses, gradients of zeros shaped like the 5-D features."""
    _, mask_embed, pixel_embed, targets, size, assignment = make_problem(segments=(0, 0))
    seg_maps, _, _ = pack_targets(targets, size, "cpu")
    for impl in IMPLS:
        (focal, dice), g_embed, g_pixel = with_grads(
            lambda me, pe: ops.mask_loss_assigned(me, pe, assignment, seg_maps, 1.0, impl=impl), mask_embed,
            pixel_embed)
        assert focal.abs().sum() == 0 and dice.abs().sum() == 0
        assert g_pixel.shape == pixel_embed.shape and g_pixel.abs().sum() == 0


# ---------------------------------------------------------------------------- point-sampled
def _points(shape, count, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, count, 2, generator=g) * 1.1 - 0.05  # some outside [0, 1]


@pytest.mark.parametrize("impl,dtype", [("torch", torch.float32), ("triton", torch.float32),
                                         ("triton", torch.bfloat16)])
@pytest.mark.parametrize("queries", [5, 1])
def test_point_matching_cost(impl, dtype, queries):
    """bf16 features: the kernel reads them as they are (the reference upcasts the same values)."""
    class_logits, mask_embed, pixel_embed, targets, size, _ = make_problem(queries=queries)
    pixel_embed = pixel_embed.to(dtype)
    seg_maps, labels, _ = pack_targets(targets, size, "cpu")
    coords = _points((3, 2), 50)
    got = point_matching_cost(class_logits, mask_embed, pixel_embed, seg_maps, labels, coords, precision="ieee",
                              impl=impl)
    want = torch.cat([point_matching_cost(class_logits[l:l + 1], mask_embed[l:l + 1], pixel_embed[l].float(),
                                          seg_maps, labels, coords[l:l + 1], impl="torch") for l in range(3)])
    torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("num_uncertain,queries", [(0, 5), (6, 5), (6, 1)])
def test_point_mask_loss(impl, num_uncertain, queries):
    _, mask_embed, pixel_embed, targets, size, assignment = make_problem(queries=queries)
    seg_maps, _, _ = pack_targets(targets, size, "cpu")
    candidates = _points(assignment.shape, 12 if num_uncertain else 0, seed=4)
    extra = _points(assignment.shape, 20, seed=5)
    num_masks = torch.tensor(2.5)

    def per_prediction(me, pe):
        return point_mask_loss(me, pe, assignment, seg_maps, num_masks, candidates, extra, num_uncertain, "ieee",
                               impl=impl)

    def looped(me, pe):
        terms = [point_mask_loss(me[l:l + 1], pe[l], assignment[l:l + 1], seg_maps, num_masks, candidates[l:l + 1],
                                 extra[l:l + 1], num_uncertain, impl="torch") for l in range(me.shape[0])]
        return tuple(torch.cat(t) for t in zip(*terms))

    assert_grads_close(with_grads(per_prediction, mask_embed, pixel_embed), with_grads(looped, mask_embed, pixel_embed))


# ---------------------------------------------------------------------------- criteria
def _criterion_losses(criterion, class_logits, mask_embed, pixel_embed, targets, size, points=None):
    outputs = MaskFormerOutput(class_logits, mask_embed, pixel_embed)
    kwargs = {} if points is None else {"points": points}
    return criterion(outputs, targets, input_size=size, **kwargs)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["maskformer", "points", "full"])
def test_criteria_equal_their_per_layer_loop(impl, kind):
    """Every layer's terms of the deep-supervised criterion on [L,B,C,h,w] features equal the
    criterion run on that layer alone with its [B,C,h,w] features (the matching, the class loss
    and the mask terms of a layer depend on that layer only); gradients too."""
    class_logits, mask_embed, pixel_embed, targets, size, _ = make_problem(queries=6)

    def build(impl):  # exact fp32 matching costs in the kernels: the same assignment as the reference
        if kind == "maskformer":
            return SetCriterion(4, HungarianMatcher(impl=impl, precision="ieee"), impl=impl)
        return PointSampledCriterion(4, PointMatcher(2.0, 5.0, 5.0, impl=impl, precision="ieee"), impl=impl,
                                     num_points=30, mask_sampling=kind)

    criterion, reference = build(impl), build("torch")
    draws = None if kind == "maskformer" else criterion.draw_points(3, 2, 3, "cpu")
    names = sorted(criterion.base_weights)

    def per_prediction(me, pe):
        losses = _criterion_losses(criterion, class_logits, me, pe, targets, size, draws)
        return tuple(losses[n + ("" if l == 2 else f"_{l}")] for l in range(3) for n in names)

    def looped(me, pe):
        out = []
        for l in range(3):
            layer_draws = None if draws is None else {k: v[l:l + 1] for k, v in draws.items()}
            losses = _criterion_losses(reference, class_logits[l:l + 1], me[l:l + 1], pe[l], targets, size,
                                       layer_draws)
            out += [losses[n] for n in names]
        return tuple(out)

    assert_grads_close(with_grads(per_prediction, mask_embed, pixel_embed), with_grads(looped, mask_embed, pixel_embed))


def test_selected_features_are_views():
    """The criteria's layer selections (all layers, the last) do not copy the [L,B,C,h,w] map."""
    from fastmaskformer.ops._checks import select_pixel_embed

    pixel_embed = make_problem()[2]
    for layers in ([0, 1, 2], [2], [1, 2]):
        selected = select_pixel_embed(pixel_embed, layers)
        assert selected.data_ptr() == pixel_embed[layers[0]].data_ptr() and torch.equal(selected, pixel_embed[layers])
    torch.testing.assert_close(select_pixel_embed(pixel_embed, [2, 0]), pixel_embed[[2, 0]])
    shared = pixel_embed[0]
    assert select_pixel_embed(shared, [1]) is shared


def test_criterion_without_deep_supervision_reads_the_final_features():
    class_logits, mask_embed, pixel_embed, targets, size, _ = make_problem()
    criterion = SetCriterion(4, deep_supervision=False, impl="torch")
    got = _criterion_losses(criterion, class_logits, mask_embed, pixel_embed, targets, size)
    want = _criterion_losses(criterion, class_logits[-1:], mask_embed[-1:], pixel_embed[-1], targets, size)
    assert got.keys() == want.keys()
    assert_all_close([got[k] for k in sorted(got)], [want[k] for k in sorted(want)])


# ---------------------------------------------------------------------------- inference
@pytest.mark.parametrize("impl", IMPLS)
def test_inference_reads_the_final_prediction(impl):
    class_logits, mask_embed, pixel_embed, _, _, _ = make_problem(queries=6, classes=5)
    final = (class_logits[-1], mask_embed[-1])
    sizes, outputs, input_size = [(26, 33), (21, 35)], [(30, 40), (21, 35)], (28, 36)
    for op, kwargs in [(ops.semantic_inference, dict(return_score=True, precision="ieee")),
                       (ops.panoptic_inference, dict(object_mask_threshold=0.0, thing_classes=(0, 1))),
                       (ops.instance_inference, dict(topk=4))]:
        got = op(*final, pixel_embed, sizes, outputs, input_size=input_size, impl=impl, **kwargs)
        want = op(*final, pixel_embed[-1], sizes, outputs, input_size=input_size, impl=impl, **kwargs)
        assert_same(got, want)
    torch.testing.assert_close(ops.mask_probs(mask_embed[-1], pixel_embed, impl=impl),
                               ops.mask_probs(mask_embed[-1], pixel_embed[-1], impl="torch"), **TOL)


# ---------------------------------------------------------------------------- bad input
def _one_line_error(fn, *needles):
    with pytest.raises(ValueError) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, (needle, message)


def test_bad_shapes_are_one_line_errors_naming_them():
    class_logits, mask_embed, pixel_embed, targets, size, assignment = make_problem()
    seg_maps, labels, counts = pack_targets(targets, size, "cpu")
    two = pixel_embed[:2]  # L = 2 against mask_embed's L = 3
    l_shapes = ("(3, 2, 5, 12)", "(2, 2, 12, 7, 9)")
    _one_line_error(lambda: ops.mask_logits(mask_embed, two), *l_shapes)
    _one_line_error(lambda: ops.mask_logits(mask_embed[0], pixel_embed), "(2, 5, 12)", "(3, 2, 12, 7, 9)")
    _one_line_error(lambda: ops.matching_cost_packed(class_logits, mask_embed, two, seg_maps, labels, counts),
                    *l_shapes)
    _one_line_error(lambda: ops.mask_loss_assigned(mask_embed, two, assignment, seg_maps, 1.0), *l_shapes)
    _one_line_error(lambda: point_matching_cost(class_logits, mask_embed, two, seg_maps, labels,
                                                _points((3, 2), 4)), *l_shapes)
    _one_line_error(lambda: point_mask_loss(mask_embed, two, assignment, seg_maps, torch.tensor(1.0),
                                            _points(assignment.shape, 0), _points(assignment.shape, 4), 0),
                    *l_shapes)
    _one_line_error(lambda: SetCriterion(4, impl="torch")(MaskFormerOutput(class_logits, mask_embed, two), targets,
                                                          input_size=size), *l_shapes)
    wrong_batch = pixel_embed[:, :1]
    _one_line_error(lambda: ops.mask_logits(mask_embed, wrong_batch), "batch", "(3, 2, 5, 12)", "(3, 1, 12, 7, 9)")
    _one_line_error(lambda: ops.matching_cost_packed(class_logits[:, :1], mask_embed[:, :1], wrong_batch, seg_maps,
                                                     labels, counts), "B=1", "(2, 26, 35)")
    _one_line_error(lambda: ops.mask_loss_assigned(mask_embed, wrong_batch, assignment, seg_maps, 1.0), "batch")
    _one_line_error(lambda: ops.semantic_inference(class_logits[-1], mask_embed[-1], wrong_batch, [(26, 35)] * 2),
                    "batch", "(2, 5, 12)", "(1, 12, 7, 9)")
