"""The ``attune`` command line: the process's entry point and composition root.

    attune [--config PATH] run                 every configured platform (else the default front end)
    attune [--config PATH] chat [--user NAME]  talk to the bot in this terminal
    attune [--config PATH] config show         the effective settings, secrets masked
    attune config sections                     each platform's section, documented, to paste into config.toml
    attune [--config PATH] train [--user U | --all] [--dry-run]    the nightly training, now
    attune [--config PATH] adapters list | rollback --user U       the adapters it made
    attune [--config PATH] keys new | rotate                        the database's encryption key

This is the process's entry point; ``attune.wiring`` puts the parts together.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version

import tomli_w

from agent_core.config import CONFIG_ENV, Config, ConfigError, effective_settings
from agent_core.llm.model_files import ModelNotFound
from attune import keys_cli, training_cli
from attune.wiring import load_config, open_agent, platform_sections, setup_logging
from storage import DatabaseError
from storage.crypto import EncryptionError

log = logging.getLogger("attune")

EXIT_CONFIG = 2
EXIT_STARTUP = 1


def _version() -> str:
    try:
        return version("attune")
    except PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        metavar="PATH",
        default=argparse.SUPPRESS,
        help=f"settings file (default: ${CONFIG_ENV}, else ./config.toml)",
    )
    common.add_argument(
        "--log-level",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        default=argparse.SUPPRESS,
        help="override [logging] level",
    )
    parser = argparse.ArgumentParser(
        prog="attune",
        parents=[common],
        description="attune: a chat bot that learns each of its users from their reactions.",
    )
    parser.add_argument("--version", action="version", version=f"attune {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("run", parents=[common], help="start every configured platform (default: the terminal chat)")
    chat = sub.add_parser("chat", parents=[common], help="talk to the bot in this terminal")
    chat.add_argument("--user", help="who you are (default: your login name)")
    config = sub.add_parser("config", parents=[common], help="inspect the configuration")
    config_sub = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    config_sub.add_parser("show", parents=[common], help="print the effective settings, secrets masked")
    config_sub.add_parser(
        "sections", parents=[common], help="print every platform's [section] with its defaults and notes"
    )
    training_cli.add_commands(sub, common)
    keys_cli.add_commands(sub, common)
    return parser


SECTIONS_HEADER = "# Each platform's settings, with their defaults, from its module in bots/ (as in config.toml).\n\n"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "config" and args.config_command == "sections":  # documentation: needs no settings file
        print(SECTIONS_HEADER + platform_sections(), end="")
        return 0
    try:
        config = load_config(getattr(args, "config", None))
    except ConfigError as exc:
        print(f"attune: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    setup_logging(getattr(args, "log_level", None) or config.settings.logging.level, config)
    if args.command == "config":
        source = f"# effective settings (file: {config.source or 'none, defaults'}; environment overrides applied)\n"
        print(source + tomli_w.dumps(effective_settings(config)), end="")
        return 0
    try:
        if args.command in ("train", "adapters"):
            return asyncio.run(training_cli.run(config, args))
        if args.command == "keys":
            return asyncio.run(keys_cli.run(config, args))
        return asyncio.run(_serve(config, user=getattr(args, "user", None), chat=args.command == "chat"))
    except (DatabaseError, EncryptionError, ModelNotFound) as exc:
        print(f"attune: {exc}", file=sys.stderr)
        return EXIT_STARTUP
    except KeyboardInterrupt:
        return 130


async def _serve(config: Config, *, user: str | None, chat: bool) -> int:
    from attune.disk_space import watch_free_space
    from bots import configured_connectors
    from bots.supervisor import run_connectors
    from bots.terminal import TerminalConnector

    agent = await open_agent(config)
    try:
        stop = asyncio.Event()
        loading = agent.load_model()  # platforms connect while it loads; replies wait for it
        loading.add_done_callback(lambda done: done.cancelled() or done.exception() is None or stop.set())
        if chat:
            connectors = [TerminalConnector(agent, config, user=user)]
        else:
            connectors = [cls(agent, config) for cls in configured_connectors(config)]
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        nightly = None
        if not chat and config.settings.training.enabled:
            from scheduler import NightlyScheduler

            storage = config.settings.storage
            nightly = NightlyScheduler(agent.training, config.settings.training, storage.sqlalchemy_url,
                                       prune=agent.store.delete_messages_before)  # fmt: skip
            nightly.start()
        disk = asyncio.create_task(watch_free_space(config.settings))
        try:
            await run_connectors(connectors, config.settings.run, stop)
        finally:
            disk.cancel()
            if nightly is not None:
                await nightly.stop()
        if loading.done() and not loading.cancelled() and (failure := loading.exception()) is not None:
            raise failure  # the model could not load (main() reports it)
        return 0
    finally:
        await agent.close()


if __name__ == "__main__":
    raise SystemExit(main())
