"""The FLUX.2 MM-DiT (spec section 2). Architecture only: no I/O, devices, compile or quantization here.

Module attribute names are the BFL checkpoint keys (spec 3.1), so `flux2-dev.safetensors` and the klein files
load with strict=True and BFL-named LoRAs map 1:1.

Shapes: B batch, L_txt text tokens (512 for the real models), N image tokens (output, then references),
D hidden size, H heads, d_h = 128 head dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from fluxion.config import TransformerConfig
from fluxion.model.attention import AttentionBackend, apply_rope, attention, cat_pe, rope

Mod = tuple[Tensor, Tensor, Tensor]  # (shift, scale, gate), each [B, 1 or L, D]


def timestep_embedding(
    t: Tensor, dim: int = 256, max_period: int = 10000, time_factor: float = 1000.0
) -> Tensor:
    """Sinusoidal embedding of t in [0, 1] (spec 2.4): [B] -> [B, dim], cosine half first.

    `time_factor * t` is computed in t's own dtype on purpose: the reference passes bf16 times, so the value
    embedded is a bf16 number (e.g. 764.0, not 767.2). The sinusoid itself is evaluated in fp32.
    """
    t = time_factor * t
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return emb.to(t.dtype) if t.is_floating_point() else emb


class MLPEmbedder(nn.Module):
    """Linear -> SiLU -> Linear, no biases (`time_in`, `guidance_in`)."""

    def __init__(self, in_dim: int, hidden_dim: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim, bias=False)
        self.silu = nn.SiLU()
        self.out_layer = nn.Linear(hidden_dim, hidden_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(self.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    """QK RMSNorm over d_h with a learned gain named `scale` (BFL key); statistics in fp32 (spec 2.9)."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x_f = x.float()
        rrms = torch.rsqrt(torch.mean(x_f * x_f, dim=-1, keepdim=True) + 1e-6)
        # Cast back before the gain, in this order, as the reference does.
        return (x_f * rrms).to(x.dtype) * self.scale


class QKNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return self.query_norm(q).to(v.dtype), self.key_norm(k).to(v.dtype)


class SwiGLU(nn.Module):
    """SiLU(first half) * second half (spec 2.10). Parameter-free: it is index 1 of `*_mlp`."""

    def forward(self, x: Tensor) -> Tensor:
        gate, up = x.chunk(2, dim=-1)
        return nn.functional.silu(gate) * up


class Modulation(nn.Module):
    """Shared AdaLN modulation: SiLU(vec) -> Linear -> 2 or 1 (shift, scale, gate) triples of [B, 1, D]."""

    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.num_sets = 2 if double else 1
        self.lin = nn.Linear(dim, 3 * self.num_sets * dim, bias=False)

    def forward(self, vec: Tensor) -> list[Mod]:
        chunks = self.lin(nn.functional.silu(vec))[:, None, :].chunk(3 * self.num_sets, dim=-1)
        return [tuple(chunks[3 * i : 3 * i + 3]) for i in range(self.num_sets)]


class SelfAttention(nn.Module):
    """Per-stream attention weights of a double block; the attention itself is joint (in the block)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim, bias=False)

    def qkv_heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x [B, L, D] -> normalised q, k and v, each [B, H, L, d_h]."""
        q, k, v = split_qkv(self.qkv(x), self.num_heads)
        q, k = self.norm(q, k, v)
        return q, k, v


def split_qkv(qkv: Tensor, num_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """[B, L, 3D] -> 3 x [B, H, L, d_h]; rows are q/k/v outermost, then heads, then head dims (spec 2.6)."""
    q, k, v = qkv.unflatten(-1, (3, num_heads, -1)).permute(2, 0, 3, 1, 4)
    return q, k, v


def modulate(x: Tensor, norm: nn.Module, mod: Mod) -> Tensor:
    shift, scale, _ = mod
    return (1 + scale) * norm(x) + shift


@dataclass
class KVCache:
    """Post-RoPE K and V of the reference tokens per block (klein-9B-KV, spec 7.3): [B, H, N_ref, d_h] each.

    Filled by `Flux2.forward_kv_extract` and read by `Flux2.forward_kv_cached`; exact, not an approximation,
    because reference tokens only attend to each other under a constant (t = 0) modulation.
    """

    double: list[tuple[Tensor, Tensor]] = field(default_factory=list)
    single: list[tuple[Tensor, Tensor]] = field(default_factory=list)
    num_ref: int = 0


@dataclass
class _KVStep:
    """What one block needs to know about the KV path in the current forward."""

    mode: Literal["extract", "cached"]
    num_ref: int
    slots: list[tuple[Tensor, Tensor]]  # extract: blocks append here; cached: blocks read slots[i]
    index: int = 0

    def next_cached(self) -> tuple[Tensor, Tensor]:
        kv = self.slots[self.index]
        self.index += 1
        return kv


def joint_attention(
    q: Tensor, k: Tensor, v: Tensor, num_txt: int, kv: _KVStep | None, backend: AttentionBackend | None = None
) -> Tensor:
    """Attention over [txt ; image tokens] sequences, q/k/v [B, H, L, d_h] after RoPE -> [B, L, D].

    kv=None: plain full attention. Extract: the sequence is [txt ; ref ; out]; txt and out queries see every
    key, reference queries see only reference keys, and the reference K/V are stored. Cached: the sequence is
    [txt ; out] and the stored reference K/V are inserted between them on the key side. `backend`: the model's
    attention kernel (None: plain SDPA).
    """
    if kv is None:
        return attention(q, k, v, backend)
    if kv.mode == "cached":
        k_ref, v_ref = kv.next_cached()
        k_all = torch.cat([k[:, :, :num_txt], k_ref, k[:, :, num_txt:]], dim=2)
        v_all = torch.cat([v[:, :, :num_txt], v_ref, v[:, :, num_txt:]], dim=2)
        return attention(q, k_all, v_all, backend)
    ref = slice(num_txt, num_txt + kv.num_ref)
    kv.slots.append((k[:, :, ref], v[:, :, ref]))
    q_main = torch.cat([q[:, :, :num_txt], q[:, :, ref.stop :]], dim=2)
    out_main = attention(q_main, k, v, backend)  # [B, L_txt + N_out, D]
    out_ref = attention(q[:, :, ref], k[:, :, ref], v[:, :, ref], backend)  # [B, N_ref, D]
    return torch.cat([out_main[:, :num_txt], out_ref, out_main[:, num_txt:]], dim=1)


class DoubleStreamBlock(nn.Module):
    """Separate img/txt weights, joint attention over [txt ; img] (spec 2.6)."""

    attention_backend: AttentionBackend | None = None  # set per model by Flux2.set_attention_backend

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        D, H = cfg.hidden_size, cfg.num_heads
        self.num_heads = H
        self.img_norm1 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.img_attn = SelfAttention(D, H)
        self.img_norm2 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.img_mlp = nn.Sequential(
            nn.Linear(D, 2 * cfg.mlp_hidden, bias=False), SwiGLU(), nn.Linear(cfg.mlp_hidden, D, bias=False)
        )
        self.txt_norm1 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.txt_attn = SelfAttention(D, H)
        self.txt_norm2 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.txt_mlp = nn.Sequential(
            nn.Linear(D, 2 * cfg.mlp_hidden, bias=False), SwiGLU(), nn.Linear(cfg.mlp_hidden, D, bias=False)
        )

    def forward(
        self,
        img: Tensor,
        txt: Tensor,
        pe: Tensor,
        mod_img: list[Mod],
        mod_txt: list[Mod],
        kv: _KVStep | None = None,
    ) -> tuple[Tensor, Tensor]:
        """img [B, N, D], txt [B, L_txt, D], pe: RoPE table of [txt ; img]."""
        (img_mod1, img_mod2), (txt_mod1, txt_mod2) = mod_img, mod_txt
        img_q, img_k, img_v = self.img_attn.qkv_heads(modulate(img, self.img_norm1, img_mod1))
        txt_q, txt_k, txt_v = self.txt_attn.qkv_heads(modulate(txt, self.txt_norm1, txt_mod1))

        # Text tokens come first in Q, K, V and in the RoPE table.
        q = apply_rope(torch.cat([txt_q, img_q], dim=2), pe)
        k = apply_rope(torch.cat([txt_k, img_k], dim=2), pe)
        v = torch.cat([txt_v, img_v], dim=2)
        num_txt = txt.shape[1]
        attn = joint_attention(q, k, v, num_txt, kv, self.attention_backend)
        txt_attn, img_attn = attn[:, :num_txt], attn[:, num_txt:]

        img = img + img_mod1[2] * self.img_attn.proj(img_attn)
        img = img + img_mod2[2] * self.img_mlp(modulate(img, self.img_norm2, img_mod2))
        txt = txt + txt_mod1[2] * self.txt_attn.proj(txt_attn)
        txt = txt + txt_mod2[2] * self.txt_mlp(modulate(txt, self.txt_norm2, txt_mod2))
        return img, txt


class SingleStreamBlock(nn.Module):
    """Parallel attention + MLP over the joint sequence with fused in/out projections (spec 2.7)."""

    attention_backend: AttentionBackend | None = None  # set per model by Flux2.set_attention_backend

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        D = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.mlp_hidden = cfg.mlp_hidden
        # linear1 rows: [q k v (3D) ; MLP gate and up (2 * mlp_hidden)]; linear2 columns: [attn (D) ; mlp].
        self.linear1 = nn.Linear(D, 3 * D + 2 * self.mlp_hidden, bias=False)
        self.linear2 = nn.Linear(D + self.mlp_hidden, D, bias=False)
        self.norm = QKNorm(cfg.head_dim)
        self.pre_norm = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.mlp_act = SwiGLU()

    def forward(self, x: Tensor, pe: Tensor, mod: Mod, num_txt: int, kv: _KVStep | None = None):
        """x [B, L_txt + N, D] (text first) -> same shape."""
        qkv, mlp = self.linear1(modulate(x, self.pre_norm, mod)).split(
            [3 * x.shape[-1], 2 * self.mlp_hidden], dim=-1
        )
        q, k, v = split_qkv(qkv, self.num_heads)
        q, k = self.norm(q, k, v)
        attn = joint_attention(apply_rope(q, pe), apply_rope(k, pe), v, num_txt, kv, self.attention_backend)
        return x + mod[2] * self.linear2(torch.cat([attn, self.mlp_act(mlp)], dim=-1))


class LastLayer(nn.Module):
    """AdaLN (rows of `adaLN_modulation.1` are [shift ; scale], BFL order) then Linear D -> 128."""

    def __init__(self, hidden_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, out_channels, bias=False)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=False))

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(vec)[:, None, :].chunk(2, dim=-1)
        return self.linear((1 + scale) * self.norm_final(x) + shift)


class Flux2(nn.Module):
    """The FLUX.2 transformer. Predicts the velocity v = noise - x0 for packed latent tokens."""

    attention_backend: AttentionBackend | None = None  # this model's kernel; see set_attention_backend

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.hidden_size
        self.img_in = nn.Linear(cfg.in_channels, D, bias=False)
        self.txt_in = nn.Linear(cfg.context_in_dim, D, bias=False)
        self.time_in = MLPEmbedder(cfg.time_channels, D)
        self.guidance_in = MLPEmbedder(cfg.time_channels, D) if cfg.use_guidance_embed else None
        self.double_stream_modulation_img = Modulation(D, double=True)
        self.double_stream_modulation_txt = Modulation(D, double=True)
        self.single_stream_modulation = Modulation(D, double=False)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(cfg) for _ in range(cfg.num_double_blocks))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(cfg) for _ in range(cfg.num_single_blocks))
        self.final_layer = LastLayer(D, cfg.in_channels)

    def set_attention_backend(self, fn: AttentionBackend | None) -> AttentionBackend | None:
        """Run this model's attention with `fn` (q, k, v [B, H, L, d_h] -> [B, H, L_q, d_h]; None: plain SDPA).
        Stored on every block (a plain attribute, not state): compiled blocks guard on it. Returns the old one."""
        previous, self.attention_backend = self.attention_backend, fn
        for block in (*self.double_blocks._modules.values(), *self.single_blocks._modules.values()):
            block.attention_backend = fn
        return previous

    def embed_time(self, timesteps: Tensor, guidance: Tensor | None) -> Tensor:
        """vec [B, D] = time_in(temb(t)) (+ guidance_in(temb(g)) for [dev]); klein ignores guidance."""
        dtype = self.time_in.in_layer.weight.dtype
        vec = self.time_in(timestep_embedding(timesteps, self.cfg.time_channels).to(dtype))
        if self.guidance_in is not None:
            if guidance is None:
                raise ValueError("this model has a guidance embedder: pass a guidance value (e.g. 4.0)")
            vec = vec + self.guidance_in(timestep_embedding(guidance, self.cfg.time_channels).to(dtype))
        return vec

    def forward(
        self,
        x: Tensor,
        x_ids: Tensor,
        timesteps: Tensor,
        ctx: Tensor,
        ctx_ids: Tensor,
        guidance: Tensor | None = None,
    ) -> Tensor:
        """x [B, N, 128] tokens (output then references), x_ids [B, N, 4], timesteps [B] in [0, 1],
        ctx [B, L_txt, C_txt], ctx_ids [B, L_txt, 4], guidance [B] or None -> velocity [B, N, 128].
        """
        vec = self.embed_time(timesteps, guidance)
        return self._run(x, x_ids, ctx, ctx_ids, vec, mods=self._mods(vec), kv=None)

    def _mods(self, vec: Tensor) -> tuple[list[Mod], list[Mod], Mod]:
        # Computed once per forward and shared by every block (spec 2.5).
        return (
            self.double_stream_modulation_img(vec),
            self.double_stream_modulation_txt(vec),
            self.single_stream_modulation(vec)[0],
        )

    def _run(self, x, x_ids, ctx, ctx_ids, vec, mods, kv: _KVStep | None) -> Tensor:
        mod_img, mod_txt, mod_single = mods
        img, txt = self.img_in(x), self.txt_in(ctx)
        pe = cat_pe(
            rope(ctx_ids, self.cfg.axes_dim, self.cfg.theta), rope(x_ids, self.cfg.axes_dim, self.cfg.theta)
        )
        for block in self.double_blocks:
            img, txt = block(img, txt, pe, mod_img, mod_txt, kv)
        num_txt = txt.shape[1]
        h = torch.cat([txt, img], dim=1)
        for block in self.single_blocks:
            h = block(h, pe, mod_single, num_txt, kv)
        img = h[:, num_txt:]
        if kv is not None and kv.mode == "extract":
            img = img[:, kv.num_ref :]  # drop the reference tokens, which come first on this path
        return self.final_layer(img, vec)

    def forward_kv_extract(
        self,
        x: Tensor,
        x_ids: Tensor,
        timesteps: Tensor,
        ctx: Tensor,
        ctx_ids: Tensor,
        ref: Tensor,
        ref_ids: Tensor,
        guidance: Tensor | None = None,
        ref_time: float = 0.0,
    ) -> tuple[Tensor, KVCache]:
        """First step of the klein-9B-KV path (spec 7.3): the sequence is [ref ; out], references are
        modulated with the fixed time `ref_time` and attend only to themselves. Returns (velocity of the
        N_out output tokens [B, N_out, 128], the filled cache).
        """
        num_ref = ref.shape[1]
        vec = self.embed_time(timesteps, guidance)
        ref_vec = self.embed_time(torch.full_like(timesteps, ref_time), guidance)
        mod_img, mod_txt, mod_single = self._mods(vec)
        ref_img, _, ref_single = self._mods(ref_vec)
        n_out, n_txt = x.shape[1], ctx.shape[1]
        # Per-token modulation: reference positions take the t = ref_time vectors.
        mod_img = [_per_token([(num_ref, r), (n_out, m)]) for r, m in zip(ref_img, mod_img)]
        mod_single = _per_token([(n_txt, mod_single), (num_ref, ref_single), (n_out, mod_single)])
        kv = _KVStep(mode="extract", num_ref=num_ref, slots=[])
        out = self._run(
            torch.cat([ref, x], dim=1),
            torch.cat([ref_ids, x_ids], dim=1),
            ctx,
            ctx_ids,
            vec,
            (mod_img, mod_txt, mod_single),
            kv,
        )
        nd = len(self.double_blocks)
        return out, KVCache(double=kv.slots[:nd], single=kv.slots[nd:], num_ref=num_ref)

    def forward_kv_cached(
        self,
        x: Tensor,
        x_ids: Tensor,
        timesteps: Tensor,
        ctx: Tensor,
        ctx_ids: Tensor,
        cache: KVCache,
        guidance: Tensor | None = None,
    ) -> Tensor:
        """Later steps of the KV path: only output tokens are computed; cached reference K/V are attended."""
        vec = self.embed_time(timesteps, guidance)
        kv = _KVStep(mode="cached", num_ref=cache.num_ref, slots=[*cache.double, *cache.single])
        return self._run(x, x_ids, ctx, ctx_ids, vec, self._mods(vec), kv)


def _per_token(segments: list[tuple[int, Mod]]) -> Mod:
    """Per-token (shift, scale, gate) [B, L, D] from [B, 1, D] triples repeated over sequence segments."""
    return tuple(torch.cat([mod[i].expand(-1, n, -1) for n, mod in segments], dim=1) for i in range(3))
