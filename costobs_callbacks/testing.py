"""Offline test doubles for apps that use costobs-callbacks (and for our examples and demo).

``FakeChatModel`` is a real langchain-core chat model that never touches the network: it reports
usage (cached and reasoning tokens included) and a served model name exactly like a provider, and
it can follow a plan of tool calls, so agents, budgets and the loop guard can be exercised in tests.
"""

from ._demo import DemoChatModel as FakeChatModel

__all__ = ["FakeChatModel"]
