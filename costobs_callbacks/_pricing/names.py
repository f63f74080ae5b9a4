"""Names, one home each: provider spellings (LangChain's ``ls_provider``, LlamaIndex's class and module names) as
the catalog knows them, and the forms a reported model name stands for (the catalog look-up and the overrides
both try them)."""

from __future__ import annotations

import functools
import re

__all__ = ["is_local", "provider_from_name", "provider_id"]


# LangChain ``ls_provider`` (and LlamaIndex / common spellings) -> genai-prices provider id.
# Anything not listed is tried as a genai-prices provider id as is (genai-prices also matches ids
# loosely, e.g. anything containing "bedrock" is AWS).
_PROVIDER_IDS: dict[str, str] = {
    "openai": "openai",
    "azure": "azure",
    "azure_openai": "azure",
    "azureopenai": "azure",
    "azure_ai": "azure",
    "anthropic": "anthropic",
    "google": "google",
    "google_genai": "google",
    "google_vertexai": "google",
    "google_anthropic_vertex": "google",
    "vertexai": "google",
    "vertex": "google",
    "gemini": "google",
    "amazon_bedrock": "aws",
    "bedrock": "aws",
    "bedrock_converse": "aws",
    "aws": "aws",
    "mistral": "mistral",
    "mistralai": "mistral",
    "groq": "groq",
    "fireworks": "fireworks",
    "together": "together",
    "deepseek": "deepseek",
    "xai": "x-ai",
    "x_ai": "x-ai",
    "perplexity": "perplexity",
    "cohere": "cohere",
    "openrouter": "openrouter",
    "cerebras": "cerebras",
    "moonshot": "moonshotai",
    "moonshotai": "moonshotai",
    "novita": "novita",
    "zhipuai": "zhipuai",
    "voyageai": "voyageai",
}

# Models served locally cost nothing per token but are not "free" in the catalog's sense either: a name
# like "deepseek-r1:8b" on Ollama must not be billed at DeepSeek's API price. They stay unpriced (and
# flagged) unless the user gives an override (which may well be 0).
_LOCAL_PROVIDERS = frozenset(
    {"ollama", "llamacpp", "llama_cpp", "lmstudio", "gpt4all", "huggingface_pipeline", "vllm", "local"}
)

# Provider spellings found inside a class or payload name (LlamaIndex's ``AzureOpenAI``, ``openai_llm``,
# ``BedrockConverse``...), compared without "_" and "-", longest first (``azureopenai`` before ``openai``);
# spellings under four letters (``aws``, ``xai``) would match inside unrelated names and are left out.
_NAMED_PROVIDERS: tuple[tuple[str, str], ...] = tuple(sorted(
    {k.replace("_", ""): v for k, v in (*_PROVIDER_IDS.items(), *((p, p) for p in _LOCAL_PROVIDERS))
     if len(k.replace("_", "")) >= 4}.items(),
    key=lambda kv: (-len(kv[0]), kv[0]),
))


def provider_id(name: str) -> str:
    """A provider's name as the catalog knows it: a known spelling (``google_genai``, ``bedrock``,
    ``azure_openai``...) -> genai-prices' id (``google``, ``aws``, ``azure``), anything else lowercased as is."""
    n = name.strip().lower()
    return _PROVIDER_IDS.get(n.replace("-", "_"), n)


def is_local(name: str) -> bool:
    """Whether a provider serves models locally (Ollama, llama.cpp, vLLM...): its calls have no catalog price."""
    return name.strip().lower().replace("-", "_") in _LOCAL_PROVIDERS


@functools.lru_cache(maxsize=256)
def provider_from_name(name: str) -> str | None:
    """The provider a class or payload name names (``AzureOpenAI`` -> ``azure``, ``openai_llm`` -> ``openai``,
    ``Ollama`` -> ``ollama``), as ``provider_id`` gives it; ``None`` for none, and for ``*Like`` classes
    (an OpenAI-compatible server of any provider)."""
    n = name.lower().replace("_", "").replace("-", "")
    if "like" in n:
        return None
    for key, pid in _NAMED_PROVIDERS:
        if key in n:
            return pid
    return None


_DATE_SUFFIX = re.compile(r"(?:[-@_](?:\d{4}-\d{2}-\d{2}|\d{8}))$")


def _name_forms(model: str) -> tuple[list[tuple[str, str | None]], list[tuple[str, str | None]]]:
    """The names a reported model name stands for, the one home of name variants (the catalog look-up and the
    overrides both use it): ``(exact, undated)``, each name with the provider id implied by a ``provider/``
    prefix, if any. Exact: the name, it without its first ``provider/`` prefix, its last path segment;
    undated: those without a trailing date (``gpt-4o-mini-2024-07-18`` -> ``gpt-4o-mini``)."""
    exact: list[tuple[str, str | None]] = [(model, None)]
    if "/" in model:
        prefix, rest = model.split("/", 1)
        if rest:
            exact.append((rest, prefix))
        last = model.rsplit("/", 1)[1]
        if last and last != rest:
            exact.append((last, None))
    undated: list[tuple[str, str | None]] = []
    for ref, implied in exact:
        u = _DATE_SUFFIX.sub("", ref)
        if u and u != ref:
            undated.append((u, implied))
    return exact, undated


def _model_refs(model: str) -> list[tuple[str, str | None]]:
    """Names to try in the catalog for a model, exact ones first (see ``_name_forms``)."""
    exact, undated = _name_forms(model)
    return exact + undated


def _override_names(model: str, provider: str | None) -> list[str]:
    """Names an override may be keyed by, in the order tried: ``_name_forms`` of the reported name, each group
    headed by the reported provider's ``provider/model`` form (exact names first, the provider's first)."""
    exact, undated = _name_forms(model)
    if not provider:
        return [ref for ref, _ in exact + undated]
    prefixed = f"{provider}/{model}"
    names = [prefixed] + [ref for ref, _ in exact]
    p_undated = _DATE_SUFFIX.sub("", prefixed)
    if p_undated != prefixed:
        names.append(p_undated)
    names.extend(ref for ref, _ in undated)
    return names
