from __future__ import annotations

from pathlib import Path

import pytest

from agent.errors import ConfigurationError
from agent.logs import RedactSecrets
from agent.settings import RoleLimit, Settings


def test_defaults_match_env_example() -> None:
    """Every setting in .env.example parses, and its shown value is the code's default."""
    example = Path(__file__).resolve().parent.parent / ".env.example"
    values = {}
    for line in example.read_text().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key] = value
    from agent.settings import _ENV_NAMES

    assert set(values) == set(_ENV_NAMES.values())
    parsed = Settings.from_mapping(values)
    defaults = Settings()
    for name in _ENV_NAMES:
        if name == "data_dir":
            assert parsed.data_dir == Path("./data")
        else:
            assert getattr(parsed, name) == getattr(defaults, name), name


def test_env_wins_over_dotenv(tmp_path: Path) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text("LLM_MODEL=from-file\nHUGGINGGPT_TOP_K=3\n")
    s = Settings.load({"LLM_MODEL": "from-env"}, dotenv=dotenv)
    assert s.llm_model == "from-env"
    assert s.top_k == 3


def test_embedded_llm_only_without_url_and_key() -> None:
    assert Settings.from_mapping({}).uses_embedded_llm
    assert not Settings.from_mapping({"OPENAI_API_KEY": "k"}).uses_embedded_llm
    assert not Settings.from_mapping({"OPENAI_BASE_URL": "http://127.0.0.1:1/v1"}).uses_embedded_llm


def test_allow_lists_parse_commas_and_spaces() -> None:
    s = Settings.from_mapping({"DISCORD_ALLOWED_CHANNELS": "1, 2 3"})
    assert s.discord_allowed_channels == frozenset({1, 2, 3})
    with pytest.raises(ConfigurationError, match=r"DISCORD_ALLOWED_GUILDS|numeric"):
        Settings.from_mapping({"DISCORD_ALLOWED_GUILDS": "general"})


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("HUGGINGGPT_TOP_K", "many"),
        ("HUGGINGGPT_TOP_K", "0"),
        ("HUGGINGGPT_MODEL_SELECTION", "random"),
        ("LLM_VISION", "maybe"),
        ("LOCAL_LLM_THREADS", "-1"),
        ("LOCAL_LLM_THREADS", "two"),
        ("HUGGINGGPT_MAX_MEDIA_SECONDS", "0"),
        ("HUGGINGGPT_IMAGE_MAX_SIDE", "10"),
    ],
)
def test_bad_values_are_configuration_errors(name: str, value: str) -> None:
    with pytest.raises(ConfigurationError):
        Settings.from_mapping({name: value})


def test_secrets_not_in_repr() -> None:
    s = Settings.from_mapping(
        {"OPENAI_API_KEY": "sk-secret-1", "HF_TOKEN": "hf_secret_2", "DISCORD_TOKEN": "dt-3"}
    )
    assert "secret" not in repr(s) and "dt-3" not in repr(s)
    assert set(s.secrets) == {"sk-secret-1", "hf_secret_2", "dt-3"}


def test_log_filter_redacts_secrets_in_message_args_and_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    logger = logging.getLogger("test.redact")
    caplog.handler.addFilter(RedactSecrets(["sk-secret-1"]))
    try:
        raise RuntimeError("server said sk-secret-1 is invalid")
    except RuntimeError:
        logger.exception("calling with key %s", "sk-secret-1")
    text = caplog.text
    assert "sk-secret-1" not in text
    assert "***" in text


def test_daily_limits_role_overrides_and_allowed_models_parse() -> None:
    s = Settings.from_mapping(
        {
            "DISCORD_USER_RUNS_PER_DAY": "20",
            "DISCORD_ROLE_LIMITS": "11=100/5000, 12=0/0",
            "LLM_MODELS_ALLOWED": "small, big,small",
        }
    )
    assert s.discord_user_runs_per_day == 20 and s.discord_user_tokens_per_day == 0
    assert s.discord_role_limits == (RoleLimit(11, 100, 5000), RoleLimit(12, 0, 0))
    assert s.llm_models_allowed == ("small", "big")
    for bad in ("11=100", "mods=1/2", "11=-1/5"):
        with pytest.raises(ConfigurationError, match="DISCORD_ROLE_LIMITS"):
            Settings.from_mapping({"DISCORD_ROLE_LIMITS": bad})
    with pytest.raises(ConfigurationError, match="DISCORD_USER_RUNS_PER_DAY"):
        Settings.from_mapping({"DISCORD_USER_RUNS_PER_DAY": "-3"})
