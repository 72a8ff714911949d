"""The application around the engine: runtime wiring, stored conversations, the ``hugginggpt`` command.

``agent`` is the HuggingGPT engine (no storage, no Discord); ``storage`` keeps what must survive a restart;
``bot`` is the Discord front end. This package puts them together: the entry point (``app.cli``) builds a
``Runtime`` once and hands it to the front end, which talks to ``Conversations`` only.
"""
