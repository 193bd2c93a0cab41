"""The PyTorch reference's training step, as its ``train.py`` performs it, on a model
loaded from this project's weights (``bench train --trajectory`` and ``--quality``; the
rules and where ``train.py`` is not followed as written: ``bench.train_trajectory``). The
reference's ``transformer_flow`` and ``utils/training.py`` are imported from the checkout."""

from __future__ import annotations

import importlib.util
import pathlib

import numpy as np

from starflow_jax.config import model_config


def _step_schedule(schedule) -> None:
    """``CosineLRSchedule.step()``. Its ``set_lr`` ends in ``return pg['lr']`` with ``pg`` bound
    only by the loop that applies a value inside ``[min_lr, max_lr]``: a value outside (early
    warmup below ``min_lr``: ``min(min_lr, 1e-6) + c / warmup * ...``) raises
    ``UnboundLocalError`` after the counter moved and before any learning rate changed (a
    bug in the reference: ``train.py`` stops there). Carried on past, the learning rate is
    unchanged: the rule the project's schedule follows (``train.optimizer.lr_schedule``)."""
    try:
        schedule.step()
    except UnboundLocalError:
        pass


class ReferenceTrainer:
    """``step(image, noise, drop_image, label=None, cond=None, drop=None)``: one update of
    the reference's ``train.py`` on a batch (numpy) with the given draws (``noise``: standard
    normal or uniform, the image's shape; ``drop``: ``(b,)`` booleans, labels or captions
    dropped); returns its metrics. ``params()`` / ``ema()``: numpy dicts in the reference's
    names."""

    def __init__(self, path: str, config, state_dict: dict[str, np.ndarray], num_classes: int, nearest: bool = False):
        import torch

        from starflow_jax.bench.reference import import_reference
        from starflow_jax.config.reference_args import to_model_kwargs, without_ours_only
        from starflow_jax.interop.state_dict import reference_buffers

        self.torch = torch
        tf = import_reference(path)
        spec = importlib.util.spec_from_file_location(
            "starflow_reference_training", pathlib.Path(path).resolve() / "utils" / "training.py"
        )
        training = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(training)
        cfg = model_config(config)
        if nearest:  # options of ours the reference lacks: its nearest model (same parameters)
            cfg, _ = without_ours_only(cfg)
        t = self.t = config.train
        self.num_classes = num_classes
        model = self.model = tf.Model(**to_model_kwargs(cfg))
        sd = dict(state_dict)
        sd.update(reference_buffers(cfg))
        model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}, strict=True)
        model.train()
        self.denoiser = bool(cfg.learnable_self_denoiser)
        self.trainable = [
            p for k, p in model.named_parameters() if p.requires_grad and not k.startswith("learnable_self_denoiser")
        ]
        lr, min_lr, warmup, total = float(t.lr), float(t.min_lr), int(t.warmup_steps), int(t.steps)
        self.optimizer = torch.optim.AdamW(self.trainable, betas=(0.9, 0.95), lr=lr, weight_decay=1e-4)
        self.schedule = training.CosineLRSchedule(self.optimizer, warmup, total, min_lr, lr)
        if self.denoiser:
            self.den_opt = torch.optim.AdamW(model.learnable_self_denoiser.parameters(), lr=1e-4, weight_decay=1e-4)
            self.den_schedule = training.CosineLRSchedule(self.den_opt, warmup, total, 1e-6, 1e-4)
        self.named = dict(model.named_parameters())
        self.ema_decay = float(t.ema_decay)
        self._ema = {k: p.detach().clone() for k, p in self.named.items()} if self.ema_decay > 0 else None
        self.total_steps, self.skipped = 0, 0

    def inputs(self, image, noise, drop_image: bool, label=None, cond=None, drop=None):
        """``(x, y)`` as ``train.py`` makes them: the noise added, the first frame dropped on a
        ``drop_image`` step (``cond``: then the ``"(extend) "`` captions), labels as one-hot
        rows (the null label at ``num_classes``) or captions (the null caption: zeros) dropped."""
        torch, t = self.torch, self.t
        x = torch.from_numpy(np.asarray(image, np.float32))
        u = torch.from_numpy(np.asarray(noise, np.float32))
        if str(t.noise_type) == "gaussian":
            x = x + float(t.noise_std) * u
        else:  # train.py's ((x + 1) * 255 / 2 + u) / 256 * 2 - 1, at train.levels
            levels = int(t.levels)
            x = ((x + 1) * ((levels - 1) / 2) + u) / levels * 2 - 1
        if drop_image:
            x = x[:, 1:]
        dropped = torch.zeros(x.shape[0], dtype=torch.bool) if drop is None else torch.from_numpy(np.asarray(drop))
        if self.num_classes:
            ids = torch.where(dropped, self.num_classes, torch.from_numpy(np.asarray(label)).long())
            y = torch.nn.functional.embedding(ids[:, None], torch.eye(self.num_classes + 1))
        elif cond is not None:
            y = torch.from_numpy(np.asarray(cond, np.float32))
            y = torch.where(dropped.view(-1, *([1] * (y.dim() - 1))), torch.zeros_like(y), y)
        else:
            y = None
        return x, y

    def step(self, image, noise, drop_image: bool = False, label=None, cond=None, drop=None) -> dict:
        torch, t, model = self.torch, self.t, self.model
        F = torch.nn.functional
        x, y = self.inputs(image, noise, drop_image, label, cond, drop)
        noise_std, clip = float(t.noise_std), float(t.grad_clip)
        x.requires_grad_(True)
        self.optimizer.zero_grad()
        if self.denoiser and not bool(t.denoiser_accumulate_grads):
            self.den_opt.zero_grad()
        z, _, outputs, logdets = model(x, y)
        weights = noise_std / 0.3 if bool(t.cond_noise_level) else None
        loss = model.get_loss(z, logdets, weights)["loss"]
        if float(t.latent_norm_regularization) > 0:
            loss = loss + float(t.latent_norm_regularization) * sum([o.pow(2).mean() for o in outputs[:-1]])
        row = dict(loss=loss.item())
        if torch.isnan(loss):  # train.py: `continue` (the project counts it as a skipped update)
            self.skipped += 1
            return dict(row, skipped=self.skipped)
        loss.backward()
        if self.denoiser:
            score = x.grad.clone().detach() * float(x.numel()) * noise_std
            loss_den = F.mse_loss(model(x, y, denoiser=True), score, reduction="mean")
            loss_den.backward()
            row["denoiser_loss"] = loss_den.item()
        skip = False
        late = bool(t.grad_skip) and self.total_steps > 100
        if clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, clip)
            row["grad_norm"] = float(grad_norm)
            skip = float(grad_norm) > clip if late else False
            if self.denoiser:
                den_norm = torch.nn.utils.clip_grad_norm_(model.learnable_self_denoiser.parameters(), clip)
                row["denoiser_grad_norm"] = float(den_norm)
                skip = skip or (float(den_norm) > clip if late else False)
        else:
            grads = [p.grad.pow(2).sum() for p in self.trainable if p.grad is not None]
            row["grad_norm"] = float(torch.sqrt(sum(grads)))
        if skip:
            self.optimizer.zero_grad()
            if self.denoiser:
                self.den_opt.zero_grad()
        row["lr"] = float(self.optimizer.param_groups[0]["lr"])
        self.optimizer.step()
        _step_schedule(self.schedule)
        if self.denoiser:
            _step_schedule(self.den_schedule)
            row["denoiser_lr"] = float(self.den_opt.param_groups[0]["lr"])
            self.den_opt.step()
        self.total_steps += 1
        self.skipped += int(skip)
        if self._ema is not None and not skip:
            with torch.no_grad():
                for k, p in self.named.items():
                    self._ema[k].mul_(self.ema_decay).add_(p.detach(), alpha=1 - self.ema_decay)
        row["skipped"] = self.skipped
        return row

    def params(self) -> dict[str, np.ndarray]:
        return {k: p.detach().numpy().copy() for k, p in self.named.items()}

    def ema(self) -> dict[str, np.ndarray] | None:
        return None if self._ema is None else {k: v.numpy().copy() for k, v in self._ema.items()}

    def nll(self, image, noise, label=None, cond=None):
        """Per-example NLL per dimension (nats; ``get_loss`` before the batch mean) of a
        batch under the given dequantisation / noise draw, in eval mode."""
        torch = self.torch
        x, y = self.inputs(image, noise, False, label, cond)
        self.model.eval()
        with torch.no_grad():
            z, _, _, logdets = self.model(x, y)
            per = 0.5 * z.pow(2).mean(dim=tuple(range(1, z.dim())))
            for ld in logdets:
                per = per - ld.mean(dim=tuple(range(1, ld.dim())))
        self.model.train()
        return per.double().numpy()
