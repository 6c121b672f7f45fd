"""Random-weight diffusers components at real size (or tiny, for a CPU smoke run), built in memory.

Owns the model configs of the GPU end-to-end benchmark. Nothing is read from disk or downloaded:
each component is constructed directly on the target device (`with torch.device(...)`) in the target
dtype, seeded on its own (the seed depends only on family and component name), so every process that
builds a component gets the same weights whatever else it builds — the monolithic reference and the
three role processes compute on identical weights, which makes their outputs comparable bit for bit.

Real size (``scale="real"``):
- FLUX.1: ``FluxTransformer2DModel`` library defaults (19 + 38 blocks, 24 x 128, = FLUX.1-dev) with
  guidance embeds; FLUX VAE (``AutoencoderKL`` 128/256/512/512, 16 latent channels); CLIP-L text encoder
  at full size; **T5-XXL shrunk to 2 of its 24 layers** (d_model 4096, d_ff 10240, 64 heads, real vocab),
  so the prompt embeddings crossing the boundary keep their real shape [1, 512, 4096].
- Wan2.1-T2V-1.3B: ``WanTransformer3DModel`` 12 heads x 128, ffn 8960, 30 layers, text_dim 4096;
  ``AutoencoderKLWan()`` defaults (the real Wan VAE, fp32); **UMT5-XXL shrunk to 2 of 24 layers** (real
  width and vocab: embeddings [1, 512, 4096]).
Tokenizers are the project's tiny in-memory ones (no tokenizer files can be fetched); with
``max_sequence_length=512`` they pad to the real sequence length.

Modules that diffusers/transformers pin to fp32 when loading in bf16 (``_keep_in_fp32_modules``) are
cast back to fp32 here too, as ``from_pretrained(torch_dtype=bf16)`` would leave them.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import torch

BASE_SEED = 20261126
TEXT_LAYERS = 2  # of T5-XXL's / UMT5-XXL's 24


@contextmanager
def _building(device: torch.device, dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(old)


def _pin_fp32(module: torch.nn.Module) -> torch.nn.Module:
    keys = getattr(module, "_keep_in_fp32_modules", None) or []
    for name, sub in module.named_modules():
        if any(k in name.split(".") for k in keys):
            sub.to(torch.float32)
    return module


_PLAIN = ("scheduler", "tokenizer", "tokenizer_2")  # not modules: built on the host as loading would


def _seeded(
    family: str, name: str, device: torch.device, dtype: torch.dtype, build: Callable[[], Any]
) -> Any:
    if name in _PLAIN:
        return build()
    torch.manual_seed(BASE_SEED + zlib.crc32(f"{family}/{name}".encode()))
    with _building(device, dtype):
        module = build()
    if isinstance(module, torch.nn.Module):
        if dtype != torch.float32:
            _pin_fp32(module)
        module.eval().requires_grad_(False)
    return module


def _clip(real: bool) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel

    from diffdisagg.worker.pipelines.tiny_tokenizers import CLIP_BOS_ID, CLIP_EOS_ID

    size = (
        {
            "vocab_size": 49408,
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "projection_dim": 768,
            "hidden_act": "quick_gelu",
        }
        if real
        else {
            "vocab_size": 1000,
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "projection_dim": 32,
        }
    )
    cfg = CLIPTextConfig(
        max_position_embeddings=77,
        bos_token_id=CLIP_BOS_ID,
        eos_token_id=CLIP_EOS_ID,
        pad_token_id=CLIP_EOS_ID,
        **size,
    )
    return CLIPTextModel(cfg)


def _t5(real: bool, umt5: bool) -> Any:
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    size = (
        {
            "vocab_size": 256384 if umt5 else 32128,
            "d_model": 4096,
            "d_ff": 10240,
            "d_kv": 64,
            "num_heads": 64,
            "num_layers": TEXT_LAYERS,
            "relative_attention_num_buckets": 32,
            "feed_forward_proj": "gated-gelu",
        }
        if real
        else {
            "vocab_size": 1000,
            "d_model": 32,
            "d_ff": 37,
            "d_kv": 8,
            "num_heads": 4,
            "num_layers": 2,
            "relative_attention_num_buckets": 8,
        }
    )
    if umt5:
        return UMT5EncoderModel(UMT5Config(decoder_start_token_id=0, **size))
    return T5EncoderModel(T5Config(decoder_start_token_id=0, **size))


def _flux(name: str, real: bool) -> Any:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    from diffdisagg.worker.pipelines.tiny_tokenizers import make_clip_tokenizer, make_t5_tokenizer

    if name == "scheduler":
        return FlowMatchEulerDiscreteScheduler(
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        )
    if name == "tokenizer":
        return make_clip_tokenizer()
    if name == "tokenizer_2":
        return make_t5_tokenizer(512)
    if name == "text_encoder":
        return _clip(real)
    if name == "text_encoder_2":
        return _t5(real, umt5=False)
    if name == "vae":
        blocks = (128, 256, 512, 512) if real else (8, 16, 16, 16)
        return AutoencoderKL(
            in_channels=3,
            out_channels=3,
            latent_channels=16,
            block_out_channels=blocks,
            layers_per_block=2 if real else 1,
            norm_num_groups=32 if real else 8,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            scaling_factor=0.3611,
            shift_factor=0.1159,
            use_quant_conv=False,
            use_post_quant_conv=False,
            sample_size=1024,
        )
    if name == "transformer":
        if real:
            return FluxTransformer2DModel(guidance_embeds=True)  # library defaults = FLUX.1 sizes
        return FluxTransformer2DModel(
            patch_size=1,
            in_channels=64,
            num_layers=1,
            num_single_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            guidance_embeds=True,
            axes_dims_rope=(4, 6, 6),
        )
    raise KeyError(name)


def _wan(name: str, real: bool) -> Any:
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel

    from diffdisagg.worker.pipelines.tiny_tokenizers import make_t5_tokenizer

    if name == "scheduler":
        return UniPCMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0, num_train_timesteps=1000
        )
    if name == "tokenizer":
        return make_t5_tokenizer(512)
    if name == "text_encoder":
        return _t5(real, umt5=True)
    if name == "vae":
        if real:
            return AutoencoderKLWan()  # defaults = the Wan2.1 VAE
        return AutoencoderKLWan(
            base_dim=8,
            z_dim=16,
            dim_mult=[1, 1, 1, 1],
            num_res_blocks=1,
            temperal_downsample=[False, True, True],
        )
    if name == "transformer":
        size = (
            {
                "num_attention_heads": 12,
                "attention_head_dim": 128,
                "text_dim": 4096,
                "ffn_dim": 8960,
                "num_layers": 30,
                "rope_max_seq_len": 1024,
                "eps": 1e-6,
            }
            if real
            else {
                "num_attention_heads": 2,
                "attention_head_dim": 12,
                "text_dim": 32,
                "ffn_dim": 32,
                "num_layers": 2,
                "rope_max_seq_len": 32,
            }
        )
        return WanTransformer3DModel(
            patch_size=(1, 2, 2),
            in_channels=16,
            out_channels=16,
            freq_dim=256,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            **size,
        )
    raise KeyError(name)


_BUILD = {"flux": _flux, "wan": _wan}


def component_dtype(family: str, name: str, dtype: torch.dtype) -> torch.dtype:
    # The Wan VAE runs in fp32, as the reference pipelines (and the role adapters) load it.
    return torch.float32 if (family == "wan" and name == "vae") else dtype


def build_pipeline(
    family: str, names: tuple[str, ...], scale: str, device: torch.device, dtype: torch.dtype
) -> Any:
    """The family's diffusers pipeline holding only ``names`` (the other components are None)."""
    from diffdisagg.worker.pipelines.families import pipeline_class
    from diffdisagg.worker.pipelines.loading import OPS

    real = scale == "real"
    comps: dict[str, Any] = {}
    for name in OPS[family].all_components():
        if name in names:
            comps[name] = _seeded(
                family,
                name,
                device,
                component_dtype(family, name, dtype),
                lambda n=name: _BUILD[family](n, real),
            )
        else:
            comps[name] = None
    pipe = pipeline_class(family)(**comps)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def role_components(family: str, role: str) -> tuple[str, ...]:
    from diffdisagg.worker.pipelines.loading import OPS, _components_of

    return _components_of(OPS[family], None if role == "mono" else role)
