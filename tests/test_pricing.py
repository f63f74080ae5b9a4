"""Prices: user overrides, the genai-prices catalog, tiers, effective dates, tools and refresh."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import genai_prices
import httpx2
import pytest
from genai_prices import Usage, calc_price, data_snapshot
from genai_prices import types as gp_types
from hypothesis import given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st

from costobs_callbacks._events import TokenUsage, UsageDetail, usd_to_nanos
from costobs_callbacks._exceptions import ConfigurationError
from costobs_callbacks._pricing import PriceBook, PricedCall, UnitPrices, load_price_file
from costobs_callbacks._pricing import book as p_book
from costobs_callbacks._pricing import catalog as p_catalog
from costobs_callbacks._pricing import names as p_names
from costobs_callbacks._pricing import rates as p_rates

CATALOG = f"genai-prices {genai_prices.__version__}"


def book(**overrides: Any) -> PriceBook:
    return PriceBook({name: prices for name, prices in overrides.items()})


# --------------------------------------------------------------------------------------------------
# Override arithmetic
# --------------------------------------------------------------------------------------------------


def test_override_arithmetic_is_exact() -> None:
    pb = PriceBook({"my-model": {"input": "2.5", "output": 10, "cache_read": 1.25}})
    call = pb.price("my-model", None, TokenUsage(input=1000, output=500, cache_read=200))
    # 800 * 2.5 + 200 * 1.25 + 500 * 10 = 7250 USD-per-MTok-tokens -> 0.00725 USD
    assert call == PricedCall(
        cost_nanos=7_250_000,
        prices=UnitPrices(
            input=Decimal("2.5"),
            output=Decimal(10),
            cache_read=Decimal("1.25"),
            cache_write=Decimal("2.5"),
            source="override",
        ),
    )


def test_override_cache_write_and_defaults() -> None:
    pb = PriceBook({"m": {"input": 3, "output": 15, "cache_read": "0.3", "cache_write": "3.75"}})
    call = pb.price("m", "anthropic", TokenUsage(input=10_000, output=2_000, cache_read=4_000, cache_write=1_000))
    assert call is not None
    # 5000 * 3 + 4000 * 0.3 + 1000 * 3.75 + 2000 * 15 = 15000 + 1200 + 3750 + 30000 = 49950
    assert call.cost_nanos == 49_950_000
    defaults = PriceBook({"m": {"input": 1, "output": 2}}).unit_prices("m", None)
    assert defaults == UnitPrices(Decimal(1), Decimal(2), Decimal(1), Decimal(1), "override")


def test_reasoning_is_billed_inside_output() -> None:
    pb = book(m={"input": 1, "output": 4})
    plain = pb.price("m", None, TokenUsage(input=100, output=300))
    with_reasoning = pb.price("m", None, TokenUsage(input=100, output=300, reasoning=250))
    assert plain is not None and with_reasoning is not None
    assert plain.cost_nanos == with_reasoning.cost_nanos == 1_300_000


def test_malformed_cache_counts_are_clamped_to_the_input() -> None:
    pb = book(m={"input": 2, "output": 8, "cache_read": 1, "cache_write": 4})
    call = pb.price("m", None, TokenUsage(input=1000, output=10, cache_read=800, cache_write=500))
    assert call is not None
    # cache counts are subsets of the input: reads 800, writes clamped to the 200 left, nothing uncached;
    # 800 * 1 + 200 * 4 + 10 * 8 = 1680 (not 2880: 300 written tokens that cannot exist)
    assert call.cost_nanos == 1_680_000
    reads_only = pb.price("m", None, TokenUsage(input=100, output=0, cache_read=5000, cache_write=5000))
    assert reads_only is not None and reads_only.cost_nanos == 100_000  # 100 reads at 1
    negative = pb.price("m", None, TokenUsage(input=-5, output=-1))
    assert negative is not None and negative.cost_nanos == 0


@pytest.mark.parametrize(("tokens", "nanos"), [(1, 0), (2, 1), (3, 2), (5, 2), (7, 4), (9, 4), (11, 6)])
def test_single_final_rounding_is_half_even(tokens: int, nanos: int) -> None:
    # 0.0005 USD/MTok = 0.5 nano-USD per token: odd counts land exactly on .5
    pb = book(m={"input": "0.0005", "output": 0})
    call = pb.price("m", None, TokenUsage(input=tokens))
    assert call is not None and call.cost_nanos == nanos


def test_price_values_of_every_type_go_through_str() -> None:
    pb = PriceBook({"m": {"input": 0.1, "output": Decimal("0.30"), "cache_read": "0.025", "cache_write": 1}})
    unit = pb.unit_prices("m", None)
    assert unit is not None
    assert (unit.input, unit.output, unit.cache_read, unit.cache_write) == (
        Decimal("0.1"),
        Decimal("0.30"),
        Decimal("0.025"),
        Decimal(1),
    )
    call = pb.price("m", None, TokenUsage(input=3, output=7, cache_read=1))
    assert call is not None
    # 2 * 0.1 + 1 * 0.025 + 7 * 0.30 = 2.325 USD-per-MTok-tokens -> 2325 nanos, no float noise
    assert call.cost_nanos == 2_325


def test_many_decimal_places_stay_exact() -> None:
    pb = book(m={"input": "0.041666666666666664", "output": "0.18000000000000002"})
    call = pb.price("m", None, TokenUsage(input=1_000_000_000, output=1_000_000_000))
    assert call is not None
    assert call.cost_nanos == usd_to_nanos(Decimal("41.666666666666664") + Decimal("180.00000000000002"))
    assert call.cost_nanos == 221_666_666_667


def test_no_precision_lost_beyond_28_digits() -> None:
    # 33 significant digits: the default Decimal context (28) would round this to exactly 0.5 nano -> 0.
    pb = book(m={"input": "100.000500000000000000000000000001", "output": 0})
    call = pb.price("m", None, TokenUsage(input=1))
    assert call is not None and call.cost_nanos == 100_001


def test_estimate_nanos() -> None:
    pb = book(m={"input": 2, "output": 8, "cache_read": 1})
    assert pb.estimate_nanos("m", None, 1_000, 500) == 6_000_000
    assert pb.estimate_nanos("nope-not-a-model", None, 1_000, 500) is None


@pytest.mark.parametrize(
    ("key", "model", "provider"),
    [
        ("gpt-custom", "gpt-custom", None),
        ("GPT-Custom", "gpt-custom", "openai"),
        ("gpt-custom", "GPT-CUSTOM", None),
        ("gpt-custom", "openai/gpt-custom", None),
        ("gpt-custom", "azure/GPT-Custom", "azure"),
        ("openai/gpt-custom", "gpt-custom", "openai"),
        ("gpt-custom", "gpt-custom-2024-07-18", "openai"),
        ("claude-custom", "claude-custom-20250514", "anthropic"),
    ],
)
def test_override_name_matching(key: str, model: str, provider: str | None) -> None:
    pb = PriceBook({key: {"input": 1, "output": 2}})
    call = pb.price(model, provider, TokenUsage(input=1_000_000, output=1_000_000))
    assert call is not None and call.cost_nanos == 3_000_000_000
    assert call.prices.source == "override"


def test_override_name_matching_is_not_a_prefix_match() -> None:
    pb = PriceBook({"gpt-custom": {"input": 1, "output": 2}})
    assert pb.price("gpt-custom-mini", "some-unknown-host", TokenUsage(input=1)) is None


def test_override_wins_over_catalog() -> None:
    pb = PriceBook({"gpt-4o": {"input": 1, "output": 1}})
    call = pb.price("gpt-4o-2024-08-06", "openai", TokenUsage(input=1_000_000, output=1_000_000))
    assert call is not None
    assert call.cost_nanos == 2_000_000_000
    assert call.prices.source == "override"
    # Other models still come from the catalog.
    other = pb.unit_prices("gpt-4o-mini", "openai")
    assert other is not None and other.source == CATALOG


# --------------------------------------------------------------------------------------------------
# Price files and validation
# --------------------------------------------------------------------------------------------------

EXPECTED_FILE = {
    "gpt-4o": {
        "input": Decimal("2.5"),
        "output": Decimal(10),
        "cache_read": Decimal("1.25"),
        "cache_write": Decimal("2.5"),
        "cache_write_1h": Decimal("2.5"),
    },
    "my-llm": {
        "input": Decimal("0.1"),
        "output": Decimal("0.4"),
        "cache_read": Decimal("0.1"),
        "cache_write": Decimal("0.2"),
        "cache_write_1h": Decimal("0.2"),
    },
}


def test_load_yaml(tmp_path: Path) -> None:
    path = tmp_path / "prices.yaml"
    path.write_text(
        "gpt-4o: {input: 2.5, output: 10, cache_read: 1.25}\n"
        "my-llm:\n  input: '0.1'\n  output: 0.4\n  cache_write: 0.2\n",
        encoding="utf-8",
    )
    assert load_price_file(path) == EXPECTED_FILE
    pb = PriceBook(str(path))
    call = pb.price("my-llm", None, TokenUsage(input=1_000_000, output=1_000_000, cache_write=500_000))
    assert call is not None and call.cost_nanos == 550_000_000


def test_load_json(tmp_path: Path) -> None:
    path = tmp_path / "prices.json"
    path.write_text(
        json.dumps(
            {
                "gpt-4o": {"input": 2.5, "output": "10", "cache_read": 1.25},
                "my-llm": {"input": "0.1", "output": 0.4, "cache_write": "0.2"},
            }
        ),
        encoding="utf-8",
    )
    assert load_price_file(path) == EXPECTED_FILE
    pb = PriceBook(path)
    unit = pb.unit_prices("gpt-4o", "openai")
    assert unit == UnitPrices(Decimal("2.5"), Decimal(10), Decimal("1.25"), Decimal("2.5"), "override")


@pytest.mark.parametrize(
    ("filename", "content", "needles"),
    [
        ("p.yaml", "gpt-x: {input: 1, output: [\n", ["not valid YAML"]),
        ("p.json", '{"gpt-x": {"input": 1,', ["not valid JSON"]),
        ("p.yaml", "- gpt-x\n- gpt-y\n", ["expected a mapping", "list"]),
        ("p.yaml", "", ["expected a mapping", "NoneType"]),
        ("p.yaml", "gpt-x: 3\n", ["'gpt-x'", "mapping of prices"]),
        ("p.yaml", "gpt-x: {input: -1, output: 2}\n", ["'gpt-x'", "'input'", "negative"]),
        ("p.json", '{"gpt-x": {"input": 1, "output": NaN}}', ["'gpt-x'", "'output'", "finite"]),
        ("p.yaml", "gpt-x: {input: 1, output: .nan}\n", ["'gpt-x'", "'output'", "finite"]),
        ("p.yaml", "gpt-x: {input: .inf, output: 1}\n", ["'gpt-x'", "'input'", "finite"]),
        ("p.yaml", "gpt-x: {input: 'NaN', output: 1}\n", ["'gpt-x'", "'input'", "finite"]),
        ("p.yaml", "gpt-x: {input: abc, output: 1}\n", ["'gpt-x'", "'input'", "must be a number"]),
        ("p.yaml", "gpt-x: {input: true, output: 1}\n", ["'gpt-x'", "'input'", "must be a number"]),
        ("p.yaml", "gpt-x: {input: null, output: 1}\n", ["'gpt-x'", "'input'", "must be a number"]),
        ("p.yaml", "gpt-x: {input: [1], output: 1}\n", ["'gpt-x'", "'input'", "must be a number"]),
        ("p.yaml", "gpt-x: {input: 1, output: 2, cache_read: -0.5}\n", ["'gpt-x'", "'cache_read'", "negative"]),
        ("p.yaml", "gpt-x: {input: 1, output: 2, cache_write: x}\n", ["'gpt-x'", "'cache_write'", "number"]),
        ("p.yaml", "gpt-x: {input: 1, output: 2, reasoning: 3}\n", ["'gpt-x'", "'reasoning'", "not a known field"]),
        ("p.yaml", "gpt-x: {output: 2}\n", ["'gpt-x'", "'input'", "required"]),
        ("p.json", '{"gpt-x": {"input": 2}}', ["'gpt-x'", "'output'", "required"]),
        ("p.yaml", "gpt-x: {input: 1e12, output: 1}\n", ["'gpt-x'", "'input'", "implausibly large"]),
        ("p.yaml", "123: {input: 1, output: 1}\n", ["model name 123", "non-empty string"]),
        ("p.json", '{"": {"input": 1, "output": 1}}', ["model name ''", "non-empty string"]),
    ],
)
def test_malformed_price_file(tmp_path: Path, filename: str, content: str, needles: list[str]) -> None:
    path = tmp_path / filename
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ConfigurationError) as info:
        load_price_file(path)
    for needle in needles:
        assert needle in str(info.value)
    with pytest.raises(ConfigurationError):
        PriceBook(path)


def test_every_bad_field_is_named(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("good: {input: 1, output: 1}\nbad-a: {input: -1, output: 1}\nbad-b: {input: 1}\n", "utf-8")
    with pytest.raises(ConfigurationError) as info:
        load_price_file(path)
    message = str(info.value)
    assert "model 'bad-a': field 'input'" in message
    assert "model 'bad-b': field 'output' is required" in message
    assert "'good'" not in message


def test_nonexistent_price_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigurationError, match="does not exist"):
        load_price_file(missing)
    with pytest.raises(ConfigurationError, match=r"nope\.yaml"):
        PriceBook(str(missing))


def test_malformed_dict_overrides() -> None:
    with pytest.raises(ConfigurationError, match=r"model 'm': field 'output' must be a finite number"):
        PriceBook({"m": {"input": 1, "output": float("nan")}})
    with pytest.raises(ConfigurationError, match=r"model 'm': field 'input' must not be negative"):
        PriceBook({"m": {"input": Decimal("-0.01"), "output": 1}})
    with pytest.raises(ConfigurationError, match="expected a mapping"):
        PriceBook(["m"])  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# Unknown models
# --------------------------------------------------------------------------------------------------


def _unpriced_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "costobs_callbacks" and r.levelno == logging.WARNING]


def test_unknown_model_is_none_and_warned_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="costobs_callbacks")
    pb = PriceBook()
    usage = TokenUsage(input=1000, output=100)
    for _ in range(3):
        assert pb.price("totally-made-up-model-x1", "openai", usage) is None
    assert pb.unit_prices("totally-made-up-model-x1", "openai") is None
    assert pb.estimate_nanos("totally-made-up-model-x1", None, 10, 10) is None
    warnings = _unpriced_warnings(caplog)
    assert len(warnings) == 1
    assert "totally-made-up-model-x1" in warnings[0].getMessage()

    assert pb.price("another-made-up-model", None, usage) is None
    assert len(_unpriced_warnings(caplog)) == 2
    # A new book warns again (once per model per PriceBook).
    assert PriceBook().price("totally-made-up-model-x1", "openai", usage) is None
    assert len(_unpriced_warnings(caplog)) == 3


def test_missing_model_name_is_unpriced(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="costobs_callbacks")
    pb = PriceBook()
    assert pb.price(None, "openai", TokenUsage(input=1)) is None
    assert pb.price("", "openai", TokenUsage(input=1)) is None
    assert len(_unpriced_warnings(caplog)) == 2  # None and "" are told apart


def test_local_providers_are_not_billed_at_api_prices() -> None:
    pb = PriceBook()
    assert pb.price("deepseek-r1:8b", "ollama", TokenUsage(input=100, output=100)) is None
    free = PriceBook({"deepseek-r1:8b": {"input": 0, "output": 0}})
    call = free.price("deepseek-r1:8b", "ollama", TokenUsage(input=100, output=100))
    assert call is not None and call.cost_nanos == 0


# --------------------------------------------------------------------------------------------------
# Agreement with genai-prices' own calc_price
# --------------------------------------------------------------------------------------------------

CATALOG_CASES = [
    # (reported model, LangChain provider, genai-prices provider id for calc_price)
    ("gpt-4o", "openai", "openai"),
    ("gpt-4o-mini", "openai", "openai"),
    ("gpt-4o-mini-2024-07-18", "openai", "openai"),
    ("gpt-4o-2024-08-06", "azure", "azure"),
    ("claude-sonnet-4-20250514", "anthropic", "anthropic"),
    ("claude-3-5-haiku@20241022", "google_vertexai", "google"),
    ("us.anthropic.claude-sonnet-4-20250514-v1:0", "amazon_bedrock", "aws"),
    ("o3", "openai", "openai"),
    ("o4-mini-2025-04-16", "openai", "openai"),
    ("o1", "openai", "openai"),
    ("gemini-2.5-pro", "google_genai", "google"),
    ("claude-opus-4-6", "anthropic", "anthropic"),
    ("qwen/qwen3-coder-flash", "openrouter", "openrouter"),
    ("grok-3", "xai", "x-ai"),
    ("mistral-large-latest", "mistral", "mistral"),
    ("deepseek-chat", "deepseek", "deepseek"),
    ("sonar", "perplexity", "perplexity"),
    ("sonar-deep-research", "perplexity", "perplexity"),
]

USAGES = [
    TokenUsage(input=1000, output=500, cache_read=200),
    TokenUsage(input=0, output=0),
    TokenUsage(input=1, output=1),
    TokenUsage(input=123_457, output=9_876, cache_read=100_000, cache_write=3_000, reasoning=4_000),
    TokenUsage(input=200_000, output=1_000, cache_read=50_000),
    TokenUsage(input=200_001, output=1_000, cache_read=50_000, cache_write=1),
    TokenUsage(input=1_000_000, output=65_000, cache_write=999_000, reasoning=64_000),
    TokenUsage(input=33_333, output=7, cache_read=33_333),
]


def _reference_nanos(model: str, provider_id: str, usage: TokenUsage) -> int:
    gp_usage = Usage(
        input_tokens=usage.input,
        cache_read_tokens=usage.cache_read,
        cache_write_tokens=usage.cache_write,
        output_tokens=usage.output,
        output_reasoning_tokens=usage.reasoning,
    )
    return usd_to_nanos(calc_price(gp_usage, model, provider_id=provider_id).total_price)


@pytest.mark.parametrize(("model", "provider", "provider_id"), CATALOG_CASES)
def test_catalog_agrees_with_calc_price(model: str, provider: str, provider_id: str) -> None:
    pb = PriceBook()
    for usage in USAGES:
        call = pb.price(model, provider, usage)
        assert call is not None, model
        assert call.cost_nanos == _reference_nanos(model, provider_id, usage), (model, usage)
        assert call.prices.source == CATALOG
        assert call.prices.catalog_provider == provider_id


def test_catalog_exact_figures() -> None:
    pb = PriceBook()
    usage = TokenUsage(input=1000, output=500, cache_read=200)
    gpt4o = pb.price("gpt-4o", "openai", usage)
    assert gpt4o is not None
    assert gpt4o.cost_nanos == 7_250_000
    assert gpt4o.prices == UnitPrices(
        Decimal("2.5"),
        Decimal(10),
        Decimal("1.25"),
        Decimal("2.5"),
        CATALOG,
        catalog_model="gpt-4o",
        catalog_provider="openai",
        web_search=Decimal("0.01"),  # $10 per 1000 web searches
    )
    mini = pb.price("gpt-4o-mini-2024-07-18", "openai", usage)
    assert mini is not None
    # 800 * 0.15 + 200 * 0.075 + 500 * 0.6 = 120 + 15 + 300 = 435 -> 0.000435 USD
    assert mini.cost_nanos == 435_000
    sonnet = pb.price(
        "claude-sonnet-4-20250514",
        "anthropic",
        TokenUsage(input=10_000, output=1_000, cache_read=6_000, cache_write=2_000),
    )
    assert sonnet is not None
    # 2000 * 3 + 6000 * 0.3 + 2000 * 3.75 + 1000 * 15 = 6000 + 1800 + 7500 + 15000 = 30300
    assert sonnet.cost_nanos == 30_300_000
    assert (sonnet.prices.cache_read, sonnet.prices.cache_write) == (Decimal("0.3"), Decimal("3.75"))


def test_catalog_without_cache_price_uses_input_price() -> None:
    unit = PriceBook().unit_prices("mistral-large-latest", "mistral")
    assert unit is not None
    assert unit.cache_read == unit.input == unit.cache_write == Decimal(2)


def test_per_request_fee_and_reasoning_price_from_catalog() -> None:
    pb = PriceBook()
    sonar = pb.price("sonar", "perplexity", TokenUsage(input=1000, output=1000))
    assert sonar is not None
    # 2000 tokens at $1/MTok + $12 per 1000 requests
    assert sonar.cost_nanos == 2_000_000 + 12_000_000
    assert sonar.prices.per_request == Decimal("0.012")
    deep = pb.price("sonar-deep-research", "perplexity", TokenUsage(input=1000, output=1000, reasoning=600))
    assert deep is not None
    # 1000 * 2 + 400 * 8 + 600 * 3 = 7000 USD-per-MTok-tokens
    assert deep.cost_nanos == 7_000_000
    assert deep.prices.reasoning == Decimal(3)


@pytest.mark.parametrize(
    ("model", "provider", "catalog_model", "catalog_provider"),
    [
        ("gpt-4o-mini-2024-07-18", "openai", "gpt-4o-mini", "openai"),
        ("gpt-4o-mini-2024-07-18", None, "gpt-4o-mini", "openai"),
        ("gpt-4o-2024-11-20", "openai", "gpt-4o", "openai"),
        ("gpt-4o-2024-05-13", "openai", "gpt-4o-2024-05-13", "openai"),  # its own (older) price
        ("gpt-4.1-2025-04-14", None, "gpt-4.1", "openai"),
        ("o3-mini-2025-01-31", "openai", "o3-mini", "openai"),
        ("openai/gpt-4o", None, "gpt-4o", "openai"),
        ("models/gemini-2.5-pro", "google_genai", "gemini-2.5-pro", "google"),
        ("claude-sonnet-4-20250514", None, "claude-sonnet-4-0", "anthropic"),
        ("deepseek-chat", "openai", "deepseek-chat", "deepseek"),  # ChatOpenAI pointed at DeepSeek
        (
            "anthropic.claude-3-5-sonnet-20240620-v1:0",
            "bedrock",
            "regional.anthropic.claude-3-5-sonnet-20240620-v1:0",
            "aws",
        ),
    ],
)
def test_model_names_resolve(model: str, provider: str | None, catalog_model: str, catalog_provider: str) -> None:
    unit = PriceBook().unit_prices(model, provider)
    assert unit is not None
    assert (unit.catalog_model, unit.catalog_provider) == (catalog_model, catalog_provider)


def test_dated_name_with_older_price_is_not_confused() -> None:
    pb = PriceBook()
    old = pb.unit_prices("gpt-4o-2024-05-13", "openai")
    new = pb.unit_prices("gpt-4o-2024-08-06", "openai")
    assert old is not None and new is not None
    assert (old.input, old.output) == (Decimal(5), Decimal(15))
    assert (new.input, new.output) == (Decimal("2.5"), Decimal(10))


# --------------------------------------------------------------------------------------------------
# Tiers
# --------------------------------------------------------------------------------------------------


def test_tiers_are_cliffs_on_total_input_tokens() -> None:
    pb = PriceBook()
    below = pb.unit_prices("gemini-2.5-pro", "google_genai", 200_000)
    above = pb.unit_prices("gemini-2.5-pro", "google_genai", 200_001)
    assert below is not None and above is not None
    assert (below.input, below.output, below.cache_read) == (Decimal("1.25"), Decimal(10), Decimal("0.125"))
    assert (above.input, above.output, above.cache_read) == (Decimal("2.5"), Decimal(15), Decimal("0.25"))

    at_threshold = pb.price("gemini-2.5-pro", "google_genai", TokenUsage(input=200_000, output=1_000))
    over = pb.price("gemini-2.5-pro", "google_genai", TokenUsage(input=200_001, output=1_000))
    assert at_threshold is not None and over is not None
    assert at_threshold.cost_nanos == 200_000 * 1250 + 1_000 * 10_000  # 0.26 USD
    # Crossing the threshold reprices ALL tokens, output included: 200001 * 2.5 + 1000 * 15
    assert over.cost_nanos == 200_001 * 2500 + 1_000 * 15_000
    assert over.cost_nanos == 515_002_500
    # Cached tokens count towards the threshold (the whole prompt decides the tier).
    cached = pb.price("gemini-2.5-pro", "google_genai", TokenUsage(input=200_001, output=0, cache_read=200_000))
    assert cached is not None
    assert cached.cost_nanos == 1 * 2500 + 200_000 * 250
    assert cached.prices.cache_read == Decimal("0.25")


def test_multi_tier_model() -> None:
    pb = PriceBook()
    inputs = {32_000: "0.195", 32_001: "0.325", 128_000: "0.325", 128_001: "0.52"}
    for tokens, price in inputs.items():
        unit = pb.unit_prices("qwen/qwen3-coder-flash", "openrouter", tokens)
        assert unit is not None and unit.input == Decimal(price), tokens
        call = pb.price("qwen/qwen3-coder-flash", "openrouter", TokenUsage(input=tokens))
        assert call is not None
        assert call.cost_nanos == usd_to_nanos(Decimal(price) * tokens / 1_000_000)
        assert call.cost_nanos == _reference_nanos("qwen/qwen3-coder-flash", "openrouter", TokenUsage(input=tokens))


def test_estimate_uses_the_tier() -> None:
    pb = PriceBook()
    assert pb.estimate_nanos("gemini-2.5-pro", "google", 100_000, 1_000) == 100_000 * 1250 + 1_000 * 10_000
    assert pb.estimate_nanos("gemini-2.5-pro", "google", 300_000, 1_000) == 300_000 * 2500 + 1_000 * 15_000


# --------------------------------------------------------------------------------------------------
# Effective dates
# --------------------------------------------------------------------------------------------------


def test_price_change_dates() -> None:
    pb = PriceBook()
    before = pb.unit_prices("o3", "openai", at=datetime(2025, 6, 9, 23, 59, tzinfo=UTC))
    after = pb.unit_prices("o3", "openai", at=datetime(2025, 6, 10, 0, 0, tzinfo=UTC))
    assert before is not None and after is not None
    assert (before.input, before.output) == (Decimal(10), Decimal(40))
    assert (after.input, after.output) == (Decimal(2), Decimal(8))
    call = pb.price("o3", "openai", TokenUsage(input=1_000_000), at=datetime(2025, 1, 1, tzinfo=UTC))
    assert call is not None and call.cost_nanos == 10_000_000_000


def test_next_change() -> None:
    snap = data_snapshot.get_snapshot()
    _, deepseek = snap.find_provider_model("deepseek-chat", None, "deepseek", None)
    assert p_catalog._next_change(deepseek, datetime(2025, 3, 1, 16, 0, tzinfo=UTC)) == datetime(
        2025, 3, 1, 16, 30, tzinfo=UTC
    )
    assert p_catalog._next_change(deepseek, datetime(2025, 3, 1, 17, 0, tzinfo=UTC)) == datetime(
        2025, 3, 2, 0, 30, tzinfo=UTC
    )
    _, o3 = snap.find_provider_model("o3", None, "openai", None)
    assert p_catalog._next_change(o3, datetime(2025, 6, 1, 12, 0, tzinfo=UTC)) == datetime(2025, 6, 10, tzinfo=UTC)
    # then the start of its flex / priority tier prices (price_variants), then nothing
    assert p_catalog._next_change(o3, datetime(2025, 7, 1, tzinfo=UTC)) == datetime(2026, 10, 12, tzinfo=UTC)
    assert p_catalog._next_change(o3, datetime(2026, 10, 20, tzinfo=UTC)) is None


def test_cache_honours_the_next_price_change(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = {"now": datetime(2025, 3, 1, 16, 20, tzinfo=UTC), "mono": 1000.0}
    monkeypatch.setattr(p_book, "_utcnow", lambda: clock["now"])
    monkeypatch.setattr(p_book, "_monotonic", lambda: clock["mono"])
    pb = PriceBook()
    usage = TokenUsage(input=1_000_000)
    peak = pb.price("deepseek-chat", "deepseek", usage)
    assert peak is not None and peak.prices.input == Decimal("0.27")
    # 9 minutes later: still cached, still the peak price.
    clock["now"], clock["mono"] = datetime(2025, 3, 1, 16, 29, tzinfo=UTC), 1540.0
    again = pb.price("deepseek-chat", "deepseek", usage)
    assert again is not None and again.prices.input == Decimal("0.27")
    # Past 16:30 UTC the off-peak price applies, long before the one-hour TTL.
    clock["now"], clock["mono"] = datetime(2025, 3, 1, 16, 31, tzinfo=UTC), 1660.0
    off_peak = pb.price("deepseek-chat", "deepseek", usage)
    assert off_peak is not None
    assert off_peak.prices.input == Decimal("0.135")
    assert off_peak.cost_nanos == 135_000_000


def test_cache_entries_expire_after_ttl(monkeypatch: pytest.MonkeyPatch) -> None:
    mono = {"t": 0.0}
    monkeypatch.setattr(p_book, "_monotonic", lambda: mono["t"])
    calls: list[str] = []
    real = p_catalog._find_in_catalog

    def counting(snapshot: Any, model: str, provider: str | None) -> Any:
        calls.append(model)
        return real(snapshot, model, provider)

    monkeypatch.setattr(p_catalog, "_find_in_catalog", counting)
    pb = PriceBook(ttl=60)
    for _ in range(5):
        pb.price("gpt-4o", "openai", TokenUsage(input=1))
        pb.price("made-up-model-for-ttl", "openai", TokenUsage(input=1))  # misses are cached too
    assert calls == ["gpt-4o", "made-up-model-for-ttl"]
    mono["t"] = 61.0
    pb.price("gpt-4o", "openai", TokenUsage(input=1))
    assert calls == ["gpt-4o", "made-up-model-for-ttl", "gpt-4o"]


# --------------------------------------------------------------------------------------------------
# Tools
# --------------------------------------------------------------------------------------------------


def test_tool_prices() -> None:
    pb = PriceBook(tool_prices={"web_search": "0.01", "Calculator": 0, "maps": 0.005, "ocr": Decimal("0.0000000015")})
    assert pb.tool_price_nanos("web_search") == 10_000_000
    assert pb.tool_price_nanos("Calculator") == 0
    assert pb.tool_price_nanos("calculator") == 0
    assert pb.tool_price_nanos("maps") == 5_000_000
    assert pb.tool_price_nanos("ocr") == 2  # 1.5 nanos, half-even
    assert pb.tool_price_nanos("unknown_tool") is None
    assert PriceBook().tool_price_nanos("web_search") is None


@pytest.mark.parametrize(
    ("prices", "needles"),
    [
        ({"search": -1}, ["tool 'search'", "negative"]),
        ({"search": float("nan")}, ["tool 'search'", "finite"]),
        ({"search": "inf"}, ["tool 'search'", "finite"]),
        ({"search": "cheap"}, ["tool 'search'", "must be a number"]),
        ({"search": None}, ["tool 'search'", "must be a number"]),
        ({"search": {"usd": 1}}, ["tool 'search'", "must be a number"]),
        ({"": 1}, ["tool name ''"]),
    ],
)
def test_bad_tool_prices(prices: dict[str, Any], needles: list[str]) -> None:
    with pytest.raises(ConfigurationError) as info:
        PriceBook(tool_prices=prices)
    for needle in needles:
        assert needle in str(info.value)


# --------------------------------------------------------------------------------------------------
# Refresh
# --------------------------------------------------------------------------------------------------


def _fake_snapshot(gpt4o_input: str) -> data_snapshot.DataSnapshot:
    provider = gp_types.Provider(
        id="openai",
        name="OpenAI",
        api_pattern=r"https://api\.openai\.com",
        model_match=gp_types.ClauseStartsWith(starts_with="gpt-"),
        models=[
            gp_types.ModelInfo(
                id="gpt-4o",
                match=gp_types.ClauseEquals(equals="gpt-4o"),
                prices=gp_types.ModelPrice(input_mtok=Decimal(gpt4o_input), output_mtok=Decimal(12)),
            )
        ],
    )
    return data_snapshot.DataSnapshot(
        providers=[provider], from_auto_update=True, timestamp=datetime(2030, 1, 2, 3, 4, 5)
    )


def test_refresh_offline_does_not_block_or_break(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The default fetcher (genai-prices' UpdatePrices.fetch) with the network down, without sending anything.
    attempts: list[str] = []
    gate = threading.Event()

    def offline_get(url: str, **_: Any) -> Any:
        attempts.append(url)
        gate.wait(5)  # a slow, failing network: construction must not wait for it
        raise httpx2.ConnectError("[Errno -2] Name or service not known")

    monkeypatch.setattr(httpx2, "get", offline_get)
    caplog.set_level(logging.DEBUG, logger="costobs_callbacks")
    started = time.perf_counter()
    pb = PriceBook(refresh=True)
    construction = time.perf_counter() - started
    try:
        assert construction < 0.5
        call = pb.price("gpt-4o", "openai", TokenUsage(input=1000, output=500, cache_read=200))
        assert call is not None and call.cost_nanos == 7_250_000
        gate.set()
        assert pb.wait_refreshed(10)  # the (failed) attempt is over
        assert attempts == [genai_prices.update_prices.DEFAULT_UPDATE_URL]
        after = pb.price("gpt-4o", "openai", TokenUsage(input=1000, output=500, cache_read=200))
        assert after is not None and after.cost_nanos == 7_250_000
        assert after.prices.source == CATALOG
        failures = [r for r in caplog.records if r.name == "costobs_callbacks" and "refresh failed" in r.message]
        assert [r.levelno for r in failures] == [logging.INFO]
    finally:
        pb.close()


def test_refreshed_data_invalidates_the_cache_but_not_overrides() -> None:
    pb = PriceBook({"gpt-4o-mini": {"input": 9, "output": 9}}, refresh_fetcher=lambda: _fake_snapshot("3"))
    usage = TokenUsage(input=1_000_000, output=1_000_000)
    before = pb.price("gpt-4o", "openai", usage)
    assert before is not None and before.cost_nanos == 12_500_000_000
    assert pb.refresh_now() is True
    after = pb.price("gpt-4o", "openai", usage)
    assert after is not None
    assert after.cost_nanos == 15_000_000_000
    assert after.prices.source == f"{CATALOG} (refreshed 2030-01-02T03:04:05)"
    override = pb.price("gpt-4o-mini", "openai", usage)
    assert override is not None and override.prices.source == "override"
    assert override.cost_nanos == 18_000_000_000


def test_background_refresh_with_a_fetcher() -> None:
    pb = PriceBook(refresh=True, refresh_fetcher=lambda: _fake_snapshot("4"))
    try:
        assert pb.wait_refreshed(10)
        call = pb.price("gpt-4o", "openai", TokenUsage(input=1_000_000))
        assert call is not None and call.cost_nanos == 4_000_000_000
    finally:
        pb.close()


def test_odd_refreshed_data_never_raises(caplog: pytest.LogCaptureFixture) -> None:
    snapshot = _fake_snapshot("NaN")
    pb = PriceBook(refresh_fetcher=lambda: snapshot)
    assert pb.refresh_now() is True
    caplog.set_level(logging.WARNING, logger="costobs_callbacks")
    assert pb.price("gpt-4o", "openai", TokenUsage(input=1)) is None
    assert len(_unpriced_warnings(caplog)) == 1


def test_failed_refresh_keeps_prices() -> None:
    def broken() -> data_snapshot.DataSnapshot:
        raise OSError("network is unreachable")

    pb = PriceBook(refresh_fetcher=broken)
    assert pb.refresh_now() is False
    unit = pb.unit_prices("gpt-4o", "openai")
    assert unit is not None and unit.input == Decimal("2.5") and unit.source == CATALOG
    pb.close()  # no thread: a no-op


# --------------------------------------------------------------------------------------------------
# Speed (printed, not asserted)
# --------------------------------------------------------------------------------------------------


def test_cached_price_timing(capsys: pytest.CaptureFixture[str]) -> None:
    pb = PriceBook()
    usage = TokenUsage(input=1000, output=500, cache_read=200)
    gp_usage = Usage(input_tokens=1000, output_tokens=500, cache_read_tokens=200)
    assert pb.price("gpt-4o", "openai", usage) is not None
    assert pb.price("gemini-2.5-pro", "google_genai", usage) is not None
    n = 20_000
    timings: dict[str, float] = {}
    cases: list[tuple[str, Callable[[], object]]] = [
        ("cached price() gpt-4o", lambda: pb.price("gpt-4o", "openai", usage)),
        ("cached price() gemini-2.5-pro (tiered)", lambda: pb.price("gemini-2.5-pro", "google_genai", usage)),
        ("genai_prices.calc_price gpt-4o", lambda: calc_price(gp_usage, "gpt-4o", provider_id="openai")),
    ]
    for label, fn in cases:
        reps = n if "cached" in label else n // 20
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        timings[label] = (time.perf_counter() - start) / reps * 1e6
    with capsys.disabled():
        print()
        for label, us in timings.items():
            print(f"  {label}: {us:.2f} µs")


# --------------------------------------------------------------------------------------------------
# What a provider reports beside the counts (UsageDetail): one-hour cache writes, web searches, tiers
# --------------------------------------------------------------------------------------------------

SONNET_1H = (10_000, 1_000, 2_000, 6_000, 0)  # 10k in: 2k read, 6k written (all one-hour), 2k uncached


def test_one_hour_cache_writes_at_the_catalog_price() -> None:
    pb = PriceBook()
    # 2000 * 3 + 2000 * 0.3 + 6000 * 6 + 1000 * 15 = 57600 USD-per-MTok-tokens (at the 5-minute price: 44100)
    priced = pb.price_nanos("claude-sonnet-4-20250514", "anthropic", SONNET_1H, UsageDetail(cache_write_1h=6_000))
    assert priced is not None and priced[0] == 57_600_000
    assert priced[1].cache_write_1h == Decimal(6) and priced[1].cache_write == Decimal("3.75")
    five_minutes = pb.price_nanos("claude-sonnet-4-20250514", "anthropic", SONNET_1H)
    assert five_minutes is not None and five_minutes[0] == 44_100_000
    # mixed lifetimes, web searches ($10 per thousand), and the same through price()
    detail = UsageDetail(cache_write_1h=4_000, web_search_requests=3)
    call = pb.price("claude-sonnet-4-20250514", "anthropic", TokenUsage(*SONNET_1H), detail=detail)
    # 6000 + 600 + 2000 * 3.75 + 4000 * 6 + 15000 = 53100 -> $0.0531, + $0.03
    assert call is not None and call.cost_nanos == 83_100_000
    assert call.cost_nanos == _reference_detail_nanos("claude-sonnet-4-0", "anthropic", SONNET_1H, detail)


def _reference_detail_nanos(model: str, provider_id: str, tokens: tuple[int, int, int, int, int],
                            detail: UsageDetail) -> int:
    """genai-prices' own figure for a call with a detail (its price_context for a tier)."""
    inp, out, cr, cw, rsn = tokens
    gp_usage = Usage(input_tokens=inp, output_tokens=out, cache_read_tokens=cr, cache_write_tokens=cw,
                     cache_write_1h_tokens=detail.cache_write_1h, output_reasoning_tokens=rsn,
                     web_searches=detail.web_search_requests)
    tier = detail.service_tier
    context = None if tier is None else ({"processing": "batch"} if tier == "batch" else {"service_tier": tier})
    return usd_to_nanos(calc_price(gp_usage, model, provider_id=provider_id, price_context=context).total_price)


@pytest.mark.parametrize(
    ("model", "provider", "catalog", "provider_id", "tier"),
    [
        ("gpt-5", "openai", "gpt-5", "openai", "flex"),
        ("gpt-5", "openai", "gpt-5", "openai", "priority"),
        ("gpt-5", "openai", "gpt-5", "openai", "batch"),
        ("o3", "openai", "o3", "openai", "flex"),
        ("claude-sonnet-4-5", "anthropic", "claude-sonnet-4-5", "anthropic", "batch"),  # tiered batch prices
        ("claude-sonnet-4-5", "anthropic", "claude-sonnet-4-5", "anthropic", None),
    ],
)
def test_service_tiers_agree_with_calc_price(model: str, provider: str, catalog: str, provider_id: str,
                                             tier: str | None) -> None:
    pb = PriceBook()
    assert pb.has_tier(model, provider, tier)
    for tokens in [(10_000, 1_000, 2_000, 0, 0), (250_000, 3_000, 100_000, 20_000, 0), (1, 1, 0, 0, 0)]:
        for detail in (UsageDetail(service_tier=tier), UsageDetail(cache_write_1h=tokens[3], service_tier=tier,
                                                                   web_search_requests=2)):
            priced = pb.price_nanos(model, provider, tokens, detail)
            assert priced is not None
            assert priced[0] == _reference_detail_nanos(catalog, provider_id, tokens, detail), (tokens, detail)
            assert priced[1].service_tier == tier


def test_gpt5_flex_figure_and_unpriced_tiers() -> None:
    pb = PriceBook()
    tokens = (10_000, 1_000, 2_000, 0, 0)
    flex = pb.price_nanos("gpt-5", "openai", tokens, UsageDetail(service_tier="flex"))
    # 8000 * 0.625 + 2000 * 0.0625 + 1000 * 5 = 10125
    assert flex is not None and flex[0] == 10_125_000 and flex[1].input == Decimal("0.625")
    standard = pb.price_nanos("gpt-5", "openai", tokens)
    assert standard is not None and standard[0] == 20_250_000
    # a tier the catalog lacks: the standard price (the adapter flags it tier_unpriced)
    assert not pb.has_tier("gpt-5", "openai", "scale")
    scale = pb.price_nanos("gpt-5", "openai", tokens, UsageDetail(service_tier="scale"))
    assert scale == standard
    assert pb.has_tier("gpt-5", "openai", "default") and pb.has_tier("gpt-5", "openai", None)
    # an override has no tier prices
    ob = book(m={"input": 1, "output": 2})
    assert not ob.has_tier("m", None, "flex")
    assert ob.price_nanos("m", None, tokens, UsageDetail(service_tier="flex")) == ob.price_nanos("m", None, tokens)


def test_override_one_hour_cache_write_price(tmp_path: Path) -> None:
    pb = book(m={"input": 3, "output": 15, "cache_read": "0.3", "cache_write": "3.75", "cache_write_1h": 6})
    priced = pb.price_nanos("m", None, SONNET_1H, UsageDetail(cache_write_1h=6_000))
    assert priced is not None and priced[0] == 57_600_000
    default = book(m={"input": 3, "output": 15, "cache_read": "0.3", "cache_write": "3.75"})
    priced = default.price_nanos("m", None, SONNET_1H, UsageDetail(cache_write_1h=6_000))
    assert priced is not None and priced[0] == 44_100_000  # cache_write_1h defaults to cache_write
    path = tmp_path / "p.yaml"
    path.write_text("m: {input: 3, output: 15, cache_write: 3.75, cache_write_1h: 6}\n", encoding="utf-8")
    assert load_price_file(path)["m"]["cache_write_1h"] == Decimal(6)
    path.write_text("m: {input: 3, output: 15, cache_write_1h: -6}\n", encoding="utf-8")
    with pytest.raises(ConfigurationError, match=r"'cache_write_1h'.*negative"):
        load_price_file(path)


# --------------------------------------------------------------------------------------------------
# Bounds: no cost passes 2^63 nano-USD
# --------------------------------------------------------------------------------------------------


def test_the_dearest_call_stays_below_two_to_the_63() -> None:
    top = str(p_rates._MAX_PRICE)
    pb = book(m={"input": top, "output": top, "cache_read": top, "cache_write": top, "cache_write_1h": top})
    huge = 10**30
    for tokens in [(huge, huge, 0, 0, 0), (huge, huge, huge, huge, huge), (-huge, huge, huge, 0, 0)]:
        priced = pb.price_nanos("m", None, tokens, None)
        assert priced is not None and priced[0] <= 2 * p_rates.MAX_TOKENS * 10**9 < 2**63
        detail = pb.price_nanos("m", None, tokens, UsageDetail(huge, None, huge))
        assert detail is not None and detail[0] < 2**63
    # the proof's bound, with a per-request fee and web searches at the largest catalog prices allowed
    unit = UnitPrices(p_rates._MAX_PRICE, p_rates._MAX_PRICE, p_rates._MAX_PRICE, p_rates._MAX_PRICE, "x",
                      per_request=p_rates._MAX_PRICE / 1000, web_search=p_rates._MAX_PRICE / 1000,
                      cache_write_1h=p_rates._MAX_PRICE, reasoning=p_rates._MAX_PRICE)
    worst = p_rates._Rates(unit).nanos_detail(huge, huge, huge, huge, huge, huge, huge)
    assert worst == 2 * 10**18 + 10**12 + 10**18 < 2**63
    with pytest.raises(ConfigurationError, match="implausibly large"):
        book(m={"input": p_rates._MAX_PRICE + 1, "output": 1})


def test_catalog_price_out_of_bounds_is_unpriced(caplog: pytest.LogCaptureFixture) -> None:
    mp = gp_types.ModelPrice(input_mtok=Decimal(10**7), output_mtok=Decimal(1))
    assert p_catalog._catalog_unit_prices(mp, None, "src", "m", "p") is None
    assert "implausible price" in caplog.text


# --------------------------------------------------------------------------------------------------
# The flat-rate shortcut against the general path (one answer)
# --------------------------------------------------------------------------------------------------


def test_flat_shortcut_keeps_per_request_fees() -> None:
    pb = PriceBook()
    assert pb.price_nanos("sonar", "perplexity", (1000, 1000, 0, 0, 0)) is not None
    entry = pb._cache[("sonar", "perplexity")]
    assert entry.flat is not None and entry.flat[2] == 12_000_000  # the shortcut is taken, with the fee
    # 2000 tokens at $1/MTok + $12 per 1000 requests, shortcut and general path alike
    assert pb.price_nanos("sonar", "perplexity", (1000, 1000, 0, 0, 0)) == (14_000_000, entry.flat[3])
    assert pb.price_nanos("sonar", "perplexity", (1000, 1000, 1, 0, 0)) == (14_000_000, entry.flat[3])
    assert pb.estimate_nanos("sonar", "perplexity", 1000, 1000) == 14_000_000
    assert pb.estimate_nanos("sonar", "perplexity", 0, 0) == 12_000_000
    assert pb.estimate_upper_nanos("sonar", "perplexity", 1000, 1000) == 14_000_000


def _oracle(unit: UnitPrices, tokens: tuple[int, int, int, int, int], detail: UsageDetail | None) -> int:
    """The documented arithmetic, in exact Decimal: counts clamped, one half-even rounding to a nano-USD."""
    import decimal

    inp, out, cr, cw, rsn = tokens
    w1h, web = (detail.cache_write_1h, detail.web_search_requests) if detail is not None else (0, 0)
    m = p_rates.MAX_TOKENS
    inp, out = min(max(inp, 0), m), min(max(out, 0), m)
    cr = min(max(cr, 0), inp)
    cw = min(max(cw, 0), inp - cr)
    rsn = min(max(rsn, 0), out)
    w1h = min(max(w1h, 0), cw)
    web = min(max(web, 0), p_rates.MAX_REQUESTS)
    with decimal.localcontext() as ctx:
        ctx.prec = 200
        one_h = unit.cache_write if unit.cache_write_1h is None else unit.cache_write_1h
        rsn_price = unit.output if unit.reasoning is None else unit.reasoning
        per_mtok = ((inp - cr - cw) * unit.input + cr * unit.cache_read + (cw - w1h) * unit.cache_write
                    + w1h * one_h + (out - rsn) * unit.output + rsn * rsn_price)
        usd = per_mtok / 1_000_000 + unit.per_request + web * unit.web_search
        return int((usd * 1_000_000_000).to_integral_value(rounding=decimal.ROUND_HALF_EVEN))


def _decimals(unit: UnitPrices) -> list[Decimal]:
    return [p for p in (unit.input, unit.output, unit.cache_read, unit.cache_write, unit.per_request, unit.reasoning,
                        unit.cache_write_1h, unit.web_search) if p is not None]


PRICE = st.builds(lambda n, p: Decimal(n).scaleb(-p), st.integers(0, 10**12), st.integers(0, 18)) | st.sampled_from(
    [Decimal(0), Decimal("0.15"), Decimal("2.5"), Decimal(15), Decimal("0.041666666666666664"), Decimal("0.0005")])
COUNTS = st.integers(-10, 10**6) | st.integers(-(10**12), 10**12) | st.just(0)
TOKENS = st.tuples(COUNTS, COUNTS, COUNTS, COUNTS, COUNTS)
DETAILS = st.none() | st.builds(UsageDetail, COUNTS, st.none(), COUNTS)


# Prices in whole thousandths of a dollar (and fees in whole thousandths per request): no rounding, one rate per
# entry without tiers, which is what the flat shortcut of _Entry.nanos takes.
CENTS = st.builds(lambda n, p: Decimal(n).scaleb(-p), st.integers(0, 10**9), st.integers(0, 3))


@st.composite
def units(draw: st.DrawFn, flat: bool = False) -> UnitPrices:
    price = CENTS if flat else PRICE
    fee = CENTS if flat else PRICE.map(lambda p: p / 1000)
    return UnitPrices(
        draw(price), draw(price), draw(price), draw(price), "override",
        per_request=draw(st.just(Decimal(0)) | fee),
        reasoning=draw(st.none() | price),
        cache_write_1h=draw(st.none() | price),
        web_search=draw(st.just(Decimal(0)) | fee),
    )


@hyp_settings(max_examples=400, deadline=None)
@given(base=units() | units(flat=True), tier=st.none() | st.tuples(st.integers(0, 10**6), units()), tokens=TOKENS,
       detail=DETAILS)
def test_flat_shortcut_price_and_rates_agree(base: UnitPrices, tier: tuple[int, UnitPrices] | None,
                                             tokens: tuple[int, int, int, int, int],
                                             detail: UsageDetail | None) -> None:
    """_Entry.nanos (through price_nanos and price: its flat shortcut where it applies), _Rates.nanos /
    nanos_detail and an exact Decimal oracle: one answer for any prices (tiers, per-request fees, many decimal
    places) and any counts (malformed ones too), with and without a detail; the estimates likewise."""
    pb = PriceBook()
    tiers = () if tier is None else ((tier[0], p_rates._Rates(tier[1])),)
    entry = p_rates._Entry(p_rates._Rates(base), tiers, float("inf"))
    if tier is None and all(p_rates._places(p) <= 3 for p in _decimals(base)):
        assert entry.flat is not None  # the shortcut is what is tested here
    pb._cache[("m", None)] = entry
    unit = tier[1] if tier is not None and tokens[0] > tier[0] else base
    rates = entry.rates(tokens[0])
    assert rates is not None and rates.unit is unit
    expected = _oracle(unit, tokens, detail)
    assert pb.price_nanos("m", None, tokens, detail) == (expected, unit)
    call = pb.price("m", None, TokenUsage(*tokens), detail=detail)
    assert call is not None and (call.cost_nanos, call.prices) == (expected, unit)
    if detail is None:
        assert rates.nanos(*tokens) == expected
    assert rates.nanos_detail(*tokens, 0, 0) == rates.nanos(*tokens) == _oracle(unit, tokens, None)
    inp, out = tokens[0], tokens[1]
    est_unit = entry.rates(inp)
    assert est_unit is not None
    assert pb.estimate_nanos("m", None, inp, out) == est_unit.nanos(inp, out, 0, 0, 0) == _oracle(
        est_unit.unit, (inp, out, 0, 0, 0), None)
    if tier is None:  # one rate: the upper bound of the estimate is the estimate
        assert pb.estimate_upper_nanos("m", None, inp, out) == pb.estimate_nanos("m", None, inp, out)


MOSTLY_ZERO = st.just(0) | st.just(0) | COUNTS
EDGES = COUNTS | st.integers(p_rates.MAX_TOKENS - 2, p_rates.MAX_TOKENS + 2) | st.integers(-3, -1)


@hyp_settings(max_examples=300, deadline=None)
@given(unit=units(flat=True), tokens=st.tuples(EDGES, EDGES, MOSTLY_ZERO, MOSTLY_ZERO, MOSTLY_ZERO))
def test_the_flat_shortcut_equals_the_general_path(unit: UnitPrices, tokens: tuple[int, int, int, int, int]) -> None:
    """An entry of one rate without rounding takes the shortcut of ``_Entry.nanos`` for calls without cache or
    reasoning tokens: it gives ``_Rates.nanos`` and the exact Decimal figure, per-request fees, out-of-range counts
    and separate reasoning prices included."""
    entry = p_rates._Entry(p_rates._Rates(unit), (), float("inf"))
    assert entry.flat is not None
    assert entry.nanos(tokens) == (entry.rates(tokens[0]).nanos(*tokens), unit)  # type: ignore[union-attr]
    assert entry.nanos(tokens) == (_oracle(unit, tokens, None), unit)


# --------------------------------------------------------------------------------------------------
# One home for name variants and provider names
# --------------------------------------------------------------------------------------------------


@hyp_settings(max_examples=300, deadline=None)
@given(
    model=st.lists(st.sampled_from(["gpt-4o", "openai", "azure", "m", "", "v1:0", "-2024-07-18", "20250514", "@",
                                    "/", "x"]), min_size=1, max_size=6).map("".join),
    provider=st.none() | st.sampled_from(["openai", "anthropic", "Azure"]),
)
def test_override_names_are_the_catalog_name_forms(model: str, provider: str | None) -> None:
    """An override is looked up under the names the catalog is (``_model_refs``), headed by the provider-prefixed
    forms: the two lookups cannot drift apart."""
    if not model:
        return
    names = p_names._override_names(model, provider)
    refs = [ref for ref, _ in p_names._model_refs(model)]
    extra = [] if not provider else [f"{provider}/{model}"]
    if provider and p_names._DATE_SUFFIX.sub("", f"{provider}/{model}") != f"{provider}/{model}":
        extra.append(p_names._DATE_SUFFIX.sub("", f"{provider}/{model}"))
    assert sorted(names) == sorted(extra + refs)
    if provider:
        assert names[0] == f"{provider}/{model}"
    # exact names before undated ones
    exact, undated = p_names._name_forms(model)
    positions = {n: i for i, n in reversed(list(enumerate(names)))}
    assert all(positions[e] < positions[u] for e, _ in exact for u, _ in undated if u not in dict(exact))


@pytest.mark.parametrize(
    ("name", "provider"),
    [
        ("OpenAI", "openai"), ("openai_llm", "openai"), ("AzureOpenAI", "azure"), ("azure_openai_llm", "azure"),
        ("Anthropic", "anthropic"), ("Gemini", "google"), ("GoogleGenAI", "google"), ("Vertex", "google"),
        ("BedrockConverse", "aws"), ("Bedrock", "aws"), ("MistralAI", "mistral"), ("Groq", "groq"),
        ("Cohere", "cohere"), ("DeepSeek", "deepseek"), ("OpenRouter", "openrouter"), ("Ollama", "ollama"),
        ("OpenAILike", None), ("MockLLM", None), ("CustomLLM", None),
    ],
)
def test_provider_names_have_one_home(name: str, provider: str | None) -> None:
    assert p_names.provider_from_name(name) == provider
    if provider is not None:
        assert p_names.provider_id(provider) == provider  # already the catalog's id


def test_adapters_use_the_pricing_provider_names() -> None:
    from costobs_callbacks.integrations.llamaindex import identity

    assert identity.provider_from_class_name("azure_openai_llm") == "azure"
    assert identity.provider_from_class_name(3) is None

    class Fake:
        pass

    Fake.__module__ = "llama_index.llms.google_genai.base"
    assert identity.provider_of(Fake) == "google"
    Fake.__module__ = "llama_index.llms.openai_like.base"
    assert identity.provider_of(Fake) is None
