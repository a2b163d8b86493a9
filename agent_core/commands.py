"""Slash commands, platform-neutral: every connector reuses these handlers.

Each command is a :class:`CommandSpec` (name, usage, summary, handler). Platforms with
a native command system register the specs there; text platforms send ``/name args``
through :func:`parse_command`. A wrong use gets the usage back, never a trace.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from statistics import fmean

from agent_core import reward_model
from agent_core.events import Attachment
from agent_core.memory import MAX_NOTE_CHARS, Memory, listing
from agent_core.operations import Operations, UnknownUser
from agent_core.policy import StylePolicy, realisation_counts
from agent_core.steering import PREFERENCE as STEERING
from agent_core.steering import ReplySteering
from agent_core.stores import CommandStore
from agent_core.style import DIMENSIONS, describe_asked_and_shown, is_valid

log = logging.getLogger(__name__)

FORGET_CONFIRM_SECONDS = 120.0
FREE_TEXT_PREFS = {"language": 60, "persona": 300}  # key -> longest value
UNSET = {"auto", "default", "unset"}


class UsageError(Exception):
    """The command was used wrongly; the message says how."""


@dataclass(frozen=True)
class CommandResult:
    text: str
    private: bool = False  # personal data: send ephemerally or directly where possible
    attachment: Attachment | None = None


@dataclass(frozen=True)
class Caller:
    """Who runs a command: the core's user, on which platform, and whether an admin
    (``[access] admins``)."""

    user_id: int
    platform: str
    admin: bool = False


Handler = Callable[["Commands", Caller, str], Awaitable[CommandResult]]


@dataclass(frozen=True)
class CommandSpec:
    name: str
    usage: str
    summary: str
    handler: Handler
    private: bool = False


def row_id(text: str) -> int | None:
    """``text`` as a database row number, or None (not digits, or too big for SQLite)."""
    if not text.isascii() or not text.isdigit():
        return None
    number = int(text)
    return number if number < 2**63 else None


def parse_command(text: str) -> tuple[str, str] | None:
    """``"/prefs tone formal"`` -> ``("prefs", "tone formal")``; None if not a command."""
    stripped = text.strip()
    if not stripped.startswith("/") or len(stripped) < 2 or not stripped[1].isalpha():
        return None
    head, _, args = stripped[1:].partition(" ")
    return head.split("@", 1)[0].lower(), args.strip()


class Commands:
    """The command table and the state some commands keep (pending confirmations)."""

    def __init__(
        self,
        store: CommandStore,
        policy: StylePolicy,
        *,
        describe_model: Callable[[], str],
        operations: Operations | None = None,
        steering: ReplySteering | None = None,
        memory: Memory | None = None,
    ) -> None:
        self.store = store
        self.memory = memory  # /remember keeps a note as "remember that ..." does
        self.policy = policy
        self.describe_model = describe_model
        self.operations = operations  # for /admin and /forget all (the adapter files)
        self.steering = steering  # each user's reward model (/prefs steering, /stats, /export, reset learning)
        self._forget_pending: dict[int, float] = {}  # user id -> deadline of "/forget all"
        self._link_failures: dict[int, list[float]] = {}  # user id -> times of wrong /link codes
        self.specs: dict[str, CommandSpec] = {s.name: s for s in SPECS}

    async def run(self, caller: Caller, name: str, args: str) -> CommandResult:
        spec = self.specs.get(name)
        if spec is None:
            return CommandResult(f"Unknown command /{name}. Type /help for the list.")
        try:
            return await spec.handler(self, caller, args)
        except UsageError as exc:
            return CommandResult(f"{exc}\nUsage: {spec.usage}", private=spec.private)


async def _help(cmds: Commands, caller: Caller, args: str) -> CommandResult:
    if args:
        spec = cmds.specs.get(args.lstrip("/").lower())
        if spec is None:
            raise UsageError(f"No command /{args.lstrip('/')}.")
        return CommandResult(f"{spec.usage}\n{spec.summary}")
    lines = ["Commands:"] + [f"  {s.usage}  —  {s.summary}" for s in cmds.specs.values()]
    lines.append("React to any reply (👍 👎 ❤️ ...) to teach me what you like.")
    return CommandResult("\n".join(lines))


SWITCHES = {STEERING: ("on", "off")}  # key -> its values, the first the default


def _show_prefs(prefs: dict[str, str]) -> str:
    lines = ["Your preferences (auto = learned from your reactions):"]
    lines += [f"  {dim}: {prefs.get(dim, 'auto')}  ({' | '.join(values)})" for dim, values in DIMENSIONS.items()]
    lines += [f"  {key}: {prefs.get(key, '(not set)')}" for key in FREE_TEXT_PREFS]
    lines += [f"  {key}: {prefs.get(key, values[0])}  ({' | '.join(values)}: whether what you like steers my replies)"
              for key, values in SWITCHES.items()]  # fmt: skip
    return "\n".join(lines)


async def _prefs(cmds: Commands, caller: Caller, args: str) -> CommandResult:
    words = args.split()
    if not words:
        return CommandResult(_show_prefs(await cmds.store.preferences(caller.user_id)), private=True)
    key = words[0].lower().rstrip(":=")
    if key == "reset" and [w.lower() for w in words[1:]] == ["learning"]:
        await cmds.policy.reset(caller.user_id)
        if cmds.steering is not None:
            await cmds.steering.reset(caller.user_id)
        retired = await cmds.store.training.retire_adapters(caller.user_id)
        return CommandResult(
            "I forgot what I had learned about your style and what you like in my replies"
            + (", and your own adapter no longer answers you" if retired else "")
            + "; I'll learn it again from your reactions.",
            True,
        )
    if key == "reset":
        keys = [k.lower() for k in words[1:]]
        unknown = [k for k in keys if k not in DIMENSIONS and k not in FREE_TEXT_PREFS and k not in SWITCHES]
        if unknown:
            raise UsageError(f"Unknown preference {unknown[0]!r}.")
        await cmds.store.clear_preferences(caller.user_id, keys or None)
        return CommandResult("Preferences reset.\n" + _show_prefs(await cmds.store.preferences(caller.user_id)), True)
    if "=" in words[0]:  # "/prefs tone=formal"
        key, _, first = words[0].partition("=")
        words = [key, first, *words[1:]]
        key = key.lower()
    value = " ".join(words[1:]).strip()
    if key in DIMENSIONS:
        value = value.lower()
        if value in UNSET:
            await cmds.store.clear_preferences(caller.user_id, [key])
            return CommandResult(f"{key} is back to auto: I'll learn it from your reactions.", True)
        if not is_valid(key, value):
            raise UsageError(f"{key} must be one of: {', '.join(DIMENSIONS[key])} (or auto).")
    elif key in SWITCHES:
        value = value.lower()
        if value not in SWITCHES[key]:
            raise UsageError(f"{key} must be one of: {', '.join(SWITCHES[key])}.")
        if value == SWITCHES[key][0]:
            await cmds.store.clear_preferences(caller.user_id, [key])
            return CommandResult(f"{key} is {value}.", True)
    elif key in FREE_TEXT_PREFS:
        if not value:
            raise UsageError(f"Give a value for {key}.")
        if value.lower() in UNSET:
            await cmds.store.clear_preferences(caller.user_id, [key])
            return CommandResult(f"{key} cleared.", True)
        if len(value) > FREE_TEXT_PREFS[key]:
            raise UsageError(f"{key} can be at most {FREE_TEXT_PREFS[key]} characters.")
    else:
        raise UsageError(f"Unknown preference {key!r}.")
    await cmds.store.set_preference(caller.user_id, key, value)
    return CommandResult(f"Set {key} to {value}.", private=True)


async def _remember(cmds: Commands, caller: Caller, args: str) -> CommandResult:
    if not args:
        raise UsageError("Tell me what to remember.")
    if len(args) > MAX_NOTE_CHARS:
        raise UsageError(f"A note can be at most {MAX_NOTE_CHARS} characters.")
    if cmds.memory is not None:
        return CommandResult(await cmds.memory.remember(caller.user_id, args), private=True)
    note_id = await cmds.store.add_memory(caller.user_id, args)
    return CommandResult(f"I'll remember that (note #{note_id}).", private=True)


async def _forget(cmds: Commands, caller: Caller, args: str) -> CommandResult:
    words = args.lower().split()
    if not words:
        notes = await cmds.store.list_memories(caller.user_id, 50)
        if not notes:
            return CommandResult("You have no notes. /forget all deletes everything I store about you.", True)
        return CommandResult(listing(notes, "Your notes (/forget <number> deletes one):"), private=True)
    if words == ["all"]:
        cmds._forget_pending[caller.user_id] = time.monotonic() + FORGET_CONFIRM_SECONDS
        return CommandResult(
            "This deletes everything I store about you: messages, notes, preferences, reactions "
            f"and what I learned. Send /forget all confirm within {FORGET_CONFIRM_SECONDS:.0f} s to go on.",
            private=True,
        )
    if words == ["all", "confirm"]:
        deadline = cmds._forget_pending.pop(caller.user_id, 0.0)
        if time.monotonic() > deadline:
            return CommandResult("Nothing to confirm: send /forget all first.", private=True)
        await cmds.store.delete_user(caller.user_id)
        if cmds.operations is not None:
            cmds.operations.training.delete_files(caller.user_id)
        return CommandResult("Done: everything I stored about you is deleted.", private=True)
    if len(words) == 1 and (number := row_id(words[0].lstrip("#"))) is not None:
        if await cmds.store.delete_memory(caller.user_id, number):
            return CommandResult(f"Forgot note {words[0]}.", private=True)
        raise UsageError(f"You have no note {words[0]}; /forget lists yours.")
    raise UsageError("Say which note to forget.")


async def _export(cmds: Commands, caller: Caller, args: str) -> CommandResult:
    data = await cmds.store.export_user(caller.user_id)
    data["learned_style"] = await cmds.policy.beliefs(caller.user_id)
    if cmds.steering is not None:
        data["reward_model"] = await cmds.steering.export(caller.user_id)
    data["exported_at"] = time.time()
    content = json.dumps(data, ensure_ascii=False, indent=2).encode()
    return CommandResult(
        f"Everything I store about you: {len(data['messages'])} messages, {len(data['memories'])} notes, "
        f"{len(data['reactions'])} reactions.",
        private=True,
        attachment=Attachment("attune-export.json", content),
    )


def reward_trend(rewards: list[float], window: int = 10) -> str:
    """``"+0.60 over the last 10 (was +0.20)"`` from rewards in time order."""
    if not rewards:
        return "no reactions yet"
    recent, earlier = rewards[-window:], rewards[:-window][-window:]
    text = f"{fmean(recent):+.2f} over the last {len(recent)}"
    if earlier:
        delta = fmean(recent) - fmean(earlier)
        arrow = "↑" if delta > 0.05 else "↓" if delta < -0.05 else "→"
        text += f" (was {fmean(earlier):+.2f} before, {arrow})"
    return text


SHOWN_WINDOW = 50  # /stats: the replies over which "asked for and shown" is counted


async def _stats(cmds: Commands, caller: Caller, args: str) -> CommandResult:
    stats = await cmds.store.stats(caller.user_id)
    adapter = await cmds.store.training.serving(caller.user_id)
    if adapter is None:
        adapter_line = "none yet: answers come from the base model"
    elif adapter.user_id is None:
        adapter_line = f"the shared population adapter v{adapter.version}"
    else:
        adapter_line = f"your own, version {adapter.version}"
    lines = [
        f"Messages: {stats['messages']} from you, {stats['replies']} replies from me.",
        f"Reactions: {len(stats['rewards'])}; reward {reward_trend(stats['rewards'])}.",
        f"Notes: {stats['memories']}.",
        await cmds.policy.describe(caller.user_id, await cmds.store.preferences(caller.user_id)),
        f"Style asked for and shown in my last {SHOWN_WINDOW} replies to you: "
        + describe_asked_and_shown((await realisation_counts(cmds.store, SHOWN_WINDOW, caller.user_id)).table())
        + ".",
        reward_model.describe(await reward_model.user_accuracy(cmds.store.training, caller.user_id)),
        *(await _steering_lines(cmds, caller.user_id)),
        f"Adapter: {adapter_line}.",
        await _training_line(cmds, caller.user_id),
        f"Model: {cmds.describe_model()}.",
    ]
    return CommandResult("\n".join(lines), private=True)


async def _steering_lines(cmds: Commands, user_id: int) -> list[str]:
    """What the reward model learned, in the user's words, and how their replies changed."""
    if cmds.steering is None:
        return []
    lines = [await cmds.steering.describe(user_id, await cmds.store.preferences(user_id))]
    adapter = await cmds.store.training.serving(user_id)
    since = adapter.since if adapter is not None and adapter.user_id == user_id else None
    if change := await cmds.steering.changes(user_id, since, cmds.store.reply_texts):
        lines.append(change)
    return lines


async def _training_line(cmds: Commands, user_id: int) -> str:
    runs = await cmds.store.training.runs(user_id, limit=1)
    if not runs:
        return "Training: not yet; a nightly run trains your own adapter once you have rated enough replies."
    run = runs[0]
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(run["started_at"]))
    outcome = {
        "promoted": "a new adapter was promoted",
        "rejected": "the new adapter was not better, so it was kept out",
    }
    what = outcome.get(run["decision"] or "", run["status"])
    gain = ""
    m = run["metrics"]
    if m.get("candidate", {}).get("nll_liked") and m.get("in_service", {}).get("nll_liked"):
        c, s = m["candidate"]["nll_liked"], m["in_service"]["nll_liked"]
        gain = f" (held-out NLL of liked replies {s:.2f} -> {c:.2f})"
    elif m.get("candidate", {}).get("reward") is not None and m.get("in_service", {}).get("reward") is not None:
        c, s = m["candidate"]["reward"], m["in_service"]["reward"]
        gain = f" (your reward model's score of its replies {s:.2f} -> {c:.2f})"
    return f"Training: last run {when} on {run['rated']} rated replies: {what}{gain}."


LINK_CODE_SECONDS = 600.0
LINK_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"  # no 0/O, 1/I: easy to copy by hand
LINK_ATTEMPTS = 5  # wrong codes a user may enter per LINK_CODE_SECONDS


def _code_hash(code: str) -> str:
    cleaned = "".join(c for c in code.upper() if c.isalnum())
    return hashlib.sha256(cleaned.encode()).hexdigest()


async def _link(cmds: Commands, caller: Caller, args: str) -> CommandResult:
    code = args.strip()
    if not code:
        new = "".join(secrets.choice(LINK_ALPHABET) for _ in range(8))
        await cmds.store.add_link_code(
            caller.user_id, caller.platform, _code_hash(new), time.time() + LINK_CODE_SECONDS
        )
        return CommandResult(
            f"Your link code: {new[:4]}-{new[4:]}\nOn your other platform, send /link {new[:4]}-{new[4:]} within "
            f"{LINK_CODE_SECONDS / 60:.0f} minutes: that account then shares this one's memory, preferences and "
            "learning. Keep the code to yourself; it works once.",
            private=True,
        )
    now = time.monotonic()
    recent = [t for t in cmds._link_failures.get(caller.user_id, []) if now - t < LINK_CODE_SECONDS]
    if len(recent) >= LINK_ATTEMPTS:
        return CommandResult("Too many wrong codes; wait a few minutes and ask for a new one.", private=True)
    taken = await cmds.store.take_link_code(_code_hash(code), time.time())
    if taken is None:
        cmds._link_failures[caller.user_id] = [*recent, now]
        raise UsageError("That code is unknown, used or expired: send /link on your other platform for a new one.")
    target, issued_on = taken
    if target == caller.user_id:
        return CommandResult("These accounts are already linked.", private=True)
    if issued_on == caller.platform:
        raise UsageError(f"That code was made on {issued_on}: enter it on your other platform.")
    await cmds.store.merge_users(caller.user_id, target)
    await cmds.policy.learn(target)  # from both accounts' reactions now
    return CommandResult(
        f"Linked: this {caller.platform} account now shares memory, preferences and learning with your "
        f"{issued_on} account.",
        private=True,
    )


ADMIN_ACTIONS = ("stats", "train", "rollback")


async def _admin(cmds: Commands, caller: Caller, args: str) -> CommandResult:
    """Operators only: totals, and one user's adapter trained now or rolled back."""
    if not caller.admin:
        return CommandResult("Only an admin of this bot can use /admin.", private=True)
    action, _, who = args.partition(" ")
    action = action.lower()
    if action not in ADMIN_ACTIONS:
        raise UsageError("Say what to do: stats, train <user> or rollback <user>.")
    ops = cmds.operations
    if ops is None:
        return CommandResult("Training is not available in this process.", private=True)
    if action == "stats":
        t = await ops.totals()
        running = await ops.running()
        return CommandResult(
            f"Users: {t['users']}. Messages: {t['messages']}, replies: {t['replies']}, reactions: {t['reactions']}.\n"
            f"Adapters in service: {t['active_adapters']}. Training: {'running' if running else 'idle'}.\n"
            f"Model: {cmds.describe_model()}",
            private=True,
        )
    if not who.strip():
        raise UsageError("Which user? Give their number or platform:id.")
    try:
        user_id = await ops.find_user(who.strip())
    except UnknownUser:
        user_id = None
    if user_id is None:
        raise UsageError(f"No user {who.strip()}.")
    if action == "rollback":
        return CommandResult((await ops.rollback(user_id)).message, private=True)
    outcome = await ops.train_now(user_id, by="/admin")
    suffix = " /admin stats shows when it is done." if outcome.ok else ""
    return CommandResult(outcome.message + suffix, private=True)


SPECS: list[CommandSpec] = [
    CommandSpec("help", "/help [command]", "show the commands, or how to use one", _help),
    CommandSpec(
        "prefs",
        "/prefs [length|tone|emoji|format|language|persona <value|auto>] | /prefs steering on|off"
        " | /prefs reset [key|learning]",
        "show or set how I answer you",
        _prefs,
        private=True,
    ),
    CommandSpec("remember", "/remember <text>", "keep a note I recall when it matters", _remember, private=True),
    CommandSpec(
        "forget",
        "/forget [<note number> | all]",
        "list or delete your notes; 'all' deletes everything about you",
        _forget,
        private=True,
    ),
    CommandSpec("export", "/export", "everything I store about you, as JSON", _export, private=True),
    CommandSpec("stats", "/stats", "your messages, reactions, reward trend and adapter", _stats, private=True),
    CommandSpec(
        "link",
        "/link [code]",
        "join your accounts on two platforms: get a code here, enter it there",
        _link,
        private=True,
    ),
    CommandSpec(
        "admin",
        "/admin stats | /admin train <user> | /admin rollback <user>",
        "for the bot's admins: totals, train or roll back a user's adapter",
        _admin,
        private=True,
    ),
]
