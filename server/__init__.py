"""HTTP side of the Qwen3-VL server: settings, OpenAI wire types, routes and serving.

Nothing in this package except ``server.engine`` may import torch; the engine and
``models/`` own every tensor.
"""
