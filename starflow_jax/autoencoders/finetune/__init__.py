"""The losses of decoder fine-tuning on the flow's noisy latents (the reference's
``finetune_decoder.py`` with ``misc/ae_losses.py``'s ``ReconstructionLoss_Single_Stage``):
the patch discriminator and the reference's 3D one for clips (``discriminator``),
LPIPS-VGG16 (``lpips``), the ConvNeXt-S logits term (``convnext``), the Haar wavelet loss
of videos (``wavelet``) and the generator and discriminator losses that combine them
(``losses``); their weights and defaults are ``starflow_jax.config.decoder_loss.decoder_loss_section()``'s."""

from starflow_jax.autoencoders.finetune.convnext import ConvNeXt, convnext_distance, load_convnext
from starflow_jax.autoencoders.finetune.discriminator import (
    ClipDiscriminator,
    PatchDiscriminator,
    load_clip_discriminator,
    load_discriminator,
)
from starflow_jax.autoencoders.finetune.losses import (
    LeCamState,
    discriminator_loss,
    discriminator_terms,
    generator_loss,
    generator_terms,
    init_lecam_state,
)
from starflow_jax.autoencoders.finetune.lpips import LPIPS, load_lpips
from starflow_jax.autoencoders.finetune.wavelet import wavelet_loss

__all__ = [
    "ClipDiscriminator",
    "ConvNeXt",
    "LPIPS",
    "LeCamState",
    "PatchDiscriminator",
    "convnext_distance",
    "discriminator_loss",
    "discriminator_terms",
    "generator_loss",
    "generator_terms",
    "init_lecam_state",
    "load_clip_discriminator",
    "load_convnext",
    "load_discriminator",
    "load_lpips",
    "wavelet_loss",
]
