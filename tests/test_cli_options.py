"""Options that do not apply to what was asked are errors, before any output."""

from __future__ import annotations

from .helpers import cli

# --- 13. options that do not apply are errors ------------------------------------------------------------


def test_options_that_do_not_apply_are_errors(tiny_snr_table, tmp_path, capsys):
    cases = [
        (["select", str(tiny_snr_table), "-o", str(tmp_path / "a"), "--budget-percent", "20"], "--budget-percent applies only to"),
        (["select", str(tiny_snr_table), "-o", str(tmp_path / "b"), "--run-id", "r1"], "--run-id apply to runs in an artifact store"),
        (["select", str(tiny_snr_table), "-o", str(tmp_path / "c"), "--force"], "--force apply to runs in an artifact store"),
        (["demo", "--workdir", str(tmp_path / "d"), "--layers", "-1"], "--layers must be at least 1"),
        (["demo", "--workdir", str(tmp_path / "e"), "--top-percent", "0"], "--top-percent must be in (0, 100]"),
    ]
    for argv, message in cases:
        code, _, err = cli(capsys, *argv)
        assert code == 2 and message in err, (argv, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
