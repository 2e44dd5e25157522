"""Explainer.decompose against the literal reference, and the how-tree's invariants."""

import functools
import json

import pytest
import torch
from torchvision.models.resnet import BasicBlock

import srd_ext
from srd_ext.how import erf_box, how

from models_for_tests import tiny_resnet, tiny_vgg
from reference import ReferenceSRD

MODELS = {  # built once per session: the capture is cached per model (the tests never modify them)
    "vgg": (functools.lru_cache(None)(lambda: tiny_vgg(seed=1).double()), 16),
    "resnet-basic": (functools.lru_cache(None)(lambda: tiny_resnet(BasicBlock, seed=2).double()), 32),
}
# (layer, into) pairs decomposed: the next site down (default), and a site further down
PAIRS = {"vgg": [("low", None), ("features.7", "features.1")], "resnet-basic": [("layer3", None), ("low", "layer2")]}


def _input(size, batch=1, seed=0):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def _strongest(m):
    """(y, x) of the largest |relevance| of a (1, H, W) map."""
    w = m.shape[-1]
    k = int(m[0].abs().flatten().argmax())
    return (k // w, k % w)


@pytest.mark.parametrize("bias_share", ["contribution", "input", "none"])
@pytest.mark.parametrize("name", list(MODELS))
def test_decompose_equals_reference(name, bias_share):
    build, size = MODELS[name]
    model = build()
    x = _input(size)
    ex = srd_ext.Explainer(model, bias_share=bias_share)
    g = ex.graph(x)
    plan = ex._plan(g)
    ref = ReferenceSRD(model, x, bias_share=bias_share)
    pairs = PAIRS[name] if bias_share == "contribution" else PAIRS[name][:1]  # the reference is slow
    for layer, into in pairs:
        m = ex.explain(x, layer=layer)
        pos = _strongest(m)
        d = ex.decompose(x, layer, pos, into=into)
        i = srd_ext.layers.resolve(g, plan, layer)
        k = srd_ext.layers.resolve(g, plan, into) if into else srd_ext.layers.next_below(g, plan, i)
        assert g.nodes[k].site and k < i
        # the PFV's relevance is the explanation's map there
        torch.testing.assert_close(d.relevance, m[:, pos[0], pos[1]], rtol=1e-12, atol=0)
        # the literal decomposition, started from a one-hot relevance at the PFV
        start = torch.zeros(m.shape[1:], dtype=torch.float64)
        start[pos] = d.relevance[0]
        r_ref = ref.run(start, start=i, stop=k)[k]
        err = _rel_err(d.contributions[0], r_ref)
        assert err < 1e-9, (layer, into, err)
        if bias_share != "none":  # conserved: the walk accounts for every bias share it drops
            total = d.contributions.sum((1, 2)) + d.unassigned
            torch.testing.assert_close(total, d.relevance, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("name", list(MODELS))
def test_decompose_into_input_from_a_unit_start_is_the_erf(name):
    build, size = MODELS[name]
    model = build()
    x = _input(size, batch=2, seed=3)
    ex = srd_ext.Explainer(model)
    d = ex.decompose(x, "low", (0, 0), into="input", relevance=1.0)
    torch.testing.assert_close(d.contributions, ex.erf(x, "low", (0, 0)), rtol=0, atol=0)
    torch.testing.assert_close(d.relevance, torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(d.contributions.sum((1, 2)) + d.unassigned, d.relevance, rtol=1e-10, atol=1e-14)
    # per-sample targets: each sample's PFV relevance in its own explanation
    t = torch.tensor([1, 3])
    m = ex.explain(x, t, layer="low")
    torch.testing.assert_close(ex.decompose(x, "low", (0, 0), target=t).relevance, m[:, 0, 0])


def test_decompose_refuses_a_layer_the_relevance_bypasses():
    model = MODELS["resnet-basic"][0]()
    x = _input(32)
    ex = srd_ext.Explainer(model)
    with pytest.raises(ValueError, match="not below layer"):
        ex.decompose(x, "layer2", (0, 0), into="layer2.0.relu@0")  # the shortcut passes by it
    with pytest.raises(ValueError, match="outside layer"):
        ex.decompose(x, "layer2", (99, 0))
    with pytest.raises(ValueError, match="no lower layer"):
        ex.decompose(x, "input", (0, 0), into="layer1")
    one = ex.erf(x, "input", (2, 3))  # an image pixel's ERF is itself, as before
    assert float(one.sum()) == 1.0 and float(one[0, 2, 3]) == 1.0


def _check_node(node, h, w):
    if node.box is not None:
        y0, x0, y1, x1 = node.box
        assert 0 <= y0 < y1 <= h and 0 <= x0 < x1 <= w
    if node.rest is None:
        assert not node.children
        return 0
    total = sum(c.relevance for c in node.children) + node.rest + node.unassigned
    scale = max(abs(node.relevance), max((abs(c.relevance) for c in node.children), default=0), 1e-300)
    assert abs(total - node.relevance) <= 1e-8 * scale, (node.layer, node.position, total, node.relevance)
    for c in node.children:
        assert c.share == pytest.approx(c.relevance / node.relevance, rel=1e-12)
    return 1 + sum(_check_node(c, h, w) for c in node.children)


@pytest.mark.parametrize("name", list(MODELS))
def test_tree_invariants(name):
    build, size = MODELS[name]
    model = build()
    x = _input(size, batch=2, seed=4)
    ex = srd_ext.Explainer(model)
    trees = how(ex, x, depth=3, top=2)
    low, logits = ex.explain(x, layer="low", return_logits=True)
    low, pred = low.sum((1, 2)), logits.argmax(-1)
    assert len(trees) == 2
    for n, tree in enumerate(trees):
        assert tree.image == n and tree.target == int(pred[n]) and len(tree.layers) == 3
        assert tree.root.relevance == pytest.approx(float(low[n]), rel=1e-12)
        assert _check_node(tree.root, size, size) >= 3  # root and at least one decomposed per level
        assert max(len(t.children) for t in tree.nodes()) == 2
        again = json.loads(json.dumps(tree.to_dict()))
        assert again["root"]["relevance"] == tree.root.relevance and again["layers"] == tree.layers
        text = str(tree)
        assert (
            tree.layers[0] in text
            and "rest" in text
            and text.count("\n") + 1 == len(tree.nodes()) + sum(t.rest is not None for t in tree.nodes())
        )


def _same_tree(a, b):
    assert a.layer == b.layer and a.position == b.position and a.box == b.box
    assert a.relevance == pytest.approx(b.relevance, rel=1e-9, abs=1e-14)
    assert len(a.children) == len(b.children)
    for p, q in zip(a.children, b.children):
        _same_tree(p, q)


@pytest.mark.parametrize("name", list(MODELS))
def test_tree_of_a_batch_is_each_image_alone(name):
    build, size = MODELS[name]
    model = build()
    x = _input(size, batch=3, seed=6)
    target = torch.tensor([0, 2, 4])
    trees = how(model, x, target, depth=2, top=3)
    chunked = how(model, x, target, depth=2, top=3, seeds_per_walk=2)  # 9 seeds per level, by 2
    for n in range(3):
        _same_tree(chunked[n].root, trees[n].root)
        one = how(model, x[n : n + 1], int(target[n]), depth=2, top=3)[0]
        assert one.target == trees[n].target
        _same_tree(trees[n].root, one.root)


def test_tree_layers_argument_and_errors():
    model = MODELS["vgg"][0]()
    x = _input(16)
    tree = how(model, x, layers=["features.7", "features.4"], top=2, boxes=False)[0]
    assert tree.layers == ["features.7", "features.4"]
    assert all(n.box is None for n in tree.nodes())
    assert _check_node(tree.root, 16, 16) == 3
    with pytest.raises(ValueError, match="top down"):
        how(model, x, layers=["features.4", "features.7"])
    with pytest.raises(ValueError, match=">= 1"):
        how(model, x, top=0)


# --------------------------------------------------------------------------------------------
# ConceptIndex
# --------------------------------------------------------------------------------------------
def _concept_index(**kw):
    from srd_ext.concepts import ConceptIndex

    model = MODELS["vgg"][0]()
    images = _input(16, batch=5, seed=8)
    dataset = [(images[n], 10 + n) for n in range(5)]  # a sequence of (image, label) pairs
    return model, images, ConceptIndex.build(model, dataset, "features.7", batch_size=2, progress=False, **kw)


def test_concept_index_rows_vectors_and_boxes():
    model, images, index = _concept_index(seeds_per_walk=7)
    feats = model.features[:8](images)  # features.7: the ReLU after the third conv
    n, c, h, w = feats.shape
    assert len(index) == n * h * w and index.layer == "features.7"
    torch.testing.assert_close(index.vectors, feats.permute(0, 2, 3, 1).reshape(-1, c).float())
    assert index.column("image").tolist() == [k // (h * w) for k in range(n * h * w)]
    assert index.column("label").tolist() == [10 + k // (h * w) for k in range(n * h * w)]
    assert index.column("prediction").tolist() == model(images).argmax(-1).repeat_interleave(h * w).tolist()
    r = 2 * h * w + 3 * w + 1  # image 2, position (3, 1)
    assert index.rows[r, 1:3].tolist() == [3, 1]
    erf = srd_ext.Explainer(model).erf(images[2:3], "features.7", (3, 1))
    assert tuple(index.rows[r, 3:7].tolist()) == erf_box(erf)[0]
    box = index.rows[:, 3:7]
    some = box[:, 0] >= 0
    assert bool(some.any())
    assert bool(((box[some, 0] < box[some, 2]) & (box[some, 2] <= 16) & (box[some, 1] < box[some, 3])).all())


def test_concept_index_nearest_is_brute_force():
    from srd_ext.concepts import ConceptIndex

    g = torch.Generator().manual_seed(0)
    vectors = torch.randn(300, 8, generator=g)
    vectors[7] = 0  # a zero vector: similarity 0
    index = ConceptIndex(vectors, torch.zeros(300, 9, dtype=torch.long), "layer")
    q = torch.randn(6, 8, generator=g)
    sims, rows = index.nearest(q, k=4, chunk=37)
    cos = (q / q.norm(dim=1, keepdim=True)) @ (vectors / vectors.norm(dim=1, keepdim=True).clamp_min(1e-30)).T
    want_s, want_i = cos.topk(4, dim=1)
    assert torch.equal(rows, want_i)
    torch.testing.assert_close(sims, want_s, rtol=1e-5, atol=1e-6)
    s1, r1 = index.nearest(q[0], k=2)
    assert r1.tolist() == want_i[0, :2].tolist() and s1.shape == (2,)
    with pytest.raises(ValueError, match="channels"):
        index.nearest(torch.randn(3, 5))


def test_concept_index_faiss_flat_index_finds_the_same_neighbours():
    pytest.importorskip("faiss")
    from srd_ext.concepts import ConceptIndex

    g = torch.Generator().manual_seed(1)
    index = ConceptIndex(torch.randn(500, 16, generator=g), torch.zeros(500, 9, dtype=torch.long), "layer")
    q = torch.randn(10, 16, generator=g)
    sims, rows = index.nearest(q, k=5, chunk=64)
    f_sims, f_rows = index.nearest(q, k=5, backend="faiss")
    assert torch.equal(f_rows, rows)
    torch.testing.assert_close(f_sims, sims, rtol=1e-5, atol=1e-5)


def test_concept_index_save_load_round_trip(tmp_path):
    import csv

    import numpy as np

    from srd_ext.concepts import COLUMNS, ConceptIndex

    _, _, index = _concept_index(boxes=False, dtype=torch.float16)
    assert index.vectors.dtype == torch.float16 and bool((index.rows[:, 3:7] == -1).all())
    index.save(str(tmp_path))
    back = ConceptIndex.load(str(tmp_path))
    assert torch.equal(back.vectors, index.vectors) and torch.equal(back.rows, index.rows)
    assert back.layer == index.layer and back.info == index.info
    # readable without srd_ext
    assert np.load(tmp_path / "vectors.npy").shape == tuple(index.vectors.shape)
    with open(tmp_path / "rows.csv", newline="") as f:
        lines = list(csv.reader(f))
    assert tuple(lines[0]) == COLUMNS and len(lines) == len(index) + 1
    q = index.vectors[:3].float()
    assert torch.equal(back.nearest(q, 2)[1], index.nearest(q, 2)[1])
    # shares of the images built apart and joined: the same rows and vectors
    model = MODELS["vgg"][0]()
    dataset = [(t, 10 + n) for n, t in enumerate(_input(16, batch=5, seed=8))]
    build = dict(layer="features.7", batch_size=2, progress=False, boxes=False, dtype=torch.float16)
    parts = [ConceptIndex.build(model, dataset, indices=range(r, 5, 2), **build) for r in range(2)]
    joined = ConceptIndex.concat(parts)
    order = joined.column("image").argsort(stable=True)
    assert torch.equal(joined.rows[order], index.rows) and torch.equal(joined.vectors[order], index.vectors)


def test_tree_and_decompose_on_a_vision_transformer():
    """Token layers: maps on the patch grid; the class token's share counts as unassigned, so
    the sums still hold; several seeds of one image are walked in rounds."""
    pytest.importorskip("timm")
    from test_transformers import timm_vit

    model = timm_vit()
    x = _input(32, batch=2, seed=9)
    ex = srd_ext.Explainer(model)
    d = ex.decompose(x, "low", (1, 2))
    torch.testing.assert_close(d.relevance, ex.explain(x, layer="low")[:, 1, 2])
    torch.testing.assert_close(d.contributions.sum((1, 2)) + d.unassigned, d.relevance, rtol=1e-9, atol=1e-14)
    trees = how(ex, x, depth=2, top=2)
    for tree in trees:
        assert _check_node(tree.root, 32, 32) >= 3
    _same_tree(how(ex, x[1:], depth=2, top=2)[0].root, trees[1].root)
