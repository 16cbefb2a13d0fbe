"""Callbacks for the frameworks that already run the training: Lightning, the Hugging Face ``Trainer`` (and
accelerate loops) and Keras ``fit``.

Each lives in its own module and imports its framework only when that module is imported, so ``import steadygrad``
never imports any of them; a missing framework gives an ``ImportError`` that names the extra to install::

    from steadygrad.integrations.lightning import SteadygradCallback     # pip install "steadygrad[lightning]"
    from steadygrad.integrations.transformers import SteadygradCallback  # pip install "steadygrad[transformers]"
    from steadygrad.integrations.keras import SteadygradCallback         # pip install "steadygrad[keras]"
"""
