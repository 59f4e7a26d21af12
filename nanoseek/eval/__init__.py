"""Evaluation as in the DeepSeek-V3 report: perplexity-based multiple choice (mc.py) and generation-based
answer checking (gen.py); run.py drives both over JSONL files and built-in tasks and reports a table and JSON."""
from .run import run_eval, table

__all__ = ["run_eval", "table"]
