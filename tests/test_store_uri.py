"""Store URIs: a mistyped one is refused and creates nothing; plain folders stay plain paths."""

from __future__ import annotations

import pytest

from .helpers import cli

# --- 7. mistyped store URIs ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("s4:/bucket/x", "unsupported URI scheme 's4'"),
        ("s3//bucket/x", "did you mean s3://bucket/x"),
        ("s3:bucket/x", "not a valid s3 URI"),
        ("file:/relative", "not a valid file URI"),
        ("file:relative/store", "not a valid file URI"),
    ],
)
def test_a_mistyped_store_uri_is_refused_and_creates_nothing(tiny_snr_table, tmp_path, capsys, monkeypatch, uri, message):
    monkeypatch.chdir(tmp_path)
    code, _, err = cli(capsys, "select", str(tiny_snr_table), "--store", uri)
    assert code == 2 and message in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_plain_folders_stay_plain_paths(tiny_snr_table, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = cli(capsys, "select", str(tiny_snr_table), "--store", "stores/local")
    assert code == 0, err
    assert (tmp_path / "stores" / "local" / "runs").is_dir()
