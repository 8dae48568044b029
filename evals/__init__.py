"""Evaluation code that train_gpt.py imports and a record inlines (tools/record_pack.py), like data/shards.py and quant/:
evals/phased_ttt.py is record N's phased score-first TTT driver."""
