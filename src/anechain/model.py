"""The torch module that export traces: decoder layers [start, end) for single-token decode.

ANE layout: activations are (1, C, 1, 1) and every projection is a 1x1 Conv2d, so the
converted program holds `conv` ops (4 per layer) and no `linear`. The KV cache lives in two
registered buffers that become Core ML states, written in place at `position`.
Hugging Face names are kept (qkv_proj, o_proj, gate_up_proj, down_proj, input_layernorm,
post_attention_layernorm) so checkpoint tensors load without remapping.

Every size used in the forward pass is a Python int fixed at construction: coremltools with
numpy >= 2.4 fails on ints derived from traced shapes.
"""

from __future__ import annotations

import torch
from torch import nn

from anechain.config import Architecture, LayerRange


class ANERMSNorm(nn.Module):
    """RMSNorm over channels that cannot overflow in fp16.

    The plain form squares x in fp16: any |x| > ~256 makes x^2 inf, the scale 0, and the
    layer's contribution silently vanishes. Dividing by max(|x|, 1) first keeps every
    square <= 1; the result is the same RMSNorm up to fp16 rounding.
    """

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1, hidden_size, 1, 1))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (1, C, 1, 1)
        scale = x.abs().amax(dim=1, keepdim=True).clamp(min=1.0)  # (1, 1, 1, 1)
        xs = x / scale
        # eps / scale^2, computed without forming scale^2 (which could overflow).
        eps = (self.eps / scale) / scale
        inv = torch.rsqrt((xs * xs).mean(dim=1, keepdim=True) + eps)
        return xs * inv * self.weight


def _conv(in_features: int, out_features: int) -> nn.Conv2d:
    return nn.Conv2d(in_features, out_features, kernel_size=1, bias=False)


class ANEAttention(nn.Module):
    def __init__(self, arch: Architecture, layer_offset: int) -> None:
        super().__init__()
        self.num_heads = arch.num_attention_heads
        self.num_kv_heads = arch.num_key_value_heads
        self.groups = self.num_heads // self.num_kv_heads
        self.head_dim = arch.head_dim
        self.rotary_dim = arch.rotary_dim
        self.half_rotary = arch.rotary_dim // 2
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scaling = self.head_dim**-0.5
        self.layer_offset = layer_offset  # index of this layer inside the shard's states
        self.qkv_proj = _conv(arch.hidden_size, self.q_size + 2 * self.kv_size)
        self.o_proj = _conv(self.q_size, arch.hidden_size)

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # x: (1, heads, 1, head_dim); cos/sin: (1, 1, 1, rotary_dim). Partial rotary, as Phi3.
        rot, passthrough = x[..., : self.rotary_dim], x[..., self.rotary_dim :]
        x1, x2 = rot[..., : self.half_rotary], rot[..., self.half_rotary :]
        rotated = torch.cat((-x2, x1), dim=-1)
        return torch.cat((rot * cos + rotated * sin, passthrough), dim=-1)

    def forward(
        self,
        x: torch.Tensor,  # (1, C, 1, 1), normed
        position: torch.Tensor,  # (1,) int32
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor,  # (1, 1, 1, T)
        key_cache: torch.Tensor,  # (L, KVH, T, D)
        value_cache: torch.Tensor,
    ) -> torch.Tensor:
        qkv = self.qkv_proj(x)  # (1, (H + 2 KVH) D, 1, 1)
        q = qkv[:, : self.q_size].reshape(1, self.num_heads, 1, self.head_dim)
        k = qkv[:, self.q_size : self.q_size + self.kv_size]
        k = k.reshape(1, self.num_kv_heads, 1, self.head_dim)
        v = qkv[:, self.q_size + self.kv_size :].reshape(1, self.num_kv_heads, 1, self.head_dim)
        # Scale q before the score matmul so scores stay small in fp16.
        q = self._rope(q, cos, sin) * self.scaling
        k = self._rope(k, cos, sin)

        i = self.layer_offset
        key_cache[i : i + 1, :, position : position + 1, :] = k
        value_cache[i : i + 1, :, position : position + 1, :] = v
        keys = key_cache[i]  # (KVH, T, D)
        values = value_cache[i]

        # GQA without repeating the cache: query heads grouped under their KV head.
        q = q.reshape(self.num_kv_heads, self.groups, self.head_dim)  # (KVH, G, D)
        scores = torch.matmul(q, keys.transpose(1, 2))  # (KVH, G, T)
        scores = scores + mask.reshape(1, 1, -1)
        probs = torch.softmax(scores, dim=-1)
        out = torch.matmul(probs, values)  # (KVH, G, D)
        return self.o_proj(out.reshape(1, self.q_size, 1, 1))


class ANEMLP(nn.Module):
    def __init__(self, arch: Architecture) -> None:
        super().__init__()
        self.intermediate_size = arch.intermediate_size
        self.gate_up_proj = _conv(arch.hidden_size, 2 * arch.intermediate_size)
        self.down_proj = _conv(arch.intermediate_size, arch.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)  # (1, 2I, 1, 1)
        gate, up = gate_up[:, : self.intermediate_size], gate_up[:, self.intermediate_size :]
        return self.down_proj(nn.functional.silu(gate) * up)


class ANEDecoderLayer(nn.Module):
    def __init__(self, arch: Architecture, layer_offset: int) -> None:
        super().__init__()
        self.input_layernorm = ANERMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.self_attn = ANEAttention(arch, layer_offset)
        self.post_attention_layernorm = ANERMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.mlp = ANEMLP(arch)

    def forward(self, x, position, cos, sin, mask, key_cache, value_cache) -> torch.Tensor:
        h = self.input_layernorm(x)
        x = x + self.self_attn(h, position, cos, sin, mask, key_cache, value_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LayerRangeModel(nn.Module):
    """Decoder layers [start, end) with their KV cache as buffers (the Core ML states)."""

    def __init__(self, arch: Architecture, layers: LayerRange, context_length: int) -> None:
        super().__init__()
        self.arch = arch
        self.range = layers
        self.context_length = context_length
        self.layers = nn.ModuleList(ANEDecoderLayer(arch, i) for i in range(layers.num_layers))
        shape = (layers.num_layers, arch.num_key_value_heads, context_length, arch.head_dim)
        # Names are the Core ML state names (fp16 in the program; fp32 here for the trace).
        self.register_buffer("key_cache", torch.zeros(shape))
        self.register_buffer("value_cache", torch.zeros(shape))

    def forward(
        self,
        hidden_states: torch.Tensor,  # (1, C, 1, 1)
        position: torch.Tensor,  # (1,) int32
        cos: torch.Tensor,  # (1, 1, 1, R)
        sin: torch.Tensor,
        attention_mask: torch.Tensor,  # (1, 1, 1, T)
    ) -> torch.Tensor:
        x = hidden_states
        for layer in self.layers:
            x = layer(x, position, cos, sin, attention_mask, self.key_cache, self.value_cache)
        return x

    def load_hf_layer_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        """Load `model.layers.{i}.*` tensors (HF names, (out, in) matrices) for this range."""
        for offset, layer in enumerate(self.layers):
            prefix = f"model.layers.{self.range.start + offset}."
            for name, param in layer.named_parameters():
                src = tensors[prefix + name]
                with torch.no_grad():
                    param.copy_(src.reshape(param.shape).to(param.dtype))

    def reset_cache(self) -> None:
        self.key_cache.zero_()
        self.value_cache.zero_()


def hf_layer_tensor_names(layer_index: int) -> list[str]:
    """Checkpoint tensor names one decoder layer needs."""
    p = f"model.layers.{layer_index}."
    return [
        p + "input_layernorm.weight",
        p + "self_attn.qkv_proj.weight",
        p + "self_attn.o_proj.weight",
        p + "post_attention_layernorm.weight",
        p + "mlp.gate_up_proj.weight",
        p + "mlp.down_proj.weight",
    ]


class LMHeadModel(nn.Module):
    """Final RMSNorm + LM head, the vocabulary split into conv chunks of <= chunk_rows rows.

    Each chunk returns its largest logit and that logit's index, so the host reduces
    n_chunks pairs instead of reading 200064 logits (and no tensor dimension exceeds the
    ANE's 16384 limit).
    """

    def __init__(self, arch: Architecture, chunk_rows: int) -> None:
        super().__init__()
        self.norm = ANERMSNorm(arch.hidden_size, arch.rms_norm_eps)
        sizes = [
            min(chunk_rows, arch.vocab_size - s) for s in range(0, arch.vocab_size, chunk_rows)
        ]
        self.chunk_rows = chunk_rows
        self.chunks = nn.ModuleList(_conv(arch.hidden_size, n) for n in sizes)

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.norm(hidden_states)  # (1, C, 1, 1)
        maxes, indices = [], []
        for chunk in self.chunks:
            logits = chunk(h)  # (1, rows, 1, 1)
            value, index = torch.max(logits.reshape(1, -1), dim=1, keepdim=True)  # (1, 1)
            maxes.append(value)
            indices.append(index.to(torch.int32))
        return torch.cat(maxes, dim=1), torch.cat(indices, dim=1)  # (1, n_chunks) each

    def load_hf_weights(self, norm_weight: torch.Tensor, lm_head: torch.Tensor) -> None:
        with torch.no_grad():
            self.norm.weight.copy_(norm_weight.reshape(self.norm.weight.shape).float())
            for i, chunk in enumerate(self.chunks):
                rows = lm_head[i * self.chunk_rows : i * self.chunk_rows + chunk.out_channels]
                chunk.weight.copy_(rows.reshape(chunk.weight.shape).float())
