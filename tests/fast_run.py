"""The few-second digits run that the training tests share: ``load_config(TINY, FAST)``
trains a 32-wide model for 6 steps with a checkpoint every 3; ``quiet`` drops its log."""

import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny_cpu.py"
FAST = [
    "model.channels=32",
    "model.layers_per_block=[1, 0, 1]",
    "train.batch_size=16",
    "train.steps=6",
    "train.warmup_steps=2",
    "train.log_every=1",
    "train.eval_every=0",
    "train.checkpoint_every=3",
    "sample.per_class=1",
    "sample.scale=1",
    "eval.num_samples=0",  # the main job scores 500 samples at its end: not these runs
]


def quiet(*args, **kwargs) -> None:
    return None
