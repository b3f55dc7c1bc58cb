"""Spark feature jobs and the Feast repository (the features stage; filled by the features issue)."""

__all__: list[str] = []
