"""moxco.agent.integrations: attach the agent to training frameworks with one line.

* ``moxco.agent.integrations.huggingface.MoxcoCallback``: a ``transformers.TrainerCallback``;
* ``moxco.agent.integrations.lightning.MoxcoCallback``: a ``lightning.pytorch.Callback``.

Each module imports its framework only when it is imported itself, so ``moxco.agent`` never
depends on either.
"""
