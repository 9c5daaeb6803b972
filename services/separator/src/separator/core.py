"""HT-Demucs split in three: the STFT before, the network (exportable), and the mask and iSTFT after.

`HTDemucsCore` is HTDemucs.forward (demucs 4.1.0, eval mode) between `_magnitude` and `_mask`,
line for line, so that graph exporters that cannot express complex tensors (ONNX, OpenVINO)
see only real tensors; `forward_split` runs the three parts and equals `model(mix)`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from demucs.htdemucs import HTDemucs
from einops import rearrange
from torch import nn
from torch.nn import functional as F

# The network part: (magnitude spectrogram, padded mix) -> (spectrogram out, waveform out).
Core = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class CoreUnsupported(ValueError):
    """The model has a part the split cannot reproduce exactly (it runs in torch instead)."""


def check_supported(model: nn.Module) -> HTDemucs:
    """The model as an HTDemucs the split reproduces exactly, or CoreUnsupported saying why not."""
    if not isinstance(model, HTDemucs):
        raise CoreUnsupported(f"only HTDemucs models can be split, got {type(model).__name__}")
    if not model.use_train_segment or not model.cac:
        raise CoreUnsupported("the split needs use_train_segment and cac (as every released htdemucs has)")
    transformer = model.crosstransformer
    # A random sine shift would be drawn per forward pass; a fixed graph could not follow it.
    if transformer is not None and (transformer.emb != "sin" or transformer.sin_random_shift != 0):
        raise CoreUnsupported("the split needs the transformer's fixed sine embedding")
    return model


def training_length(model: HTDemucs) -> int:
    """The samples of one segment, which every forward pass is padded to."""
    return int(model.segment * model.samplerate)


class HTDemucsCore(nn.Module):
    """The network of an HTDemucs: encoders, cross-transformer and decoders, on real tensors only."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = check_supported(model)

    def forward(self, mag: torch.Tensor, mix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 2C, Fq, T) magnitude and (B, C, L) padded mix -> (B, S, 2C, Fq, T) and (B, S, C, L)."""
        m = self.model
        x = mag
        B, _, Fq, T = x.shape
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        std = x.std(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) / (1e-5 + std)
        xt = mix
        meant = xt.mean(dim=(1, 2), keepdim=True)
        stdt = xt.std(dim=(1, 2), keepdim=True)
        xt = (xt - meant) / (1e-5 + stdt)

        saved, saved_t, lengths, lengths_t = [], [], [], []
        for idx, encode in enumerate(m.encoder):
            lengths.append(x.shape[-1])
            inject = None
            if idx < len(m.tencoder):
                lengths_t.append(xt.shape[-1])
                tenc = m.tencoder[idx]
                xt = tenc(xt)
                if not tenc.empty:
                    saved_t.append(xt)
                else:
                    inject = xt
            x = encode(x, inject)
            if idx == 0 and m.freq_emb is not None:
                frs = torch.arange(x.shape[-2], device=x.device)
                emb = m.freq_emb(frs).t()[None, :, :, None].expand_as(x)
                x = x + m.freq_emb_scale * emb
            saved.append(x)
        if m.crosstransformer:
            if m.bottom_channels:
                f = x.shape[2]
                x = rearrange(x, "b c f t-> b c (f t)")
                x = m.channel_upsampler(x)
                x = rearrange(x, "b c (f t)-> b c f t", f=f)
                xt = m.channel_upsampler_t(xt)
            x, xt = m.crosstransformer(x, xt)
            if m.bottom_channels:
                x = rearrange(x, "b c f t-> b c (f t)")
                x = m.channel_downsampler(x)
                x = rearrange(x, "b c (f t)-> b c f t", f=f)
                xt = m.channel_downsampler_t(xt)

        for idx, decode in enumerate(m.decoder):
            x, pre = decode(x, saved.pop(-1), lengths.pop(-1))
            offset = m.depth - len(m.tdecoder)
            if idx >= offset:
                tdec = m.tdecoder[idx - offset]
                length_t = lengths_t.pop(-1)
                if tdec.empty:
                    xt, _ = tdec(pre[:, :, 0], None, length_t)
                else:
                    xt, _ = tdec(xt, saved_t.pop(-1), length_t)

        S = len(m.sources)
        x = x.view(B, S, -1, Fq, T) * std[:, None] + mean[:, None]
        xt = xt.view(B, S, -1, mix.shape[-1]) * stdt[:, None] + meant[:, None]
        return x, xt


def prepare(model: HTDemucs, mix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The mix padded to a segment, its complex spectrogram, and the core's magnitude input."""
    length = training_length(model)
    if mix.shape[-1] < length:
        mix = F.pad(mix, (0, length - mix.shape[-1]))
    z = model._spec(mix)
    return mix, z, model._magnitude(z)


def finish(
    model: HTDemucs, z: torch.Tensor, spec_out: torch.Tensor, wave_out: torch.Tensor, length: int
) -> torch.Tensor:
    """The sources: the spectrogram branch through the mask and iSTFT, plus the waveform branch."""
    waves = model._ispec(model._mask(z, spec_out), training_length(model))
    return (wave_out + waves)[..., :length]


def forward_split(model: HTDemucs, core: Core, mix: torch.Tensor) -> torch.Tensor:
    """`model(mix)` with the network run by `core`: (B, C, L) in, (B, S, C, L) out."""
    padded, z, mag = prepare(model, mix)
    spec_out, wave_out = core(mag, padded)
    return finish(model, z, spec_out, wave_out, mix.shape[-1])
