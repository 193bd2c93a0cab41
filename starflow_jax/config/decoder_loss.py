"""The losses of decoder fine-tuning (the reference's ``finetune_decoder.py`` with
``misc/ae_losses.py``'s ``ReconstructionLoss_Single_Stage``): every key once, with its
default and where in the reference it comes from. ``decoder_loss_section(**values)``
builds the section, naming only what differs; an unknown key is an error.

    total (generator) = reconstruction / exp(logvar)
                        + perceptual_weight * (lpips_weight * LPIPS + convnext_weight * ConvNeXt)
                                            / (lpips_weight + convnext_weight)
                        + discriminator_weight * factor * (-mean D(reconstruction))
                        + wavelet_weight * wavelet            (videos only)
    discriminator       = factor * hinge(D(real), D(fake)) + lecam_weight * LeCam(EMAs)
    factor              = discriminator_factor once step >= discriminator_start, else 0
"""

from __future__ import annotations

import ml_collections

from starflow_jax.config.model_config import ConfigError

# ae_losses.py = misc/ae_losses.py, RLSS = its ReconstructionLoss_Single_Stage.__init__,
# NLD = misc/discriminator.py's NLayerDiscriminator defaults (RLSS passes only with_condition=False)
DECODER_LOSS_DEFAULTS = dict(
    reconstruction="l2",  # RLSS: reconstruction_loss = "l2" (mse over every pixel; "l1" also supported there)
    reconstruction_weight=1.0,  # RLSS: reconstruction_weight = 1.0
    logvar=0.0,  # RLSS: logvar = nn.Parameter(0.0, requires_grad=False); reconstruction / exp(logvar)
    perceptual_weight=1.1,  # RLSS: perceptual_weight = 1.1
    lpips_weight=1.0,  # RLSS: PerceptualLoss("lpips-convnext_s-1.0-0.1"): the LPIPS share
    convnext_weight=0.1,  # same name string: the ConvNeXt-S logits share; the two are averaged by their weights
    discriminator_weight=0.1,  # RLSS: discriminator_weight = 0.1 (d_weight: constant, no adaptive weight)
    discriminator_factor=1.0,  # RLSS: discriminator_factor = 1.0
    discriminator_start=0,  # RLSS: discriminator_iter_start = 0 (factor 0 before this step)
    lecam_weight=0.001,  # RLSS: lecam_regularization_weight = 0.001
    lecam_ema_decay=0.999,  # RLSS: lecam_ema_decay = 0.999 (EMAs of the mean logits, starting at 0)
    wavelet_weight=0.5,  # RLSS: wavelet_loss_weight = 0.5 (applied to 5-D video batches only)
    discriminator_channels=128,  # NLD: hidden_channels = 128
    discriminator_stages=3,  # NLD: num_stages = 3
    discriminator_blur=4,  # NLD: blur_kernel_size = 4 (blur_resample = True)
    discriminator_3d=False,  # fd.py: --use_3d_disc 0; True: NLayer3DDiscriminator on whole clips (videos only)
)


def decoder_loss_section(**values) -> ml_collections.ConfigDict:
    """A decoder-loss section: DECODER_LOSS_DEFAULTS with ``values`` applied."""
    unknown = sorted(set(values) - set(DECODER_LOSS_DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown decoder loss config keys: {unknown} (the keys: {sorted(DECODER_LOSS_DEFAULTS)})")
    return ml_collections.ConfigDict({**DECODER_LOSS_DEFAULTS, **values})
