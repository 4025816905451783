"""The simulated engine's parts, split as nano-vllm splits its engine; runtime/sim_engine.py is the
Engine over them.

  request.py       one request's state (tokens, blocks, output)
  block_pool.py    paged KV blocks, the prefix cache, their KV events
  sampler.py       the next token and its logprobs (the simulated model)
  scheduler.py     waiting/running queues, admission, preemption, one `step()`, the step-time model
  kv_connector.py  disaggregation: the prefill leg's handoff, real KV pulls between instances
  kv_bytes.py      the deterministic KV bytes a prefill instance writes and a decode instance checks
  mirror.py        followers that mirror the leader's steps when an instance spans several ranks
"""
