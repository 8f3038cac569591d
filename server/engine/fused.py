"""The text model's decode step with fused weights and fused ops: ~9 dispatched ops per
decoder layer where transformers' modules dispatch ~60.

Contract:

* ``fuse_weights(lm)`` merges, once at load, each layer's q/k/v projections into one
  ``[(heads + 2 kv_heads) * D, H]`` weight and gate/up into one ``[2 I, H]`` weight.  The
  modules' own ``weight`` parameters become views into the merged storage (no second copy
  in memory), so transformers' forward (``generate()``, prefill, the startup checks) runs
  unchanged on the same numbers.  Only for what it knows: plain ``nn.Linear`` float
  weights without bias, SiLU MLPs, Qwen3's q/k RMSNorm; anything else (a quantised model)
  returns a reason and keeps transformers' layers.
* ``FusedDecoder(lm, pool)`` runs one decode step (one token per row) over the fused
  weights: per layer, ``add_rms_norm`` -> one q/k/v GEMM -> ``qk_norm_rope`` ->
  ``paged_attention`` (writes the new keys/values, reads the blocks) -> o GEMM ->
  ``add_rms_norm`` -> one gate/up GEMM -> ``silu_mul`` -> down GEMM, the pieces being the
  custom ops of server/engine/kernels.py (on the torch backend, outside torch.compile,
  their references called directly: ``kernels.ops()``).  Its reference twin is the
  model's own layers (``ModelRunner.decode_hidden`` with ``fused=False``); tests compare
  the two and ``generate()`` token for token.
"""

from __future__ import annotations

import torch
from torch import nn

from server.engine import kernels


_NORMS = ("Qwen3VLTextRMSNorm", "Qwen3VLMoeTextRMSNorm")


def _plain(lin) -> bool:
    return type(lin) is nn.Linear and lin.bias is None and lin.weight.dtype.is_floating_point


def fusable(lm) -> str | None:
    """None when ``fuse_weights`` applies to the text model ``lm``, else why not."""
    cfg = lm.config
    if getattr(cfg, "hidden_act", None) != "silu":
        return f"activation {getattr(cfg, 'hidden_act', None)!r} (SiLU expected)"
    for layer in lm.layers:
        a, m = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        names = ("q_proj", "k_proj", "v_proj", "o_proj")
        if a is None or m is None or not all(_plain(getattr(a, n, None)) for n in names) \
                or not all(_plain(getattr(m, n, None)) for n in ("gate_proj", "up_proj",
                                                                  "down_proj")):
            return "not plain bias-free float linear layers (a quantised model?)"
        norms = (a.q_norm, a.k_norm, layer.input_layernorm, layer.post_attention_layernorm)
        if not all(type(x).__name__ in _NORMS for x in norms):  # not, say, a (1 + w) norm
            return "not Qwen3's RMSNorms (w * x / rms(x))"
        if a.q_norm.variance_epsilon != a.k_norm.variance_epsilon:
            return "q and k norms with different epsilons"
        if any(hasattr(x, "_hf_hook") for x in (layer, a, m)):  # accelerate's offloading
            return "accelerate hooks (offloaded or split weights)"  # hooks run in forward()
    return None


def _merge(linears: list[nn.Linear]) -> torch.Tensor:
    """One weight for ``linears`` (stacked along the output), their ``weight`` parameters
    re-pointed at its slices; the old storages are freed as the last reference goes."""
    merged = torch.cat([lin.weight.detach() for lin in linears])
    at = 0
    for lin in linears:
        n = lin.weight.shape[0]
        lin.weight = nn.Parameter(merged[at:at + n], requires_grad=False)
        at += n
    return merged


def fuse_weights(lm) -> str | None:
    """Merge q/k/v and gate/up of every layer of ``lm`` (see the module docstring); None
    on success, else the reason nothing was changed."""
    why = fusable(lm)
    if why is not None:
        return why
    with torch.no_grad():
        for layer in lm.layers:
            a, m = layer.self_attn, layer.mlp
            if getattr(a, "qkv_weight", None) is None:
                a.qkv_weight = _merge([a.q_proj, a.k_proj, a.v_proj])
                m.gate_up_weight = _merge([m.gate_proj, m.up_proj])
    return None


class _Layer:
    """What one layer's fused step reads: weights transposed once (views), norms, eps."""
    __slots__ = ("qkv", "o", "gate_up", "down", "ln1", "ln2", "qn", "kn", "eps", "qk_eps")

    def __init__(self, layer):
        a, m = layer.self_attn, layer.mlp
        self.qkv, self.o = a.qkv_weight.t(), a.o_proj.weight.t()
        self.gate_up, self.down = m.gate_up_weight.t(), m.down_proj.weight.t()
        self.ln1, self.ln2 = layer.input_layernorm.weight, layer.post_attention_layernorm.weight
        self.qn, self.kn = a.q_norm.weight, a.k_norm.weight
        self.eps = layer.input_layernorm.variance_epsilon
        self.qk_eps = a.q_norm.variance_epsilon
        if layer.post_attention_layernorm.variance_epsilon != self.eps:
            raise ValueError("the layer's two norms have different epsilons")


class FusedDecoder:
    def __init__(self, lm, pool):
        cfg = lm.config
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        a = lm.layers[0].self_attn
        self.scale = a.scaling
        self.layers = [_Layer(layer) for layer in lm.layers]
        self.norm, self.norm_eps = lm.norm.weight, lm.norm.variance_epsilon
        # one layer's pool as a view made once (indexing pool.k per layer per step would
        # be two more ops per layer)
        self.kp, self.vp = list(pool.k.unbind(0)), list(pool.v.unbind(0))

    def __call__(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx,
                 q_start: torch.Tensor, kv_len: torch.Tensor) -> torch.Tensor:
        """``h`` ``[B, H]`` embeddings, ``cos``/``sin`` ``[B, D]`` -> final hidden ``[B, H]``."""
        residual = None
        op = kernels.ops()  # the custom ops, or their references called directly
        for i, w in enumerate(self.layers):
            if residual is None:
                residual, x = h, op.rms_norm(h, w.ln1, w.eps)
            else:
                x, residual = op.add_rms_norm(h, residual, w.ln1, w.eps)
            q, k, v = op.qk_norm_rope(torch.mm(x, w.qkv), w.qn, w.kn, cos, sin, w.qk_eps,
                                      self.heads, self.kv_heads)
            o = op.paged_attention(q, k, v, self.kp[i], self.vp[i], ctx.slots, ctx.rows,
                                   q_start, kv_len, ctx.mask, self.scale)
            x, residual = op.add_rms_norm(torch.mm(o, w.o), residual, w.ln2, w.eps)
            h = torch.mm(op.silu_mul(torch.mm(x, w.gate_up)), w.down)
        return op.add_rms_norm(h, residual, self.norm, self.norm_eps)[0]
