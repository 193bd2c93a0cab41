"""The workdir: one directory per run or imported model, written by ``train`` and
``import`` and read by sample, nll, export and fine-tuning. ``layout`` names its entries
and reads its config; ``run`` locks and prepares it for a training run; ``checkpoints``
saves and restores the train state; ``integrity`` fingerprints what is saved; ``params``
reads the parameters (or EMA) back and writes an imported workdir."""
