"""Vision transformers explained through their blocks: tokens as PFVs, attention with its
weights held as gates, the class token and position embeddings as constants (docs/math.md,
"Tokens and attention"). Every rule is checked against the literal reference at every site."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.vision_transformer import VisionTransformer as TorchvisionViT

import srd_ext

from reference import ReferenceSRD

timm = pytest.importorskip("timm")


def _randomise(model, seed):
    """Non-zero biases, norm parameters, class token, position embeddings and head."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and ("norm" in name or "ln" in name) and name.endswith("weight"):
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))
            elif p.dim() == 1 or "token" in name or "pos" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
            elif "head" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    return model.eval().double()


def timm_vit(seed=0, fused=True, **kw):
    torch.manual_seed(seed)
    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10)
    args.update(kw)
    m = timm.models.vision_transformer.VisionTransformer(**args)
    for blk in m.blocks:
        blk.attn.fused_attn = fused
    return _randomise(m, seed)


def timm_deit_distilled(seed=0):
    """A class and a distillation token before the patches; the head averages both."""
    from timm.models.deit import VisionTransformerDistilled

    torch.manual_seed(seed)
    m = VisionTransformerDistilled(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10)
    return _randomise(m, seed)


def torchvision_vit(seed=0):
    torch.manual_seed(seed)
    m = TorchvisionViT(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10
    )
    return _randomise(m, seed)


class TinyAttentionNet(nn.Module):
    """A patch embedding, a class token, position embeddings and one pre-norm attention block
    whose attention is written as ``form``: "sdpa", "explicit", "mha" or "mha-weights" (the
    module returning its weights too)."""

    def __init__(self, form="sdpa", dim=16, heads=2, mask=None, causal=False, gqa=False):
        super().__init__()
        self.form, self.heads, self.mask, self.causal, self.gqa = form, heads, mask, causal, gqa
        self.patch = nn.Conv2d(3, dim, 4, 4)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.zeros(1, 17, dim))
        self.norm1 = nn.LayerNorm(dim)
        kv = dim // 2 if gqa else dim
        self.qkv = nn.Linear(dim, dim + 2 * kv)
        self.proj = nn.Linear(dim, dim)
        self.mha = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 5)

    def tie(self):
        """The MultiheadAttention shares the qkv and proj parameters."""
        with torch.no_grad():
            self.mha.in_proj_weight.copy_(self.qkv.weight)
            self.mha.in_proj_bias.copy_(self.qkv.bias)
            self.mha.out_proj.weight.copy_(self.proj.weight)
            self.mha.out_proj.bias.copy_(self.proj.bias)
        return self

    def attend(self, x):
        B, N, C = x.shape
        if self.form in ("mha", "mha-weights"):
            mask = None if self.mask is None else ~self.mask  # the module's True masks out
            return self.mha(x, x, x, need_weights=self.form == "mha-weights", attn_mask=mask)[0]
        h = self.heads
        d = C // h
        hk = h // 2 if self.gqa else h
        q, k, v = self.qkv(x).split([C, hk * d, hk * d], -1)
        q = q.reshape(B, N, h, d).transpose(1, 2)
        k = k.reshape(B, N, hk, d).transpose(1, 2)
        v = v.reshape(B, N, hk, d).transpose(1, 2)
        if self.form == "sdpa":
            kw = {"enable_gqa": True} if self.gqa else {}
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, is_causal=self.causal, **kw)
        else:
            if self.gqa:
                k, v = k.repeat_interleave(h // hk, 1), v.repeat_interleave(h // hk, 1)
            a = (q * d**-0.5) @ k.transpose(-2, -1)
            if self.causal:
                a = a.masked_fill(~torch.ones(N, N, dtype=torch.bool).tril(), float("-inf"))
            if self.mask is not None:
                a = a.masked_fill(~self.mask, float("-inf"))
            o = a.softmax(-1) @ v
        return self.proj(o.transpose(1, 2).reshape(B, N, C))

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], 1) + self.pos
        t = t + self.attend(self.norm1(t))
        t = t + self.fc2(F.gelu(self.fc1(self.norm2(t))))
        return self.head(self.norm(t)[:, 0])


def tiny_attention(form="sdpa", seed=0, **kw):
    torch.manual_seed(seed)
    m = TinyAttentionNet(form, **kw)
    _randomise(m, seed)
    return m if m.gqa else m.tie()


def _mask():
    g = torch.Generator().manual_seed(3)
    m = torch.rand(17, 17, generator=g) > 0.3
    return m | torch.eye(17, dtype=torch.bool)


MODELS = {
    "timm-vit": (timm_vit, 32),
    "timm-vit-explicit": (lambda: timm_vit(fused=False), 32),
    "timm-vit-avgpool": (lambda: timm_vit(seed=1, global_pool="avg", class_token=False), 32),
    "timm-vit-registers": (lambda: timm_vit(seed=2, reg_tokens=2, no_embed_class=True), 32),
    "timm-deit-distilled": (lambda: timm_deit_distilled(seed=3), 32),
    "torchvision-vit": (torchvision_vit, 32),
    "attention-sdpa": (lambda: tiny_attention("sdpa"), 16),
    "attention-explicit": (lambda: tiny_attention("explicit"), 16),
    "attention-mha": (lambda: tiny_attention("mha"), 16),
    "attention-mask": (lambda: tiny_attention("sdpa", mask=_mask()), 16),
    "attention-causal": (lambda: tiny_attention("sdpa", causal=True), 16),
    "attention-gqa": (lambda: tiny_attention("sdpa", heads=4, gqa=True), 16),
}


def _input(size, batch=1, seed=0):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _rel_err(a, b):
    return float((a - b).detach().abs().max() / b.detach().abs().max().clamp_min(1e-12))


@pytest.mark.parametrize("bias_share", ["contribution", "input", "none"])
@pytest.mark.parametrize("name", list(MODELS))
def test_fast_path_equals_reference_at_every_site(name, bias_share):
    build, size = MODELS[name]
    model = build()
    x = _input(size)
    ex = srd_ext.Explainer(model, bias_share=bias_share)
    g, fast = ex._all_layers(x, None, None, False)
    ref = ReferenceSRD(model, x, bias_share=bias_share)
    r_ref = ref.run(fast[ref.plan.encoder][0])
    if bias_share != "none":
        assert max(ref.residuals.values()) < 1e-10
    checked = 0
    for i, r in r_ref.items():
        assert i in fast, g.display_name(i)
        assert _rel_err(fast[i][0], r) < 1e-4, g.display_name(i)
        checked += 1
    assert checked == len(ref.sites()) + 1 and checked >= 3


@pytest.mark.parametrize("bias_share", ["contribution", "input"])
@pytest.mark.parametrize("name", list(MODELS))
def test_conservation(name, bias_share):
    """encoder = input + unassigned; the unassigned part includes the class token's share."""
    build, size = MODELS[name]
    model = build()
    x = _input(size, batch=3)
    ex = srd_ext.Explainer(model, bias_share=bias_share)
    budget = ex.relevance_budget(x)
    assert float(budget["encoder"].abs().min()) > 0
    torch.testing.assert_close(budget["input"] + budget["unassigned"], budget["encoder"], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", list(MODELS))
def test_batch_invariance_and_model_unchanged(name):
    build, size = MODELS[name]
    model = build()
    before = copy.deepcopy(model.state_dict())
    x = _input(size, batch=3, seed=5)
    target = torch.tensor([0, 3, 1])
    ex = srd_ext.Explainer(model)
    layers = ["input", "low", "high"]
    batch = ex.explain(x, target, layer=layers)
    for i in range(3):
        one = ex.explain(x[i : i + 1], int(target[i]), layer=layers)
        for k in batch:
            torch.testing.assert_close(batch[k][i : i + 1], one[k], rtol=1e-9, atol=1e-12)
    maps, logits = ex.explain(x, target, return_logits=True)
    with torch.no_grad():
        torch.testing.assert_close(logits, model(x))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert not model.training


def test_three_forms_of_attention_give_the_same_maps():
    x = _input(16, batch=2, seed=1)
    for kw in ({}, {"mask": _mask()}):
        maps = {}
        for form in ("sdpa", "explicit", "mha", "mha-weights"):
            model = tiny_attention(form, **kw)
            ex = srd_ext.Explainer(model)
            maps[form] = ex.explain(x, layer=["input", "low", "high"])
        for form in ("explicit", "mha", "mha-weights"):
            for k in maps["sdpa"]:
                torch.testing.assert_close(maps[form][k], maps["sdpa"][k], rtol=1e-7, atol=1e-10)
    # timm's fused and explicit attention
    x = _input(32, batch=2, seed=2)
    a = srd_ext.Explainer(timm_vit(fused=True)).explain(x)
    b = srd_ext.Explainer(timm_vit(fused=False)).explain(x)
    torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize(
    "name, encoder, high",
    [
        ("timm-vit", "norm", "patch_embed.proj"),
        ("timm-vit-avgpool", "blocks", "patch_embed.proj"),  # fc_norm after the pool
        ("torchvision-vit", "encoder", "conv_proj"),
    ],
)
def test_encoder_after_the_last_block_and_maps_on_the_patch_grid(name, encoder, high):
    build, size = MODELS[name]
    model = build()
    x = _input(size, batch=2)
    ex = srd_ext.Explainer(model)
    assert ex.encoder_layer(x) == encoder
    names = ex.layer_names(x)
    assert high in names
    out = ex.explain(x, layer=["input", "low", "high", names[-2]], upsample=False)
    assert out["input"].shape == (2, size, size)
    assert out["low"].shape == out["high"].shape == out[names[-2]].shape == (2, size // 8, size // 8)
    g = ex.graph(x)
    assert g.display_name(srd_ext.layers.high(g, ex._plan(g))) == high
    up = ex.explain(x, layer="low", upsample=True)
    assert up.shape == (2, size, size)


def test_class_token_relevance_is_unassigned():
    """The class token is no pixel's: the relevance that reaches it at the concatenation (its
    position embedding's share included) is unassigned, and nothing else is when every token
    contributes."""
    model = timm_vit()
    x = _input(32, batch=2)
    ex = srd_ext.Explainer(model)
    budget = ex.relevance_budget(x)
    g, maps = ex._all_layers(x, None, None, False)
    cat = next(i for i in maps if g.nodes[i].op_name == "aten.cat")
    proj = next(i for i in maps if g.nodes[i].op_name == "aten.conv2d")
    add = next(i for i in maps if g.nodes[i].op_name == "aten.add" and i > cat)
    # Everything at the token sequence after the concatenation = patches + class token.
    cls = maps[cat][:, 0, 0]
    torch.testing.assert_close(maps[cat].sum((1, 2)), maps[proj].sum((1, 2)) + cls)
    assert float(cls.abs().min()) > 0
    assert float(maps[add][:, 0, 0].abs().min()) > 0
    # conv biases share among pixels that contribute: only the class token is unassigned here
    torch.testing.assert_close(budget["unassigned"], cls, rtol=1e-6, atol=1e-12)


def test_erf_and_init_tensor_on_the_patch_grid():
    model = timm_vit()
    x = _input(32, batch=1)
    ex = srd_ext.Explainer(model)
    e = ex.erf(x, "low", (1, 2))
    assert e.shape == (1, 32, 32)
    ones = torch.ones(4, 4, dtype=torch.float64)
    m = ex.explain(x, init=ones, layer="low")
    torch.testing.assert_close(m, ones.expand(1, 4, 4))
    with pytest.raises(ValueError, match="patch grid"):
        ex.explain(x, init=torch.ones(17, 1, dtype=torch.float64))


def test_product_of_queries_and_keys_without_softmax_is_refused():
    class Bad(nn.Module):
        def __init__(self):
            super().__init__()
            self.patch = nn.Conv2d(3, 8, 4, 4)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            t = self.patch(x).flatten(2).transpose(1, 2)
            t = (t @ t.transpose(1, 2)) @ t
            return self.head(t.mean(1))

    with pytest.raises(srd_ext.UnsupportedModelError, match="neither is a gate"):
        srd_ext.explain(Bad().eval(), torch.randn(1, 3, 16, 16))


def test_torch_compile_and_create_graph():
    """A ViT's explanation compiles with fullgraph=True and equals eager; with create_graph it
    can be differentiated with respect to the input (the attention weights depend on it)."""
    model = timm_vit().float()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    ex = srd_ext.Explainer(model)
    eager = ex.explain(x, torch.tensor([0, 1]), layer=["input", "low"])
    compiled = torch.compile(lambda inp, t: ex.explain(inp, t, layer=["input", "low"]), fullgraph=True)
    out = compiled(x, torch.tensor([0, 1]))
    for k in eager:
        torch.testing.assert_close(out[k], eager[k], rtol=1e-4, atol=1e-6)
    xd = _input(32, batch=1).requires_grad_(True)
    m = srd_ext.Explainer(timm_vit()).explain(xd, 0, create_graph=True)
    (gx,) = torch.autograd.grad(m.square().sum(), xd)
    assert torch.isfinite(gx).all() and float(gx.abs().max()) > 0
