"""``loraforge serve``: an OpenAI-compatible server for many adapters on one base model.

``engine`` owns the model and batches every running request, of any adapter, into one forward
per step; ``server`` is the HTTP side (FastAPI); ``cli`` the command.
"""
