"""HuggingGPT: an LLM plans over Hugging Face models in four stages (plan, select, execute, respond)."""
