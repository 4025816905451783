"""`slurmserve batch`: offline batch generation with a local deployment, and `slurmserve batch merge`.

    slurmserve batch CONFIG -i IN.jsonl -o OUT.jsonl [--errors ERR.jsonl] [--shard i/n] [--ordered]
    slurmserve batch merge -i IN.jsonl -o OUT.jsonl [--errors ERR.jsonl]

A batch run is a normal deployment whose config has a `batch:` section (set here with `--set`
overrides, so `slurmserve sbatch|submit --batch IN.jsonl ...` and submitit's `launch` run the same
thing in Slurm); its head sends the file through its own API (launcher/batch/driver.py) and exits.
Run the same command again, by hand or by a requeue, and it resumes where the output ends.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from slurmserve.config import ConfigError
from slurmserve.launcher.batch import files as bf


def _yaml_str(value: str) -> str:
    """A `--set` value that stays a string whatever it holds (YAML single-quoted scalar)."""
    return "'" + value.replace("'", "''") + "'"


def batch_overrides(input: str | Path, output: str | Path, errors: str | Path | None = None,
                    shard: str | None = None, ordered: bool = False, report=None) -> list[str]:
    """The `--set` overrides that make a deployment a batch run, after checking what can be checked
    before anything starts: the input is readable, the shard is well-formed, duplicate custom_ids
    (reported through `report(line)`, default stderr)."""
    inp, out = Path(input).expanduser().resolve(), Path(output).expanduser().resolve()
    if not inp.is_file():
        raise bf.BatchError(f"-i {input}: no such file")
    if out == inp:
        raise bf.BatchError("-o: the output must not be the input file")
    shard_ = bf.resolve_shard(shard)
    scan = bf.scan_input(inp, shard_)
    for msg in scan.report():
        (report or (lambda m: print(f"slurmserve batch: {inp}: {m}", file=sys.stderr)))(msg)
    sets = [f"batch.input={_yaml_str(str(inp))}", f"batch.output={_yaml_str(str(out))}"]
    if errors:
        sets.append(f"batch.errors={_yaml_str(str(Path(errors).expanduser().resolve()))}")
    if shard:
        sets.append(f"batch.shard={_yaml_str(shard.strip())}")
    if ordered:
        sets.append("batch.ordered=true")
    return sets


def add_batch_file_args(p, required: bool = True) -> None:
    p.add_argument("-i", "--input", required=required, metavar="IN.jsonl",
                   help="OpenAI batch input: one {custom_id, method, url, body} per line")
    p.add_argument("-o", "--output", required=required, metavar="OUT.jsonl",
                   help="answers, appended; an existing file is resumed (done custom_ids are skipped)")
    p.add_argument("--errors", metavar="ERR.jsonl", help="error records here (default: in OUT.jsonl)")


def cmd_batch(args) -> int:
    try:
        if args.config == "merge":
            return _merge(args)
        return _run(args)
    except bf.BatchError as e:
        print(f"slurmserve batch: {e}", file=sys.stderr)
        return 2


def _merge(args) -> int:
    counts = bf.merge(Path(args.input), Path(args.output), Path(args.errors) if args.errors else None)
    print(json.dumps(counts))
    print(f"merged {counts['shards']} shards into {args.output}: every input line has one record",
          file=sys.stderr)
    return 0


def _run(args) -> int:
    from slurmserve.config import load_config
    from slurmserve.launcher.local import serve
    from slurmserve.launcher.batch.driver import INCOMPLETE_EXIT, summary_of

    overrides = list(args.overrides) + batch_overrides(args.input, args.output, args.errors, args.shard,
                                                       args.ordered)
    if args.max_inflight:
        overrides.append(f"batch.max_inflight={args.max_inflight}")
    cfg = load_config(args.config, overrides)
    if not cfg.model.path.is_dir():
        raise ConfigError(f"model.path: {cfg.model.path} is not a directory")
    shard = bf.resolve_shard(cfg.batch.shard)
    output = bf.shard_path(cfg.batch.output, shard)
    # ranks of a killed run may still be writing: say so now, not from inside the new deployment
    bf.check_no_writer([output] + ([bf.shard_path(cfg.batch.errors, shard)] if cfg.batch.errors else []))
    if sys.stderr.isatty():
        os.environ["SLURMSERVE_BATCH_BAR"] = "1"      # the head draws a progress bar (mpirun passes it on)
    rc = serve(cfg, args.config, overrides)
    summary = summary_of(output) if rc in (0, INCOMPLETE_EXIT) else None   # else it may be an old run's
    if summary is not None:
        print(json.dumps(summary, indent=2))
    if rc == INCOMPLETE_EXIT:
        print(f"slurmserve batch: stopped before the end; run the same command again to resume "
              f"({output})", file=sys.stderr)
    return rc


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "batch", help="run an OpenAI batch file through a local deployment (or `batch merge`)",
        description="Run an OpenAI batch file (chat and completions lines) through a deployment on this "
                    "machine; resumable. `slurmserve batch merge -i IN -o OUT [--errors ERR]` combines "
                    "the OUT.shard-I-of-N.jsonl outputs of `--shard` runs and checks completeness.")
    p.add_argument("config", help="deployment YAML, or `merge`")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (repeatable)")
    add_batch_file_args(p)
    p.add_argument("--shard", metavar="I/N", help="do input lines L with (L-1) mod N == I; output "
                   "OUT.shard-I-of-N.jsonl (default: from SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT)")
    p.add_argument("--ordered", action="store_true", help="write records in input order")
    p.add_argument("--max-inflight", type=int, metavar="N",
                   help="requests in flight (default: twice the engines' batch capacity)")
    p.set_defaults(func=cmd_batch, command="batch")
