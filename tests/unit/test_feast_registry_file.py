"""Feast's file registry, as the platform writes it: whole or not at all."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.feast


def test_a_registry_rewrite_never_shows_readers_an_empty_file(tmp_path):
    """Feast 0.67 opens the registry file for writing in place (emptying it first), so a reader at that
    moment sees no views. The platform's store renames a whole new file over it: a reader holding the
    old file reads it all, and the path never holds less than a whole registry."""
    from feast.infra.registry.file import FileRegistryStore
    from feast.protos.feast.core.Registry_pb2 import Registry as RegistryProto
    from feast.repo_config import RegistryConfig

    from shopsight.features.store import _write_registry_files_whole

    _write_registry_files_whole()
    path = tmp_path / "registry.db"
    registry = FileRegistryStore(RegistryConfig(path=str(path)), tmp_path)
    first = RegistryProto(registry_schema_version="1")
    registry.update_registry_proto(first)
    size = path.stat().st_size
    with path.open("rb") as reading:  # a reader that opened the file before the rewrite
        registry.update_registry_proto(RegistryProto(registry_schema_version="2"))
        old = RegistryProto()
        old.ParseFromString(reading.read())
    assert len(old.SerializeToString()) == size and old.registry_schema_version == "1"
    assert registry.get_registry_proto().registry_schema_version == "2"
    assert [p.name for p in tmp_path.iterdir()] == ["registry.db"]  # no partial file left
