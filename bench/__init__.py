"""Benchmarks of the agent and the bot: ``python -m bench`` runs them all and rewrites BENCHMARKS.md.

One script per question (``planning``, ``economy``, ``scheduling``, ``overhead``, ``discord_latency``,
``embedded_llm``), each runnable alone with ``--smoke`` for a seconds-long run that proves it still works.
"""

__all__: list[str] = []
