r"""A trained cold fleet (`scripts/make_fleet.py`): one base per family, K fine-tunes each.

  python scripts/make_fleet.py --out=workdir/fleet
  python scripts/make_fleet.py --config=configs/train/fleet.py \
      --config.finetune.trainable=experts --out=workdir/fleet_experts_only
  # seconds (what the tests run):
  python scripts/make_fleet.py --config=configs/train/fleet.py:smoke --out=/tmp/fleet_smoke

Blocks: `families` (one base each, `tiny_config(family, **model)`), `seed` (inits, the corpus,
the batches), `corpus` (`build_corpus`), `base` and `finetune` (`trainer.TrainConfig` fields;
a base trains on every domain, a fine-tune on its one domain), `finetune_domains` (K = their
number; each base gets one fine-tune per domain). The default builds 4 bases and 12 fine-tunes.
"""

from __future__ import annotations

import ml_collections

from crosspool_jax.experiments.config_lib import config_variant
from crosspool_jax.models.config import FAMILIES
from crosspool_jax.train.corpus import DOMAINS


def _train_block(*, steps, warmup_steps, learning_rate, batch_size, seq_len, eval_batches,
                 log_every):
  block = ml_collections.ConfigDict(dict(
      steps=steps, batch_size=batch_size, seq_len=seq_len, learning_rate=learning_rate,
      warmup_steps=warmup_steps, final_lr_ratio=0.1, weight_decay=0.1, clip_norm=1.0, b1=0.9,
      b2=0.95, trainable="all", eval_every=steps, eval_batches=eval_batches,
      log_every=log_every, checkpoint_every=0))
  # None: the family's HF default (objective.AUX_LOSS_COEF).
  block.aux_loss_coef = ml_collections.config_dict.placeholder(float)
  return block


def get_config(arg: str | None = None):
  """The default fleet; arg "smoke" gives the seconds-long variant of the tests."""
  variant = config_variant("fleet", arg, ("default", "smoke"))
  smoke = variant == "smoke"
  c = ml_collections.ConfigDict()
  c.variant = variant
  c.families = FAMILIES
  c.model = ml_collections.ConfigDict()
  c.seed = 0
  c.corpus = ml_collections.ConfigDict(dict(
      max_bytes=20_000 if smoke else 600_000, heldout_fraction=0.1))
  size = dict(batch_size=4, seq_len=32, eval_batches=1) if smoke else dict(
      batch_size=16, seq_len=128, eval_batches=4)
  c.base = _train_block(steps=3 if smoke else 300, warmup_steps=1 if smoke else 30,
                        learning_rate=3e-3, log_every=1 if smoke else 50, **size)
  c.finetune = _train_block(steps=2 if smoke else 100, warmup_steps=0 if smoke else 10,
                            learning_rate=1e-3, log_every=1 if smoke else 50, **size)
  c.finetune_domains = DOMAINS[:2] if smoke else DOMAINS
  return c
