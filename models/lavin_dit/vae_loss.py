"""Training losses for LaVin-DiT's ST-VAE, and one tested training step.

What the thesis says (LaVin-DiT chapter, §4.3.1.1 "ST-VAE"): the latent is regularized with a KL constraint; training
runs in two stages, "first on images alone, then jointly on both images and videos"; each stage optimizes "a
combination of the mean squared error, perceptual loss [LDM, LPIPS], and adversarial loss [LDM]". It gives no weights,
schedule lengths, discriminator design or optimizer settings for the VAE, and the official repository has no training
code. Every number below is therefore the common LDM / taming-transformers (VQGAN) default, named as such:

=========================  =================  ==============================================================
term                       default            source
=========================  =================  ==============================================================
reconstruction             MSE, mean/pixel    thesis (MSE); LDM uses L1
perceptual (LPIPS-VGG)     weight 1.0         LDM ``LPIPSWithDiscriminator(perceptual_weight=1.0)``
KL                         weight 1e-6        LDM autoencoder configs (kl-f8 ``kl_weight: 0.000001``)
adversarial (PatchGAN)     weight 0.5, hinge  LDM (``disc_weight: 0.5``, ``disc_loss="hinge"``)
adaptive GAN weight        clamp [0, 1e4],    taming ``calculate_adaptive_weight`` (grad-norm ratio at the
                           eps 1e-4           decoder's last layer, detached)
GAN start                  step 50001         LDM kl-f8 ``disc_start: 50001``
discriminator              ndf 64, 3 layers   taming ``NLayerDiscriminator``
=========================  =================  ==============================================================

Generator objective, for x and its reconstruction x' ([B, 3, T, H, W] in [-1, 1]), posterior q(z|x) and step s::

    rec   = mean((x' - x)^2) + perceptual_weight * mean_frames(LPIPS(x', x))
    kl    = mean_b( KL(q(z|x_b) || N(0, I)) summed over the latent ) / (3*T*H*W)
    adv   = -mean(D(x'))                                            (D: per-frame PatchGAN logits)
    lam   = disc_weight * clamp(||d rec / d W_last|| / (||d adv / d W_last|| + 1e-4), 0, 1e4), detached
    loss  = rec + kl_weight * kl + [s >= disc_start] * disc_factor * lam * adv

Reductions, and why: the thesis asks for MSE, which we take as the per-element mean. LDM sums its reconstruction
error over pixels and the KL over latent elements (both divided by the batch); dividing *both* by the number of
input elements per sample keeps LDM's exact balance between them while the loss stays O(1) per pixel. The
adaptive weight makes the GAN term's gradient at the last layer ``disc_weight`` times the reconstruction gradient
whatever that reduction is.

Discriminator objective (hinge, LDM's default; "vanilla" = softplus is available)::

    loss_D = [s >= disc_start] * disc_factor * 0.5 * ( mean(relu(1 - D(x))) + mean(relu(1 + D(x'.detach()))) )

Before ``disc_start`` the discriminator is neither evaluated nor updated (taming multiplies its loss by 0, which
only wastes the forward pass and lets weight decay act on it).

Video: the perceptual and adversarial terms work on frames (T folded into the batch): LPIPS is an image metric, and
a 2D PatchGAN serves both stages with one discriminator (stage 1 has T = 1 only, so a 3D discriminator would see no
temporal extent for most of training and would have to switch architecture between stages). Temporal consistency
is carried by the MSE over all frames and by the causal 3D convolutions themselves. This is our choice; the thesis
does not name a discriminator.

Discriminator normalization: GroupNorm rather than taming's BatchNorm (``norm="batch"`` is kept for
checkpoint-compatible experiments). GroupNorm has no running buffers (nothing for DDP to broadcast and no
"modified by an inplace operation" errors when one module is called several times per step), it normalizes each
sample alone (real and fake can share one forward call, which DDP and DeepSpeed handle as one graph, with no
real/fake batch-statistics leak), and it behaves the same for any per-GPU batch size.

The training step (:func:`vae_train_step`) is split so that optimizer ownership stays with the caller:

* :func:`vae_generator_loss` runs the autoencoder through ``vae(x, sample_posterior=..., generator=...)`` (its
  ``forward``, so DDP / DeepSpeed wrappers see the call) and returns the generator loss. The discriminator is called
  there with *detached parameters* (``torch.func.functional_call`` on the unwrapped module), so the generator's
  backward never writes discriminator gradients and never triggers the discriminator's gradient all-reduce.
* :meth:`VAELoss.discriminator_loss` returns the discriminator loss for (x, x'.detach()) in one forward call.
* :func:`vae_train_step` is the thin wrapper for plain torch optimizers: zero_grad / backward / step for each. A
  DeepSpeed trainer calls the two loss functions itself and uses ``engine.backward(loss)`` / ``engine.step()``.
  The adaptive weight needs the full last-layer weight (``torch.autograd.grad``), which holds for DDP and ZeRO
  stages 1-2 but not for ZeRO-3 (partitioned parameters).
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass
from fractions import Fraction
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from models.lavin_dit.lpips import LPIPS

# ------------------------------------------------------------------------------------------------------------------
# Helpers


def unwrap(module: nn.Module) -> nn.Module:
    """The user module inside DDP / DeepSpeed-engine (``.module``) and torch.compile (``._orig_mod``) wrappers."""
    seen = 0
    while seen < 8:
        inner = getattr(module, "module", None)
        if isinstance(inner, nn.Module):
            module = inner
        elif isinstance(getattr(module, "_orig_mod", None), nn.Module):
            module = module._orig_mod
        else:
            return module
        seen += 1
    return module


def frames(x: torch.Tensor) -> torch.Tensor:
    """[B, C, T, H, W] -> [B*T, C, H, W], row b*T + t = frame t of sample b; a 4-D [N, C, H, W] passes unchanged."""
    if x.dim() == 4:
        return x
    if x.dim() != 5:
        raise ValueError(f"frames: expected [B, C, T, H, W] or [N, C, H, W], got {tuple(x.shape)}")
    B, C, T, H, W = x.shape
    return x.transpose(1, 2).reshape(B * T, C, H, W)


# ------------------------------------------------------------------------------------------------------------------
# Discriminator


@dataclass(frozen=True)
class PatchGANConfig:
    """NLayerDiscriminator hyper-parameters (taming defaults: 3 input channels, ndf 64, 3 layers)."""

    in_channels: int = 3
    ndf: int = 64
    n_layers: int = 3
    norm: str = "group"  # "group" (ours, see the module docstring) or "batch" (taming)
    max_groups: int = 32

    def __post_init__(self):
        if self.norm not in ("group", "batch"):
            raise ValueError(f"PatchGANConfig.norm: expected 'group' or 'batch', got {self.norm!r}")
        if self.n_layers < 1 or self.ndf < 1 or self.in_channels < 1:
            raise ValueError("PatchGANConfig: in_channels, ndf and n_layers must be >= 1")

    @classmethod
    def tiny(cls) -> "PatchGANConfig":
        return cls(ndf=8, n_layers=2)


def _group_count(channels: int, max_groups: int) -> int:
    return max(g for g in range(1, min(channels, max_groups) + 1) if channels % g == 0)


class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pix / taming ``NLayerDiscriminator``) applied to every frame.

    Layout (``main`` Sequential, the same indices as taming's, so ``norm="batch"`` loads its checkpoints):
    conv4x4/2 (bias) -> LeakyReLU(0.2); (n_layers - 1) x [conv4x4/2 (no bias) -> norm -> LeakyReLU]; conv4x4/1 (no
    bias) -> norm -> LeakyReLU; conv4x4/1 -> 1 channel (bias). Widths ndf * min(2^n, 8). Init as taming: conv weights
    N(0, 0.02), norm weights N(1, 0.02), norm biases 0.

    forward(x): x [B, C, T, H, W] or [N, C, H, W] -> logits [B*T (or N), 1, h, w], one per overlapping patch
    (70x70 receptive field for n_layers 3). The input is cast to the weights' dtype.
    """

    def __init__(self, config: PatchGANConfig = PatchGANConfig()):
        super().__init__()
        self.config = config
        c = config

        def norm(ch):
            if c.norm == "batch":
                return nn.BatchNorm2d(ch)
            return nn.GroupNorm(_group_count(ch, c.max_groups), ch)

        layers: list[nn.Module] = [nn.Conv2d(c.in_channels, c.ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, c.n_layers):
            prev, mult = mult, min(2 ** n, 8)
            layers += [nn.Conv2d(c.ndf * prev, c.ndf * mult, 4, 2, 1, bias=False), norm(c.ndf * mult),
                       nn.LeakyReLU(0.2, True)]
        prev, mult = mult, min(2 ** c.n_layers, 8)
        layers += [nn.Conv2d(c.ndf * prev, c.ndf * mult, 4, 1, 1, bias=False), norm(c.ndf * mult),
                   nn.LeakyReLU(0.2, True), nn.Conv2d(c.ndf * mult, 1, 4, 1, 1)]
        self.main = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, (nn.GroupNorm, nn.BatchNorm2d)):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def min_size(self) -> int:
        """The smallest frame side that gives at least one logit."""
        s = 1
        while True:
            n = s
            for _ in range(self.config.n_layers):
                n = (n - 2) // 2 + 1 if n >= 2 else 0
            if n - 2 >= 1:
                return s
            s += 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = frames(x)
        if x.shape[1] != self.config.in_channels:
            raise ValueError(f"PatchDiscriminator: argument 'x' must have {self.config.in_channels} channels, got "
                             f"{tuple(x.shape)}")
        if min(x.shape[-2:]) < self.min_size():
            raise ValueError(f"PatchDiscriminator: frames must be at least {self.min_size()}x{self.min_size()} for "
                             f"n_layers={self.config.n_layers}, got {tuple(x.shape[-2:])}")
        return self.main(x.to(self.main[0].weight.dtype))


# ------------------------------------------------------------------------------------------------------------------
# Loss terms


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake))), fp32 scalar."""
    return 0.5 * (F.relu(1.0 - logits_real.float()).mean() + F.relu(1.0 + logits_fake.float()).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """0.5 * (mean(softplus(-real)) + mean(softplus(fake))): the non-saturating BCE loss on logits, fp32 scalar."""
    return 0.5 * (F.softplus(-logits_real.float()).mean() + F.softplus(logits_fake.float()).mean())


D_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}


def generator_adv_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """-mean(D(x')), the generator's adversarial loss for both discriminator losses (as taming/LDM), fp32 scalar."""
    return -logits_fake.float().mean()


def adaptive_gan_weight(rec_loss: torch.Tensor, adv_loss: torch.Tensor, last_layer: torch.Tensor, *,
                        scale: float = 0.5, eps: float = 1e-4, max_weight: float = 1e4) -> torch.Tensor:
    """scale * clamp(||d rec/d W|| / (||d adv/d W|| + eps), 0, max_weight), detached fp32 scalar (W = last_layer).

    Both losses must depend on ``last_layer`` through graphs that stay alive (retain_graph is used, so the caller can
    still backpropagate the total).
    """
    if not last_layer.requires_grad:
        raise ValueError("adaptive_gan_weight: argument 'last_layer' does not require grad (is the decoder frozen?)")
    g_rec, = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)
    g_adv, = torch.autograd.grad(adv_loss, last_layer, retain_graph=True)
    w = torch.linalg.vector_norm(g_rec.float()) / (torch.linalg.vector_norm(g_adv.float()) + eps)
    return (w.clamp(0.0, max_weight) * scale).detach()


def kl_per_element(posterior, x: torch.Tensor) -> torch.Tensor:
    """mean_b(posterior.kl()) / (elements per input sample), fp32 scalar (the normalization is explained in the
    module docstring). ``posterior.kl()`` is KL(q || N(0, I)) per sample [B], summed over the latent."""
    kl = posterior.kl()
    if kl.dim() != 1 or kl.shape[0] != x.shape[0]:
        raise ValueError(f"kl_per_element: posterior.kl() must be [B]={x.shape[0]}, got {tuple(kl.shape)}")
    return kl.float().mean() / x[0].numel()


# ------------------------------------------------------------------------------------------------------------------
# The criterion


@dataclass(frozen=True)
class VAELossConfig:
    """Loss weights and switches (defaults: LDM / taming, see the module docstring).

    lpips_path: local LPIPS weight file(s) (see :meth:`LPIPS.from_pretrained`); None disables the perceptual term
    with a warning. disc_start: first step (0-based, the ``step`` passed to the losses) with the GAN terms on.
    sample_posterior: decode a posterior sample (True, as LDM trains) or its mean.
    """

    kl_weight: float = 1e-6
    perceptual_weight: float = 1.0
    lpips_path: Union[None, str, tuple] = None
    disc_weight: float = 0.5
    disc_factor: float = 1.0
    disc_start: int = 50001
    disc_loss: str = "hinge"
    adaptive_eps: float = 1e-4
    adaptive_max: float = 1e4
    sample_posterior: bool = True

    def __post_init__(self):
        if self.disc_loss not in D_LOSSES:
            raise ValueError(f"VAELossConfig.disc_loss: expected one of {sorted(D_LOSSES)}, got {self.disc_loss!r}")
        for name in ("kl_weight", "perceptual_weight", "disc_weight", "disc_factor", "adaptive_eps", "adaptive_max"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"VAELossConfig.{name}: expected a finite number >= 0, got {v!r}")
        if isinstance(self.lpips_path, list):  # keep the dataclass hashable (criteria are cached per config)
            object.__setattr__(self, "lpips_path", tuple(self.lpips_path))


class VAELoss(nn.Module):
    """The ST-VAE criterion: holds the config and the frozen LPIPS network (moved lazily to the data's device).

    generator_loss(x, recon, posterior, step, disc, last_layer) -> (loss, logs)
    discriminator_loss(disc, x, recon, step) -> (loss or None before disc_start, logs)

    x, recon: [B, 3, T, H, W] (or [B, 3, H, W]) in [-1, 1]; posterior: has ``.kl()`` -> [B]. ``logs`` maps names to
    detached scalar tensors (call ``float`` on them when logging; kept as tensors to avoid a device sync per term).
    """

    def __init__(self, config: VAELossConfig = VAELossConfig(), lpips: Optional[LPIPS] = None):
        super().__init__()
        self.config = config
        if lpips is None and config.lpips_path is not None and config.perceptual_weight > 0:
            lpips = LPIPS.from_pretrained(config.lpips_path)
        elif lpips is None and config.perceptual_weight > 0:
            warnings.warn("VAELoss: no LPIPS weights given (VAELossConfig.lpips_path is None), so the perceptual loss "
                          "is disabled. To enable it, set lpips_path to local file(s) holding the VGG16 features and "
                          "the LPIPS heads, e.g. (torchvision vgg16 state dict, lpips weights/v0.1/vgg.pth); "
                          "nothing is downloaded.", stacklevel=2)
        self.lpips = lpips
        self._d_loss = D_LOSSES[config.disc_loss]

    def gan_active(self, step: int) -> bool:
        c = self.config
        return step >= c.disc_start and c.disc_factor > 0 and c.disc_weight > 0

    def perceptual(self, x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        """mean over frames of LPIPS(recon, x), fp32 scalar; 0 when disabled."""
        if self.lpips is None or self.config.perceptual_weight == 0:
            return recon.new_zeros((), dtype=torch.float32)
        w = self.lpips.features[0].weight
        if w.device != recon.device:
            self.lpips.to(recon.device)
        return self.lpips(frames(recon), frames(x).detach()).mean()

    def generator_loss(self, x: torch.Tensor, recon: torch.Tensor, posterior, step: int,
                       disc: Optional[nn.Module] = None, last_layer: Optional[torch.Tensor] = None):
        _check_pair(x, recon)
        c = self.config
        x = x.detach()
        mse = F.mse_loss(recon.float(), x.float())
        p = self.perceptual(x, recon)
        rec = mse + c.perceptual_weight * p
        kl = kl_per_element(posterior, x)
        loss = rec + c.kl_weight * kl
        zero = loss.new_zeros(())
        adv, lam = zero, zero
        if self.gan_active(step):
            if disc is None or last_layer is None:
                raise ValueError(f"VAELoss.generator_loss: step {step} >= disc_start={c.disc_start} needs 'disc' and "
                                 "'last_layer'")
            adv = generator_adv_loss(_call_frozen(disc, recon))
            if torch.is_grad_enabled():
                lam = adaptive_gan_weight(rec, adv, last_layer, scale=c.disc_weight, eps=c.adaptive_eps,
                                          max_weight=c.adaptive_max)
            # else (evaluation under no_grad): the weight cannot be measured; the adversarial term is logged only.
            loss = loss + c.disc_factor * lam * adv
        logs = {"loss_g": loss, "rec": rec, "mse": mse, "lpips": p, "kl": kl * x[0].numel(),
                "kl_term": c.kl_weight * kl, "adv_g": adv, "adaptive_weight": lam}
        return loss, {k: v.detach() for k, v in logs.items()}

    def discriminator_loss(self, disc: nn.Module, x: torch.Tensor, recon: torch.Tensor, step: int):
        _check_pair(x, recon)
        if not self.gan_active(step):
            return None, {}
        # Real and fake in one call: one graph for DDP/DeepSpeed; GroupNorm keeps the samples independent.
        fx, fr = frames(x.detach()), frames(recon.detach()).to(x.dtype)
        logits = disc(torch.cat([fx, fr]))
        real, fake = logits[: fx.shape[0]], logits[fx.shape[0]:]
        loss = self.config.disc_factor * self._d_loss(real, fake)
        logs = {"loss_d": loss, "logits_real": real.float().mean(), "logits_fake": fake.float().mean()}
        return loss, {k: v.detach() for k, v in logs.items()}


def _check_pair(x: torch.Tensor, recon: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or not isinstance(recon, torch.Tensor):
        raise TypeError("VAELoss: arguments 'x' and 'recon' must be tensors")
    if x.shape != recon.shape:
        raise ValueError(f"VAELoss: 'recon' {tuple(recon.shape)} must have the shape of 'x' {tuple(x.shape)}")
    if x.dim() not in (4, 5) or x.shape[1] != 3:
        raise ValueError(f"VAELoss: 'x' must be [B, 3, T, H, W] or [B, 3, H, W], got {tuple(x.shape)}")


def _call_frozen(disc: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """disc(x) with the parameters detached: gradients reach x only (see the module docstring)."""
    inner = unwrap(disc)
    params = {n: p.detach() for n, p in inner.named_parameters()}
    return torch.func.functional_call(inner, params, (x,))


# ------------------------------------------------------------------------------------------------------------------
# Two-stage data schedule


@dataclass(frozen=True)
class VAEStageSchedule:
    """Which batch kind to draw at a step (thesis: stage 1 images only, stage 2 images and videos jointly).

    Steps [0, stage1_steps) are stage 1 (images, T = 1). From stage1_steps on, stage 2 interleaves image and video
    batches deterministically (a batch holds one kind, as the two have different T): in the first n stage-2 steps
    exactly floor(n * video_fraction) are video steps, spread evenly, so every rank of a data-parallel job draws the
    same kind at the same step. The thesis gives no stage lengths, mix or clip length; video_frames = 17 (1 + 4*4)
    and an even mix are our defaults.
    """

    stage1_steps: int
    video_fraction: float = 0.5
    video_frames: int = 17

    def __post_init__(self):
        if not isinstance(self.stage1_steps, int) or self.stage1_steps < 0:
            raise ValueError(f"VAEStageSchedule.stage1_steps: expected an int >= 0, got {self.stage1_steps!r}")
        if not 0.0 <= self.video_fraction <= 1.0:
            raise ValueError(f"VAEStageSchedule.video_fraction: expected a value in [0, 1], got "
                             f"{self.video_fraction!r}")
        if self.video_frames < 5 or (self.video_frames - 1) % 4:
            raise ValueError(f"VAEStageSchedule.video_frames: expected 1 + 4k frames with k >= 1, got "
                             f"{self.video_frames!r}")

    def _check(self, step: int) -> None:
        if not isinstance(step, int) or step < 0:
            raise ValueError(f"VAEStageSchedule: argument 'step' must be an int >= 0, got {step!r}")

    def stage(self, step: int) -> int:
        self._check(step)
        return 1 if step < self.stage1_steps else 2

    def batch_kind(self, step: int) -> str:
        """'image' or 'video'."""
        if self.stage(step) == 1:
            return "image"
        frac = Fraction(self.video_fraction).limit_denominator(10 ** 6)
        i = step - self.stage1_steps
        video = ((i + 1) * frac.numerator) // frac.denominator > (i * frac.numerator) // frac.denominator
        return "video" if video else "image"

    def num_frames(self, step: int) -> int:
        """T of the batch to draw: 1 for images, video_frames for videos."""
        return self.video_frames if self.batch_kind(step) == "video" else 1


# ------------------------------------------------------------------------------------------------------------------
# Training step


def vae_generator_loss(vae: nn.Module, disc: Optional[nn.Module], x: torch.Tensor, step: int, criterion: VAELoss,
                       generator: Optional[torch.Generator] = None):
    """Autoencode ``x`` through ``vae``'s forward and return (loss_g, recon, logs). ``vae`` may be wrapped (DDP,
    DeepSpeed engine); its forward must be ``(x, sample_posterior, generator) -> (recon, posterior)`` as STVAE's, and
    the unwrapped module must have ``last_layer()``."""
    recon, posterior = vae(x, sample_posterior=criterion.config.sample_posterior, generator=generator)
    last = unwrap(vae).last_layer() if criterion.gan_active(step) else None
    loss, logs = criterion.generator_loss(x, recon, posterior, step, disc=disc, last_layer=last)
    return loss, recon, logs


@functools.lru_cache(maxsize=4)
def _criterion_for(config: VAELossConfig) -> VAELoss:
    return VAELoss(config)


def _as_batch(batch) -> torch.Tensor:
    if isinstance(batch, dict):
        for key in ("video", "pixel_values", "image", "x"):
            if key in batch:
                batch = batch[key]
                break
        else:
            raise ValueError(f"vae_train_step: argument 'batch' dict needs a 'video', 'pixel_values', 'image' or 'x' "
                             f"entry, got keys {sorted(batch)}")
    if not isinstance(batch, torch.Tensor) or not batch.is_floating_point():
        raise TypeError("vae_train_step: argument 'batch' must be a float tensor [B, 3, T, H, W] in [-1, 1]")
    if batch.dim() == 4:  # images [B, 3, H, W] -> 1-frame clips
        batch = batch.unsqueeze(2)
    if batch.dim() != 5 or batch.shape[1] != 3:
        raise ValueError(f"vae_train_step: argument 'batch' must be [B, 3, T, H, W] or [B, 3, H, W], got "
                         f"{tuple(batch.shape)}")
    return batch


def vae_train_step(vae: nn.Module, disc: nn.Module, batch, opt_g: torch.optim.Optimizer,
                   opt_d: torch.optim.Optimizer, step: int, cfg: Union[VAELoss, VAELossConfig], *,
                   generator: Optional[torch.Generator] = None) -> dict[str, float]:
    """One generator update and (from ``disc_start`` on) one discriminator update; returns the logged losses.

    Args:
        vae: the autoencoder (STVAE or a wrapper around it), in the mode the caller wants (usually train()).
        disc: the discriminator (:class:`PatchDiscriminator` or a wrapper).
        batch: [B, 3, T, H, W] (or [B, 3, H, W] images, or a dict with 'video'/'pixel_values'/'image'/'x') in [-1, 1],
            on the models' device.
        opt_g / opt_d: plain torch optimizers over the VAE's / the discriminator's parameters.
        step: the global step (decides whether the GAN terms are on).
        cfg: a :class:`VAELoss` criterion (preferred: it holds the loaded LPIPS network), or a
            :class:`VAELossConfig`, for which a criterion is built once and cached.
        generator: RNG for the posterior sample (None: the global CPU generator, as the official sampler).

    Returns:
        floats: loss_g, rec, mse, lpips, kl (per-sample KL, summed over the latent), kl_term, adv_g,
        adaptive_weight, gan_active (0/1) and, when the discriminator stepped, loss_d, logits_real, logits_fake.

    The discriminator sees the reconstructions made before the generator update (as in taming/LDM).
    """
    criterion = cfg if isinstance(cfg, VAELoss) else _criterion_for(cfg)
    if not isinstance(criterion, VAELoss):
        raise TypeError(f"vae_train_step: argument 'cfg' must be a VAELoss or VAELossConfig, got {type(cfg).__name__}")
    x = _as_batch(batch)
    opt_g.zero_grad(set_to_none=True)
    loss_g, recon, logs = vae_generator_loss(vae, disc, x, step, criterion, generator)
    loss_g.backward()
    opt_g.step()
    logs["gan_active"] = torch.tensor(float(criterion.gan_active(step)))
    loss_d, logs_d = criterion.discriminator_loss(disc, x, recon.detach(), step)
    if loss_d is not None:
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
        logs.update(logs_d)
    return {k: float(v) for k, v in logs.items()}


__all__ = [
    "LPIPS", "PatchGANConfig", "PatchDiscriminator", "VAELossConfig", "VAELoss", "VAEStageSchedule",
    "adaptive_gan_weight", "frames", "generator_adv_loss", "hinge_d_loss", "kl_per_element", "unwrap",
    "vae_generator_loss", "vae_train_step", "vanilla_d_loss",
]
