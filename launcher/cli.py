"""The `slurmserve` command line."""

from __future__ import annotations

import argparse
import sys

from slurmserve import __version__
from slurmserve.config import ConfigError, DeploymentConfig, dump_config, load_config


def _add_config_args(p: argparse.ArgumentParser, optional: bool = False) -> None:
    if optional:
        p.add_argument("config", nargs="?", help="deployment YAML (default: the embedded default)")
    else:
        p.add_argument("config", help="deployment YAML")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set pools.workers=2 (repeatable)")


def _load(args) -> DeploymentConfig:
    return load_config(args.config, args.overrides)


def cmd_config_validate(args) -> int:
    cfg = _load(args)
    sys.stdout.write(dump_config(cfg))
    print(f"# ok: {cfg.world_size} MPI ranks", file=sys.stderr)
    return 0


def cmd_run(args) -> int:
    from slurmserve.launcher.rank_main import run_rank
    return run_rank(_load(args))


def cmd_serve(args) -> int:
    from slurmserve.launcher.local import serve
    cfg = _load(args)
    if args.make_model and not cfg.model.path.exists():
        from slurmserve.tools.tiny_model import make_tiny_model
        make_tiny_model(cfg.model.path)
    if not cfg.model.path.is_dir():
        raise ConfigError(f"model.path: {cfg.model.path} is not a directory "
                          f"(create the demo model with `slurmserve model make-tiny {cfg.model.path}`)")
    if cfg.api_key_file is not None:   # at once, not after every rank has started
        from slurmserve.router.head import HeadError, read_api_key_file
        try:
            read_api_key_file(cfg.api_key_file)
        except HeadError as e:
            raise ConfigError(str(e)) from None
    return serve(cfg, args.config, args.overrides)


def cmd_make_tiny(args) -> int:
    from slurmserve.tools import tiny_model
    return tiny_model.run(args)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="slurmserve", description="Slurm-native LLM serving.")
    ap.add_argument("--version", action="version", version=f"slurmserve {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("config", help="inspect deployment configs")
    csub = p.add_subparsers(dest="config_command", required=True, metavar="SUBCOMMAND")
    v = csub.add_parser("validate", help="print the resolved config, or every error with its key path")
    _add_config_args(v, optional=True)
    v.set_defaults(func=cmd_config_validate)

    p = sub.add_parser("run", help="run one rank of a deployment (under mpirun or srun)")
    _add_config_args(p, optional=True)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("serve", help="run a deployment on this machine (starts mpirun)")
    _add_config_args(p, optional=True)
    p.add_argument("--make-model", action="store_true",
                   help="create the tiny demo model at model.path if it does not exist")
    p.set_defaults(func=cmd_serve)

    from slurmserve.bench.cli import register as register_bench
    register_bench(sub)
    from slurmserve.launcher.slurm_cli import register as register_slurm
    register_slurm(sub)
    from slurmserve.launcher.batch.cli import register as register_batch
    register_batch(sub)
    from slurmserve.gateway.cli import register as register_gateway
    register_gateway(sub)

    p = sub.add_parser("model", help="model utilities")
    msub = p.add_subparsers(dest="model_command", required=True, metavar="SUBCOMMAND")
    t = msub.add_parser("make-tiny", help="generate a tiny random-weight Llama with its tokenizer")
    from slurmserve.tools import tiny_model
    tiny_model.add_arguments(t)
    t.set_defaults(func=cmd_make_tiny)
    return ap


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
    except ConfigError as e:
        print(f"slurmserve: {e}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)
