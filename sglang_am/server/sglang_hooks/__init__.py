"""Called by SGLang itself inside its scheduler process: the hook points and the attention backends."""
