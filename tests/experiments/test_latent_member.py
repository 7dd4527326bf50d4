"""The CPU experiments' DeepSeek-V2 member (latent rows in the fleet's pages): memory_utilisation's
tiny DeepSeek-V2 next to tiny Mixtral, served by the experiment runner under every policy,
gives each of its requests the tokens of `generate` alone."""

import ml_collections

from crosspool_jax.experiments.config_lib import length_dist
from crosspool_jax.experiments.runner import run_experiment
from crosspool_jax.experiments.serving import fleet_model_config
from crosspool_jax.models.decode import generate
from crosspool_jax.models.model import init_params
from crosspool_jax.models.sampling import SamplingParams
from crosspool_jax.workloads import prompt_ids, read_jsonl
from tests.experiments.test_run_experiment import experiment_config

MODELS = ("deepseek_v2_4", "mixtral_0")


def test_memory_utilisation_deepseek_member_equals_the_reference(tmp_path):
  config = experiment_config("memory_utilisation.py", "cpu")
  fleet = config.fleet
  assert fleet.deepseek_v2_4.family == "deepseek_v2"
  config.fleet = ml_collections.ConfigDict({m: fleet[m] for m in MODELS})
  w = config.workload
  w.popularity, w.num_requests, w.random_bursts = ",".join(MODELS), 8, 0
  # one prompt and output length: `generate` compiles once for every reference
  w.prompt_len, w.output_len = length_dist("constant", value=40), length_dist("constant", value=6)
  outputs = {}
  r = run_experiment(config, log=lambda msg: None, outputs=outputs, trace_dir=str(tmp_path))
  assert [run["name"] for run in r["runs"]] == ["static", "shared", "crosspool"]
  s = r["config"]["sampling"]
  checked = 0
  for i, rec in enumerate(read_jsonl(tmp_path / "trace.jsonl")):
    if rec.model_id != "deepseek_v2_4":
      continue
    entry = config.fleet[rec.model_id]
    cfg = fleet_model_config(entry)
    assert cfg.mla and cfg.kv_stores == 1
    want = generate(init_params(cfg, seed=entry.seed), cfg,
                    [prompt_ids(rec, cfg.vocab_size, low=w.prompt_low)],
                    max_new_tokens=rec.max_new_tokens,
                    sampling=SamplingParams(temperature=s["temperature"], top_k=s["top_k"],
                                            top_p=s["top_p"], seed=rec.seed))[0]
    for run in r["runs"]:
      assert outputs[f"{run['name']}@"][f"r{i:05d}"] == want, (run["name"], i)
      checked += 1
  assert checked >= 6  # at least 2 DeepSeek requests, under each policy
  assert r["outputs_agree"][""]["all_same"]
