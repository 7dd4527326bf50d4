"""Routing statistics of a fleet: what the weights pool's expert policies would see.

Each model routes the same held-out text (the fleet's corpus, rebuilt from its seed: `windows`
windows of every domain); per MoE layer, from the experts each token chose (top-k):

- `load`: share of the layer's assignments per expert; `entropy`: its entropy over log E (1 =
  uniform); `hot_share`: the share of the top quarter of the experts (uniform: 0.25);
- layer-to-layer predictability, for each pair of consecutive MoE layers: a token's next-layer
  experts predicted from its current ones by co-occurrence counts (each next expert scored by
  how often it followed the token's current experts), fitted on the first half of the tokens
  and scored on the second as recall (predicted top-k against the chosen top-k); next to the
  prediction by popularity alone (the next layer's top-k most loaded experts, same halves) and
  chance (k / E);
- hot-expert overlap between models of one base (the base and its fine-tunes: expert e of a
  fine-tune descends from expert e of its base): per layer the Jaccard index of their hot
  experts (top quarter by load), averaged over layers; chance is the mean Jaccard of two random
  sets of that size.

The same statistics of a random-initialised model of each family (`random_init`, our own init
with the model's seed 0) are the baseline every other fleet here has.
"""

from __future__ import annotations

import itertools
import math

import jax.numpy as jnp
import numpy as np

from crosspool_jax.models.checkpoint import load_checkpoint
from crosspool_jax.models.config import ModelConfig
from crosspool_jax.models.model import forward_train, init_params
from crosspool_jax.train.corpus import build_corpus, sample_windows
from crosspool_jax.train.fleet import read_fleet
from crosspool_jax.train.objective import expert_ids


def routing(params: dict, cfg: ModelConfig, windows: np.ndarray, batch_size: int = 16
            ) -> np.ndarray:
  """The experts each token chose in each MoE layer, int32 [L, tokens, top_k]."""
  out = []
  for i in range(0, len(windows), batch_size):
    _, logits_LTE = forward_train(params, jnp.asarray(windows[i:i + batch_size]), cfg=cfg)
    out.append(np.asarray(expert_ids(logits_LTE, cfg)))
  return np.concatenate(out, axis=1)


def _hot(load_E: np.ndarray) -> set[int]:
  n = max(1, len(load_E) // 4)
  return set(np.argsort(-load_E, kind="stable")[:n].tolist())


def _recall(pred_TK: np.ndarray, ids_TK: np.ndarray) -> float:
  hits = (pred_TK[:, :, None] == ids_TK[:, None, :]).any(-1).sum()
  return float(hits / ids_TK.size)


def predictability(cur_TK: np.ndarray, nxt_TK: np.ndarray, num_experts: int) -> dict:
  """Recall of the next layer's experts: by co-occurrence with the current layer's, by
  popularity alone (both fitted on the first half of the tokens, scored on the second), and
  by chance."""
  half = len(cur_TK) // 2
  k = nxt_TK.shape[1]
  counts_EE = np.zeros((num_experts, num_experts))
  rows = np.repeat(cur_TK[:half], k, axis=1).ravel()
  np.add.at(counts_EE, (rows, np.tile(nxt_TK[:half], (1, cur_TK.shape[1])).ravel()), 1)
  scores_TE = counts_EE[cur_TK[half:]].sum(1)
  pred_TK = np.argsort(-scores_TE, axis=-1, kind="stable")[:, :k]
  popular_K = np.argsort(-np.bincount(nxt_TK[:half].ravel(), minlength=num_experts),
                         kind="stable")[:k]
  popular_TK = np.broadcast_to(popular_K, (len(cur_TK) - half, k))
  return {"cooccurrence": _recall(pred_TK, nxt_TK[half:]),
          "popularity": _recall(popular_TK, nxt_TK[half:]), "chance": k / num_experts}


def model_stats(ids_LTK: np.ndarray, num_experts: int) -> dict:
  """Per-layer load, entropy, hot share and layer-to-layer predictability of one model."""
  layers = []
  for ids_TK in ids_LTK:
    load_E = np.bincount(ids_TK.ravel(), minlength=num_experts) / ids_TK.size
    nonzero = load_E[load_E > 0]
    layers.append({"load": load_E.round(5).tolist(),
                   "entropy": float(-(nonzero * np.log(nonzero)).sum() / math.log(num_experts)),
                   "hot_share": float(np.sort(load_E)[::-1][:max(1, num_experts // 4)].sum())})
  pairs = [predictability(a, b, num_experts) for a, b in itertools.pairwise(ids_LTK)]
  mean = {key: float(np.mean([p[key] for p in pairs])) if pairs else None
          for key in ("cooccurrence", "popularity", "chance")}
  return {"layers": layers, "entropy": float(np.mean([x["entropy"] for x in layers])),
          "hot_share": float(np.mean([x["hot_share"] for x in layers])),
          "predictability": {"layers": pairs, "mean": mean}}


def hot_overlap(a: dict, b: dict) -> float:
  """Mean over layers of the Jaccard index of two models' hot experts (`model_stats` dicts)."""
  values = []
  for la, lb in zip(a["layers"], b["layers"], strict=True):
    ha, hb = _hot(np.asarray(la["load"])), _hot(np.asarray(lb["load"]))
    values.append(len(ha & hb) / len(ha | hb))
  return float(np.mean(values))


def chance_overlap(num_experts: int) -> float:
  """Mean Jaccard index of two independent uniformly random hot sets (a quarter of E each)."""
  h = max(1, num_experts // 4)
  total = 0.0
  for i in range(h + 1):  # i = size of the intersection, hypergeometric
    p = math.comb(h, i) * math.comb(num_experts - h, h - i) / math.comb(num_experts, h)
    total += p * i / (2 * h - i)
  return total


def fleet_stats(fleet_dir: str, *, windows: int = 16, log=print) -> dict:
  """The statistics of every model of a fleet (`scripts/make_fleet.py`) and of a random init
  of each of its families (module docstring)."""
  manifest = read_fleet(fleet_dir)
  config = manifest["config"]
  base = config["base"]
  models, random_init, texts = {}, {}, None
  for entry in manifest["models"]:
    cfg, params = load_checkpoint(entry["dir"])
    if texts is None:
      corpus = build_corpus(seed=manifest["seed"], vocab_size=cfg.vocab_size, **config["corpus"])
      rng = np.random.default_rng([manifest["seed"], 7])
      texts = np.concatenate([sample_windows(corpus.heldout, (d,), batch=windows,
                                             length=base["seq_len"] - 1, rng=rng)
                              for d in corpus.heldout])
    models[entry["id"]] = {"family": cfg.family, "base": entry["base"],
                           "domain": entry["domain"],
                           **model_stats(routing(params, cfg, texts), cfg.num_experts)}
    log(f"{entry['id']}: entropy {models[entry['id']]['entropy']:.3f}")
    if cfg.family not in random_init:
      random_init[cfg.family] = model_stats(routing(init_params(cfg, seed=0), cfg, texts),
                                            cfg.num_experts)
  overlap = {}
  for family in dict.fromkeys(m["family"] for m in models.values()):
    ids = [i for i, m in models.items() if m["family"] == family]
    num_experts = len(models[ids[0]]["layers"][0]["load"])
    overlap[family] = {"pairs": {f"{a}|{b}": hot_overlap(models[a], models[b])
                                 for a, b in itertools.combinations(ids, 2)},
                       "chance": chance_overlap(num_experts)}
  return {"fleet": fleet_dir, "tokens_per_model": int(texts.size), "models": models,
          "random_init": random_init, "hot_overlap": overlap}


def plot_stats(stats: dict, path: str) -> str:
  """Three panels: load entropy per model (random-init families dashed), layer-to-layer
  predictability (co-occurrence, popularity, chance) and the mean hot-expert overlap of each
  family's models; returns the PNG's path."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  ids = list(stats["models"])
  x = np.arange(len(ids))
  fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
  ax = axes[0]
  ax.bar(x, [stats["models"][i]["entropy"] for i in ids], color="tab:blue", label="trained")
  for family, s in stats["random_init"].items():
    xs = [j for j, i in enumerate(ids) if stats["models"][i]["family"] == family]
    ax.hlines(s["entropy"], min(xs) - 0.4, max(xs) + 0.4, colors="k", linestyles="--",
              label="random init" if family == next(iter(stats["random_init"])) else None)
  ax.set_ylabel("expert-load entropy / log E (mean over layers)")
  ax.set_ylim(0, 1.05)
  ax = axes[1]
  width = 0.27
  for j, (key, color) in enumerate((("cooccurrence", "tab:green"),
                                    ("popularity", "tab:orange"), ("chance", "grey"))):
    ax.bar(x + (j - 1) * width, [stats["models"][i]["predictability"]["mean"][key] or 0
                                 for i in ids], width, color=color, label=key)
  ax.set_ylabel("next-layer expert recall")
  for ax in axes[:2]:
    ax.set_xticks(x, ids, rotation=60, ha="right", fontsize=7)
    ax.legend(fontsize=7)
  ax = axes[2]
  families = list(stats["hot_overlap"])
  means = [np.mean(list(v["pairs"].values())) if v["pairs"] else 0
           for v in stats["hot_overlap"].values()]
  ax.bar(np.arange(len(families)), means, color="tab:purple", label="models of one base")
  ax.scatter(np.arange(len(families)), [v["chance"] for v in stats["hot_overlap"].values()],
             color="k", marker="_", s=400, label="chance")
  ax.set_xticks(np.arange(len(families)), families, fontsize=8)
  ax.set_ylabel("hot-expert Jaccard (mean over pairs, layers)")
  ax.legend(fontsize=7)
  fig.suptitle(f"routing of {stats['fleet']} ({stats['tokens_per_model']:,} held-out tokens "
               "per model)")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path

