"""The scheduler on the fake executor (no model): fairness, chunked prefill, preemption order,
out-of-band eviction, all checked by hand; tokens are fake_token(position), so a preempted
and recomputed request must still produce exactly the hand-computed output."""

import pytest

from crosspool_jax.engine.engine import EngineConfig
from crosspool_jax.engine.executors.api import FakeExecutor
from crosspool_jax.engine.request import Request, Status
from crosspool_jax.engine.scheduler import Scheduler
from crosspool_jax.models.sampling import INVALID_TOKEN, NO_TOKEN, SamplingParams
from crosspool_jax.pools.kv_pool import KVModelSpec, KVPool

# page_elems 64 with 2 KV heads x 16 dims: 1 token per page per layer; 1 layer.
PAGE_ELEMS = 64


def _setup(models=("a", "b", "c"), pages=200, token_budget=12, max_batch=4, max_tokens=64,
           decode_steps=1, max_prefill_chunk=0, short_prefills_first=False):
  pool = KVPool(page_elems=PAGE_ELEMS, pages_per_device=pages, policy="shared")
  for m in models:
    pool.register_model(KVModelSpec(m, num_layers=1, kv_heads=2, head_dim=16, max_context=64,
                                    max_batch=max_batch))
  sched = Scheduler({m: pool for m in models}, token_budget=token_budget, max_batch=max_batch,
                    max_tokens=max_tokens, decode_steps=decode_steps,
                    max_prefill_chunk=max_prefill_chunk,
                    short_prefills_first=short_prefills_first)
  return sched, pool, FakeExecutor()


def _request(rid, model, prompt_len, max_new, arrival):
  return Request(rid, model, list(range(1, prompt_len + 1)), SamplingParams(), max_new,
                 arrival_s=arrival)


def _step(sched, executor):
  batches = sched.schedule()
  results = executor.run_many(batches) if batches else []
  for batch, tokens in zip(batches, results, strict=True):
    (sched.commit if batch.decode_steps is None else sched.commit_many)(batch, tokens, now=0.0)
  return batches


def _fed(batches):
  """(request id, tokens fed) of each request of a step's batches."""
  return [(r.request_id, n) for b in batches for r, n in zip(b.requests, b.num_new, strict=True)]


def _serve(sched, executor, *requests):
  """Adds the requests and steps until nothing is left; returns what each step fed."""
  for r in requests:
    sched.add(r)
  fed = []
  while sched.has_work():
    fed.append(_fed(_step(sched, executor)))
  return fed


def _drain(sched, executor, limit=200):
  for _ in range(limit):
    if not sched.has_work():
      return
    _step(sched, executor)
  raise AssertionError("the scheduler did not finish")


def test_fair_shares_rotate_over_models():
  sched, _, ex = _setup(token_budget=12)
  for i, m in enumerate("abc"):
    for j in range(3):
      sched.add(_request(f"{m}{j}", m, prompt_len=20, max_new=1, arrival=i * 3 + j))
  first = _step(sched, ex)
  # every model gets a third of the budget: 4 prompt tokens of its oldest request
  assert [(b.model_id, [r.request_id for r in b.requests], b.num_new) for b in first] == [
      ("a", ["a0"], [4]), ("b", ["b0"], [4]), ("c", ["c0"], [4])]
  second = _step(sched, ex)
  assert [b.model_id for b in second] == ["b", "c", "a"]  # the round robin starts one further


def test_idle_models_share_goes_to_the_others():
  sched, _, ex = _setup(token_budget=12)
  sched.add(_request("a0", "a", prompt_len=30, max_new=1, arrival=0))
  sched.add(_request("b0", "b", prompt_len=30, max_new=1, arrival=1))
  batches = _step(sched, ex)
  assert sorted((b.model_id, b.num_new) for b in batches) == [("a", [6]), ("b", [6])]


def test_chunked_prefill_then_decode_gives_the_hand_computed_tokens():
  sched, pool, ex = _setup(models=("a",), token_budget=4)
  req = _request("r", "a", prompt_len=10, max_new=3, arrival=0)
  sched.add(req)
  fed = [_step(sched, ex)[0].num_new for _ in range(5)]
  assert fed == [[4], [4], [2], [1], [1]]
  assert not sched.has_work()
  assert req.output_ids == [ex.fake_token(p) for p in (10, 11, 12)]
  assert req.status == Status.FINISHED and req.finish_reason == "length"
  assert pool.used_pages == 0


def test_a_prefill_chunk_limit_spreads_long_prompts_and_keeps_the_tokens():
  sched, pool, ex = _setup(models=("a",), token_budget=12, max_prefill_chunk=3)
  long, short = (_request("long", "a", prompt_len=10, max_new=2, arrival=0),
                 _request("short", "a", prompt_len=4, max_new=2, arrival=1))
  fed = _serve(sched, ex, long, short)
  # by hand: no request feeds more than 3 tokens a step though the budget has room; a
  # decode (1 pending token) goes before the prompt chunks
  assert fed == [[("long", 3), ("short", 3)], [("short", 1), ("long", 3)],
                 [("short", 1), ("long", 3)], [("long", 1)], [("long", 1)]]
  assert long.output_ids == [ex.fake_token(p) for p in (10, 11)]
  assert short.output_ids == [ex.fake_token(p) for p in (4, 5)]
  assert pool.used_pages == 0
  with pytest.raises(ValueError, match="max_prefill_chunk must be >= 0"):
    _setup(max_prefill_chunk=-1)
  with pytest.raises(ValueError, match="max_prefill_chunk must be an integer >= 0"):
    EngineConfig(max_prefill_chunk=-1)


@pytest.mark.parametrize("short_first", [False, True])
def test_short_prefills_first_lets_a_short_prompt_pass_a_long_one(short_first):
  # budget 4 (so one chunk is 4 tokens): a 10-token prompt, then a 3-token one behind it
  sched, pool, ex = _setup(models=("a",), token_budget=4, short_prefills_first=short_first)
  long, short = (_request("long", "a", prompt_len=10, max_new=2, arrival=0),
                 _request("short", "a", prompt_len=3, max_new=2, arrival=1))
  fed = _serve(sched, ex, long, short)
  if short_first:
    # by hand: the short prompt fits a chunk, the long one (10 > 4 pending) feeds what it
    # leaves; once the long one's pending tokens fit a chunk (2), it is short too
    assert fed == [[("short", 3), ("long", 1)], [("short", 1), ("long", 3)], [("long", 4)],
                   [("long", 2)], [("long", 1)]]
  else:  # first come, first served: the short prompt waits until the long one's last chunk
    assert fed == [[("long", 4)], [("long", 4)], [("long", 2), ("short", 2)],
                   [("long", 1), ("short", 1)], [("short", 1)]]
  assert long.output_ids == [ex.fake_token(p) for p in (10, 11)]
  assert short.output_ids == [ex.fake_token(p) for p in (3, 4)]
  assert pool.used_pages == 0
  with pytest.raises(ValueError, match="short_prefills_first must be a bool"):
    EngineConfig(short_prefills_first=1)


def test_short_prefills_first_waits_for_a_free_row_and_feeds_the_running():
  # max_batch 2: two long prompts (8 > 3 pending) hold both rows when a short one arrives;
  # it sorts first but cannot be admitted, and the running ones are still fed
  sched, pool, ex = _setup(models=("a",), token_budget=8, max_batch=2, max_prefill_chunk=3,
                           short_prefills_first=True)
  l1, l2, short = (_request("l1", "a", prompt_len=8, max_new=1, arrival=0),
                   _request("l2", "a", prompt_len=8, max_new=1, arrival=1),
                   _request("short", "a", prompt_len=2, max_new=1, arrival=2))
  sched.add(l1)
  sched.add(l2)
  fed = [_fed(_step(sched, ex)), *_serve(sched, ex, short)]
  assert fed == [[("l1", 3), ("l2", 3)], [("l1", 3), ("l2", 3)], [("l1", 2), ("l2", 2)],
                 [("short", 2)]]
  assert (l1.output_ids, l2.output_ids, short.output_ids) == (
      [ex.fake_token(8)], [ex.fake_token(8)], [ex.fake_token(2)])
  assert pool.used_pages == 0


def test_preempted_requests_are_recomputed_exactly():
  # 8 usable pages, 1 token per page: two requests of 3 + 4 tokens cannot both finish.
  sched, pool, ex = _setup(models=("a", "b"), pages=9, token_budget=16)
  old = _request("old", "a", prompt_len=3, max_new=4, arrival=0)
  new = _request("new", "b", prompt_len=3, max_new=4, arrival=1)
  sched.add(old)
  sched.add(new)
  _step(sched, ex)  # both prefilled: 6 pages
  assert old.status == new.status == Status.RUNNING
  _drain(sched, ex)
  assert old.preemptions + new.preemptions >= 1
  for r in (old, new):
    assert r.output_ids == [ex.fake_token(p) for p in range(3, 7)]
  pool.check_invariants()
  assert pool.used_pages == 0


def test_pages_taken_between_steps_are_requeued_not_lost():
  sched, pool, ex = _setup(models=("a",), token_budget=16)
  reqs = [_request(f"r{i}", "a", prompt_len=4, max_new=3, arrival=i) for i in range(3)]
  for r in reqs:
    sched.add(r)
  _step(sched, ex)
  victims = pool.set_limit(8)  # out of band: the scheduler is not told
  assert victims == ["r2"]
  assert [r.request_id for r in sched.requeue_evicted()] == ["r2"]
  assert reqs[2].status == Status.WAITING and reqs[2].num_cached == 0
  pool.set_limit(pool.capacity)
  _drain(sched, ex)
  assert all(r.output_ids == [ex.fake_token(p) for p in (4, 5, 6)] for r in reqs)


def test_an_invalid_token_fails_its_request_only():
  sched, pool, ex = _setup(models=("a",))
  good = _request("good", "a", prompt_len=2, max_new=2, arrival=0)
  bad = _request("bad", "a", prompt_len=2, max_new=2, arrival=1)
  sched.add(good)
  sched.add(bad)
  (batch,) = sched.schedule()
  out = sched.commit(batch, [ex.fake_token(2), INVALID_TOKEN], now=1.0)
  assert [(r.request_id, tok, reason) for r, tok, reason in out] == [
      ("good", 2, None), ("bad", None, "error")]
  assert bad.status == Status.FAILED and "non-finite logits at position 2" in bad.error
  assert not pool.has_request("bad") and pool.has_request("good")


def test_remove_model_returns_its_queue_and_pages():
  sched, pool, ex = _setup(models=("a", "b"))
  for i in range(3):
    sched.add(_request(f"a{i}", "a", prompt_len=5, max_new=2, arrival=i))
  sched.add(_request("b0", "b", prompt_len=5, max_new=2, arrival=9))
  _step(sched, ex)
  gone = sched.remove_model("a")
  assert [r.request_id for r in gone] == ["a0", "a1", "a2"]
  assert pool.requests == ["b0"]
  with pytest.raises(ValueError, match="already scheduled"):
    sched.add_model("b", pool)


def test_multistep_reserves_what_fits_and_commits_by_the_one_step_rules():
  # 15 usable pages, 1 token per page: a (prompt 3, 12 new) and b (prompt 3, 2 new)
  sched, pool, ex = _setup(models=("a",), pages=16, token_budget=16, decode_steps=4)
  a = _request("a", "a", prompt_len=3, max_new=12, arrival=0)
  b = _request("b", "a", prompt_len=3, max_new=2, arrival=1)
  sched.add(a)
  sched.add(b)
  (prefill,) = _step(sched, ex)
  assert prefill.decode_steps is None and pool.used_pages == 6
  (batch,) = sched.schedule()
  # a: 4 tokens (positions 3..6 fed), b: only 1 left to generate
  assert batch.decode_steps == [4, 1] and pool.used_pages == 3 + 4 + 3 + 1
  (tokens,) = ex.run_many([batch])
  out = sched.commit_many(batch, tokens, now=1.0)
  assert [(r.request_id, t, why) for r, t, why in out] == (
      [("a", ex.fake_token(p), None) for p in range(4, 8)] + [("b", ex.fake_token(4), "length")])
  assert a.num_cached == 7 and a.num_pending == 1 and not pool.has_request("b")
  pool.check_invariants()
  pool.set_limit(9)  # 2 free pages: 1 for the pending token, 1 more: 2 steps, none preempted
  assert [b.decode_steps for b in _step(sched, ex)] == [[2]]
  assert a.num_cached == 9 and pool.used_pages == 9
  pool.set_limit(10)  # 1 free page: 1 step, the 1-step path
  (batch,) = sched.schedule()
  assert batch.decode_steps is None and batch.num_new == [1]
  sched.commit(batch, ex.run_many([batch])[0], now=2.0)
  assert pool.preemptions == 0 and a.preemptions == 0
  pool.set_limit(pool.capacity)
  _drain(sched, ex)
  assert a.output_ids == [ex.fake_token(p) for p in range(3, 15)]
  assert a.finish_reason == "length" and pool.used_pages == 0
  pool.check_invariants()


def test_multistep_commit_stops_on_a_stop_id_or_invalid_token_and_returns_every_page():
  sched, pool, ex = _setup(models=("a",), token_budget=16, decode_steps=4)
  reqs = [_request(f"r{i}", "a", prompt_len=2, max_new=9, arrival=i) for i in range(3)]
  reqs[0].stop_ids = frozenset({ex.fake_token(4)})
  for r in reqs:
    sched.add(r)
  _step(sched, ex)
  (batch,) = sched.schedule()
  assert batch.decode_steps == [4, 4, 4] and pool.used_pages == 3 * 6
  tokens = ex.run_many([batch])[0]
  tokens[1, 1] = INVALID_TOKEN  # r1's second token of the dispatch
  out = sched.commit_many(batch, tokens, now=1.0)
  assert [(r.request_id, t, why) for r, t, why in out] == [
      ("r0", 3, None), ("r0", 4, "stop"), ("r1", 3, None), ("r1", None, "error"),
      ("r2", 3, None), ("r2", 4, None), ("r2", 5, None), ("r2", 6, None)]
  assert reqs[0].output_ids == [2, 3, 4] and reqs[1].status == Status.FAILED
  assert pool.requests == ["r2"] and pool.used_pages == 6  # reserved but unused pages too
  pool.check_invariants()
  bad = tokens.copy()
  bad[2, :] = NO_TOKEN
  bad[2, 0] = 7
  batch.decode_steps = [4, 4, 0]
  with pytest.raises(RuntimeError, match="past the 0 its KV pages were reserved for"):
    sched.commit_many(batch, bad, now=2.0)
