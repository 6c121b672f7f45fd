"""Tiny, randomly initialised diffusers models in the real on-disk (HF) layout.

Owns ``build_tiny_model(family, path)`` and the cache used when a role is started without a model
path. The configs keep the real channel counts, patch sizes and the 8x VAE factor and shrink the
widths (notes/diffusion-pipelines.md §2.2), so shapes crossing the role boundaries have the real
structure at a few hundred kB of weights. Each component is seeded on its own before it is built:
the weights never depend on which other components were built first, and the directory written is
the same bytes every time. Roles then load it through the ordinary ``from_pretrained`` path.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .families import FAMILIES, check_family, pipeline_class
from .tiny_tokenizers import CLIP_BOS_ID, CLIP_EOS_ID, make_clip_tokenizer, make_t5_tokenizer

log = logging.getLogger(__name__)

# Bump when a config below changes: the cache directory name carries it, so a stale cache is never
# loaded by a newer worker.
TINY_VERSION = 1
_BASE_SEED = 20261126


def _seeded(family: str, component: str, build: Callable[[], Any]) -> Any:
    torch.manual_seed(_BASE_SEED + zlib.crc32(f"{family}/{component}".encode()))
    module = build()
    if isinstance(module, torch.nn.Module):
        module.eval()
    return module


def _clip_text_config(projection_dim: int = 32, hidden_size: int = 32) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=1000,
        hidden_size=hidden_size,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=CLIP_BOS_ID,
        eos_token_id=CLIP_EOS_ID,
        pad_token_id=CLIP_EOS_ID,
        projection_dim=projection_dim,
    )


def _t5_config(d_model: int) -> Any:
    from transformers import T5Config

    return T5Config(
        vocab_size=1000,
        d_model=d_model,
        d_ff=37,
        d_kv=8,
        num_heads=4,
        num_layers=2,
        relative_attention_num_buckets=8,
        decoder_start_token_id=0,
    )


def _kl_vae(scaling_factor: float, shift_factor: float) -> Any:
    from diffusers import AutoencoderKL

    blocks = 4
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=16,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def _flux_components() -> dict[str, Any]:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    f = "flux"
    return {
        "scheduler": FlowMatchEulerDiscreteScheduler(
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        ),
        "text_encoder": _seeded(f, "text_encoder", lambda: CLIPTextModel(_clip_text_config())),
        "tokenizer": make_clip_tokenizer(),
        "text_encoder_2": _seeded(f, "text_encoder_2", lambda: T5EncoderModel(_t5_config(32))),
        "tokenizer_2": make_t5_tokenizer(),
        "vae": _seeded(f, "vae", lambda: _kl_vae(0.3611, 0.1159)),
        "transformer": _seeded(
            f,
            "transformer",
            lambda: FluxTransformer2DModel(
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
            ),
        ),
    }


def _sd3_components() -> dict[str, Any]:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    f = "sd3"
    # The pipeline zero-pads the concatenated CLIP features (32 + 32) up to the T5 width, so the
    # T5 width must be at least their sum.
    return {
        "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0),
        "text_encoder": _seeded(f, "text_encoder", lambda: CLIPTextModelWithProjection(_clip_text_config())),
        "tokenizer": make_clip_tokenizer(),
        "text_encoder_2": _seeded(
            f, "text_encoder_2", lambda: CLIPTextModelWithProjection(_clip_text_config())
        ),
        "tokenizer_2": make_clip_tokenizer(),
        "text_encoder_3": _seeded(f, "text_encoder_3", lambda: T5EncoderModel(_t5_config(64))),
        "tokenizer_3": make_t5_tokenizer(),
        "vae": _seeded(f, "vae", lambda: _kl_vae(1.5305, 0.0609)),
        "transformer": _seeded(
            f,
            "transformer",
            lambda: SD3Transformer2DModel(
                sample_size=32,
                patch_size=2,
                in_channels=16,
                num_layers=2,
                attention_head_dim=16,
                num_attention_heads=2,
                joint_attention_dim=64,
                caption_projection_dim=32,
                pooled_projection_dim=64,
                out_channels=16,
            ),
        ),
    }


def _wan_components() -> dict[str, Any]:
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    f = "wan"
    umt5 = UMT5Config(
        vocab_size=1000,
        d_model=32,
        d_ff=37,
        d_kv=8,
        num_heads=4,
        num_layers=2,
        relative_attention_num_buckets=8,
        decoder_start_token_id=0,
    )
    return {
        "scheduler": UniPCMultistepScheduler(
            prediction_type="flow_prediction",
            use_flow_sigmas=True,
            flow_shift=3.0,
            num_train_timesteps=1000,
        ),
        "text_encoder": _seeded(f, "text_encoder", lambda: UMT5EncoderModel(umt5)),
        "tokenizer": make_t5_tokenizer(),
        "vae": _seeded(
            f,
            "vae",
            lambda: AutoencoderKLWan(
                base_dim=8,
                z_dim=16,
                dim_mult=[1, 1, 1, 1],
                num_res_blocks=1,
                temperal_downsample=[False, True, True],
            ),
        ),
        "transformer": _seeded(
            f,
            "transformer",
            lambda: WanTransformer3DModel(
                patch_size=(1, 2, 2),
                num_attention_heads=2,
                attention_head_dim=12,
                in_channels=16,
                out_channels=16,
                text_dim=32,
                freq_dim=256,
                ffn_dim=32,
                num_layers=2,
                cross_attn_norm=True,
                qk_norm="rms_norm_across_heads",
                rope_max_seq_len=32,
            ),
        ),
    }


_BUILDERS: dict[str, Callable[[], dict[str, Any]]] = {
    "flux": _flux_components,
    "sd3": _sd3_components,
    "wan": _wan_components,
}


def build_tiny_model(family: str, path: str | os.PathLike[str]) -> Path:
    """Write a tiny ``family`` model directory (model_index.json + one folder per component) to ``path``.

    Deterministic: the same files every call. Returns the path.
    """

    check_family(family)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    # Fork the global RNG so that building a tiny model inside a worker or a test leaves the
    # caller's random stream untouched.
    with torch.random.fork_rng(devices=[]):
        pipe = pipeline_class(family)(**_BUILDERS[family]())
        pipe.save_pretrained(out, safe_serialization=True)
    (out / "diffdisagg_tiny.json").write_text(json.dumps({"family": family, "version": TINY_VERSION}))
    return out


def tiny_cache_root() -> Path:
    env = os.environ.get("DIFFDISAGG_TINY_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "diffdisagg" / "tiny"


def tiny_model_dir(family: str, root: Path | None = None) -> Path:
    """The cached tiny model directory of ``family``, built on first use (atomically, race-safe)."""
    check_family(family)
    root = root or tiny_cache_root()
    final = root / f"{family}-v{TINY_VERSION}"
    if (final / "model_index.json").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{family}-", dir=root))
    try:
        build_tiny_model(family, staging)
        try:
            staging.rename(final)
        except OSError:
            # Another process won the race and its directory is identical by construction.
            if not (final / "model_index.json").is_file():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    log.info("tiny model ready", extra={"family": family, "path": str(final)})
    return final


__all__ = ["FAMILIES", "TINY_VERSION", "build_tiny_model", "tiny_cache_root", "tiny_model_dir"]
