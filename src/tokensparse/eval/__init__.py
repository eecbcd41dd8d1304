"""Accuracy evaluations of attention methods on long prompts.

Modules:
    niah           needle-in-a-haystack prompts and the depth x length grid
    ruler          RULER's synthetic tasks (and QA from local SQuAD/HotpotQA files)
    longbench      LongBench from its official JSONL files
    infinitebench  InfiniteBench from its official JSONL files
    metrics        the benchmarks' scoring functions (F1, ROUGE-L, edit similarity, ...)
    haystack       haystack texts: filler, Python's reference prose, or the user's .txt files
    prompts        :class:`Sample` and prompt building helpers
    runner         greedy generation with prefill timing, resumable JSONL results
    results        reading result files
    report         markdown table and plots from result files

Heavy imports (torch, transformers) happen in ``runner`` only; the CLI
(``tokensparse eval ...``, ``tokensparse report``) is the usual entry point.
"""
