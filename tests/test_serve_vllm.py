"""End to end with real vLLM: `slurmserve serve` (real mpirun) with vLLM CPU engines, driven through the
openai client.

Two deployments, each started once for the module: aggregated (head + 1 worker) and disaggregated
(head + 1 prefill + 1 decode, KV over NIXL). Greedy outputs are checked against vLLM's own offline
`LLM.generate` on the same prompt token ids (in a subprocess, like tests/test_vllm_engine.py); the
disaggregated deployment must answer exactly like the aggregated one, report the decode instance's
KV transfer, and keep answering correctly (through the fallback) once its prefill instance is killed.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time

import openai
import psutil
import pytest

import vllm_cpu
from slurmserve.tools.local_deployment import LocalDeployment
from slurmserve.tools.local_deployment import metric_value as metric
from slurmserve.router.tokenizer import Tokenizer
from vllm_cpu import BLOCK, ENGINE_ARGS, MAX_MODEL_LEN, MAX_TOKENS, Offline

pytestmark = pytest.mark.vllm

MODEL = "tiny-llama"
# Token-id prompts of 40, 70 and 100 tokens (1, 2 and 3 full blocks), distinct from the first token on.
TOKEN_PROMPTS = [[(7 * i + 13 * k) % 300 + 10 for i in range(n)] for k, n in ((1, 40), (2, 70), (3, 100))]
# vLLM's penalties on the first prompt, greedy: served and offline must agree, and differ from plain greedy.
PENALTIES = {"presence_penalty": 0.5, "frequency_penalty": 1.0, "repetition_penalty": 1.5}
CHAT = [{"role": "system", "content": "you are a helpful assistant ."},
        {"role": "user", "content": "what is the capital of france ? tell me about its history too ."}]


def vllm_config(model_dir, **pools) -> dict:
    return {
        "model": {"path": str(model_dir), "name": MODEL, "max_model_len": MAX_MODEL_LEN},
        "engine": {"kind": "vllm", "args": ENGINE_ARGS},
        "pools": pools,
        "router": {"host": "127.0.0.1", "port": 0, "policy": "round_robin",
                   "disagg": {"min_uncached_tokens": 0, "min_uncached_fraction": 0.0}},   # always remote
        "runtime": {"heartbeat_interval_s": 0.5, "heartbeat_timeout_s": 2.0},
    }


def wait_for(cond, timeout: float, what: str, poll: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(poll)


# ---- fixtures -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cpu_env():
    with vllm_cpu.cpu_env():
        yield


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return Tokenizer(tiny_model_dir)


@pytest.fixture(scope="module")
def prompts(tok):
    """(kind, prompt, token ids): three token-id completions and one chat."""
    return ([("completion", p, p) for p in TOKEN_PROMPTS]
            + [("chat", CHAT, tok.apply_chat_template(CHAT))])


@pytest.fixture(scope="module")
def offline(cpu_env, tiny_model_dir, prompts):
    """The prompts greedy, then the first one greedy with PENALTIES."""
    ids = [ids for _, _, ids in prompts]
    off = Offline(tiny_model_dir, ids + ids[:1], sampling=[{} for _ in ids] + [PENALTIES])
    yield off
    off.kill()


def _deployment(tmp_path_factory, model_dir, name, **pools):
    dep = LocalDeployment(tmp_path_factory.mktemp(name), vllm_config(model_dir, **pools))
    try:
        dep.start(timeout=240)
    except BaseException:
        dep.kill()
        raise
    return dep


def engine_processes(pid: int) -> list[psutil.Process]:
    """An engine rank and its children (vLLM's engine core, the watchdog), which `dep.pids()`
    cannot see: their command lines do not name the config."""
    try:
        p = psutil.Process(pid)
        return [p] + p.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _teardown(dep, extra=()) -> None:
    procs = [p for i in dep.info.get("instances", []) for p in engine_processes(i["pid"])] + list(extra)
    try:
        rc = dep.stop()
    finally:
        dep.kill()
    left = []
    deadline = time.monotonic() + 5
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except psutil.NoSuchProcess:
            continue
        except psutil.TimeoutExpired:
            left.append((p.pid, p.name()))
            p.kill()
    assert not left, f"engine processes outlived the deployment: {left}"
    assert rc == 0, f"serve exited with {rc}:\n" + (dep.dir / "serve.log").read_text(errors="replace")[-6000:]


@pytest.fixture(scope="module")
def agg(cpu_env, offline, tiny_model_dir, tmp_path_factory):
    dep = _deployment(tmp_path_factory, tiny_model_dir, "vllm-agg", workers=1)
    yield dep
    _teardown(dep)


@pytest.fixture(scope="module")
def disagg(cpu_env, tiny_model_dir, tmp_path_factory):
    dep = _deployment(tmp_path_factory, tiny_model_dir, "vllm-1p1d", prefill=1, decode=1)
    dep.orphans = []   # processes of a killed instance: must be gone at teardown
    yield dep
    _teardown(dep, dep.orphans)


def ask(client, kind, prompt, **kw):
    """(text, completion_tokens, finish_reason) of one greedy request."""
    if kind == "chat":
        r = client.chat.completions.create(model=MODEL, messages=prompt, max_tokens=MAX_TOKENS,
                                           temperature=0, **kw)
        return r.choices[0].message.content, r.usage.completion_tokens, r.choices[0].finish_reason
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, **kw)
    return r.choices[0].text, r.usage.completion_tokens, r.choices[0].finish_reason


def ask_stream(client, kind, prompt):
    opts = dict(model=MODEL, max_tokens=MAX_TOKENS, temperature=0, stream=True,
                stream_options={"include_usage": True})
    if kind == "chat":
        chunks = list(client.chat.completions.create(messages=prompt, **opts))
        parts = [(c.choices[0].delta.content or "", c.choices[0].finish_reason) for c in chunks if c.choices]
    else:
        chunks = list(client.completions.create(prompt=prompt, **opts))
        parts = [(c.choices[0].text, c.choices[0].finish_reason) for c in chunks if c.choices]
    assert len(parts) > 2, "tokens must arrive over several chunks"
    return "".join(p for p, _ in parts), chunks[-1].usage.completion_tokens, parts[-1][1]


@pytest.fixture(scope="module")
def agg_answers(agg, prompts):
    c = agg.client(timeout=60)
    return [ask(c, kind, prompt) for kind, prompt, _ in prompts]


# ---- aggregated ---------------------------------------------------------------------------------

def test_aggregated_matches_offline_llm(offline, agg_answers, prompts, tok):
    want = offline.result()[:len(prompts)]
    for (kind, _, ids), (text, n, finish), (want_ids, want_finish) in zip(prompts, agg_answers, want):
        assert want_ids, "the offline engine generated nothing"
        assert (text, n, finish) == (tok.decode(want_ids), len(want_ids), want_finish), kind


def test_an_instance_over_two_nodes_matches_offline_llm(cpu_env, offline, prompts, tok, tiny_model_dir,
                                                        tmp_path_factory):
    """engine.nodes_per_instance 2 with tensor_parallel_size 2: the instance's leader rank runs
    vLLM's multi-node executor, its follower rank that node's worker headless (vLLM's --headless).
    Greedy answers equal the single-process offline ones (it was refused before). A follower rank
    killed with SIGKILL takes its node's worker with it (its watchdog); the clean stop of such an
    instance is checked on the Slurm test cluster (test_slurm_launcher.py)."""
    cfg = vllm_config(tiny_model_dir, workers=1)
    cfg["engine"] = dict(cfg["engine"], nodes_per_instance=2, tensor_parallel_size=2)
    dep = LocalDeployment(tmp_path_factory.mktemp("vllm-tp2"), cfg)
    try:
        dep.start(timeout=300)
        ranks = {pid for pid in dep.pids()                         # `python -m slurmserve run CONFIG`
                 if psutil.Process(pid).cmdline()[1:4] == ["-m", "slurmserve", "run"]}
        (follower,) = [psutil.Process(pid) for pid in ranks - {dep.info["pid"], dep.info["instances"][0]["pid"]}]
        tree = [follower] + follower.children(recursive=True)
        assert len(tree) > 1, "the follower rank runs its node's worker"
        c = dep.client(timeout=120)
        got = [ask(c, kind, prompt) for kind, prompt, _ in prompts]
        workers = [p for p in tree if "Worker" in p.name()]
        assert workers, [p.name() for p in tree]
        follower.kill()
        gone, alive_ = psutil.wait_procs(workers, timeout=10)
        assert not alive_, f"the follower's workers outlived it: {[p.pid for p in alive_]}"
    finally:
        dep.kill()
    psutil.wait_procs(tree, timeout=10)
    assert not [p for p in tree if alive(p)], "processes of the follower rank outlived the deployment"
    for (text, n, finish), (want_ids, want_finish) in zip(got, offline.result()[:len(prompts)]):
        assert (text, n, finish) == (tok.decode(want_ids), len(want_ids), want_finish)


def test_penalties_reach_vllm(agg, offline, prompts, tok):
    """presence, frequency and repetition penalties are vLLM's own: the served answer equals vLLM's
    offline one with the same penalties, which is not the plain greedy answer."""
    kind, prompt, _ = prompts[0]
    c = agg.client(timeout=60)
    text, n, finish = ask(c, kind, prompt, presence_penalty=PENALTIES["presence_penalty"],
                          frequency_penalty=PENALTIES["frequency_penalty"],
                          extra_body={"repetition_penalty": PENALTIES["repetition_penalty"]})
    greedy_ids, penalized = offline.result()[0], offline.result()[-1]
    assert penalized[0] != greedy_ids[0], "the penalties must change vLLM's answer for this test to mean anything"
    assert (text, n, finish) == (tok.decode(penalized[0]), len(penalized[0]), penalized[1])


def test_n_choices_are_vllm_seeded_samples(agg, prompts):
    """n > 1 with a seed: choice i is what vLLM samples for one request with seed + i (its
    parallel sampling's rule), at temperature 1."""
    _, prompt, _ = prompts[1]
    c = agg.client(timeout=60)
    args = dict(model=MODEL, prompt=prompt, max_tokens=8, temperature=1.0)
    singles = [c.completions.create(seed=11 + i, **args).choices[0].text for i in range(2)]
    assert singles[0] != singles[1]
    assert [ch.text for ch in c.completions.create(n=2, seed=11, **args).choices] == singles


def test_aggregated_streaming_equals_non_streaming(agg, agg_answers, prompts):
    c = agg.client(timeout=60)
    for (kind, prompt, _), answer in zip(prompts, agg_answers):
        assert ask_stream(c, kind, prompt) == answer, kind


def test_aggregated_kv_events_reach_head(agg, agg_answers):
    # The earlier requests filled full blocks; an unseen prompt of 2 full blocks must add an event
    # (one BlockStored event may carry several blocks).
    before = wait_for(lambda: metric(agg.metrics(), "slurmserve:kv_events_total", type="BlockStored",
                                     instance="0"), 5, "BlockStored events of the earlier requests")
    agg.client(timeout=60).completions.create(model=MODEL, prompt=[300 - i for i in range(2 * BLOCK + 5)],
                                              max_tokens=2, temperature=0)
    wait_for(lambda: metric(agg.metrics(), "slurmserve:kv_events_total", type="BlockStored",
                            instance="0") > before, 5, "a BlockStored event of the new prompt")
    assert metric(agg.metrics(), "slurmserve:kv_event_gaps_total") == 0


# ---- disaggregated ------------------------------------------------------------------------------

def test_disaggregated_matches_aggregated(disagg, agg_answers, prompts):
    c = disagg.client(timeout=60)
    answers = [ask(c, kind, prompt) for kind, prompt, _ in prompts]
    assert answers == agg_answers
    assert ask_stream(c, *prompts[-1][:2]) == agg_answers[-1]
    m = disagg.metrics()
    n = len(prompts) + 1
    assert metric(m, "slurmserve:disagg_requests_total", path="remote_prefill") == n
    assert metric(m, "slurmserve:disagg_requests_total", path=re.compile("fallback.*")) == 0

    # The decode instance got every prompt's full blocks over NIXL (reported in its heartbeats);
    # the prefill instance computed them and received nothing.
    roles = {i["role"]: str(i["index"]) for i in disagg.info["instances"]}
    full_blocks = sum(len(ids) // BLOCK * BLOCK for _, _, ids in prompts)   # the streamed repeat hits the cache

    def external(role):
        return metric(disagg.metrics(), "slurmserve:instance_prompt_tokens_external_total",
                      instance=roles[role], role=role)

    wait_for(lambda: external("decode") >= full_blocks, 5, "the decode instance's KV transfer in a heartbeat")
    assert external("prefill") == 0


def test_disaggregated_kv_events_from_both_instances(disagg):
    roles = {i["role"]: str(i["index"]) for i in disagg.info["instances"]}
    c = disagg.client(timeout=60)
    c.completions.create(model=MODEL, prompt=[200 + (i % 50) for i in range(3 * BLOCK + 1)], max_tokens=2,
                         temperature=0)

    def stored(role):
        return metric(disagg.metrics(), "slurmserve:kv_events_total", type="BlockStored", instance=roles[role])

    wait_for(lambda: stored("prefill") > 0 and stored("decode") > 0, 5,
             "BlockStored events from the prefill and the decode instance")
    assert metric(disagg.metrics(), "slurmserve:kv_event_gaps_total") == 0


def test_prefill_killed_falls_back(disagg, agg_answers, prompts):
    """SIGKILL the prefill instance under load: requests started after the kill are answered
    correctly by the decode instance alone; ones in flight may fail (their KV may be unreachable)."""
    prefill = next(i for i in disagg.info["instances"] if i["role"] == "prefill")
    decode = next(i for i in disagg.info["instances"] if i["role"] == "decode")
    disagg.orphans = engine_processes(prefill["pid"])   # must all go with the rank (see teardown)
    c = disagg.client(timeout=60)
    results: list[tuple[float, int, object]] = []   # (start time, prompt index, answer or exception)
    stop = threading.Event()
    killed = {"at": float("inf")}

    def load(offset):
        i = offset
        while not stop.is_set():
            k = i % len(prompts)
            started = time.monotonic()
            try:
                results.append((started, k, ask(c, *prompts[k][:2])))
            except openai.APIError as e:
                results.append((started, k, e))
            i += 1

    threads = [threading.Thread(target=load, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: len(results) >= 4, 30, "requests before the kill")
        time.sleep(0.2)   # and some in flight
        killed["at"] = time.monotonic()
        os.kill(prefill["pid"], signal.SIGKILL)
        # until the head has dropped the prefill instance and a few requests went to decode alone
        wait_for(lambda: sum(s > killed["at"] for s, _, _ in results) >= 8
                 and metric(disagg.metrics(), "slurmserve:instance_up", instance=prefill["index"]) == 0,
                 60, "requests after the kill")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=90)
    before = [(k, r) for s, k, r in results if s < killed["at"]]
    after = [(k, r) for s, k, r in results if s > killed["at"]]
    assert len(before) >= 2, "no load before the kill"
    for k, r in before:
        assert isinstance(r, openai.APIError) or r == agg_answers[k], (k, r)
    for k, r in after:
        assert r == agg_answers[k], (k, r)

    m = disagg.metrics()
    assert metric(m, "slurmserve:disagg_requests_total", path=re.compile("fallback.*")) > 0
    assert metric(m, "slurmserve:instance_up", instance=decode["index"]) == 1
    # the killed rank's engine core (and everything else it started) went with it
    wait_for(lambda: not any(map(alive, disagg.orphans)), 10, "the killed instance's engine core to exit")
    # and the decode instance keeps serving: one more of each prompt
    for k, (kind, prompt, _) in enumerate(prompts):
        assert ask(c, kind, prompt) == agg_answers[k]
