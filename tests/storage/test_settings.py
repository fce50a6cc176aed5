"""Settings: defaults in the user data directory, environment over config file, unknown keys rejected."""

from __future__ import annotations

from pathlib import Path

import pytest

from quantplan.storage import SettingsError, load_settings
from quantplan.storage.db import make_engine


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("DATABASE_URL", "ARTIFACTS", "RAY_ADDRESS", "CONFIG", "POOL_SIZE"):
        monkeypatch.delenv(f"QUANTPLAN_{name}", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))


def test_defaults_live_in_the_user_data_dir(tmp_path: Path) -> None:
    settings = load_settings()
    assert settings.database_url == f"sqlite:///{tmp_path / 'data' / 'quantplan' / 'quantplan.db'}"
    assert settings.artifacts == str(tmp_path / "data" / "quantplan" / "artifacts")
    assert settings.ray_address is None


def test_environment_beats_config_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = tmp_path / "quantplan.toml"
    config.write_text('database_url = "postgresql://db/q"\nartifacts = "/srv/a"\npool_size = 20\n')
    monkeypatch.setenv("QUANTPLAN_CONFIG", str(config))
    monkeypatch.setenv("QUANTPLAN_ARTIFACTS", "s3://bucket/a")
    monkeypatch.setenv("QUANTPLAN_RAY_ADDRESS", "ray://head:10001")
    settings = load_settings()
    assert (settings.database_url, settings.artifacts, settings.pool_size) == ("postgresql://db/q", "s3://bucket/a", 20)
    assert settings.ray_address == "ray://head:10001"
    assert load_settings(database_url="sqlite:///x.db").database_url == "sqlite:///x.db"  # arguments beat both


def test_default_config_file_is_read(tmp_path: Path) -> None:
    path = tmp_path / "config" / "quantplan" / "config.toml"
    path.parent.mkdir(parents=True)
    path.write_text('ray_address = "auto"\n')
    assert load_settings().ray_address == "auto"


def test_bad_config_is_a_settings_error(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('databse_url = "sqlite:///typo.db"\n')
    with pytest.raises(SettingsError, match="unknown key.*databse_url.*known keys: database_url"):
        load_settings(config)
    config.write_text("pool_size = 0\n")
    with pytest.raises(SettingsError, match="pool_size"):
        load_settings(config)
    config.write_text("not toml [")
    with pytest.raises(SettingsError, match="TOML"):
        load_settings(config)
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings(tmp_path / "missing.toml")
    with pytest.raises(SettingsError):
        load_settings(pool_sizee=3)


def test_pool_sizing_applies_to_postgresql() -> None:
    settings = load_settings(database_url="postgresql://u@h/d", pool_size=7, max_overflow=3)
    engine = make_engine(settings.database_url, settings)
    assert engine.dialect.driver == "psycopg" and engine.pool.size() == 7 and engine.pool._max_overflow == 3
