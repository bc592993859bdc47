"""`recserve-serve`: --help of every command, and the --settings YAML file under the flags."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from serve_app.cli import build_parser, settings_overrides
from serve_app.config import ServeSettings


@pytest.mark.parametrize("command", ["serve", "demo", "config", "shadow-report", "keys"])
def test_help(command: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "serve_app.cli", command, "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert "usage: recserve-serve" in out.stdout


def test_a_settings_file_sets_the_experiment_and_flags_win(tmp_path: Path) -> None:
    path = tmp_path / "serve.yaml"
    path.write_text(
        "experiment:\n"
        "  salt: s-1\n"
        "  variants:\n"
        "    - {name: control, model: champion, weight: 0.9}\n"
        "    - {name: treatment, model: challenger, weight: 0.1}\n"
        "  shadow: {model: challenger, share: 0.05}\n"
        "models: {poll_interval_seconds: 5, uri: 'models:/recserve@champion'}\n"
        "redis_url: redis://from-file:6379/0\n"
    )
    args = build_parser().parse_args(
        [
            "serve",
            "--settings",
            str(path),
            "--poll-interval",
            "2",
            "--redis-url",
            "redis://flag:1/0",
        ]
    )
    settings = ServeSettings(**settings_overrides(args))
    assert settings.experiment.weights == (("control", 0.9), ("treatment", 0.1))
    assert settings.experiment.shadow.share == 0.05
    assert settings.models.poll_interval_seconds == 2.0  # the flag, over the file
    assert settings.models.uri == "models:/recserve@champion"  # the file's, kept beside the flag
    assert settings.event_redis_url == "redis://flag:1/0"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("experiment:\n  variants: [{name: a, weight: 0}]\n", "positive weight"),
        ("experiment:\n  shadow: {share: 3}\n", "experiment.shadow.share"),
        ("nonsense_field: 1\n", "nonsense_field"),
        ("- a list\n", "expected a mapping"),
        ("experiment: [unclosed\n", "--settings"),
    ],
)
def test_a_bad_settings_file_is_refused_naming_the_field(
    tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "serve.yaml"
    path.write_text(text)
    args = build_parser().parse_args(["serve", "--settings", str(path)])
    with pytest.raises(SystemExit, match=message):
        settings_overrides(args)


def test_the_banner_says_whether_keys_are_needed_and_where_they_come_from() -> None:
    from serve_app.cli import auth_banner, curl_examples

    off = auth_banner(ServeSettings().api, local_demo=True)
    assert off.startswith("auth: off (local demo)") and "RECSERVE_API__AUTH__ENABLED" in off
    assert "Authorization" not in curl_examples("http://h:1", "u", "i")
    on = ServeSettings(
        api={
            "auth": {"enabled": True, "keys_file": "/etc/recserve/api-keys/keys.json"},
            "admin_api_key": "s3cret-admin-key",
            "rate_limit": {"requests_per_second": 20},
        }
    ).api
    banner = auth_banner(on, local_demo=True)
    assert banner.startswith("auth: on")
    assert "/etc/recserve/api-keys/keys.json" in banner and "api.admin_api_key" in banner
    assert "20/s per key and Ingress replica" in banner and "s3cret" not in banner
    curls = curl_examples("http://h:1", "u", "i", auth=True)
    assert curls.count('-H "Authorization: Bearer $RECSERVE_API_KEY"') == 3
