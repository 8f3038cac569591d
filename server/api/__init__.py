"""The API side: what an API-server process runs (``python -m server`` starts
``--api-server-count`` of them; ``server.api.api_server``).

HTTP routes (``app``), OpenAI wire types (``protocol``), request semantics and responses
(``serving``, ``completions``, ``responses``, ``tools``, ``grounding``), media fetching and
decoding to uint8 (``media``), the slow-client guards (``clients``, ``middleware``,
``body``), metrics, and the handle on the engine-core process (``engine_client``: ZeroMQ,
messages from ``server.messages``).  Nothing here imports torch; the engine side is
``server.engine``, and what both sides share (settings, errors, keys and limits, the
messages, the text preparation's cut) stays in ``server``.
"""
