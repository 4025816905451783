"""Start a local deployment (the embedded default: tiny model, four sim workers), ask it one
chat question through the openai client, and shut it down. Used by `make demo`."""

import json
import pathlib
import signal
import subprocess
import sys
import time
import urllib.request

from openai import OpenAI

log_dir = pathlib.Path("runs/default")
endpoint_file = log_dir / "endpoint.json"
endpoint_file.unlink(missing_ok=True)
proc = subprocess.Popen([sys.executable, "-m", "slurmserve", "serve", "--make-model"])
try:
    deadline = time.time() + 120
    while True:
        if proc.poll() is not None:
            sys.exit(f"slurmserve serve exited with {proc.returncode}")
        if endpoint_file.exists():
            info = json.loads(endpoint_file.read_text())
            try:
                with urllib.request.urlopen(f"http://{info['host']}:{info['port']}/health") as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
        if time.time() > deadline:
            sys.exit("deployment did not become ready in 120 s")
        time.sleep(0.2)
    key = pathlib.Path(info["api_key_file"]).read_text().strip()
    client = OpenAI(base_url=info["url"], api_key=key)
    reply = client.chat.completions.create(
        model=info["model"], messages=[{"role": "user", "content": "hello world"}], max_tokens=16)
    print(f"\n{info['model']} at {info['url']} answered: {reply.choices[0].message.content!r}")
    print(f"usage: {reply.usage.model_dump()}")
finally:
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=30)
