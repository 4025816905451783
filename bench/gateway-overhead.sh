#!/bin/bash
# Latency the login-node gateway adds: the same `slurmserve bench serve` load, alternately straight to
# a job's head and through `slurmserve gateway`, in one run.
#
#   bench/gateway-overhead.sh JOB_ID [REPEATS] [extra `slurmserve bench serve` args...]
#
# JOB_ID is a ready job in your registry (`slurmserve submit ...; slurmserve wait JOB_ID`). The gateway
# is started here on 127.0.0.1:${GW_PORT:-8765} and stopped at the end. Results: runs/bench/gateway-overhead/.
set -euo pipefail
job=$1; repeats=${2:-3}; shift $(( $# >= 2 ? 2 : 1 ))
out=runs/bench/gateway-overhead
mkdir -p "$out"
state=$(python -c 'from slurmserve import registry; print(registry.state_dir())')
url=$(python -c "from slurmserve import registry; print(registry.read_entry('$job')['url'])")
model=$(python -c "from slurmserve import registry; print(registry.read_entry('$job')['model'])")
log_dir=$(python -c "from slurmserve import registry; print(registry.read_entry('$job')['log_dir'])")
head_pid=$(python -c "import json; print(json.load(open('$log_dir/endpoint.json'))['pid'])")
port=${GW_PORT:-8765}
slurmserve gateway --port "$port" > "$out/gateway.log" 2>&1 &
gw=$!
trap 'kill $gw' EXIT
until curl -sf "http://127.0.0.1:$port/health" > /dev/null; do sleep 0.2; done
load=(--model "$model" --concurrency 1 --num-prompts 500 --warmup 50 --input-len 32 --output-len 16 "$@")
for i in $(seq "$repeats"); do
  slurmserve bench serve --url "$url" --api-key-file "$log_dir/api_key" "${load[@]}" \
      --cpu-pid head="$head_pid" --result-json "$out/direct-$i.json" > /dev/null
  slurmserve bench serve --url "http://127.0.0.1:$port/v1" --api-key-file "$state/gateway_key" "${load[@]}" \
      --cpu-pid head="$head_pid" --cpu-pid gateway="$gw" --result-json "$out/gateway-$i.json" > /dev/null
done
python - "$out" "$repeats" <<'EOF'
import json, statistics, sys
out, n = sys.argv[1], int(sys.argv[2])
rows = {}
for kind in ("direct", "gateway"):
    runs = [json.load(open(f"{out}/{kind}-{i}.json")) for i in range(1, n + 1)]
    med = lambda f: statistics.median(f(r) for r in runs)
    rows[kind] = {"ttft_p50": med(lambda r: r["ttft_ms"]["p50"]), "e2e_p50": med(lambda r: r["e2e_ms"]["p50"]),
                  "e2e_p99": med(lambda r: r["e2e_ms"]["p99"]),
                  "gw_cpu": med(lambda r: r["cpu_ms_per_request"].get("gateway", float("nan"))),
                  "failed": sum(r["failed"] for r in runs)}
print(f"| path | TTFT p50 ms | E2E p50 ms | E2E p99 ms | gateway CPU ms/request | failed |  (median of {n})")
print("|---|---|---|---|---|---|")
for kind, r in rows.items():
    cpu = "-" if kind == "direct" else f"{r['gw_cpu']:.3f}"
    print(f"| {kind} | {r['ttft_p50']:.3f} | {r['e2e_p50']:.3f} | {r['e2e_p99']:.3f} | {cpu} | {r['failed']} |")
d, g = rows["direct"], rows["gateway"]
print(f"\ngateway adds: TTFT p50 {g['ttft_p50'] - d['ttft_p50']:+.3f} ms, E2E p50 {g['e2e_p50'] - d['e2e_p50']:+.3f} ms")
EOF
