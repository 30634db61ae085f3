"""The FLUX.2 autoencoder (spec section 4): a KL-VAE with an 8x spatial factor and 32 latent channels, plus the
2x2 patchify and the batch-norm latent normaliser, so callers only ever see model-space latents
[B, 128, H/16, W/16].

Module attribute names are the keys of BFL's `ae.safetensors` (spec 4.6); `weights/vae_mapping.py` converts to and
from the diffusers `vae/` layout. Nothing here picks a device or dtype: build on `meta`, then
`load_state_dict(sd, strict=True, assign=True)`. The reference runs this model in fp32 (spec 4.5, 10).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fluxion.config import VAEConfig

GN_EPS = 1e-6  # every GroupNorm in the VAE (spec 4.1); unrelated to the latent BN eps (cfg.bn_eps = 1e-4)


def patchify(z: Tensor, patch_size: int = 2) -> Tensor:
    """[B, C, h, w] -> [B, C*p*p, h/p, w/p]; output channel c*p*p + pi*p + pj holds pixel (p*i+pi, p*j+pj) of c.

    This is the order BFL's einops pattern `c (i pi) (j pj) -> (c pi pj) i j` and the diffusers pipelines produce.
    """
    b, c, h, w = z.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"cannot patchify a {h}x{w} latent into {p}x{p} patches")
    z = z.reshape(b, c, h // p, p, w // p, p)  # [B, C, i, pi, j, pj]
    return z.permute(0, 1, 3, 5, 2, 4).reshape(b, c * p * p, h // p, w // p)


def unpatchify(z: Tensor, patch_size: int = 2) -> Tensor:
    """Inverse of `patchify`: [B, C*p*p, h, w] -> [B, C, h*p, w*p]."""
    b, cpp, h, w = z.shape
    p = patch_size
    if cpp % (p * p):
        raise ValueError(f"{cpp} channels cannot be split into {p}x{p} patches")
    c = cpp // (p * p)
    z = z.reshape(b, c, p, p, h, w)  # [B, C, pi, pj, i, j]
    return z.permute(0, 1, 4, 2, 5, 3).reshape(b, c, h * p, w * p)


def group_norm(channels: int, num_groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=num_groups, num_channels=channels, eps=GN_EPS, affine=True)


class ResnetBlock(nn.Module):
    """GN -> SiLU -> conv3x3, twice, plus a shortcut (1x1 conv `nin_shortcut` only when the width changes).

    No time embedding and no dropout: this is the plain VAE ResNet of FLUX.1/FLUX.2.
    """

    def __init__(self, in_channels: int, out_channels: int, num_groups: int):
        super().__init__()
        self.norm1 = group_norm(in_channels, num_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels, num_groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)  # BFL name ("network in network")

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions, head width = C (scale 1/sqrt(C)), residual.

    q, k, v and proj_out are 1x1 convs (BFL layout [C, C, 1, 1]); diffusers stores them as Linear [C, C].
    """

    def __init__(self, channels: int, num_groups: int):
        super().__init__()
        self.norm = group_norm(channels, num_groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        x_n = self.norm(x)
        # [B, C, H, W] -> [B, 1 head, H*W, C] for SDPA (its default scale is 1/sqrt(C), as in the reference).
        # contiguous() matters: with a strided last dim SDPA falls back to the math kernel, which materialises
        # the (H*W)^2 score matrix (32 GiB at the 256x256 mid resolution of a 2048x2048 image, fp32).
        q, k, v = (
            proj(x_n).flatten(2).transpose(1, 2).unsqueeze(1).contiguous()
            for proj in (self.q, self.k, self.v)
        )
        a = F.scaled_dot_product_attention(q, k, v)  # [B, 1, H*W, C]
        a = a.squeeze(1).transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(a)


class Downsample(nn.Module):
    """Halve H and W. Quirk kept from the reference: pad only right and bottom by one pixel, then a 3x3 stride-2
    conv with no padding (a symmetric padding=1 conv gives different numbers)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour x2, then a 3x3 conv (padding 1)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    """ResNet -> attention -> ResNet at the lowest resolution (keys `mid.block_1`, `mid.attn_1`, `mid.block_2`)."""

    def __init__(self, channels: int, num_groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, num_groups)
        self.attn_1 = AttnBlock(channels, num_groups)
        self.block_2 = ResnetBlock(channels, channels, num_groups)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """[B, 3, H, W] image -> [B, 2*z_channels, H/8, W/8] moments (mean, log-variance), quant_conv included."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = cfg.widths  # 128, 256, 512, 512 for FLUX.2; any list (diffusers block_out_channels)
        self.conv_in = nn.Conv2d(cfg.in_channels, widths[0], 3, padding=1)
        self.down = nn.ModuleList()
        block_in = widths[0]
        for level, block_out in enumerate(widths):
            down = nn.Module()  # plain container: its attribute names are the checkpoint keys
            down.block = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                down.block.append(ResnetBlock(block_in, block_out, cfg.num_groups))
                block_in = block_out
            if level != len(widths) - 1:  # no downsampling after the last level
                down.downsample = Downsample(block_in)
            self.down.append(down)
        self.mid = MidBlock(block_in, cfg.num_groups)
        self.norm_out = group_norm(block_in, cfg.num_groups)
        self.conv_out = nn.Conv2d(block_in, 2 * cfg.z_channels, 3, padding=1)
        # FLUX.2 keeps quant_conv inside the encoder (key `encoder.quant_conv`); diffusers has it at top level.
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.z_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)  # [B, 128, H, W]
        for level, down in enumerate(self.down):
            for block in down.block:
                h = block(h)  # [B, widths[level], H / 2^level, W / 2^level]
            if level != len(self.down) - 1:
                h = down.downsample(h)
        h = self.mid(h)  # [B, widths[-1], H/8, W/8]
        h = self.conv_out(F.silu(self.norm_out(h)))  # [B, 64, H/8, W/8]: mean and log-variance, 32 each
        return self.quant_conv(h)


class Decoder(nn.Module):
    """[B, z_channels, h, w] latent -> [B, 3, 8h, 8w] image (unclamped), post_quant_conv included."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = (
            cfg.decoder_widths
        )  # its own list: BFL's small decoder is 96/192/384/384 behind a 128.. encoder
        block_in = widths[-1]
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 1)
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, padding=1)
        self.mid = MidBlock(block_in, cfg.num_groups)
        # `up[l]` is indexed by resolution level like the encoder's `down[l]`, but built and run from the
        # deepest level to level 0; diffusers' `up_blocks` use execution order, hence its index 3 - l.
        levels: list[nn.Module] = []
        for level in reversed(range(len(widths))):
            up = nn.Module()
            up.block = nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):  # the decoder has one more ResNet per level
                up.block.append(ResnetBlock(block_in, widths[level], cfg.num_groups))
                block_in = widths[level]
            if level != 0:  # no upsampling after the full-resolution level
                up.upsample = Upsample(block_in)
            levels.insert(0, up)
        self.up = nn.ModuleList(levels)
        self.norm_out = group_norm(block_in, cfg.num_groups)
        self.conv_out = nn.Conv2d(block_in, cfg.out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.conv_in(self.post_quant_conv(z))  # [B, decoder_widths[-1], h, w]
        h = self.mid(h)
        # The reference casts to the up-blocks' dtype here (a no-op unless mid and up blocks differ in dtype).
        h = h.to(next(self.up.parameters()).dtype)
        for level in reversed(range(len(self.up))):  # deepest level first
            up = self.up[level]
            for block in up.block:
                h = block(h)  # [B, decoder_widths[level], 8h / 2^level, 8w / 2^level]
            if level != 0:
                h = up.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))  # [B, 3, 8h, 8w]


class AutoEncoder(nn.Module):
    """Image [B, 3, H, W] in [-1, 1] <-> normalised latent [B, latent_channels, H/16, W/16].

    `bn` is a BatchNorm2d over the patchified latent used only through its running statistics: it replaces FLUX.1's
    scale/shift factors. It is never run in train mode, so its stats never change.
    """

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        # affine=False: no weight/bias; running_mean/var [latent_channels] + num_batches_tracked are the state.
        self.bn = nn.BatchNorm2d(cfg.latent_channels, eps=cfg.bn_eps, affine=False, track_running_stats=True)

    def _bn_stats(self) -> tuple[Tensor, Tensor]:
        """Per-channel (mean, std) of the patchified latent, shaped [1, C, 1, 1] for broadcasting."""
        mean = self.bn.running_mean.view(1, -1, 1, 1)
        std = torch.sqrt(self.bn.running_var.view(1, -1, 1, 1) + self.bn.eps)
        return mean, std

    def encode(self, x: Tensor) -> Tensor:
        """[B, 3, H, W] -> [B, 128, H/16, W/16]. Deterministic: the posterior mean, never a sample."""
        f = self.cfg.downsample_factor
        if x.ndim != 4 or x.shape[1] != self.cfg.in_channels:
            raise ValueError(
                f"expected an image batch [B, {self.cfg.in_channels}, H, W], got {tuple(x.shape)}"
            )
        h, w = x.shape[-2:]
        if h % f or w % f:
            raise ValueError(
                f"image size {h}x{w} (HxW) is not a multiple of {f} (8x VAE downsampling x 2x2 patch); "
                f"resize or crop to e.g. {h // f * f}x{w // f * f}"
            )
        # Cast to the weights' dtype so e.g. a bf16 image goes through an fp32 VAE (the reference's precision).
        moments = self.encoder(x.to(self.encoder.conv_in.weight.dtype))  # [B, 2*z, H/8, W/8]
        z_mean = moments[:, : self.cfg.z_channels]  # drop the log-variance half
        z = patchify(z_mean, self.cfg.patch_size)  # [B, 128, H/16, W/16]
        mean, std = self._bn_stats()
        return (z - mean) / std

    def decode(self, z: Tensor) -> Tensor:
        """[B, 128, h, w] -> [B, 3, 16h, 16w], unclamped (callers clamp to [-1, 1] before quantising)."""
        if z.ndim != 4 or z.shape[1] != self.cfg.latent_channels:
            raise ValueError(f"expected latents [B, {self.cfg.latent_channels}, h, w], got {tuple(z.shape)}")
        mean, std = self._bn_stats()
        # With fp32 buffers this promotes bf16 latents to fp32 first, as the reference does (spec 4.5).
        z = z * std + mean
        z = unpatchify(z, self.cfg.patch_size)  # [B, 32, 2h, 2w]
        return self.decoder(z.to(self.decoder.conv_in.weight.dtype))

    def forward(self, x: Tensor) -> Tensor:
        """Reconstruction (encode then decode); used by tests and VAE evaluation."""
        return self.decode(self.encode(x))
