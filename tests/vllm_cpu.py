"""What the vLLM tests on a CPU-only machine share: engine args, environment, and vLLM's own offline
`LLM.generate` as the reference, run in a process of its own."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import textwrap

BLOCK = 32                 # vLLM's CPU backend needs a multiple of 32
MAX_MODEL_LEN = 1024
MAX_TOKENS = 24
ENGINE_ARGS = {"dtype": "float32", "enforce_eager": True, "block_size": BLOCK,
               "kv_cache_memory_bytes": "256MiB"}
# A 2-core box: no thread pinning, one OpenMP thread per engine; UCX on loopback for NIXL.
CPU_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": "1",
           "UCX_NET_DEVICES": "lo", "UCX_WARN_UNUSED_ENV_VARS": "n"}

_OFFLINE = textwrap.dedent("""
    import json, sys
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    if __name__ == "__main__":
        model, prompts, max_tokens = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
        max_len, args, extra = int(sys.argv[4]), json.loads(sys.argv[5]), json.loads(sys.argv[6])
        llm = LLM(model=model, max_model_len=max_len, **args)
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                            [SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw) for kw in extra],
                            use_tqdm=False)
        print("RESULT " + json.dumps([[list(o.outputs[0].token_ids), o.outputs[0].finish_reason]
                                      for o in outs]))
""")


# A random tiny model pads structured JSON with whitespace for ever; vLLM's engine-wide option
# (engine.args, as `vllm serve --structured-outputs-config`) keeps it compact.
COMPACT_JSON = {"structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": True}}


@contextlib.contextmanager
def deployment(cfg: dict, workdir, timeout: float = 240):
    """A started LocalDeployment of `cfg` under vLLM's CPU settings; stopped (killed if need be) after."""
    from slurmserve.tools.local_deployment import LocalDeployment

    with cpu_env():
        d = LocalDeployment(workdir, cfg)
        try:
            d.start(timeout=timeout)
            yield d
        finally:
            try:
                d.stop()
            finally:
                d.kill()


@contextlib.contextmanager
def cpu_env():
    saved = dict(os.environ)
    os.environ.update(CPU_ENV)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


class Offline:
    """vLLM's offline greedy LLM.generate on token-id prompts, started at once in its own process;
    `result()` waits for [[token_ids, finish_reason], ...]. `sampling` gives each prompt further
    SamplingParams arguments (penalties, say)."""

    def __init__(self, model_dir, token_prompts, max_tokens: int = MAX_TOKENS,
                 max_model_len: int = MAX_MODEL_LEN, sampling: list[dict] | None = None):
        args = dict(ENGINE_ARGS, kv_cache_memory_bytes=256 << 20)   # LLM() takes bytes, not "256MiB"
        sampling = sampling or [{} for _ in token_prompts]
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _OFFLINE, str(model_dir), json.dumps(token_prompts), str(max_tokens),
             str(max_model_len), json.dumps(args), json.dumps(sampling)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, **CPU_ENV, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
        self._result = None

    def result(self) -> list:
        if self._result is None:
            try:
                out, err = self.proc.communicate(timeout=240)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                out, err = self.proc.communicate()
            lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
            assert self.proc.returncode == 0 and lines, \
                f"offline vLLM failed ({self.proc.returncode}):\n{err[-4000:]}"
            self._result = json.loads(lines[-1][len("RESULT "):])
        return self._result

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()
