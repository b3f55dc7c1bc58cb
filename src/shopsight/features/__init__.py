"""Spark feature jobs and the Feast repository.

Public entry points live in their modules, imported lazily because Spark and Feast are heavy:
``shopsight.features.build`` (the Spark build), ``shopsight.features.store`` (apply, materialise,
catalog, training sets, lookups), ``shopsight.features.push``, ``shopsight.features.client``.
"""

__all__: list[str] = []
