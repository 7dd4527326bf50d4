r"""Training one tiny byte-level MoE on the standard library's sources (`scripts/train_tiny.py`).

  python scripts/train_tiny.py --config=configs/train/tiny.py --workdir=workdir/train_mixtral
  python scripts/train_tiny.py --config=configs/train/tiny.py --config.family=olmoe \
      --config.train.steps=600 --workdir=workdir/train_olmoe
  # seconds (what the tests run):
  python scripts/train_tiny.py --config=configs/train/tiny.py:smoke --workdir=/tmp/train_smoke
  # a wider, longer-trained model of Python code whose samples read as code (minutes):
  python scripts/train_tiny.py --config=configs/train/tiny.py:text --workdir=workdir/train_text
  python scripts/generate.py --checkpoint=workdir/train_text/hf --prompt="def " \
      --max_new_tokens=200 --temperature=0.5 --seed=0

Blocks: `family` and `model` (overrides of `tiny_config(family)`), `seed` (the init, the
corpus and the batches), `corpus` (`build_corpus`: bytes per domain, held-out fraction),
`train` (`trainer.TrainConfig`'s fields). The default (300 steps of 16 x 128 tokens) takes
about a minute on 2 CPU cores. "text" trains a wider model (D=128, F=128) on the code domain
alone for longer, so that what it generates is readable.
"""

from __future__ import annotations

import ml_collections

from crosspool_jax.experiments.config_lib import config_variant


def get_config(arg: str | None = None):
  """The default config; arg "smoke" gives the seconds-long variant of the tests, "text" the
  readable one (module docstring)."""
  variant = config_variant("train", arg, ("default", "smoke", "text"))
  smoke = variant == "smoke"
  c = ml_collections.ConfigDict()
  c.variant = variant
  c.family = "mixtral"
  c.model = ml_collections.ConfigDict()
  c.seed = 0
  c.corpus = ml_collections.ConfigDict(dict(
      max_bytes=30_000 if smoke else 600_000, heldout_fraction=0.1))
  c.train = ml_collections.ConfigDict(dict(
      steps=6 if smoke else 300, batch_size=4 if smoke else 16, seq_len=32 if smoke else 128,
      learning_rate=3e-3, warmup_steps=2 if smoke else 30, final_lr_ratio=0.1,
      weight_decay=0.1, clip_norm=1.0, b1=0.9, b2=0.95, trainable="all",
      domains=("code", "docstrings", "comments"), eval_every=3 if smoke else 100,
      eval_batches=2 if smoke else 4, log_every=1 if smoke else 20,
      checkpoint_every=3 if smoke else 100))
  # None: the family's HF default (objective.AUX_LOSS_COEF).
  c.train.aux_loss_coef = ml_collections.config_dict.placeholder(float)
  if variant == "text":
    c.model = ml_collections.ConfigDict(dict(
        d_model=128, num_heads=4, num_kv_heads=2, head_dim=32, d_ff_expert=128))
    c.corpus.max_bytes = 3_000_000
    c.train.update(steps=1000, warmup_steps=50, domains=("code",), eval_every=250,
                   log_every=50, checkpoint_every=250)
  return c
