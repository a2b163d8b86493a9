"""The store: every query over one database, grouped by who uses it.

``Store`` is one object for the process (its parts share the id caches), and the core
sees it only through the narrow protocols in ``agent_core.stores``: the message
pipeline's (:class:`~storage.conversations.Conversations`), the commands'
(:class:`~storage.user_data.UserData`), the policy's (:class:`~storage.policy_state.PolicyState`),
the reward models' (:class:`~storage.reward_state.RewardState`),
and, as attributes, the training's and adapters' (:class:`~storage.training.TrainingRecords`)
and the operators' reports (:class:`~storage.reports.Reports`).
"""

from __future__ import annotations

from storage.conversations import Conversations
from storage.database import Database
from storage.policy_state import PolicyState
from storage.reports import Reports
from storage.reward_state import RewardState
from storage.training import TrainingRecords
from storage.user_data import UserData


class Store(Conversations, UserData, PolicyState, RewardState):
    """Queries over one :class:`Database`; ids in and out are the core's own."""

    def __init__(self, db: Database) -> None:
        super().__init__(db)
        self.training = TrainingRecords(db)  # rated replies, runs, adapters, the lock
        self.reports = Reports(db)  # the operators' totals and the dashboard's figures
