"""APScheduler jobs inside ``attune run``: the nightly training and daily message retention."""

from scheduler.nightly import JOB_ID, RETENTION_ID, NightlyScheduler

__all__ = ["JOB_ID", "RETENTION_ID", "NightlyScheduler"]
