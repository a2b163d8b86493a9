"""Who may talk to the bot, and who may run /admin: ``[access]``.

Entries are ``"platform:id"``: the platform's name and its own id of the user or chat. A platform with
no ``allowed_users`` entry answers everyone on it; once it has one, it answers only the
users listed. ``allowed_chats`` works the same way for chats (groups, channels, DMs).
``admins`` may use ``/admin``; being an admin does not bypass the allowlists.
"""

from __future__ import annotations

from collections import defaultdict

from agent_core.config import AccessSettings


def by_platform(entries: list[str]) -> dict[str, set[str]]:
    table: dict[str, set[str]] = defaultdict(set)
    for entry in entries:
        platform, _, ident = entry.partition(":")
        table[platform].add(ident)
    return dict(table)


class Access:
    def __init__(self, settings: AccessSettings) -> None:
        self.users = by_platform(settings.allowed_users)
        self.chats = by_platform(settings.allowed_chats)
        self.admins = by_platform(settings.admins)

    def allows(self, platform: str, user_id: str, chat_id: str) -> bool:
        """Whether this person may talk to the bot in this chat."""
        users, chats = self.users.get(platform), self.chats.get(platform)
        return (users is None or user_id in users) and (chats is None or chat_id in chats)

    def is_admin(self, platform: str, user_id: str) -> bool:
        return user_id in self.admins.get(platform, set())
