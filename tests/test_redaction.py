"""Secrets and pieces of them are redacted wherever text leaves the process; URLs never show credentials."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.http import public_url, retry_after_seconds, url_secrets
from agent.logs import ECHO_CHARS, RedactSecrets, redact
from agent.settings import Settings

TOKEN_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-."
tokens = st.text(alphabet=TOKEN_CHARS, min_size=ECHO_CHARS, max_size=64)
words = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=1, max_size=ECHO_CHARS - 1
)
LONG_WORDS = ["internationalization", "responsibilities", "authentication", "configuration", "administrator"]


@given(tokens, st.data(), st.text(max_size=80), st.text(max_size=80))
def test_any_piece_of_a_secret_of_echo_length_or_more_is_redacted(
    secret: str, data: st.DataObject, before: str, after: str
) -> None:
    start = data.draw(st.integers(0, len(secret) - ECHO_CHARS))
    end = data.draw(st.integers(start + ECHO_CHARS, len(secret)))
    out = redact(before + secret[start:end] + after, [secret])
    assert not any(secret[i : i + ECHO_CHARS] in out for i in range(len(secret) - ECHO_CHARS + 1))
    assert "***" in out


@given(tokens, st.lists(words, max_size=40), st.sampled_from([" ", ", ", "\n", ": "]))
def test_ordinary_words_are_never_redacted(secret: str, text_words: list[str], separator: str) -> None:
    """A word shorter than ECHO_CHARS cannot hold a redacted piece, whatever the secret is made of."""
    text = separator.join(text_words)
    assert redact(text, [secret]) == text


@given(st.lists(tokens, min_size=1, max_size=3), st.sampled_from(LONG_WORDS))
def test_long_ordinary_words_survive_random_tokens(secrets: list[str], word: str) -> None:
    text = f"the {word} failed for model org/x (HTTP 500)"
    assert redact(text, secrets) == text


@given(st.text(alphabet=TOKEN_CHARS, min_size=4, max_size=ECHO_CHARS - 1), st.text(max_size=40))
def test_short_secrets_are_redacted_whole(secret: str, around: str) -> None:
    out = redact(f"{around}{secret}{around}", [secret])
    assert secret not in out.replace("***", "\0")


def test_secrets_shorter_than_four_characters_are_ignored() -> None:
    assert redact("a b c", ["a", "b c"]) == "a b c"


def test_the_log_filter_redacts_echoed_pieces(caplog: pytest.LogCaptureFixture) -> None:
    token = "hf_AbCdEfGhIjKlMnOpQrStUv"
    logger = logging.getLogger("test.redaction")
    caplog.set_level(logging.INFO)
    caplog.handler.addFilter(RedactSecrets([token]))
    logger.info("server said: invalid token %s…", token[:12])
    assert token[:12] not in caplog.text and "invalid token ***…" in caplog.text


@pytest.mark.parametrize(
    ("url", "shown", "secrets"),
    [
        ("http://user:pa%40ss@proxy:8080/v1", "http://proxy:8080/v1", ("pa%40ss", "pa@ss")),
        ("https://tok123456@router.example/x?q=1", "https://router.example/x?q=1", ("tok123456",)),
        ("http://[::1]:9/", "http://[::1]:9/", ()),
        ("https://router.huggingface.co/hf-inference", "https://router.huggingface.co/hf-inference", ()),
        ("", "", ()),
    ],
)
def test_urls_show_no_credentials_and_their_credentials_are_secrets(
    url: str, shown: str, secrets: tuple[str, ...]
) -> None:
    assert public_url(url) == shown
    assert url_secrets(url) == secrets


def test_settings_secrets_include_the_credentials_of_every_configured_url(tmp_path: Path) -> None:
    endpoints = tmp_path / "endpoints.json"
    endpoints.write_text(json.dumps({"a/b": "http://e:endpoint-pw@10.0.0.5:8080", "c/d": ""}))
    settings = Settings(
        openai_base_url="http://llm:llm-pw@127.0.0.1:1/v1",
        hf_inference_base_url="http://hf-proxy-token@127.0.0.1:2",
        endpoints_file=str(endpoints),
        hf_token="hf_x1234",
    )
    assert set(settings.secrets) == {"hf_x1234", "llm-pw", "hf-proxy-token", "endpoint-pw"}
    assert Settings(endpoints_file=str(tmp_path / "missing.json")).secrets == ()


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        ({"Retry-After": "7"}, 7.0),
        ({"retry-after-ms": "1500", "Retry-After": "7"}, 1.5),
        ({"Retry-After": "-3"}, 0.0),
        ({"Retry-After": "soon"}, None),
        ({}, None),
    ],
)
def test_retry_after(headers: dict[str, str], seconds: float | None) -> None:
    assert retry_after_seconds(headers) == seconds


def test_retry_after_as_an_http_date() -> None:
    waited = retry_after_seconds({"Retry-After": "Wed, 21 Oct 2099 07:28:00 GMT"})
    assert waited is not None and waited > 3600
