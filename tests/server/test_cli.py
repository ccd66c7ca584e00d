"""``psearch-serve``: settings from the command line, handed to uvicorn."""

import pytest

from server import cli


@pytest.fixture
def served(monkeypatch):
    """What uvicorn.run was called with (nothing is served)."""
    calls = []
    monkeypatch.setattr(cli.uvicorn, "run", lambda app, **options: calls.append((app, options)))
    return calls


def test_flags_and_settings_reach_the_app_and_uvicorn(tmp_path, served):
    config = tmp_path / "server.yaml"
    config.write_text("port: 9000\nmax_batch_size: 2\n")

    status = cli.main(
        [
            "--config",
            str(config),
            "--set",
            "max_wait_ms=12.5",
            "--set",
            "api_keys=[a, b]",
            "--host",
            "0.0.0.0",
        ]
    )

    assert status == 0
    [(app, options)] = served
    settings = app.state.settings
    assert (settings.port, settings.max_batch_size, settings.max_wait_ms) == (9000, 2, 12.5)
    assert [key.get_secret_value() for key in settings.api_keys] == ["a", "b"]
    assert (options["host"], options["port"], options["workers"]) == ("0.0.0.0", 9000, 1)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--set", "max_batch_size=0"], "max_batch_size"),
        (["--set", "no_such_setting=1"], "no_such_setting"),
        (["--set", "max_batch_size"], "KEY=VALUE"),
        (["--set", "max_batch_size=[1"], "not valid YAML"),
        (["--config", "/no/such/file.yaml"], "settings file not found"),
    ],
)
def test_bad_settings_end_with_a_message_and_status_2(argv, message, served, capsys):
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err
    assert served == []
