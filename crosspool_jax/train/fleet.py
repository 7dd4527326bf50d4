"""A trained cold fleet: one base per family, then fine-tunes of each base on single domains.

Production cold fleets are mostly fine-tunes of a few bases; this builds that shape from a
seed. Per family (in config order): a base trained from our own init on every corpus domain
(`config.base`), then one fine-tune per domain of `config.finetune_domains`, each starting
from the base's params with a fresh optimizer (`config.finetune`; `trainable="experts"` tunes
the routed experts only). Every model is written as an HF checkpoint with its byte-level
tokenizer (`export.export_model`) into `out/<id>/`, ids `<family>_base` and
`<family>_<domain>`, and `out/fleet.json` lists them with their held-out losses on every
domain. One corpus (from `config.seed`) serves every model. A fleet can be built a family at
a time into one directory (`build_fleet` keeps the other families' models of the same config).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable

from crosspool_jax.models.config import FAMILIES, tiny_config
from crosspool_jax.models.model import init_params
from crosspool_jax.train.corpus import DOMAINS, build_corpus
from crosspool_jax.train.export import export_model
from crosspool_jax.train.trainer import evaluate, heldout_windows, train, train_config

FLEET_FILE = "fleet.json"


def _check(config) -> None:
  unknown = [f for f in config.families if f not in FAMILIES]
  if unknown or not config.families:
    raise ValueError(f"fleet families must be a non-empty subset of {FAMILIES}, got "
                     f"{tuple(config.families)}")
  if len(set(config.families)) != len(config.families):
    raise ValueError(f"fleet families repeat: {tuple(config.families)}")
  bad = [d for d in config.finetune_domains if d not in DOMAINS]
  if bad or len(set(config.finetune_domains)) != len(config.finetune_domains):
    raise ValueError(f"fleet finetune_domains must be distinct domains of {DOMAINS}, got "
                     f"{tuple(config.finetune_domains)}")


def _kept_models(out_dir: str, recipe: dict, families) -> tuple[list[dict], dict]:
  """The models (and build seconds) an existing fleet in `out_dir` keeps: those of families
  this build does not make, if it was built from the same recipe (the config but its
  families); none if there is no fleet there."""
  path = os.path.join(out_dir, FLEET_FILE)
  if not os.path.exists(path):
    return [], {}
  with open(path) as f:
    previous = json.load(f)
  if previous["config"] != recipe:
    raise ValueError(f"{out_dir} holds a fleet built from another config (seed, corpus, "
                     "model, base, finetune or finetune_domains differ); build into another "
                     "--out")
  kept = [m for m in previous["models"] if m["family"] not in families]
  return kept, {f: s for f, s in previous["build_s"].items() if f not in families}


def build_fleet(config, out_dir: str, *, log: Callable[[str], None] = print) -> dict:
  """Trains and writes the fleet of `config` (`configs/train/fleet.py`) into `out_dir`.

  A fleet already in `out_dir` built from the same config but other families keeps its
  models (so a fleet can be built a family at a time); one of another config is refused.

  Returns:
    The manifest written to `out_dir/fleet.json`: seed, corpus summary, families, build
    seconds per family (and "corpus": building the corpus, summed over the builds), the
    config without its families, and per model its id, family, base (None for a base), domain
    ("all" for a base), directory (relative to `out_dir`), training seconds and held-out
    cross-entropy per domain.
  """
  _check(config)
  recipe = json.loads(json.dumps(config.to_dict()))  # as fleet.json holds it
  families = recipe.pop("families")
  kept, build_s = _kept_models(out_dir, recipe, families)
  start = time.perf_counter()
  base_tc = train_config(config.base, seed=config.seed, domains=DOMAINS)
  ft_tc = train_config(config.finetune, seed=config.seed)
  os.makedirs(out_dir, exist_ok=True)
  # Byte-level ids do not depend on the vocabulary's size (its fillers come last).
  corpus = build_corpus(seed=config.seed, vocab_size=tiny_config(config.families[0],
                                                                 **config.model).vocab_size,
                        **config.corpus)
  windows = heldout_windows(corpus, base_tc)
  models = []

  def save(cfg, model_id, params, **entry):
    export_model(os.path.join(out_dir, model_id), cfg, params)
    heldout = evaluate(params, cfg, windows, base_tc.batch_size)
    models.append({"id": model_id, "family": cfg.family, **entry, "dir": model_id,
                   "heldout": heldout})
    log(f"{model_id}: held-out ce {json.dumps({d: round(v, 4) for d, v in heldout.items()})}")

  for family in families:
    family_start = time.perf_counter()
    cfg = tiny_config(family, **config.model)
    log(f"{family}: base, {base_tc.steps} steps on {', '.join(DOMAINS)}")
    base = train(cfg, init_params(cfg, seed=config.seed), corpus, base_tc, log=log)
    base_id = f"{family}_base"
    save(cfg, base_id, base.params, base=None, domain="all", train_s=round(base.wall_s, 2))
    for j, domain in enumerate(config.finetune_domains):
      tc = dataclasses.replace(ft_tc, domains=(domain,), seed=config.seed + 1 + j)
      log(f"{family}: fine-tune on {domain}, {tc.steps} steps ({tc.trainable})")
      tuned = train(cfg, base.params, corpus, tc, log=log)
      save(cfg, f"{family}_{domain}", tuned.params, base=base_id, domain=domain,
           train_s=round(tuned.wall_s, 2))
    build_s[family] = round(time.perf_counter() - family_start, 2)
  build_s["corpus"] = round(build_s.get("corpus", 0.0) + time.perf_counter() - start
                            - sum(build_s[f] for f in families), 2)
  models = kept + models
  manifest = {"seed": config.seed, "corpus": corpus.summary(),
              "families": list(dict.fromkeys(m["family"] for m in models)),
              "build_s": build_s, "models": models, "config": recipe}
  with open(os.path.join(out_dir, FLEET_FILE), "w") as f:
    json.dump(manifest, f, indent=1)
  return manifest


def read_fleet(fleet_dir: str) -> dict:
  """The manifest of a fleet directory, each model's `dir` made a full path."""
  path = os.path.join(fleet_dir, FLEET_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{fleet_dir} is not a fleet directory (no {FLEET_FILE}; build "
                            "one with scripts/make_fleet.py)")
  with open(path) as f:
    manifest = json.load(f)
  for model in manifest["models"]:
    model["dir"] = os.path.join(fleet_dir, model["dir"])
  return manifest
