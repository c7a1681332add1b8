"""The LLaVA model: the embedded tiny recipe, loading any HF LLaVA, the chat/batch encoding, where its parts are and
their shapes. No training code (that is many.loop, many.pretrain, many.training)."""
