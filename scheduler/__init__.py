"""APScheduler jobs inside ``attune run``: the nightly training (retention comes later)."""

from scheduler.nightly import JOB_ID, NightlyScheduler

__all__ = ["JOB_ID", "NightlyScheduler"]
