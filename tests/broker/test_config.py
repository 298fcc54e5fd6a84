from __future__ import annotations

from pathlib import Path

import pytest

from broker.config import ConfigError, load_config


def test_defaults_without_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = load_config(env={})
    assert (config.server.host, config.server.port) == ("127.0.0.1", 8000)
    assert config.store.backend == "sqlite"
    assert config.store.path == "./data/events.db"
    assert config.store.synchronous == "FULL"


def test_file_and_env_overrides(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('[server]\nport = 9001\n[store]\npath = "/x/e.db"\n')
    config = load_config(
        f,
        env={
            "BROKER_SERVER__PORT": "9100",
            "BROKER_SERVER__HOST": "0.0.0.0",
            "BROKER_STORE__PATH": "/srv/x.db",
            "BROKER_STORE__VERIFY_ON_OPEN": "false",
            "UNRELATED": "1",
        },
    )
    assert config.server.port == 9100
    assert config.server.host == "0.0.0.0"
    assert config.store.path == "/srv/x.db"
    assert config.store.verify_on_open is False


@pytest.mark.parametrize(
    ("text", "env", "fragment"),
    [
        ("[server]\nprot = 1\n", {}, "prot"),
        ("[sever]\nport = 1\n", {}, "sever"),
        ("[server]\nport = 'eighty'\n", {}, "port"),
        ("[server]\nport = 70000\n", {}, "port"),
        ("[store]\nbackend = 'oracle'\n", {}, "backend"),
        ("[store]\nsynchronous = 'sometimes'\n", {}, "synchronous"),
        ("not toml [", {}, "c.toml"),
        ("", {"BROKER_SERVER__PORT": "x"}, "port"),
        ("", {"BROKER_SERVER__NOPE": "1"}, "nope"),
    ],
)
def test_bad_config_is_a_clear_error(
    tmp_path: Path, text: str, env: dict[str, str], fragment: str
) -> None:
    f = tmp_path / "c.toml"
    f.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(f, env=env)
    assert fragment in str(info.value)


def test_missing_explicit_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "absent.toml", env={})
