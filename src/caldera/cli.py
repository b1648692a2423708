"""The ``caldera`` command: ``caldera train RUN.toml [--set section.key=value ...]``, ``caldera launch -n N -- cmd``."""

from __future__ import annotations

import argparse
import sys

from caldera.config import ConfigError


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``caldera`` command."""
    parser = argparse.ArgumentParser(prog="caldera", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="train from a run file (alone, or under mpiexec/srun)")
    p_train.add_argument("config", help="run file (.toml or .yaml)")
    p_train.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                         help="override a config value, e.g. --set optim.lr=3e-4 (repeatable)")  # fmt: skip
    p_launch = sub.add_parser(
        "launch", help="start N ranks with mpiexec (or srun inside Slurm): launch -n N -- cmd"
    )
    p_launch.add_argument("-n", "--ranks", type=int, required=True, help="number of ranks")
    p_launch.add_argument("--launcher", choices=["auto", "mpiexec", "srun"], default="auto")
    p_launch.add_argument("cmd", nargs=argparse.REMAINDER, help="-- command to run on every rank")
    p_check = sub.add_parser("check", help="validate a run file and print the resolved config")
    p_check.add_argument("config")
    p_check.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = parser.parse_args(argv)
    if args.command == "launch":
        from caldera.launch import launch

        cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
        try:
            return launch(args.ranks, cmd, args.launcher)
        except (RuntimeError, ValueError) as exc:
            sys.stderr.write(f"caldera launch: error: {exc}\n")
            return 2

    from caldera.config import load_config

    try:
        cfg = load_config(args.config, args.set)
        if args.command == "check":
            print(cfg.model_dump_json(indent=2))
            return 0
        from caldera.train.run import train

        train(cfg, args.config)
    except ConfigError as exc:
        _error(str(exc))
        return 2
    return 0


def _error(message: str) -> None:
    """Print a config error once per job (rank 0), not once per rank."""
    from caldera.world import launched_size

    rank = 0
    if launched_size() > 1:
        from caldera.world import init

        rank = init().rank
    if rank == 0:
        sys.stderr.write(f"caldera: error: {message}\n")


if __name__ == "__main__":
    sys.exit(main())
