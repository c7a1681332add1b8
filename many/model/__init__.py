"""The LLaVA model: the embedded tiny recipe, loading any HF LLaVA, and the chat/batch encoding."""
