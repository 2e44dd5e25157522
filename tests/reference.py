"""A slow SRD that follows the paper literally (Eq. 5-13), for testing the fast path.

For every activation layer k and every PFV v_j of its pre-activation, the PFV is decomposed
explicitly into the contributions v_hat_{i->j} of every input PFV v_i of the activation layers
(or the image) it is computed from: the linear part by evaluating the segment on inputs that are
zero except at pixel i, the conv biases by Eq. 11 (shares by tap norms, computed by explicit
loops), with max-pools as the fixed 0/1 selections of Eq. 12. Then
``mu_{i->j} = <v_hat_{i->j}, v_j> / ||v_j||^2`` and ``R_i = sum_j mu_{i->j} R_j``.

Only the graph structure (which step feeds which) comes from ``srd_ext.capture``; no VJP, op or
rule of the fast path is used. float64, one sample at a time.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F

from srd_ext.capture import Recorder, capture


def _folded(step):
    m = step.module
    w, b = m.weight.detach().double(), (m.bias.detach().double() if m.bias is not None else None)
    if step.bn is not None:
        bn = step.bn
        s = bn.weight.detach().double() / torch.sqrt(bn.running_var.double() + bn.eps)
        t = bn.bias.detach().double() - s * bn.running_mean.double()
        w = w * s[:, None, None, None]
        b = t if b is None else t + s * b
    return w, b


def _bn_affine(bn):
    s = bn.weight.detach().double() / torch.sqrt(bn.running_var.double() + bn.eps)
    return s, bn.bias.detach().double() - s * bn.running_mean.double()


class ReferenceSRD:
    def __init__(self, model, x: torch.Tensor, bias_share: str = "contribution"):
        assert x.shape[0] == 1, "the reference explains one sample at a time"
        self.plan = capture(model)
        self.steps = self.plan.steps
        self.mode = bias_share
        rec = Recorder()  # the model's own forward, with the max-pool indices
        with torch.no_grad():
            self.values = [v.detach().double() if torch.is_tensor(v) else v
                           for v in self.plan.forward(x.double(), rec)]
        self.indices = rec.indices
        self.sources_of: Dict[int, List[int]] = {}
        self.mu: Dict[Tuple[int, int], torch.Tensor] = {}

    # -- structure --------------------------------------------------------------------------
    def _segment(self, k: int) -> Tuple[List[int], List[int]]:
        """Steps between the sources and activation k's pre-activation, and the sources."""
        seg, sources, stack = set(), set(), [self.steps[k].inputs[0]]
        while stack:
            i = stack.pop()
            if self.steps[i].kind in ("act", "input"):
                sources.add(i)
                continue
            if i in seg:
                continue
            seg.add(i)
            stack.extend(self.steps[i].inputs)
        return sorted(seg), sorted(sources)

    def _linear_eval(self, seg, leaves: Dict[int, torch.Tensor], stop: int,
                     inject: Tuple[int, torch.Tensor] = None) -> torch.Tensor:
        """The segment's linear part (no biases) on batched leaf values; ``inject`` adds a tensor
        at the output of one step (used to push a bias share forward)."""
        vals = dict(leaves)
        n = next(iter(leaves.values())).shape[0] if leaves else inject[1].shape[0]
        for i in seg:
            s = self.steps[i]
            ins = []
            for j in s.inputs:
                if j not in vals:  # a source that is off in this evaluation
                    ref = self.values[j]
                    vals[j] = torch.zeros((n,) + tuple(ref.shape[1:]), dtype=torch.float64)
                ins.append(vals[j])
            k = s.kind
            if k == "conv":
                w, _ = _folded(s)
                m = s.module
                y = F.conv2d(ins[0], w, None, m.stride, s.params["padding"], m.dilation, m.groups)
            elif k == "bn":
                y = ins[0] * _bn_affine(s.module)[0].view(1, -1, 1, 1)
            elif k == "maxpool":  # Eq. 12: the recorded 0/1 selection
                idx = self.indices[i]
                b, c = ins[0].shape[:2]
                out_shape = (b,) + tuple(idx.shape[1:])
                y = ins[0].flatten(2).gather(2, idx.flatten(2).expand(b, -1, -1)).view(out_shape)
            elif k == "avgpool":
                p = s.params
                y = F.avg_pool2d(ins[0], p["kernel_size"], p["stride"], p["padding"], p["ceil_mode"],
                                 p["count_include_pad"], p["divisor_override"])
            elif k == "adaptive_avgpool":
                y = F.adaptive_avg_pool2d(ins[0], s.params["output_size"])
            elif k == "add":
                y = ins[0] + ins[1]
            elif k == "identity":
                y = ins[0]
            else:
                raise NotImplementedError(k)
            if inject is not None and inject[0] == i:
                y = y + inject[1]
            vals[i] = y
            if i == stop:
                return y
        return vals[stop]

    def _pixel_probes(self, src: int) -> torch.Tensor:
        """(H*W, C, H, W): sample 0 of source ``src`` with all pixels but one zeroed."""
        a = self.values[src][0]
        c, h, w = a.shape
        eye = torch.eye(h * w, dtype=torch.float64).view(h * w, 1, h, w)
        return eye * a.unsqueeze(0)

    def _tap_norm_shares(self, conv, x: torch.Tensor, out_hw):
        """Eq. 11 with explicit loops: for every output pixel p and input pixel m under tap t,
        the share n_t(m) / S_p. Returns a list of (m_flat, p_flat, share) and the output pixels
        with S_p = 0, whose bias no input pixel can carry."""
        w, _ = _folded(conv)
        m = conv.module
        kh, kw = w.shape[2], w.shape[3]
        (sh, sw), (ph, pw), (dh, dw) = m.stride, conv.params["padding"], m.dilation
        H, W = x.shape[1], x.shape[2]
        entries, unshared = [], []
        for oy in range(out_hw[0]):
            for ox in range(out_hw[1]):
                taps = []
                for ty in range(kh):
                    for tx in range(kw):
                        iy, ix = oy * sh - ph + ty * dh, ox * sw - pw + tx * dw
                        if 0 <= iy < H and 0 <= ix < W:
                            v = x[:, iy, ix]
                            n = torch.linalg.vector_norm(w[:, :, ty, tx] @ v) if self.mode == "contribution" \
                                else torch.linalg.vector_norm(v)
                            taps.append((iy * W + ix, float(n)))
                total = sum(n for _, n in taps)
                for mi, n in taps:
                    if total > 0:
                        entries.append((mi, oy * out_hw[1] + ox, n / total))
                if total == 0:
                    unshared.append(oy * out_hw[1] + ox)
        return entries, unshared

    # -- the decomposition --------------------------------------------------------------------
    def decompose(self, k: int) -> Dict[int, torch.Tensor]:
        """v_hat for activation k: {source: (P_src, C_k, H_k, W_k)} of every source pixel's share."""
        seg, sources = self._segment(k)
        self.sources_of[k] = sources
        stop = self.steps[k].inputs[0]
        self.unshared = 0  # bias of output pixels whose receptive field is all zero (S_p = 0)
        v_hat = {}
        for src in sources:
            v_hat[src] = self._linear_eval(seg, {src: self._pixel_probes(src)}, stop)
        if self.mode == "none":
            return v_hat
        for i in seg:
            s = self.steps[i]
            if s.kind == "conv":
                _, b = _folded(s)
                if b is None:
                    continue
                x = self.values[s.inputs[0]][0]
                out = self.values[i][0]
                ho, wo = out.shape[1:]
                entries, unshared = self._tap_norm_shares(s, x, (ho, wo))
                field = torch.zeros((x.shape[1] * x.shape[2], b.numel(), ho * wo), dtype=torch.float64)
                for mi, pi, share in entries:
                    field[mi, :, pi] += b * share
                field = field.view(-1, b.numel(), ho, wo)
                lost = torch.zeros((1, b.numel(), ho * wo), dtype=torch.float64)
                lost[0, :, unshared] = b[:, None]
                self.unshared = self.unshared + self._linear_eval(
                    seg, {}, stop, inject=(i, lost.view(1, -1, ho, wo)))[0]
            elif s.kind == "bn":
                scale, shift = _bn_affine(s.module)
                x = self.values[s.inputs[0]][0]
                c, h, w = x.shape
                src_norm = torch.linalg.vector_norm(x * scale.view(-1, 1, 1) if self.mode == "contribution" else x, dim=0)
                field = torch.zeros((h * w, c, h * w), dtype=torch.float64)
                lost = torch.zeros((1, c, h * w), dtype=torch.float64)
                for mi in range(h * w):
                    if src_norm.view(-1)[mi] > 0:
                        field[mi, :, mi] = shift
                    else:
                        lost[0, :, mi] = shift
                field = field.view(h * w, c, h, w)
                self.unshared = self.unshared + self._linear_eval(
                    seg, {}, stop, inject=(i, lost.view(1, c, h, w)))[0]
            else:
                continue
            bias_to_z = self._linear_eval(seg, {}, stop, inject=(i, field))  # (M, C_k, H_k, W_k)
            self._hand_to_sources(seg, s.inputs[0], bias_to_z, v_hat, stop)
        return v_hat

    def _hand_to_sources(self, seg, u: int, bias_to_z, v_hat, stop):
        """Bias contributions of the conv-input pixels m of step u, split among source pixels:
        directly when u is a source, else by the sharing ratio of each source pixel in x_m
        (Eq. 13: the composite of pooling and conv)."""
        if self.steps[u].kind in ("act", "input"):
            v_hat[u] = v_hat[u] + bias_to_z
            return
        xu = self.values[u][0]
        c, h, w = xu.shape
        xm = xu.reshape(c, h * w)
        n2 = (xm * xm).sum(0)
        for src in self.sources_of_step(seg, u):
            contrib = self._linear_eval(seg, {src: self._pixel_probes(src)}, u)  # (P, c, h, w)
            contrib = contrib.reshape(contrib.shape[0], c, h * w)
            ratio = torch.where(n2 > 0, (contrib * xm.unsqueeze(0)).sum(1) / n2.clamp_min(1e-300),
                                torch.zeros_like(n2))  # (P, M)
            v_hat[src] = v_hat[src] + torch.einsum("pm,mchw->pchw", ratio, bias_to_z)

    def sources_of_step(self, seg, u):
        out, stack, seen = set(), [u], set()
        while stack:
            i = stack.pop()
            if self.steps[i].kind in ("act", "input"):
                out.add(i)
                continue
            if i in seen:
                continue
            seen.add(i)
            stack.extend(self.steps[i].inputs)
        return sorted(out)

    def run(self, encoder: int, r_init: torch.Tensor) -> Dict[int, torch.Tensor]:
        """Relevance (H, W) at every activation layer and the input, from ``r_init`` at ``encoder``."""
        R = {encoder: r_init.double().reshape(r_init.shape[-2:])}
        acts = [s.index for s in self.steps if s.kind == "act" and s.index <= encoder]
        for k in reversed(acts):
            if k not in R:
                continue  # no relevance reaches it
            rk = R[k]
            z = self.values[self.steps[k].inputs[0]][0]
            z2 = (z * z).sum(0)
            v_hat = self.decompose(k)
            self.last_v_hat = v_hat
            total = sum(v.sum(0) for v in v_hat.values()) + self.unshared
            self.residuals = getattr(self, "residuals", {})
            self.residuals[k] = float((total - z).abs().max() / z.abs().max().clamp_min(1e-300))
            for src, vh in v_hat.items():
                mu = torch.where(z2 > 0, (vh * z.unsqueeze(0)).sum(1) / z2.clamp_min(1e-300),
                                 torch.zeros_like(z2))  # (P_src, H_k, W_k)
                self.mu[(src, k)] = mu
                h, w = self.values[src].shape[2:]
                r_src = (mu * rk.unsqueeze(0)).sum((1, 2)).view(h, w)
                R[src] = R[src] + r_src if src in R else r_src
        return R
