"""The feature server's gunicorn control socket is its data directory's, not the machine user's one
(``~/.gunicorn/gunicorn.ctl``, which a second server would take over). The running server's socket is
checked in tests/component/test_feature_store.py (test_http_feature_server_returns_the_same_values): not
here, as importing Feast's feature server sets PROMETHEUS_MULTIPROC_DIR for the whole process, which turns
the serving tests' metrics into shared files."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from shopsight.features import store
from shopsight.platform import load_settings


def _settings(data_dir: Path):
    return load_settings(overrides={"data_dir": str(data_dir)}, environ={}).settings


def test_each_data_directory_and_port_has_its_own_control_socket(tmp_path):
    first, second = _settings(tmp_path / "first"), _settings(tmp_path / "second")
    assert store.control_socket(first, 6566) == tmp_path / "first" / "feast" / "feature-server-6566.ctl"
    sockets = {store.control_socket(s, port) for s in (first, second) for port in (6566, 6567)}
    assert len(sockets) == 4
    assert all(s.parent.is_dir() for s in sockets)  # gunicorn binds there at once

    # a data directory too deep for a socket path (107 bytes) gets a short one, still its own
    deep = [_settings(tmp_path / ("d" * 60) / ("e" * 60) / name) for name in ("a", "b")]
    short = [store.control_socket(s, 6566) for s in deep]
    assert all(s.parent == Path(tempfile.gettempdir()) and len(os.fsencode(s)) <= 107 for s in short)
    assert short[0] != short[1] and short[0] == store.control_socket(deep[0], 6566)
