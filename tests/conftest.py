"""Shared test setup: no network, ever (model code must load local files)."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.pop("OLLAMA_GUARD_CONFIG", None)
