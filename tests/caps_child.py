"""A replica for the spend-cap tests: a real ``CostTracker`` with ``tenant_budgets`` and real ``ChatOpenAI`` calls to
the stub server, from several threads. Run as ``python tests/caps_child.py '<json>'``; prints ``ready``, waits for a
line on stdin, bursts, then prints one JSON line of results and exits.

Each thread calls the model until a call is refused (``BudgetExceededError``), at most ``max_calls`` times."""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import Any


def main(cfg: dict[str, Any]) -> None:
    from langchain_openai import ChatOpenAI

    from costobs_callbacks import BudgetExceededError, CostTracker

    tracker = CostTracker(cfg["url"], user_salt="caps-salt", spool_dir=cfg["spool"], prices=cfg["prices"],
                          tenant_budgets=cfg.get("tenant_budgets"), user_budgets=cfg.get("user_budgets"),
                          cap_refresh_s=cfg.get("refresh", 0.5), export_delay=0.2)
    llm = ChatOpenAI(model=cfg["model"], base_url=cfg["base_url"], api_key="sk-test", max_retries=0,
                     max_tokens=cfg["max_tokens"], timeout=30)
    attrs = cfg.get("attrs", {"tenant_id": "burst"})
    results: list[dict[str, Any]] = []
    lock = threading.Lock()
    go = threading.Event()

    def worker() -> None:
        ok = 0
        refused: str | None = None
        errors: list[str] = []
        go.wait()
        for _ in range(cfg["max_calls"]):
            try:
                llm.invoke(cfg["prompt"], config=tracker.config(**attrs))
                ok += 1
            except BudgetExceededError as exc:
                refused = exc.reason
                break
            except Exception as exc:  # reported to the test, which fails on it
                errors.append(repr(exc))
                break
        with lock:
            results.append({"ok": ok, "refused": refused, "errors": errors})

    threads = [threading.Thread(target=worker) for _ in range(cfg["threads"])]
    for t in threads:
        t.start()
    print("ready", flush=True)
    sys.stdin.readline()
    t0 = time.perf_counter()
    go.set()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    if cfg.get("die"):  # report, then wait to be killed with what it holds (its lease never given back)
        time.sleep(1.0)  # a few rounds: what it spent is reported
        print(json.dumps({"threads": results, "elapsed": elapsed, "stats": tracker.stats}), flush=True)
        time.sleep(600)
    stats = tracker.stats
    tracker.close()
    print(json.dumps({"threads": results, "elapsed": elapsed, "stats": stats,
                      "final_stats": tracker.stats}), flush=True)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
