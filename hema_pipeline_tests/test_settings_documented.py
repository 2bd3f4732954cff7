"""Every environment variable the pipeline reads is in docs/settings.md (a newcomer's one list)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_setting_read_from_the_environment_is_documented():
    read = set()
    for path in (ROOT / "hema_pipeline").rglob("*.py"):
        read |= set(
            re.findall(r"""(?:_env|_env_flag|os\.environ\.get|os\.getenv)\(\s*["'](HEMA_[A-Z0-9_]+)["']""", path.read_text())
        )
    documented = set(re.findall(r"`(HEMA_[A-Z0-9_]+)`", (ROOT / "docs" / "settings.md").read_text()))
    assert read, "no setting found: the pattern no longer matches how settings are read"
    assert read - documented == set()
