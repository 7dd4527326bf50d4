"""Memory policies resolved by name, their config validation, and the one placement rule."""

import numpy as np
import pytest

from crosspool_jax.engine import EngineConfig
from crosspool_jax.engine.policies import POLICIES, get_policy
from crosspool_jax.engine.policies.placement import (
  fill_closed_form,
  lay_out_kv,
  pages_that_fit,
  place,
)
from crosspool_jax.models.config import tiny_config


def test_registry_order_is_baselines_first():
  assert list(POLICIES) == ["static", "shared", "crosspool", "crosspool_partitioned"]
  assert all(get_policy(name).name == name for name in POLICIES)
  assert [get_policy(n).pools_experts for n in POLICIES] == [False, False, True, True]


@pytest.mark.parametrize("kwargs, error", [
    (dict(kv_policy="paged"), r"kv_policy must be one of \('static', 'shared', 'crosspool', "
                              r"'crosspool_partitioned'\), got 'paged'"),
    (dict(kv_policy="shared", weight_devices=(1,)),
     r"a shared engine has no weights devices, got weight_devices=\(1,\)"),
    (dict(kv_policy="static", devices=(0, 1), weight_devices=(2, 3)),
     "a static engine has no weights devices"),
    (dict(kv_policy="crosspool_partitioned", weight_devices=(1,), expert_policy="mru"),
     "unknown policy 'mru'"),
])
def test_engine_config_is_validated_by_its_policy(kwargs, error):
  with pytest.raises(ValueError, match=error):
    EngineConfig(**kwargs)


def test_models_go_in_fleet_order_to_the_least_loaded_device():
  # room per device: 100 - 2 pages of 5 = 90 B
  p = place({"a": 60, "b": 50, "c": 20, "d": 45}, num_devices=2, device_bytes=100, page_bytes=5)
  # a -> 0, b -> 1, c -> 1 (50 < 60), d -> 0 (60 < 70) would be 105 > 90: no room
  assert p.device == {"a": 0, "b": 1, "c": 1} and p.tp == {"a": 1, "b": 1, "c": 1}
  assert p.resident == [60, 70]
  assert p.not_fit == {"d": "weights 45 B do not fit next to 60 B on the emptiest device (of "
                            "100 B, 2 KV pages kept)"}


def test_a_split_model_takes_fresh_devices_first():
  weights = {"a": 10, "big": 170, "b": 20}
  p = place(weights, num_devices=4, device_bytes=100, page_bytes=5, split=True)
  assert p.device == {"a": 2, "big": 0, "b": 3} and p.tp == {"a": 1, "big": 2, "b": 1}
  assert p.resident == [85, 85, 10, 20]
  alone = place(weights, num_devices=4, device_bytes=100, page_bytes=5)
  assert alone.not_fit == {"big": "weights 170 B do not fit on one device of 100 B with 2 KV "
                                  "pages each"}
  assert alone.device == {"a": 0, "b": 1}


def test_appending_a_model_never_moves_the_others():
  rng = np.random.default_rng(0)
  for _ in range(50):
    weights = {f"m{i}": int(w) for i, w in enumerate(rng.integers(1, 60, size=8))}
    full = place(weights, num_devices=3, device_bytes=200, page_bytes=5)
    for n in range(1, len(weights)):
      prefix = place(dict(list(weights.items())[:n]), num_devices=3, device_bytes=200,
                     page_bytes=5)
      assert prefix.device == {m: d for m, d in full.device.items() if m in prefix.device}


def test_kv_buffers_are_equal_and_the_rest_is_stranded():
  cfgs = {"a": tiny_config("mixtral"), "b": tiny_config("mixtral")}
  layout = lay_out_kv(cfgs, {"a": 3000, "b": 5000}, num_devices=2, device_bytes=10_000,
                      page_elems=512, page_bytes=2048)
  assert pages_that_fit(device_bytes=10_000, resident_bytes=3000, page_bytes=2048) == 3
  assert layout.pages_per_device == 2  # (10000 - 5000) // 2048 on the loaded device
  # Stranded: all but weights and the 2-page buffer: next to "a" one more page and 856 B,
  # next to "b" 904 B (less than a page).
  assert layout.accounting["stranded_bytes_per_kv_device"] == [10_000 - 3000 - 2 * 2048,
                                                               10_000 - 5000 - 2 * 2048]
  assert layout.accounting["stranded_bytes"] == 2904 + 904
  assert layout.page_tokens == {"a": 8, "b": 8}  # 512 / (2 x 2 heads x 16)
  assert pages_that_fit(device_bytes=10_000, resident_bytes=0, page_bytes=1000,
                        reserve_fraction=0.25) == 7
  with pytest.raises(ValueError, match="reserve_fraction"):
    pages_that_fit(device_bytes=10_000, resident_bytes=0, page_bytes=1000, reserve_fraction=1)


def test_fill_closed_form_by_hand():
  # 10 pages, 2 layers, 4 tokens a page, requests of up to 6 tokens (2 pages a layer):
  # 2 whole requests (8 pages) and 1 page a layer of a third: 6 + 6 + 4.
  assert fill_closed_form(10, 2, 4, 6) == 16
  assert fill_closed_form(10, 2, 4, 6, rows=2) == 12
  assert fill_closed_form(10, 2, 4, 6, rows=3) == 16
